"""An apply that fails at any kernel call, against a fake kernel (tests/unit/fakekernel.py):
the previous policy stays, or the journal lets the next apply finish it. Kills at each step
are in test_engine_kills.py.
"""
from __future__ import annotations

import pytest

from engine_world import k  # noqa: F401  (the fixture)
from engine_world import CHANGES, apply_text, assert_runs_state, runs
from netbpf.errors import NetbpfError
from netbpf.observe.drift import drift
from netbpf.store.state import load_journal, load_state

def _calls_of(k, tmp_path, change: str) -> list[tuple[str, int]]:
    """(call, n) for every kernel call an apply of change makes: the first and the last of
    each kind."""
    before = dict(k.calls)
    apply_text(tmp_path / "p.yaml", CHANGES[change][1])
    out = set()
    for name, n in k.calls.items():
        made = n - before.get(name, 0)
        out |= {(name, i) for i in (1, made) if 0 < i <= made}
    return sorted(out)


@pytest.mark.parametrize("change", CHANGES)
def test_a_failure_at_any_kernel_call_leaves_the_old_policy_or_a_journal_to_finish(
        k, tmp_path, change):
    old, new = CHANGES[change]
    apply_text(tmp_path / "p.yaml", old)
    base = k.snapshot("base")
    was = runs(k)
    calls = _calls_of(k, tmp_path, change)
    done = runs(k)
    assert len(calls) > 10
    for call, nth in calls:
        k.restore(base, keep=True)
        k.fail_on(call, nth)
        try:
            apply_text(tmp_path / "p.yaml", new)
        except NetbpfError as e:
            assert "injected failure" in str(e), (call, nth, e)
            if load_journal("gw0") is None:
                assert runs(k) == was, f"a failed {call} #{nth} changed what runs"
                assert_runs_state(k)
            else:   # failed after the kernel took some of it: the next apply finishes it
                assert "interrupted" in drift(load_state("gw0")), (call, nth)
        else:       # the engine tolerated this failure: then it finished
            assert runs(k)["state"] == done["state"] or runs(k) != was, (call, nth)
            assert_runs_state(k)
        apply_text(tmp_path / "p.yaml", new)
        assert_runs_state(k)
        assert [r.name for r in load_state("gw0").parts["ingress"].rules][0] == \
            done["state"]["ingress"][2][0], (call, nth)
    k.restore(base)
