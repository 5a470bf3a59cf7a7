"""An apply SIGKILLed at each named step (NETBPF_KILL_AT, netbpf/engine/faults.py), and policies that
grow and shrink: `status` names what happened, the next apply repairs it, `detach` leaves nothing.

    [client] client0 ---------------------------- gw0 [gw]   (one private lab per module)
             10.10.0.2                             10.10.0.1
                                                   XDP ingress: policy N drops udp 7000+N
                                                   TC egress:   policy N drops udp 8000+N

Verdicts are read with BPF_PROG_TEST_RUN on the programs attached right now (their live maps),
so each hook is seen to run a whole policy; no traffic is needed. Not random kill times
(test_killed_apply.py) and not racing applies (test_races.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netbpf.engine.faults import ENV, PROGRAM_STEPS, SET_STEPS, UPDATE_STEPS
from netbpf.kernel import attach, bpfsys
from netbpf.kernel.testrun import XDP_DROP
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.store.state import PIN_ROOT, journal_file, staging_dirs, state_file

from netbpf_cli import NETBPF, netbpf
from test_killed_apply import drops_by_test_run
from test_races import policy, write

TAGS = (1, 2, 3)


@pytest.fixture(scope="module")
def lab():
    from netbpf.lab import TOPOLOGY_DIR, Lab
    with Lab.from_file(TOPOLOGY_DIR / "two-hosts.yaml") as lab:
        yield lab


@pytest.fixture
def gw(lab):
    """The lab's gateway, with nothing of netbpf's on it before and after the test."""
    assert_nothing_left(lab)
    yield lab
    netbpf(lab, "detach", "gw0", check=False)
    assert_nothing_left(lab)


def key(lab) -> str:
    return f"{lab.ns('gw')}:gw0"


def assert_nothing_left(lab) -> None:
    ns = lab.ns("gw")
    assert attach.xdp_state("gw0", netns=ns) is None, "an XDP program is still attached"
    for d in ("ingress", "egress"):
        ours = [f for f in attach.list_tc_filters("gw0", d, netns=ns)
                if f.prio == attach.NB_TC_PRIO]
        assert not ours, f"netbpf's tc {d} filter is still there: {ours}"
    k = key(lab)
    left = [p for p in (PIN_ROOT / k, *staging_dirs(k), state_file(k), journal_file(k))
            if p.exists()]
    assert not left, f"left behind: {left}"


def status(lab) -> tuple[int, dict]:
    """`netbpf -n NS status gw0 --json`: exit code and this interface's row."""
    p = subprocess.run([NETBPF, "-n", lab.ns("gw"), "status", "gw0", "--json"],
                       capture_output=True, text=True, timeout=60)
    rows = json.loads(p.stdout)
    assert len(rows) == 1, rows
    return p.returncode, rows[0]


def killed_apply(lab, path: Path, step: str) -> None:
    env = dict(os.environ, **{ENV: step})
    p = subprocess.run([NETBPF, "-n", lab.ns("gw"), "apply", str(path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, f"the apply was not killed at {step}: {p.returncode}\n" \
                               f"{p.stdout}\n{p.stderr}"


def in_force(lab) -> tuple[set[int], set[int]]:
    return drops_by_test_run(lab, TAGS)


# step -> (ingress, egress) policy in force after the kill: "old" or "new"
PROGRAM_CASES = {
    "program:loaded": ("old", "old"),
    "program:journal": ("old", "old"),
    "program:attached-ingress": ("new", "old"),
    "program:attached-egress": ("new", "new"),
    "program:old-detached": ("new", "new"),
    "program:pins-retired": ("new", "new"),
    "program:pins-renamed": ("new", "new"),
    "program:state-saved": ("new", "new"),
}
UPDATE_CASES = {
    "update:written": ("old", "old"),
    "update:journal": ("old", "old"),
    "update:flipped-ingress": ("new", "old"),
    "update:flipped-egress": ("new", "new"),
    "update:state-saved": ("new", "new"),
}


def test_every_step_has_a_case():
    assert set(PROGRAM_CASES) == {f"program:{s}" for s in PROGRAM_STEPS}
    assert set(UPDATE_CASES) == {f"update:{s}" for s in UPDATE_STEPS}
    assert set(SET_CASES) == {f"sets:{s}" for s in SET_STEPS}


# Detach straight after the kill, at the steps where the kernel runs a program no state names.
DETACH_AFTER = ("program:attached-ingress", "program:pins-renamed", "update:flipped-ingress")


@pytest.mark.parametrize("step,then", [(s, "apply") for s in (*PROGRAM_CASES, *UPDATE_CASES)]
                         + [(s, "detach") for s in DETACH_AFTER])
def test_kill_at_each_step_is_named_by_status_and_repaired(gw, tmp_path, step, then):
    """Policy 1 -> 3 (100 more rules: new programs) or 1 -> 2 (map writes only), killed at
    `step`; then a repairing apply of the same policy, or a detach; the fixture then detaches
    and checks that no program, filter, pin, state or journal is left."""
    lab = gw
    old, new = 1, (3 if step.startswith("program:") else 2)
    p_old = write(tmp_path, "old.yaml", policy(old))
    p_new = write(tmp_path, "new.yaml", policy(new, pad=100 if new == 3 else 0))
    netbpf(lab, "apply", str(p_old))
    killed_apply(lab, p_new, step)

    expect = {"old": {old}, "new": {new}}
    ing, eg = (expect[w] for w in (PROGRAM_CASES | UPDATE_CASES)[step])
    assert in_force(lab) == (ing, eg), f"after a kill at {step}"
    code, row = status(lab)
    if step.endswith(("loaded", "written", "state-saved")):
        assert (code, row["health"]) == (0, "ok"), row       # no journal yet / any more
    else:
        assert code == 1 and "was interrupted" in row["health"], row
        assert str(p_new.resolve()) in row["health"], row
        assert "replaced ours" not in row["health"], row

    if then == "detach":
        out = netbpf(lab, "detach", "gw0")
        assert "not netbpf's" not in out.stdout, out.stdout
        return                                   # the fixture checks nothing is left
    out = netbpf(lab, "apply", str(p_new))
    assert in_force(lab) == ({new}, {new}), out.stdout
    code, row = status(lab)
    assert (code, row["health"]) == (0, "ok"), row
    assert not any(d.exists() for d in staging_dirs(key(lab)))
    assert "nothing to do" in netbpf(lab, "apply", str(p_new)).stdout


# ---- a set updated in place (only its entries change) ----

SET_OLD, SET_NEW = "192.0.2.10", "192.0.2.20"
# step -> the set entries the running program holds after the kill
SET_CASES = {
    "sets:journal": {SET_OLD},
    "sets:added": {SET_OLD, SET_NEW},       # additions first, then removals
    "sets:state-saved": {SET_NEW},
}


def set_members(lab) -> set[str]:
    """Which of the two addresses the running program drops (rule to-set: dst in dst-set)."""
    ns = lab.ns("gw")
    cur = attach.xdp_state("gw0", netns=ns)
    out = set()
    with bpfsys.prog_get_fd_by_id(cur.prog_id) as fd:
        for addr in (SET_OLD, SET_NEW):
            frame = bytes(Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) /
                          IP(src=lab.addr("client", "client0"), dst=addr) /
                          UDP(sport=40000, dport=53) / b"probe")
            if run_prog(fd, frame).retval == XDP_DROP:
                out.add(addr)
    return out


@pytest.mark.parametrize("step,then", [(s, "new") for s in SET_CASES] +
                         [("sets:added", "old"), ("sets:added", "detach")])
def test_kill_during_a_set_update_in_place_is_named_and_repaired(gw, tmp_path, step, then):
    """The set of policy 1 changes from SET_OLD to SET_NEW (rules the same: an update in
    place), killed at `step`; then the new policy, the old one again, or a detach."""
    lab = gw
    p_old = write(tmp_path, "old.yaml", policy(1, set_addr=SET_OLD))
    p_new = write(tmp_path, "new.yaml", policy(1, set_addr=SET_NEW))
    netbpf(lab, "apply", str(p_old))
    prog = attach.xdp_state("gw0", netns=lab.ns("gw")).prog_id
    killed_apply(lab, p_new, step)
    assert set_members(lab) == SET_CASES[step]
    assert in_force(lab) == ({1}, {1})                  # the rules never changed
    code, row = status(lab)
    if step.endswith("state-saved"):
        assert (code, row["health"]) == (0, "ok"), row
    else:
        assert code == 1 and "a set update in place" in row["health"], row
    if then == "detach":
        netbpf(lab, "detach", "gw0")
        return
    path, want = (p_new, {SET_NEW}) if then == "new" else (p_old, {SET_OLD})
    out = netbpf(lab, "apply", str(path))
    assert set_members(lab) == want, out.stdout
    assert attach.xdp_state("gw0", netns=lab.ns("gw")).prog_id == prog, out.stdout
    assert status(lab)[1]["health"] == "ok"
    assert "nothing to do" in netbpf(lab, "apply", str(path)).stdout


def test_detach_removes_a_netbpf_program_the_state_does_not_record(gw, tmp_path):
    """The state file of the running apply lost (as after a kill before it was written by an
    older netbpf): detach still knows netbpf's program by its name and its pins."""
    lab = gw
    netbpf(lab, "apply", str(write(tmp_path, "p1.yaml", policy(1))))
    state_file(key(lab)).unlink()
    out = netbpf(lab, "detach", "gw0")
    assert "detached" in out.stdout and "left alone" not in out.stdout, out.stdout


def test_a_deleted_namespace_is_reported_and_forgotten_by_detach(make_lab, tmp_path):
    lab = make_lab("two-hosts")
    ns = lab.ns("gw")
    netbpf(lab, "apply", str(write(tmp_path, "p1.yaml", policy(1))))
    subprocess.run(["ip", "netns", "del", ns], check=True)
    code, row = status(lab)
    assert code == 1 and row["health"].startswith("namespace gone"), row
    out = netbpf(lab, "detach", "gw0")
    assert f"{ns}:gw0: the namespace is gone" in out.stdout and "forgot" in out.stdout
    assert not state_file(key(lab)).exists() and not (PIN_ROOT / key(lab)).exists()
    p = subprocess.run([NETBPF, "-n", ns, "status", "gw0"], capture_output=True, text=True)
    assert p.returncode == 1 and "not managed by netbpf" in p.stderr
