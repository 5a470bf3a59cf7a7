"""decompile() is the inverse of compile_direction(): the rules it reads out of the tables
decide every packet as the original rules do, and ordinary rules come back field for field.
Pure; tests/netns/test_inspect_lab.py does the same through the kernel's maps."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netbpf.fw.compile import compile_direction, decompile, reference_match, rule_digest
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR
from test_compile_property import directions, packets, set_tables


def _names(d: DirectionIR):
    return ([r.name for r in d.rules if r.action != "count"],
            [r.name for r in d.rules if r.action == "count"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directions(), set_tables(), st.lists(packets(), min_size=10, max_size=25))
def test_decompiled_rules_decide_like_the_originals(d, sets, pkts):
    back = DirectionIR(d.default, tuple(decompile(compile_direction(d, sets), *_names(d))))
    assert [r.name for r in back.rules] == [r.name for r in d.rules]
    for p in pkts:
        assert reference_match(back, sets, p) == reference_match(d, sets, p), p


def test_ordinary_rules_come_back_field_for_field():
    p4 = Prefix(4, 10 << 24, 8)
    p6 = Prefix(6, 0x20010db8 << 96, 32)
    rules = (
        RuleIR("c", "count", proto=6, dport=((80, 80),)),
        RuleIR("web", "allow", dst=AddrMatch((p4, p6)), proto=6, dport=((80, 80), (443, 443))),
        RuleIR("bl", "drop", src=AddrMatch(set_name="bad")),
        RuleIR("ping", "rate_limit", proto=1, icmp_type=8, rate_pps=5, rate_burst=10),
        RuleIR("syn", "drop", proto=6, tcp_flags=(0x12, 0x02), sport=((1024, 65535),)),
        RuleIR("unreach", "allow", proto=58, icmp_code=4),
        RuleIR("tail", "count"),
    )
    d = DirectionIR("drop", rules)
    back = decompile(compile_direction(d), *_names(d))
    assert [rule_digest(r) for r in back] == [rule_digest(r) for r in rules]
