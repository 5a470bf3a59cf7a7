"""The apply engine against a fake kernel (tests/unit/fakekernel.py), without root: which
applies load programs and which only write maps, what is attached and pinned, counters
carried across program changes. The real-kernel tests (tests/netns, tests/bpf) stay.
"""
from __future__ import annotations

import pytest

from engine_world import k  # noqa: F401  (the fixture)
from engine_world import apply_text, fake_world, policy
from netbpf import abi
from netbpf.engine.apply import plan_apply
from netbpf.policy import load_policy
from netbpf.store.state import load_state, pin_dir


def test_first_apply_loads_attaches_through_links_and_records_state(k, tmp_path):
    plan = apply_text(tmp_path / "p.yaml", policy(1))
    (p,) = plan.interfaces
    assert p.what == "create" and p.reasons == ["first apply"]
    st = load_state("gw0")
    ids = {d: part.prog_id for d, part in st.parts.items()}
    assert k.attached("gw0") == {"xdp": ids["ingress"], "egress": ids["egress"]}
    assert {part.attach for part in st.parts.values()} == {"link"}
    assert (pin_dir("gw0") / "ingress" / "link").exists()
    assert not any(f.startswith("bpf/netbpf_staging") for f in k.pinned_files())
    assert len(k.loads) == 2


def test_same_policy_again_changes_nothing(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1))
    before = (dict(k.calls), k.attached("gw0"))
    plan = apply_text(tmp_path / "p.yaml", policy(1))
    assert [p.what for p in plan.interfaces] == ["unchanged"]
    assert len(k.loads) == 2 and k.attached("gw0") == before[1]
    assert k.calls["map_update_batch"] == before[0]["map_update_batch"]


def test_rule_edit_writes_the_other_generation_and_keeps_the_programs(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1))
    was = load_state("gw0")
    plan = apply_text(tmp_path / "p.yaml", policy(2))
    (p,) = plan.interfaces
    assert p.what == "update" and not p.new_program
    st = load_state("gw0")
    assert len(k.loads) == 2                       # nothing compiled
    for d in ("ingress", "egress"):
        assert st.parts[d].prog_id == was.parts[d].prog_id
        assert st.parts[d].gen == 1 - was.parts[d].gen
        gen = k.map_at(pin_dir("gw0") / d / "nb_fw_gen")
        assert gen.get(bytes(4))[:4] == st.parts[d].gen.to_bytes(4, "little")
    assert [(r.name, r.what) for r in p.rules] == [
        ("in-2", "added"), ("in-1", "removed"), ("out-2", "added"), ("out-1", "removed")]


def test_more_rules_than_the_program_holds_load_a_bigger_program(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1))
    old = load_state("gw0").parts["ingress"].prog_id
    plan = apply_text(tmp_path / "p.yaml", policy(1, pad=100))
    (p,) = plan.interfaces
    assert p.new_program and "ingress program shape changed" in p.reasons
    st = load_state("gw0")
    assert st.parts["ingress"].prog_id != old and st.parts["ingress"].words > 1
    assert k.attached("gw0")["xdp"] == st.parts["ingress"].prog_id
    assert not any("staging" in f for f in k.pinned_files())


def test_netlink_path_replaces_programs_in_place_when_the_kernel_has_no_links(
        tmp_path, monkeypatch):
    k = fake_world(tmp_path, monkeypatch, links=False)
    k.add_interface("gw0")
    apply_text(tmp_path / "p.yaml", policy(1))
    st = load_state("gw0")
    assert {p.attach for p in st.parts.values()} == {"netlink"}
    apply_text(tmp_path / "p.yaml", policy(1, pad=100))
    new = load_state("gw0")
    assert k.attached("gw0") == {"xdp": new.parts["ingress"].prog_id,
                                 "egress": new.parts["egress"].prog_id}
    assert k.clsact and new.created_clsact


def _count(k, d: str, slot: int, packets: int) -> None:
    m = k.map_at(pin_dir("gw0") / d / "nb_fw_cnt")
    stride = (m.value_size + 7) // 8 * 8
    one = packets.to_bytes(8, "little") + (packets * 100).to_bytes(8, "little")
    one = one.ljust(stride, b"\0")
    m.set(slot.to_bytes(4, "little"), one * k.cpus)


def _counted(k, d: str, slot: int) -> int:
    m = k.map_at(pin_dir("gw0") / d / "nb_fw_cnt")
    stride = (m.value_size + 7) // 8 * 8
    raw = m.get(slot.to_bytes(4, "little"))
    return sum(int.from_bytes(raw[c * stride:c * stride + 8], "little") for c in range(k.cpus))


@pytest.mark.parametrize("grow", [(0, 100), (100, 0), (300, 40)], ids=str)
def test_counters_of_kept_rules_follow_them_to_the_new_program(k, tmp_path, grow):
    """Grow and shrink across program sizes (issue 19: a shrink found no free slot)."""
    first, second = grow
    apply_text(tmp_path / "p.yaml", policy(1, pad=first))
    st = load_state("gw0")
    slot = {r.name: r.slot for r in st.parts["ingress"].rules}
    _count(k, "ingress", slot["in-1"], 7)
    apply_text(tmp_path / "p.yaml", policy(1, pad=second, action="allow"))
    new = load_state("gw0")
    assert new.parts["ingress"].prog_id != st.parts["ingress"].prog_id
    slots = {r.name: r.slot for r in new.parts["ingress"].rules}
    assert sorted(slots.values()) == list(range(len(slots)))
    assert _counted(k, "ingress", slots["in-1"]) == 7 * k.cpus
    assert all(_counted(k, "ingress", s) == 0 for n, s in slots.items() if n != "in-1")


def test_rule_update_keeps_slots_of_kept_rules_and_zeroes_fresh_ones(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1, pad=3))
    st = load_state("gw0")
    slot = {r.name: r.slot for r in st.parts["ingress"].rules}
    _count(k, "ingress", slot["pad-0"], 5)
    _count(k, "ingress", 40, 9)                 # a slot no rule uses now
    apply_text(tmp_path / "p.yaml", policy(2, pad=3))
    new = {r.name: r.slot for r in load_state("gw0").parts["ingress"].rules}
    assert new["pad-0"] == slot["pad-0"] and _counted(k, "ingress", new["pad-0"]) == 5 * k.cpus
    assert new["in-2"] not in slot.values() and _counted(k, "ingress", new["in-2"]) == 0


def test_what_the_old_program_counts_after_the_copy_is_kept_beside_the_live_map(
        k, tmp_path, monkeypatch):
    """The remainder of a counter carry (counted by the old program between the copy and the
    swap) goes into the state, never into the live per-CPU map the new program is counting
    in (a write there would replace its counts: issue 19's 999 of 1000). Stats add it; a
    rule update keeps it for kept rules; the next program change folds it into the copy."""
    from netbpf.fw.fwtables import CounterCarry
    from netbpf.observe.stats import read_stats
    apply_text(tmp_path / "p.yaml", policy(1))
    slot = {r.name: r.slot for r in load_state("gw0").parts["ingress"].rules}["in-1"]
    _count(k, "ingress", slot, 7)
    copy = CounterCarry.copy

    def copy_then_count(self):
        copy(self)
        _count(k, "ingress", slot, 7 + 3)       # the old program goes on counting
    monkeypatch.setattr(CounterCarry, "copy", copy_then_count)
    apply_text(tmp_path / "p.yaml", policy(1, pad=100))
    monkeypatch.setattr(CounterCarry, "copy", copy)
    st = load_state("gw0")
    new = {r.name: r.slot for r in st.parts["ingress"].rules}
    assert _counted(k, "ingress", new["in-1"]) == 7 * k.cpus            # the copy only
    assert st.parts["ingress"].carried_counts(abi.NB_MAP_FW_CNT) == {
        new["in-1"]: (3 * k.cpus, 300 * k.cpus, 0)}

    def stats_of(name):
        rules = read_stats("gw0", None)["parts"]["ingress"]["rules"]
        return next(r["packets"] for r in rules if r["name"] == name)
    assert stats_of("in-1") == 10 * k.cpus
    apply_text(tmp_path / "p.yaml", policy(1, pad=99))                 # a rule update
    assert load_state("gw0").parts["ingress"].prog_id == st.parts["ingress"].prog_id
    assert stats_of("in-1") == 10 * k.cpus
    apply_text(tmp_path / "p.yaml", policy(1))                          # a program change
    st = load_state("gw0")
    assert not st.parts["ingress"].carried_counts(abi.NB_MAP_FW_CNT)
    slot = {r.name: r.slot for r in st.parts["ingress"].rules}["in-1"]
    assert _counted(k, "ingress", slot) == 10 * k.cpus and stats_of("in-1") == 10 * k.cpus


def test_plan_alone_changes_nothing(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1))
    path = tmp_path / "p.yaml"
    path.write_text(policy(1, pad=100))
    calls = dict(k.calls)
    plan = plan_apply(load_policy(path), str(path), None)
    assert plan.changes and plan.interfaces[0].new_program
    writes = ("map_update", "map_update_batch", "obj_pin", "load_program", "create_link",
              "attach_xdp", "attach_tc", "update_pinned", "detach_pinned")
    assert all(k.calls[c] == calls.get(c, 0) for c in writes)
    assert abi.slot_cap(load_state("gw0").parts["ingress"].words) >= 2
