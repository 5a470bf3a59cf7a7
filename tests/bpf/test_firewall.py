"""The XDP firewall program under BPF_PROG_TEST_RUN: exact verdicts and counters.

Every case of tests/cases/firewall.py, plus behaviours that need state or size: rate limiting,
a 100k-entry set, generations flipping without a mix, every program shape loading.
"""
from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import TCP, UDP

from cases.firewall import CASES, eth, v4
from unit.fw_builders import direction, rule

from netbpf import abi
from netbpf.fw.compile import compile_direction
from netbpf.policy.ir import SetIR

from fwprog import FwProg


@pytest.fixture(scope="module")
def fw():
    return FwProg(words=4, class_cap=256)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_verdict_and_counters(fw, case):
    fw.install(case.policy, case.sets)
    assert fw.run(case.packet) == case.verdict
    for r in case.policy.rules:
        expected = 1 if r.name == case.rule or r.name in case.counted else 0
        assert fw.counter(r.name)[0] == expected, r.name
    totals = fw.totals()
    assert totals[case.verdict] == 1
    if case.rule is None and case.model:
        assert totals["default"] == 1


_SPECIALISED: dict[int, FwProg] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_verdict_with_only_the_used_fields_compiled_in(case):
    """What netbpf apply loads: a program built with just the fields the policy uses."""
    fields = compile_direction(case.policy, case.sets).field_mask
    if fields not in _SPECIALISED:
        _SPECIALISED[fields] = FwProg(words=4, class_cap=256, fields=fields)
    prog = _SPECIALISED[fields]
    prog.install(case.policy, case.sets)
    assert prog.run(case.packet) == case.verdict


def test_counters_count_bytes_per_rule(fw):
    fw.install(direction(rule("web", "allow", proto=6, dport=80),
                         rule("no-dns", "drop", proto=17, dport=53)))
    pkt = eth(v4(UDP(dport=53)))
    for _ in range(7):
        fw.run(pkt)
    assert fw.counter("no-dns")[:2] == (7, 7 * len(pkt))
    assert fw.counter("web") == (0, 0, 0)


def test_rate_limit_passes_burst_then_drops(fw):
    fw.install(direction(rule("dns-limit", "rate_limit", proto=17, dport=53, rate_pps=1,
                              rate_burst=5, rate_per="src")))
    pkt = eth(v4(UDP(dport=53)))
    verdicts = [fw.run(pkt) for _ in range(8)]
    assert verdicts == ["pass"] * 5 + ["drop"] * 3
    packets, _, over = fw.counter("dns-limit")
    assert (packets, over) == (8, 3)
    # another source has its own bucket
    assert fw.run(eth(v4(UDP(dport=53), src="10.0.0.3"))) == "pass"


def test_rate_limit_per_rule_shares_one_bucket(fw):
    fw.install(direction(rule("lim", "rate_limit", proto=17, rate_pps=1, rate_burst=2,
                              rate_per="rule")))
    verdicts = [fw.run(eth(v4(UDP(), src=f"10.0.0.{i}"))) for i in range(2, 6)]
    assert verdicts == ["pass", "pass", "drop", "drop"]


def test_100k_entry_set_matches_members_only(fw):
    net = ipaddress.ip_network("10.128.0.0/9")
    base = int(net.network_address)
    members = tuple((base + (i << 8), 24) for i in range(100_000))
    big = SetIR("big", v4=members)
    fw.install(direction(rule("drop-big", "drop", src="@big")), {"big": big})
    for i in (0, 54_321, 99_999):
        src = str(ipaddress.ip_address(base + (i << 8) + 77))
        assert fw.run(eth(v4(UDP(), src=src))) == "drop", src
    outside = str(ipaddress.ip_address(base + (100_000 << 8) + 1))
    assert fw.run(eth(v4(UDP(), src=outside))) == "pass"


def test_full_length_sets_use_the_hash_and_mixed_sets_the_trie(fw):
    """An all-/32 (all-/128) family goes to the hash map; a family with one shorter prefix
    keeps the trie; both give the same membership, and replacing the set leaves no stale key."""
    hosts = tuple((int(ipaddress.ip_address("10.9.0.0")) + i, 32) for i in range(5000))
    hosts6 = ((int(ipaddress.ip_address("2001:db8::7")), 128),)
    mixed = hosts[:10] + ((int(ipaddress.ip_address("10.200.0.0")), 16),)
    for s, hashed in ((SetIR("s", v4=hosts, v6=hosts6), True), (SetIR("s", v4=mixed), False)):
        fw.install(direction(rule("drop-set", "drop", src="@s")), {"s": s})
        c = fw.compiled
        assert bool(c.setrefs[0].hashed & abi.NB_SETREF_HASH4) == hashed
        assert fw.run(eth(v4(UDP(), src="10.9.0.9"))) == "drop"
        assert fw.run(eth(v4(UDP(), src="10.9.0.3"))) == "drop"
        assert fw.run(eth(v4(UDP(), src="10.200.3.4"))) == ("pass" if hashed else "drop")
        assert fw.run(eth(v4(UDP(), src="10.9.200.1"))) == "pass"
    fw.install(direction(rule("drop-set", "drop", src="@s")),
               {"s": SetIR("s", v6=hosts6)})
    assert fw.run(eth(v4(UDP(), src="10.9.0.9"))) == "pass"     # old hash entries are gone
    from netbpf.kernel import bpfsys
    assert list(bpfsys.map_keys(fw.tables.fd("nb_seth4"), 8)) == []


def test_generation_flip_switches_whole_policy(fw):
    a = direction(rule("a-drop-udp", "drop", proto=17), rule("a-allow", "allow"))
    b = direction(rule("b-allow-udp", "allow", proto=17), rule("b-drop", "drop"))
    pkt_udp, pkt_tcp = eth(v4(UDP())), eth(v4(TCP()))
    fw.install(a)
    assert (fw.run(pkt_udp), fw.run(pkt_tcp)) == ("drop", "pass")
    fw.install(b)
    assert (fw.run(pkt_udp), fw.run(pkt_tcp)) == ("pass", "drop")


def test_last_of_many_rules_matches(fw):
    rules = [rule(f"r{i}", "drop", proto=17, dport=1000 + i) for i in range(250)]
    fw.install(direction(*rules))
    assert fw.run(eth(v4(UDP(dport=1249)))) == "drop"
    assert fw.counter("r249")[0] == 1
    assert fw.run(eth(v4(UDP(dport=1250)))) == "pass"


@pytest.mark.parametrize("words", abi.WORD_BUCKETS)
def test_every_shape_loads_and_classifies(words):
    prog = FwProg(words=words, class_cap=1024)
    n = min(words * 64, 300)
    prog.install(direction(*[rule(f"r{i}", "drop", proto=17, dport=2000 + i) for i in range(n)]))
    assert prog.run(eth(v4(UDP(dport=2000 + n - 1)))) == "drop"
    assert prog.run(eth(v4(UDP(dport=1999)))) == "pass"
