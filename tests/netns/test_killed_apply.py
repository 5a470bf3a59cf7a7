"""`netbpf apply` killed with SIGKILL at random points, and applies that fail: what runs
afterwards is a whole policy, and the next apply repairs everything.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab per test)
             10.10.0.2                             10.10.0.1
             UDP probes to gw:7000+N  ----------->  XDP ingress: policy N drops udp 7000+N
             UDP from gw:8000+N      <-----------   TC egress:   policy N drops udp 8000+N

Each hook's verdicts are read twice: with lab traffic (test_races.Probes) and with
BPF_PROG_TEST_RUN on the program attached right now (its live maps). The random kills check
each hook is whole and the repair; the ordered kills (a poll on the pinned generation or the
staging pins, then SIGKILL) pin the windows down. Set NETBPF_SEED to replay a random run;
NETBPF_SOAK=1 kills 60 times instead of 15.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netbpf.kernel import attach, bpfsys, link
from netbpf.kernel.testrun import TC_ACT_SHOT, XDP_DROP
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.store.state import PIN_ROOT, staging_dirs

from netbpf_cli import NETBPF, netbpf
# Shared with the race tests: policies told apart by two ports, probes, status and stats.
from test_races import (IN_BASE, OUT_BASE, Probes, policy, reaches, rule_names, status_row,
                        write)

SOAK = os.environ.get("NETBPF_SOAK") == "1"
KILLS = 60 if SOAK else 15


@pytest.fixture
def gw(make_lab):
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=range(4))
    try:
        yield lab, probes
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


def key(lab) -> str:
    return f"{lab.ns('gw')}:gw0"


def staging_left(lab) -> list[str]:
    return [str(d) for d in staging_dirs(key(lab)) if d.exists()]


def drops_by_test_run(lab, tags) -> tuple[set[int], set[int]]:
    """Which tags' ports the attached programs drop, by BPF_PROG_TEST_RUN on their fds."""
    ns = lab.ns("gw")
    gw_mac, cl_mac = lab.mac("gw", "gw0"), lab.mac("client", "client0")
    gw4, cl4 = lab.addr("gw", "gw0"), lab.addr("client", "client0")
    ing, eg = set(), set()
    xdp = attach.xdp_state("gw0", netns=ns)
    # netbpf's TCX link is appended: the last program on the hook (cls_bpf when forced)
    tc = [pid for pid in link.tcx_prog_ids("gw0", "egress", netns=ns)][-1:] or \
        [f.prog_id for f in attach.list_tc_filters("gw0", "egress", netns=ns)
         if f.prio == attach.NB_TC_PRIO]
    for t in tags:
        frame_in = bytes(Ether(src=cl_mac, dst=gw_mac) / IP(src=cl4, dst=gw4) /
                         UDP(sport=40000, dport=IN_BASE + t) / b"probe")
        frame_out = bytes(Ether(src=gw_mac, dst=cl_mac) / IP(src=gw4, dst=cl4) /
                          UDP(sport=40000, dport=OUT_BASE + t) / b"probe")
        if xdp is not None:
            with bpfsys.prog_get_fd_by_id(xdp.prog_id) as fd:
                if run_prog(fd, frame_in).retval == XDP_DROP:
                    ing.add(t)
        if tc:
            with bpfsys.prog_get_fd_by_id(tc[0]) as fd:
                if run_prog(fd, frame_out).retval == TC_ACT_SHOT:
                    eg.add(t)
    return ing, eg


class Killed:
    """`netbpf apply` started now, SIGKILLed later (if still running)."""

    def __init__(self, lab, path: Path):
        self.proc = subprocess.Popen([NETBPF, "-n", lab.ns("gw"), "apply", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started = time.monotonic()

    def kill(self) -> bool:
        """SIGKILL; True if the apply was still running (it really was interrupted)."""
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        return running


def repair(lab, probes: Probes, path: Path, tag: int) -> None:
    """The next apply exits 0 and leaves everything as a clean apply would."""
    out = netbpf(lab, "apply", str(path))
    assert probes.enforced() == tag, out.stdout
    assert drops_by_test_run(lab, probes.tags) == ({tag}, {tag})
    row = status_row(lab)
    assert row["health"] == "ok" and row["policy_path"] == str(path.resolve()), row
    assert {f"in-{tag}", f"out-{tag}"} <= rule_names(lab)
    assert staging_left(lab) == [], out.stdout


def _wait_gen_flip(lab, run: Killed, timeout: float = 60.0) -> None:
    """Poll the pinned ingress generation; SIGKILL the apply the moment it flips."""
    with bpfsys.obj_get(PIN_ROOT / key(lab) / "ingress" / "nb_fw_gen") as fd:
        before = bpfsys.map_lookup(fd, bytes(4), 4)
        deadline = time.monotonic() + timeout
        while bpfsys.map_lookup(fd, bytes(4), 4) == before:
            assert run.proc.poll() is None, "the apply ended before the generation flipped"
            assert time.monotonic() < deadline, "the generation never flipped"
            time.sleep(0.0005)
    assert run.kill(), "the apply had finished already"


def test_kill_between_the_two_flips_leaves_one_policy_or_status_says_so(gw, tmp_path):
    lab, probes = gw
    p1, p2 = write(tmp_path, "p1.yaml", policy(1)), write(tmp_path, "p2.yaml", policy(2))
    netbpf(lab, "apply", str(p1))
    run = Killed(lab, p2)
    _wait_gen_flip(lab, run)
    ing, eg = probes.dropped()
    health = status_row(lab)["health"]
    try:
        assert ing == eg or health != "ok", (
            f"ingress runs policy {ing}, egress {eg}, status health {health!r}")
    finally:
        repair(lab, probes, p2, 2)


def test_set_written_by_a_killed_apply_does_not_leak_into_the_next_policy(gw, tmp_path):
    lab, probes = gw
    for addr in ("192.0.2.1", "198.51.100.1"):
        lab.run("gw", ["ip", "addr", "add", f"{addr}/32", "dev", "gw0"])
    # the base policy has a set already, so the changes below are map writes, not programs
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0, set_addr="203.0.113.1"))))
    run = Killed(lab, write(tmp_path, "p1.yaml", policy(1, set_addr="192.0.2.1")))
    _wait_gen_flip(lab, run)
    p2 = write(tmp_path, "p2.yaml", policy(2, set_addr="198.51.100.1"))
    # the killed apply flipped without recording it: the next apply sees the half-applied
    # state and repairs (new programs) rather than writing over leftovers
    netbpf(lab, "apply", str(p2))
    assert probes.enforced() == 2
    assert not reaches(lab, "198.51.100.1")
    assert reaches(lab, "192.0.2.1"), "policy 2 drops an address only policy 1's set held"


def test_staging_pins_of_a_killed_apply_are_removed_by_the_next_apply(gw, tmp_path):
    lab, probes = gw
    p1 = write(tmp_path, "p1.yaml", policy(1))
    netbpf(lab, "apply", str(p1))
    new, _ = staging_dirs(key(lab))
    run = Killed(lab, write(tmp_path, "p3.yaml", policy(3, pad=100)))
    deadline = time.monotonic() + 60
    while not (new / "ingress" / "nb_fw_gen").exists():
        assert run.proc.poll() is None and time.monotonic() < deadline, "no staging pins seen"
        time.sleep(0.001)
    assert run.kill()
    assert probes.enforced() == 1
    out = netbpf(lab, "apply", str(p1))
    left = staging_left(lab)
    assert left == [] or status_row(lab)["health"] != "ok", (
        f"{left} left behind, status ok; apply said: {out.stdout}")


def test_rejected_policy_exits_2_and_leaves_the_running_policy_untouched(gw, tmp_path):
    """Bad input is refused before anything is touched: same programs, same generation, same
    state, same verdicts."""
    lab, probes = gw
    p1 = write(tmp_path, "p1.yaml", policy(1))
    netbpf(lab, "apply", str(p1))
    before = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    row = status_row(lab)
    (tmp_path / "bl.txt").write_text("192.0.2.0/24\nnot-an-address\n")
    bad = {
        "set": policy(2).replace("version: 1\n", "version: 1\nsets:\n  bl: {file: bl.txt}\n")
                        .replace("rules:\n", "rules:\n        - {name: b, src: \"@bl\", "
                                             "action: drop}\n", 1),
        "field": policy(2).replace("dport: 7002", "dport: 70000"),
        "yaml": policy(2) + "  gw0: {}\n",
    }
    for what, text in bad.items():
        r = netbpf(lab, "apply", str(write(tmp_path, f"bad-{what}.yaml", text)), check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (what, r.stderr)
        assert r.stdout == "", (what, r.stdout)
    assert "bl.txt:2:1: sets.bl:" in netbpf(
        lab, "apply", str(tmp_path / "bad-set.yaml"), check=False).stderr
    after = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    for d in ("ingress", "egress"):
        for field in ("prog_id", "generation"):
            assert after["parts"][d][field] == before["parts"][d][field], (d, field)
    assert status_row(lab) == row
    assert probes.enforced() == 1
