"""The plan as a diff: changed fields per rule, +N/-M per set, direction settings, the summary
of long plans, JSON; and a sampling-only change keeps the rule's counter slot. Pure."""
from __future__ import annotations

from netbpf.engine.plan import RuleChange
from netbpf.engine.update import allocate_slots
from netbpf.fw.compile import counter_key, rule_digest
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR, SetIR
from netbpf.safety.plandiff import diff_direction, direction_lines
from netbpf.store.state import PartState, RuleState


def web(dport, sample=0, name="web"):
    return RuleIR(name, "allow", proto=6, dport=dport, sample=sample)


def test_changed_fields_are_named_with_old_and_new_values():
    old = DirectionIR("allow", (web(((80, 80), (443, 443))),))
    new = DirectionIR("drop", (web(((80, 80), (443, 443), (8081, 8081))),))
    dd = diff_direction("ingress", new, old, [RuleChange("web", "allow", "changed")], {}, {}, [])
    assert direction_lines(dd) == ["default: allow -> drop",
                                   "~ web: dport [80, 443] -> [80, 443, 8081]"]


def test_adding_sample_is_shown_and_keeps_counters():
    old = DirectionIR("allow", (web(((80, 80),)),))
    new = DirectionIR("allow", (web(((80, 80),), sample=10),))
    dd = diff_direction("ingress", new, old, [RuleChange("web", "allow", "changed")], {}, {}, [])
    assert direction_lines(dd) == ["~ web: sample - -> 10 (counters kept)"]
    a, b = rule_digest(old.rules[0]), rule_digest(new.rules[0])
    assert a != b and counter_key(a) == counter_key(b)


def test_sampling_change_reuses_the_counter_slot_and_a_match_change_does_not():
    before = web(((80, 80),))
    old = PartState("ingress", "xdp", "generic", 1, "h", 1, 64, "allow",
                    rules=[RuleState("web", "allow", rule_digest(before), 5)])
    sampled = [("web", "allow", rule_digest(web(((80, 80),), sample=3)), 1)]
    assert allocate_slots(sampled, old, 256) == ([5], [])
    widened = [("web", "allow", rule_digest(web(((80, 81),))), 1)]
    slots, fresh = allocate_slots(widened, old, 256)
    assert slots != [5] and fresh == slots


def test_set_refresh_shows_added_and_removed_entries():
    old = {"bl": SetIR("bl", v4=((1 << 24, 8), (2 << 24, 8)))}
    new = {"bl": SetIR("bl", v4=((2 << 24, 8), (3 << 24, 8), (4 << 24, 8)), v6=((1, 128),))}
    d = DirectionIR("allow", (RuleIR("x", "drop", src=AddrMatch(set_name="bl")),))
    dd = diff_direction("ingress", d, d, [RuleChange("x", "drop", "kept")], new, old, ["bl"])
    assert direction_lines(dd) == ["= 1 rule(s) unchanged (counters kept)",
                                   "set bl: +3/-1 (4 entries)"]


def test_thousands_of_removals_are_summarised_unless_verbose():
    rules = tuple(RuleIR(f"r{i}", "drop", src=AddrMatch((Prefix(4, i << 8, 24),)))
                  for i in range(5000))
    old, new = DirectionIR("allow", rules), DirectionIR("allow", rules[:50])
    changes = ([RuleChange(r.name, "drop", "kept") for r in rules[:50]] +
               [RuleChange(r.name, "drop", "removed") for r in rules[50:]])
    dd = diff_direction("ingress", new, old, changes, {}, {}, [])
    short = direction_lines(dd)
    assert len(short) == 12
    assert short[10] == ("... 4940 more: 0 added, 4950 removed, 0 changed in all "
                         "(--verbose lists every one)")
    assert len(direction_lines(dd, verbose=True)) == 4951
