"""Firewall compiler, case by case: the tables it writes and the decisions they give.

Each case checks simulate() (the data plane's model) against reference_match() and, where the
table layout itself is the point, the tables. Random coverage is in test_compile_property.py.
"""
from __future__ import annotations


import pytest

from fw_builders import (ACK, FIN, SYN, addr, check_table_invariants, direction, icmp, ip,
                         ip_set, make_pkt, rule, tcp, udp)
from netbpf import abi
from netbpf.fw.compile import (Decision, Shape, choose_shape, compile_direction, reference_match,
                            simulate, verdict)
from netbpf.errors import InputError
from netbpf.policy.ir import AddrMatch, Prefix, RuleIR

ALL_ONES = (1 << 64) - 1


def decide(d, pkt, sets=None):
    """simulate's decision, after checking it equals the reference matcher's."""
    c = compile_direction(d, sets)
    got = simulate(c, sets, pkt)
    assert got == reference_match(d, sets, pkt), pkt
    return got


# ---------------------------------------------------------------- each field

def test_empty_direction_uses_default_and_looks_nothing_up():
    for default, expect in (("allow", "default-allow"), ("drop", "default-drop")):
        c = compile_direction(direction(default=default))
        assert (c.nrules, c.ncount, c.field_mask, c.nclasses) == (0, 0, 0, 1)
        assert c.vecs == {} and c.lpm4 == [] and c.ports == {} and c.proto is None
        d = simulate(c, None, tcp("10.0.0.1", "10.0.0.2"))
        assert d == Decision(None, []) and verdict(d, c) == expect


def test_match_all_rule_needs_no_lookup():
    d = direction(rule("all", "drop"))
    c = compile_direction(d)
    assert c.field_mask == 0 and c.nclasses == 1
    assert verdict(decide(d, udp("10.0.0.1", "10.0.0.2")), c) == "drop"


def test_src_prefix_rule_matches_only_inside_prefix():
    d = direction(rule("lan", "drop", src="10.1.0.0/16"))
    c = compile_direction(d)
    assert c.field_mask == 1 << abi.NB_F_SRC
    assert c.lpm4 == [(abi.NB_F_SRC, bytes([10, 1, 0, 0]), 16, c.lpm4[0][3])]
    assert c.vecs[c.lpm4[0][3]] == (0, 1) and c.vecs[c.wild_id[abi.NB_F_SRC]] == (0, 0)
    assert decide(d, tcp("10.1.200.3", "1.1.1.1")).terminal == 0
    assert decide(d, tcp("10.2.0.1", "1.1.1.1")).terminal is None
    assert decide(d, tcp("1.1.1.1", "10.1.0.1")).terminal is None


def test_dst_prefix_rule_looks_at_destination_only():
    d = direction(rule("web", "allow", dst="192.0.2.0/24"), default="drop")
    c = compile_direction(d)
    assert c.field_mask == 1 << abi.NB_F_DST
    assert c.lpm4[0][:3] == (abi.NB_F_DST, bytes([192, 0, 2, 0]), 24)
    assert decide(d, tcp("10.0.0.1", "192.0.2.200")).terminal == 0
    assert decide(d, tcp("192.0.2.200", "10.0.0.1")).terminal is None


def test_prefix_with_host_bits_set_is_canonicalised():
    fam, a = addr("192.0.2.77")
    d = direction(RuleIR("h", "drop", dst=AddrMatch((Prefix(fam, a, 24),))))
    c = compile_direction(d)
    assert c.lpm4[0][:3] == (abi.NB_F_DST, bytes([192, 0, 2, 0]), 24)
    assert decide(d, tcp("10.0.0.1", "192.0.2.1")).terminal == 0
    assert decide(d, tcp("10.0.0.1", "192.0.3.1")).terminal is None


def test_nested_prefixes_carry_the_enclosing_rules():
    d = direction(rule("host", "allow", src="10.1.2.3/32"),
                  rule("net16", "drop", src="10.1.0.0/16"),
                  rule("net8", "allow", src="10.0.0.0/8"),
                  rule("net24", "drop", src="10.1.2.0/24"))
    c = compile_direction(d)
    by_plen = {plen: c.vecs[i][1] for _, _, plen, i in c.lpm4}
    assert by_plen == {8: 0b0100, 16: 0b0110, 24: 0b1110, 32: 0b1111}
    assert decide(d, tcp("10.1.2.3", "1.1.1.1")).terminal == 0
    assert decide(d, tcp("10.1.2.4", "1.1.1.1")).terminal == 1
    assert decide(d, tcp("10.1.3.4", "1.1.1.1")).terminal == 1
    assert decide(d, tcp("10.9.3.4", "1.1.1.1")).terminal == 2
    assert decide(d, tcp("11.0.0.1", "1.1.1.1")).terminal is None


def test_sibling_prefixes_do_not_leak_into_each_other():
    d = direction(rule("a", "drop", src="10.1.0.0/16"), rule("b", "allow", src="10.2.0.0/16"),
                  rule("c", "drop", src="10.2.128.0/17"))
    c = compile_direction(d)
    by_addr = {(a, plen): c.vecs[i][1] for _, a, plen, i in c.lpm4}
    assert by_addr[(bytes([10, 1, 0, 0]), 16)] == 0b001
    assert by_addr[(bytes([10, 2, 128, 0]), 17)] == 0b110
    assert decide(d, tcp("10.2.200.1", "1.1.1.1")).terminal == 1


def test_ipv4_rule_never_matches_ipv6_packet_and_vice_versa():
    d = direction(rule("v4", "drop", src="0.0.0.0/0"), rule("v6", "allow", src="::/0"),
                  default="drop")
    c = compile_direction(d)
    assert [e[2] for e in c.lpm4] == [0] and [e[2] for e in c.lpm6] == [0]
    assert c.vecs[c.wild_id[abi.NB_F_SRC]][1] == 0
    assert decide(d, tcp("10.0.0.1", "10.0.0.2")).terminal == 0
    assert decide(d, tcp("2001:db8::1", "2001:db8::2")).terminal == 1


def test_rule_with_both_families_matches_both():
    d = direction(rule("both", "drop", dst=["10.0.0.0/8", "2001:db8::/32"]))
    c = compile_direction(d)
    assert len(c.lpm4) == len(c.lpm6) == 1
    assert c.lpm6[0][1] == bytes.fromhex("20010db8") + bytes(12)
    assert decide(d, udp("1.1.1.1", "10.9.9.9")).terminal == 0
    assert decide(d, udp("2001::1", "2001:db8:5::1")).terminal == 0
    assert decide(d, udp("2001::1", "2001:db9::1")).terminal is None


def test_proto_rule_uses_exact_array():
    d = direction(rule("udp", "drop", proto=17), rule("tcp", "allow", proto=6))
    c = compile_direction(d)
    assert c.field_mask == 1 << abi.NB_F_PROTO and len(c.proto) == 256
    assert c.vecs[c.proto[17]][1] == 0b01 and c.vecs[c.proto[6]][1] == 0b10
    assert c.vecs[c.proto[47]][1] == 0
    assert decide(d, udp("10.0.0.1", "10.0.0.2")).terminal == 0
    assert decide(d, ip("10.0.0.1", "10.0.0.2", 47)).terminal is None


def test_dport_ranges_split_into_classes():
    d = direction(rule("web", "allow", dport=[80, 443]), rule("high", "drop", dport=(400, 1000)),
                  rule("any-tcp", "allow", proto=6))
    c = compile_direction(d)
    dport = c.ports[1]
    assert set(c.ports) == {1} and len(dport) == 65536
    assert c.vecs[dport[80]][1] == 0b101
    assert c.vecs[dport[399]][1] == 0b100
    assert c.vecs[dport[400]][1] == c.vecs[dport[1000]][1] == 0b110
    assert c.vecs[dport[443]][1] == 0b111
    assert dport[1001] == dport[0] == dport[65535] == dport[79]
    for port, expect in ((80, 0), (443, 0), (500, 1), (1000, 1), (1001, 2), (0, 2), (65535, 2)):
        assert decide(d, tcp("10.0.0.1", "10.0.0.2", dport=port)).terminal == expect


def test_port_rule_ignores_packets_without_ports():
    d = direction(rule("dns", "drop", dport=53), rule("src", "drop", sport=(0, 65535)))
    c = compile_direction(d)
    assert c.vecs[c.wild_id[abi.NB_F_DPORT]] == (0, 0b10)      # "src" is unconstrained there
    assert decide(d, udp("10.0.0.1", "10.0.0.2", dport=53)).terminal == 0
    assert decide(d, udp("10.0.0.1", "10.0.0.2", dport=53, fragment=True)).terminal is None
    assert decide(d, icmp("10.0.0.1", "10.0.0.2")).terminal is None
    assert decide(d, ip("10.0.0.1", "10.0.0.2", 132)).terminal is None   # SCTP: not parsed


def test_overlapping_ranges_of_one_rule_are_merged():
    d = direction(rule("r", "drop", sport=[(10, 20), (15, 30), (31, 40)]))
    c = compile_direction(d)
    sport = c.ports[0]
    assert {c.vecs[sport[p]][1] for p in range(10, 41)} == {1}
    assert c.vecs[sport[9]][1] == c.vecs[sport[41]][1] == 0


def test_ranges_touching_at_one_port_cover_it_once():
    d = direction(rule("touch", "drop", sport=[(10, 20), (20, 30)]),
                  rule("dup", "drop", sport=[5, 5]))
    c = compile_direction(d)
    assert [c.vecs[c.ports[0][p]][1] for p in (4, 5, 6, 9, 10, 20, 21, 30, 31)] == \
        [0, 2, 0, 0, 1, 1, 1, 1, 0]


def test_icmp_wildcards_reach_the_ends_of_the_type_and_code_space():
    d = direction(rule("type255", "drop", icmp_type=255), rule("code255", "drop", icmp_code=255),
                  rule("type0", "drop", icmp_type=0))
    c = compile_direction(d)
    assert c.vecs[c.icmp[255 << 8 | 0]][1] == 0b001
    assert c.vecs[c.icmp[255 << 8 | 255]][1] == 0b011
    assert c.vecs[c.icmp[0 << 8 | 255]][1] == 0b110
    assert c.vecs[c.icmp[7 << 8 | 255]][1] == 0b010
    assert c.vecs[c.icmp[7 << 8 | 254]][1] == 0


def test_icmp_type_and_code_rules():
    d = direction(rule("echo", "allow", icmp_type=8, icmp_code=0),
                  rule("unreach", "drop", icmp_type=3),
                  rule("code1", "drop", icmp_code=1),
                  rule("ns", "allow", icmp_type=135), default="drop")
    c = compile_direction(d)
    assert c.field_mask == 1 << abi.NB_F_ICMP and len(c.icmp) == 65536
    for t, code, expect in ((8, 0, 0), (8, 1, 2), (3, 4, 1), (3, 1, 1), (11, 1, 2),
                            (11, 0, None), (135, 0, 3)):
        assert decide(d, icmp("10.0.0.1", "10.0.0.2", t, code)).terminal == expect
    assert decide(d, icmp("2001:db8::1", "2001:db8::2", 135, 0)).terminal == 3
    assert decide(d, tcp("10.0.0.1", "10.0.0.2")).terminal is None
    # ICMP (proto 1) inside IPv6 has no ICMP header for the classifier
    assert decide(d, make_pkt(6, 1, 2, 1, icmp_type=8)).terminal is None
    assert decide(d, icmp("10.0.0.1", "10.0.0.2", 8, 0, fragment=True)).terminal is None


def test_tcp_flags_mask_and_value():
    d = direction(rule("syn-only", "allow", tcp_flags=(SYN | ACK, SYN)),
                  rule("fin", "drop", tcp_flags=(FIN, FIN)),
                  rule("impossible", "drop", tcp_flags=(SYN, SYN | ACK)))
    c = compile_direction(d)
    assert c.field_mask == 1 << abi.NB_F_FLAGS and len(c.flags) == 256
    assert all(c.vecs[i][1] & 0b100 == 0 for i in c.flags)
    assert decide(d, tcp("10.0.0.1", "10.0.0.2", flags=SYN)).terminal == 0
    assert decide(d, tcp("10.0.0.1", "10.0.0.2", flags=SYN | ACK)).terminal is None
    assert decide(d, tcp("10.0.0.1", "10.0.0.2", flags=SYN | FIN)).terminal == 0
    assert decide(d, tcp("10.0.0.1", "10.0.0.2", flags=FIN | ACK)).terminal == 1
    assert decide(d, udp("10.0.0.1", "10.0.0.2")).terminal is None


def test_fields_combine_by_and():
    d = direction(rule("ssh-from-lan", "allow", src="10.1.0.0/16", proto=6, dport=22),
                  rule("ssh", "drop", dport=22), default="allow")
    assert decide(d, tcp("10.1.0.5", "10.0.0.1", dport=22)).terminal == 0
    assert decide(d, tcp("10.2.0.5", "10.0.0.1", dport=22)).terminal == 1
    assert decide(d, udp("10.1.0.5", "10.0.0.1", dport=22)).terminal == 1
    assert decide(d, tcp("10.1.0.5", "10.0.0.1", dport=23)).terminal is None


# ---------------------------------------------------------------- sets

def test_set_reference_is_a_pseudo_field():
    sets = {"blk": ip_set("blk", "10.9.0.0/16", "2001:db8:9::/48"),
            "ok": ip_set("ok", "192.168.0.0/16")}
    d = direction(rule("blocked", "drop", src="@blk"),
                  rule("ok-dst", "allow", dst="@ok"),
                  rule("blocked-dst", "drop", dst="@blk"),
                  rule("lan", "allow", src="10.0.0.0/8"), default="drop")
    c = compile_direction(d, sets)
    assert [(r.set_name, r.field) for r in c.setrefs] == [
        ("blk", abi.NB_F_SRC), ("ok", abi.NB_F_DST), ("blk", abi.NB_F_DST)]
    assert c.field_mask == (1 << abi.NB_F_SRC) | (0b111 << abi.NB_F_SET0)
    blk = c.setrefs[0]
    assert c.vecs[blk.member_id][1] == 0b1111 and c.vecs[blk.nonmember_id][1] == 0b1110
    # src set rules are unconstrained in SRC itself
    assert c.vecs[c.wild_id[abi.NB_F_SRC]][1] == 0b0111
    assert decide(d, tcp("10.9.1.1", "1.1.1.1"), sets).terminal == 0
    assert decide(d, tcp("2001:db8:9::5", "2001::1"), sets).terminal == 0
    assert decide(d, tcp("1.1.1.1", "192.168.3.3"), sets).terminal == 1
    assert decide(d, tcp("1.1.1.1", "10.9.0.1"), sets).terminal == 2
    assert decide(d, tcp("10.1.1.1", "1.1.1.1"), sets).terminal == 3
    assert decide(d, tcp("2001::1", "2001::2"), sets).terminal is None


def test_unknown_set_reference_is_an_input_error():
    with pytest.raises(InputError, match="unknown set 'nope'"):
        compile_direction(direction(rule("r", "drop", src="@nope")), {})


# ---------------------------------------------------------------- count rules

def test_count_rules_count_only_until_the_terminal_rule():
    d = direction(rule("c-tcp", "count", proto=6),
                  rule("web", "allow", dport=80),
                  rule("c-all", "count"),
                  rule("c-lan", "count", src="10.0.0.0/8"),
                  rule("drop-lan", "drop", src="10.1.0.0/16"), default="allow")
    c = compile_direction(d)
    assert (c.nrules, c.ncount) == (2, 3)
    assert [r.count_mask for r in c.rules] == [0b001, 0b111]
    assert [e.name for e in c.count_rules] == ["c-tcp", "c-all", "c-lan"]
    assert decide(d, tcp("10.1.0.1", "1.1.1.1", dport=80)) == Decision(0, [0])
    assert decide(d, tcp("10.1.0.1", "1.1.1.1", dport=81)) == Decision(1, [0, 1, 2])
    assert decide(d, udp("10.1.0.1", "1.1.1.1")) == Decision(1, [1, 2])
    assert decide(d, udp("11.1.0.1", "1.1.1.1")) == Decision(None, [1])
    assert decide(d, tcp("10.2.0.1", "1.1.1.1", dport=81)) == Decision(None, [0, 1, 2])


def test_count_only_direction_counts_and_applies_default():
    d = direction(rule("c", "count", dport=22), default="drop")
    c = compile_direction(d)
    assert c.vecs[c.ports[1][22]] == (1, 0) and c.vecs[c.ports[1][23]] == (0, 0)
    got = decide(d, tcp("10.0.0.1", "10.0.0.2", dport=22))
    assert got == Decision(None, [0]) and verdict(got, c) == "default-drop"


def test_64_count_rules_fit_and_65_do_not():
    many = [rule(f"c{i}", "count", dport=i) for i in range(64)]
    c = compile_direction(direction(*many, rule("last", "drop")))
    assert c.ncount == 64 and c.rules[0].count_mask == ALL_ONES
    assert decide(direction(*many, rule("last", "drop")),
                  udp("10.0.0.1", "10.0.0.2", dport=63)) == Decision(0, [63])
    with pytest.raises(InputError, match="NB_MAX_COUNT_RULES"):
        compile_direction(direction(*many, rule("c64", "count")))


# ---------------------------------------------------------------- rule entries

def test_rule_entries_carry_action_and_rate_limit():
    d = direction(rule("a", "allow"), rule("d", "drop"),
                  rule("rl", "rate_limit", rate_pps=50, rate_burst=200, rate_per="rule"),
                  rule("rl-src", "rate_limit", rate_pps=10))
    c = compile_direction(d)
    assert [r.action for r in c.rules] == [abi.NB_ACT_ALLOW, abi.NB_ACT_DROP,
                                           abi.NB_ACT_RATE, abi.NB_ACT_RATE]
    assert (c.rules[2].rl_rate, c.rules[2].rl_burst, c.rules[2].rl_per) == \
        (50, 200, abi.NB_RL_PER_RULE)
    assert (c.rules[3].rl_rate, c.rules[3].rl_burst, c.rules[3].rl_per) == \
        (10, 10, abi.NB_RL_PER_SRC)
    assert (c.rules[0].rl_rate, c.rules[0].rl_burst) == (0, 0)
    assert verdict(Decision(2, []), c) == "rate_limit"


def test_digest_ignores_position_and_line_but_not_content():
    a = rule("web", "allow", dport=[443, 80], dst=["10.0.0.0/8", "2001:db8::/32"], line=3)
    moved = rule("web", "allow", dport=[80, 443], dst=["2001:db8::/32", "10.0.0.0/8"], line=9)
    changed = rule("web", "allow", dport=[80, 444], dst=["10.0.0.0/8", "2001:db8::/32"])
    c1 = compile_direction(direction(a))
    c2 = compile_direction(direction(rule("new", "drop", proto=1), moved))
    assert c1.rules[0].digest == c2.rules[1].digest
    assert len(c1.rules[0].digest) == 16
    assert compile_direction(direction(changed)).rules[0].digest != c1.rules[0].digest
    assert compile_direction(direction(rule("web2", "allow", dport=[80, 443],
                                            dst=["10.0.0.0/8", "2001:db8::/32"]))
                             ).rules[0].digest != c1.rules[0].digest


# ---------------------------------------------------------------- class ids

def test_identical_vectors_share_one_id_across_fields():
    d = direction(rule("r", "drop", src="10.0.0.0/8", dst="10.0.0.0/8", sport=1000, dport=80,
                       proto=6))
    c = compile_direction(d)
    check_table_invariants(c)
    # match = rule 0 everywhere, miss = nothing everywhere: two vectors in all; the address
    # fields and the destination port keep their own ids (a contiguous range each), the
    # source port and the protocol share theirs
    assert set(c.vecs.values()) == {(0, 1), (0, 0)}
    assert c.nclasses == 9 and c.wild_id[abi.NB_F_SPORT] == c.wild_id[abi.NB_F_PROTO]


def test_field_mask_lists_only_constrained_fields():
    d = direction(rule("a", "drop", dport=80), rule("b", "count", tcp_flags=(SYN, SYN)))
    c = compile_direction(d)
    assert c.field_mask == (1 << abi.NB_F_DPORT) | (1 << abi.NB_F_FLAGS)
    assert set(c.ports) == {1} and c.proto is None and c.icmp is None and c.lpm4 == []
    assert [c.wild_id[f] == 0 for f in range(abi.NB_NFIELDS_BASE)] == \
        [True, True, True, True, False, True, False]
    check_table_invariants(c)


def test_compilation_is_deterministic():
    def build():
        return direction(*[rule(f"r{i}", ("allow", "drop", "count")[i % 3],
                                src=f"10.{i % 7}.0.0/16", dport=(i, i + 100), proto=(6, 17)[i % 2])
                           for i in range(60)])
    a, b = compile_direction(build()), compile_direction(build())
    assert a == b
    check_table_invariants(a)


# ---------------------------------------------------------------- capacity

def test_too_many_terminal_rules_is_an_input_error():
    rules = [rule(f"r{i}", "drop") for i in range(abi.NB_MAX_RULES + 1)]
    with pytest.raises(InputError, match="NB_MAX_RULES"):
        compile_direction(direction(*rules))


def test_too_many_set_references_is_an_input_error():
    rules = [rule(f"r{i}", "drop", src=f"@s{i}") for i in range(abi.NB_MAX_SETREFS + 1)]
    with pytest.raises(InputError, match="NB_MAX_SETREFS"):
        compile_direction(direction(*rules))
    # the same set on src and dst is two references; the same set twice on src is one
    ok = compile_direction(direction(rule("a", "drop", src="@s"), rule("b", "drop", src="@s"),
                                     rule("c", "drop", dst="@s")))
    assert len(ok.setrefs) == 2


def test_too_many_prefixes_per_family_is_an_input_error():
    base = addr("2001:db8::")[1]
    hosts = AddrMatch(tuple(Prefix(6, base + i, 128) for i in range(abi.NB_PREFIX_CAP + 1)))
    with pytest.raises(InputError, match="NB_PREFIX_CAP"):
        compile_direction(direction(rule("big", "drop", src=hosts)))


def test_invalid_rule_values_are_input_errors():
    for bad in (rule("p", "drop", dport=(10, 70000)), rule("q", "drop", proto=300),
                rule("a", "refuse"), rule("r", "rate_limit", rate_pps=0),
                rule("f", "drop", tcp_flags=(256, 0))):
        with pytest.raises(InputError, match=f"rule '{bad.name}'"):
            compile_direction(direction(bad))


# ---------------------------------------------------------------- shape

def _bucket_edges():
    """(nrules, words) at each edge of abi.WORD_BUCKETS: the last fit and the first overflow."""
    b = abi.WORD_BUCKETS
    yield 0, b[0]
    for small, big in zip(b, b[1:]):
        yield small * 64, small
        yield small * 64 + 1, big
    yield b[-1] * 64, b[-1]


@pytest.mark.parametrize("nrules,words", list(_bucket_edges()))
def test_shape_words_is_smallest_bucket(nrules, words):
    assert choose_shape(nrules, 10).words == words


def test_shape_class_cap_has_headroom():
    assert choose_shape(10, 1).class_cap == 64
    assert choose_shape(10, 32).class_cap == 64
    assert choose_shape(10, 33).class_cap == 128
    assert choose_shape(10, 1000).class_cap == 2048


def test_shape_keeps_current_while_it_fits():
    cur = Shape(4, 256)
    assert choose_shape(100, 200, cur) is cur
    assert choose_shape(100, 257, cur) == Shape(4, 1024)
    assert choose_shape(300, 10, cur) == Shape(abi.WORD_BUCKETS[2], 64)
    assert choose_shape(10, 10, cur) == Shape(1, 64)        # fewer words: a smaller program
    with pytest.raises(InputError, match="NB_MAX_RULES"):
        choose_shape(abi.NB_MAX_RULES + 1, 10)


# ---------------------------------------------------------------- size (speed is in bench/)

def test_10000_distinct_src_hosts_compile():
    rules = [rule(f"h{i}", "drop", src=f"10.{i >> 8 & 255}.{i & 255}.1/32") for i in range(10000)]
    c = compile_direction(direction(*rules))
    assert c.nrules == 10000 and len(c.lpm4) == 10000


def test_10000_distinct_dports_compile():
    rules = [rule(f"p{i}", "drop", dport=i + 1) for i in range(10000)]
    c = compile_direction(direction(*rules))
    assert c.nclasses == 10002
