"""Shadowed-rule warnings: which rules can never match, and the message naming both rules.

covers() is checked against a reference packet matcher (hypothesis), find_shadowed() against
a brute-force search, and long rule lists run through the candidate indexes.
"""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from netbpf.policy.ir import AddrMatch, Prefix, RuleIR
from netbpf.policy import load_policy
from netbpf.policy.shadow import covers, find_shadowed


def net(text: str) -> Prefix:
    addr, _, plen = text.partition("/")
    a, b, c, d = (int(x) for x in addr.split("."))
    return Prefix(4, (a << 24) | (b << 16) | (c << 8) | d, int(plen or 32))


def rule(name="r", action="drop", src=None, dst=None, **kw) -> RuleIR:
    as_match = (lambda v: None if v is None else AddrMatch(set_name=v[1:]) if v.startswith("@")
                else AddrMatch(prefixes=tuple(net(x) for x in v.split())))
    return RuleIR(name=name, action=action, src=as_match(src), dst=as_match(dst), **kw)


SHADOWED = [
    ("identical", rule(proto=6, dport=((22, 22),)), rule(proto=6, dport=((22, 22),))),
    ("wider_prefix_first", rule(src="10.0.0.0/8"), rule(src="10.1.2.0/24")),
    ("every_prefix_of_a_list_covered", rule(src="10.0.0.0/8 192.0.2.0/24"),
     rule(src="10.9.0.0/16 192.0.2.128/25")),
    ("any_proto_before_tcp", rule(), rule(proto=6, dport=((80, 80),))),
    ("port_range_before_port", rule(proto=17, dport=((1, 1024),)), rule(proto=17, dport=((53, 53),))),
    ("tcp_or_udp_ports_cover_tcp", rule(dport=((53, 53),)), rule(proto=6, dport=((53, 53),))),
    ("same_set", rule(src="@bad"), rule(src="@bad", proto=6)),
    ("any_icmp_type_first", rule(proto=1), rule(proto=1, icmp_type=8, icmp_code=0)),
    ("icmp_type_covers_codes", rule(proto=1, icmp_type=3), rule(proto=1, icmp_type=3, icmp_code=4)),
    ("fewer_flags_first", rule(proto=6, tcp_flags=(0x02, 0x02)),
     rule(proto=6, tcp_flags=(0x12, 0x02))),
    ("rate_limit_is_terminal", rule(action="rate_limit", proto=17), rule(proto=17, dport=((9, 9),))),
    ("count_rule_can_be_shadowed", rule(action="allow"), rule(action="count", proto=6)),
]

NOT_SHADOWED = [
    ("count_rules_go_on", rule(action="count"), rule(proto=6)),
    ("narrower_prefix_first", rule(src="10.1.2.0/24"), rule(src="10.0.0.0/8")),
    ("other_set", rule(src="@a"), rule(src="@b")),
    ("prefix_does_not_cover_set", rule(src="0.0.0.0/0"), rule(src="@a")),
    ("ipv4_only_does_not_cover_any", rule(src="0.0.0.0/0"), rule()),
    ("ports_miss_fragments", rule(proto=6, dport=((0, 65535),)), rule(proto=6)),
    ("tcp_or_udp_does_not_cover_icmp", rule(dport=((0, 65535),)), rule(proto=1)),
    ("partial_port_overlap", rule(proto=6, dport=((80, 90),)), rule(proto=6, dport=((85, 95),))),
    ("gap_between_ranges", rule(proto=6, dport=((80, 80), (82, 82))),
     rule(proto=6, dport=((80, 82),))),
    ("flag_values_differ", rule(proto=6, tcp_flags=(0x02, 0x02)), rule(proto=6, tcp_flags=(0x02, 0))),
    ("more_flags_first", rule(proto=6, tcp_flags=(0x12, 0x02)), rule(proto=6, tcp_flags=(0x02, 0x02))),
    ("icmp_code_first", rule(proto=1, icmp_type=3, icmp_code=1), rule(proto=1, icmp_type=3)),
    ("other_protocol", rule(proto=6), rule(proto=17)),
]


def test_each_shadowed_case_is_found():
    for name, first, second in SHADOWED:
        assert covers(first, second), name
        assert find_shadowed([first, second]) == [(1, 0)], name


def test_each_not_shadowed_case_is_left_alone():
    for name, first, second in NOT_SHADOWED:
        if first.action != "count":   # a count rule may cover, it just never decides
            assert not covers(first, second), name
        assert find_shadowed([first, second]) == [], name


def test_warning_names_both_rules_and_the_earlier_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ninterfaces:\n  eth0:\n    ingress:\n      rules:\n"
                    "        - {name: web, proto: tcp, dport: [80, 443], action: allow}\n"
                    "        - {name: count-all, action: count}\n"
                    "        - {name: web-2, proto: tcp, dport: 443, src: 10.0.0.0/8, "
                    "action: drop}\n")
    assert load_policy(path).warnings == [
        f"{path}:8:11: interfaces.eth0.ingress.rules[2]: rule 'web-2' is shadowed by rule "
        "'web' (line 6) and can never match"]


def test_directions_are_checked_separately(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ninterfaces:\n  eth0:\n"
                    "    ingress: {rules: [{name: a, action: drop}]}\n"
                    "    egress: {rules: [{name: b, proto: tcp, action: drop}]}\n")
    assert load_policy(path).warnings == []


# ---- properties: covers() against packets, find_shadowed() against brute force ------------

SETS = {"a": [net("10.0.0.0/8")], "b": [net("192.0.2.0/24"), net("10.1.0.0/16")]}
PREFIXES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.0.2.0/24", "0.0.0.0/0",
            "10.1.2.3/32"]
ADDRS = [net(x).addr for x in ("10.1.2.3", "10.9.9.9", "192.0.2.7", "8.8.8.8")]

addr_fields = st.one_of(st.none(), st.sampled_from(["@a", "@b"]),
                        st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=2)
                        .map(" ".join))


def _merge_ranges(ranges):
    """The models' normal form: sorted, touching ranges joined."""
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


port_range = st.tuples(st.integers(0, 6), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1]))
ports = st.one_of(st.none(), st.lists(port_range, min_size=1, max_size=2).map(_merge_ranges))


@st.composite
def rules(draw):
    kind = draw(st.sampled_from(["any", "ports", "icmp", "tcp"]))
    kw = {}
    if kind == "ports":
        kw = {"proto": draw(st.sampled_from([None, 6, 17])), "sport": draw(ports),
              "dport": draw(ports)}
    elif kind == "icmp":
        kw = {"proto": 1, "icmp_type": draw(st.sampled_from([None, 0, 8]))}
        if kw["icmp_type"] is not None:
            kw["icmp_code"] = draw(st.sampled_from([None, 0, 1]))
    elif kind == "tcp":
        mask, bits = draw(st.integers(0, 7)), draw(st.integers(0, 7))
        kw = {"proto": 6, "tcp_flags": draw(st.sampled_from([None, (mask, bits & mask)]))}
    elif draw(st.booleans()):
        kw = {"proto": draw(st.sampled_from([1, 6, 17, 47]))}
    return rule(action=draw(st.sampled_from(["allow", "drop", "count", "rate_limit"])),
                src=draw(addr_fields), dst=draw(addr_fields), **kw)


@st.composite
def packets(draw):
    proto = draw(st.sampled_from([1, 6, 17, 47]))
    fragment = draw(st.booleans())
    return {"src": draw(st.sampled_from(ADDRS)), "dst": draw(st.sampled_from(ADDRS)),
            "proto": proto, "fragment": fragment,
            "sport": draw(st.integers(0, 10)), "dport": draw(st.integers(0, 10)),
            "type": draw(st.sampled_from([0, 8, 3])), "code": draw(st.integers(0, 2)),
            "flags": draw(st.integers(0, 7))}


def _addr_ok(match, addr):
    if match is None:
        return True
    prefixes = SETS[match.set_name] if match.set_name else match.prefixes
    return any(addr >> (32 - p.plen) == p.addr >> (32 - p.plen) if p.plen else True
               for p in prefixes)


def matches(r: RuleIR, p: dict) -> bool:
    """Reference semantics of docs/policy.md for one IPv4 packet."""
    if not (_addr_ok(r.src, p["src"]) and _addr_ok(r.dst, p["dst"])):
        return False
    has_ports = r.sport is not None or r.dport is not None
    if r.proto is not None and r.proto != p["proto"]:
        return False
    if has_ports:
        if p["fragment"] or p["proto"] not in (6, 17):
            return False
        for ranges, port in ((r.sport, p["sport"]), (r.dport, p["dport"])):
            if ranges is not None and not any(lo <= port <= hi for lo, hi in ranges):
                return False
    if r.icmp_type is not None:
        if p["fragment"] or p["type"] != r.icmp_type:
            return False
        if r.icmp_code is not None and p["code"] != r.icmp_code:
            return False
    if r.tcp_flags is not None:
        if p["fragment"] or p["flags"] & r.tcp_flags[0] != r.tcp_flags[1]:
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(rules(), rules(), st.lists(packets(), min_size=20, max_size=20))
def test_covers_never_claims_a_packet_the_earlier_rule_misses(a, b, pkts):
    if covers(a, b):
        for p in pkts:
            assert not matches(b, p) or matches(a, p), (a, b, p)


@settings(max_examples=200, deadline=None)
@given(st.lists(rules(), max_size=25))
def test_find_shadowed_equals_brute_force(rule_list):
    expected = []
    for j, b in enumerate(rule_list):
        for i in range(j):
            a = rule_list[i]
            if a.action != "count" and covers(a, b):
                expected.append((j, i))
                break
    assert find_shadowed(rule_list) == expected


def test_ten_thousand_rules_run_through_the_indexes():
    shapes = {
        "distinct hosts": lambda i: rule(src=f"10.{i >> 8 & 255}.{i & 255}.1/32"),
        "distinct ports": lambda i: rule(proto=6, dport=((i, i),)),
        "port ranges": lambda i: rule(proto=6, dport=((2 * i, 2 * i + 1),)),
        "icmp types": lambda i: rule(proto=1, icmp_type=i % 256, icmp_code=i // 256 % 256),
        "duplicates": lambda i: rule(proto=17, dport=((53, 53),)),
    }
    for name, make in shapes.items():
        rule_list = [make(i) for i in range(10_000)]
        start = time.perf_counter()
        found = find_shadowed(rule_list)
        print(f"{name}: {time.perf_counter() - start:.3f} s, {len(found)} shadowed")
        if name == "duplicates":
            assert found == [(j, 0) for j in range(1, 10_000)]
