"""The world the engine's unprivileged tests run in: a fake kernel installed (fake_world),
the fixture `k` (gw0 on it), policies, applying text as `netbpf apply` does, a kill at a
named step, and the checks every test repeats (what runs, nothing left after detach).
Not the fake kernel itself (fakekernel.py).
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import pytest

from fakekernel import FakeKernel, Killed
from netbpf.observe.drift import drift
from netbpf.store.state import list_states, load_journal, load_state, staging_dirs


def fake_world(tmp_path: Path, monkeypatch, links: bool = True) -> FakeKernel:
    """A fake kernel the engine talks to, with netbpf's pins and state under tmp_path."""
    from netbpf.kernel import api
    from netbpf.store import state
    # State files are fsynced: in memory (/dev/shm) that costs nothing
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="netbpf-fake-", dir=shm)) if shm.is_dir() else tmp_path
    root = base / "world"
    pins = root / "bpf" / "netbpf"
    staging = root / "bpf" / "netbpf_staging"
    pins.parent.mkdir(parents=True)
    monkeypatch.setattr(state, "PIN_ROOT", pins)
    monkeypatch.setattr(state, "STAGING_ROOT", staging)
    monkeypatch.setattr(state, "STAGING_DIRS", (staging / "new", staging / "old"))
    monkeypatch.setattr(state, "STATE_ROOT", root / "run")
    monkeypatch.setattr(state, "LIB_ROOT", root / "lib")
    k = FakeKernel(root, links=links)
    if base != tmp_path:
        weakref.finalize(k, shutil.rmtree, base, True)
    k.install(monkeypatch)
    monkeypatch.setattr(api, "_current", k)
    return k


def kill_at(k: FakeKernel, monkeypatch, step: str) -> list:
    """Make the engine's kill point `step` a SIGKILL: the world as it was there is kept
    (returned list gets the snapshot) and Killed unwinds the apply; restore() it after."""
    from netbpf.engine import faults
    snaps: list = []

    def point(name: str) -> None:
        if name == step:
            snaps.append(k.snapshot())
            raise Killed(step)
    monkeypatch.setattr(faults, "kill_point", point)
    return snaps


def policy(tag: int = 1, *, pad: int = 0, egress: bool = True, iface: str = "gw0",
           action: str = "drop", extra_in: str = "") -> str:
    """Policy `tag` for one interface: drops udp 7000+tag in (and 8000+tag out); pad adds
    TCP rules with action `action` (over 64 rules needs a bigger program)."""
    rules = "".join(f"        - {{name: pad-{i}, proto: tcp, dport: {20000 + i}, "
                    f"action: {action}}}\n" for i in range(pad))
    out = (f"    egress:\n      default: allow\n      rules:\n"
           f"        - {{name: out-{tag}, proto: udp, dport: {8000 + tag}, action: drop}}\n"
           if egress else "")
    return (f"version: 1\ninterfaces:\n  {iface}:\n    xdp: {{mode: native}}\n"
            f"    ingress:\n      default: allow\n      rules:\n"
            f"        - {{name: in-{tag}, proto: udp, dport: {7000 + tag}, action: drop}}\n"
            f"{extra_in}{rules}{out}")


_parsed: dict = {}


def apply_text(path: Path, text: str, netns: str | None = None, log=None):
    """Write text to path and apply it through the engine (as `netbpf apply` does)."""
    from netbpf.engine.apply import apply_policy
    from netbpf.policy import load_policy
    path.write_text(text)
    lines: list[str] = []
    if (path, text) not in _parsed:          # parsing is most of a test's time otherwise
        _parsed[(path, text)] = load_policy(path)
    plan = apply_policy(_parsed[(path, text)], str(path), netns, log=log or lines.append)
    plan.log = lines
    return plan


def lb_policy(*weights: int, conntrack: bool = False, pad: int = 0) -> str:
    """policy(1) on gw0 (with conntrack, pad rules) and a NAT balancer with these weights."""
    text = policy(1, pad=pad)
    if conntrack:
        text = text.replace("    xdp: {mode: native}\n", "    xdp: {mode: native}\n"
                            "    conntrack: true\n")
    backs = "".join(f"      - {{address: 10.30.0.{11 + i}, port: 80, weight: {w}}}\n"
                    for i, w in enumerate(weights))
    return (f"{text}load_balancers:\n  web:\n    interface: gw0\n    vip: \"10.0.0.100\"\n"
            f"    port: 80\n    proto: tcp\n    mode: nat\n    backends:\n{backs}")


CHANGES = {"programs": (policy(1), policy(1, pad=100)),     # a bigger program
           "update": (policy(1), policy(2)),                 # rules only
           # rules, then balancer tables and conntrack timeouts after the flip
           "balancer": (lb_policy(1, 1, 1, conntrack=True), lb_policy(1, 1, 0, conntrack=True))}


def runs(k) -> dict:
    """What the kernel runs and what the state says, comparable between worlds."""
    st = load_state("gw0")
    return {"attached": k.attached("gw0"),
            "state": {d: (p.prog_id, p.gen, [r.name for r in p.rules])
                      for d, p in st.parts.items()} if st else None}


def assert_runs_state(k) -> None:
    """The kernel runs exactly what the state records, nothing left over."""
    st = load_state("gw0")
    assert drift(st) is None
    assert k.attached("gw0") == {("xdp" if p.hook == "xdp" else d): p.prog_id
                                 for d, p in st.parts.items()}
    assert load_journal("gw0") is None
    assert not [d for d in staging_dirs("gw0") if d.exists()], k.last_failed


def assert_detach_leaves_nothing(k) -> None:
    from netbpf.engine.apply import detach
    detach("gw0", None, log=lambda line: None)
    assert k.attached("gw0") == {}
    assert k.pinned_files() == [] and list_states() == []
    assert not k.clsact


def killed_apply(k: FakeKernel, path: Path, step: str, old: str, new: str) -> dict:
    """Apply old, then new SIGKILLed at step: the world is left as that kill leaves it.
    Returns what ran before (runs())."""
    from _pytest.monkeypatch import MonkeyPatch
    apply_text(path, old)
    was = runs(k)
    with MonkeyPatch.context() as m:
        snaps = kill_at(k, m, step)
        try:
            apply_text(path, new)
        except Killed:
            pass
        else:
            raise AssertionError(f"the apply passed no kill point {step}")
    k.restore(snaps[0])
    return was


@pytest.fixture
def k(tmp_path, monkeypatch) -> FakeKernel:
    """The fake kernel with one interface, gw0 (import this fixture into a test module)."""
    k = fake_world(tmp_path, monkeypatch)
    k.add_interface("gw0")
    return k
