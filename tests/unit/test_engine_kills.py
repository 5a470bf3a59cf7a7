"""An apply killed at each named step (netbpf/engine/faults.py), against a fake kernel
(tests/unit/fakekernel.py): status names what happened, recover() rolls back before the kernel
took any part and forward after, the next apply repairs, `detach` leaves nothing. The same
kills against the real kernel are in tests/netns/test_kill_points.py.
"""
from __future__ import annotations

import pytest

from engine_world import k  # noqa: F401  (the fixture)
from engine_world import (CHANGES, apply_text, assert_detach_leaves_nothing, assert_runs_state,
                        killed_apply, runs)
from netbpf.engine.faults import PROGRAM_STEPS, UPDATE_STEPS
from netbpf.engine.recover import recover
from netbpf.observe.drift import drift
from netbpf.store.state import load_journal, load_state




@pytest.mark.parametrize("step", [f"program:{s}" for s in PROGRAM_STEPS] +
                         [f"update:{s}" for s in UPDATE_STEPS])
def test_killed_at_each_step_status_names_it_and_the_next_apply_repairs(
        k, tmp_path, step):
    old, new = CHANGES["programs" if step.startswith("program") else "update"]
    was = killed_apply(k, tmp_path / "p.yaml", step, old, new)
    st, j = load_state("gw0"), load_journal("gw0")
    journaled = step.split(":")[1] not in ("loaded", "written", "state-saved")
    assert (j is not None) == journaled
    why = drift(st)
    if journaled:
        assert "interrupted" in why and "the next apply or detach repairs it" in why
        if step.endswith(("journal",)):
            assert "the previous policy is still in force" in why
            assert runs(k)["attached"] == was["attached"]
        if step.endswith("ingress"):
            assert "the new policy on ingress, the previous on egress" in why
    else:
        assert why is None
    plan = apply_text(tmp_path / "p.yaml", new)
    assert_runs_state(k)
    names = [r.name for r in load_state("gw0").parts["ingress"].rules]
    assert names[0] == "in-2" if step.startswith("update") else names[:2] == ["in-1", "pad-0"]
    assert plan.interfaces
    assert_detach_leaves_nothing(k)


@pytest.mark.parametrize("step, outcome", [
    ("program:journal", "the previous policy stays"),
    ("program:attached-ingress", "finished it"),
    ("program:pins-retired", "finished it"),
    ("update:journal", "the previous policy stays"),
    ("update:flipped-ingress", "finished it")])
def test_recover_rolls_back_before_the_kernel_took_any_part_and_forward_after(
        k, tmp_path, step, outcome):
    old, new = CHANGES["programs" if step.startswith("program") else "update"]
    was = killed_apply(k, tmp_path / "p.yaml", step, old, new)
    journal = load_journal("gw0")
    lines: list[str] = []
    recover("gw0", lines.append)
    assert len(lines) == 1 and outcome in lines[0]
    assert load_journal("gw0") is None
    if outcome == "finished it":
        st = load_state("gw0")
        assert {d: p.prog_id for d, p in st.parts.items()} == \
            {d: p.prog_id for d, p in journal.state.parts.items()}
        assert_runs_state(k)
    else:
        assert runs(k) == was
        assert_runs_state(k)


def test_a_killed_balancer_update_is_finished_and_its_programs_reloaded(k, tmp_path):
    """Balancer tables and conntrack timeouts are written after the flip: a roll-forward
    cannot tell they were, so the next apply loads the programs afresh."""
    old, new = CHANGES["balancer"]
    killed_apply(k, tmp_path / "p.yaml", "update:flipped-egress", old, new)
    assert load_journal("gw0").reload
    loads = len(k.loads)
    (p,) = apply_text(tmp_path / "p.yaml", new).interfaces
    assert "ingress program reloaded to finish an interrupted apply" in p.reasons
    assert len(k.loads) == loads + 2
    assert_runs_state(k)
