"""Two `netbpf apply` at once on one gateway: both succeed (one waits for the apply lock) and
the interface ends up running one whole policy, told apart by traffic, stats and status.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab per test)
             10.10.0.2                             10.10.0.1
             UDP probes to gw:7000+N  ----------->  XDP ingress: policy N drops udp 7000+N
             UDP from gw:8000+N      <-----------   TC egress:   policy N drops udp 8000+N

Policy N drops exactly those two ports, so one probe round says which policy each hook runs.
The ordered cases hold the apply lock while both commands plan, so the second one runs a plan
made before the first committed (the race, made deterministic with SIGSTOP/SIGCONT).
Not killed applies (test_killed_apply.py) nor drift (test_drift.py); those, test_privilege.py
and test_soak.py import the helpers here (policy, Probes, status_row, ...).
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from netbpf.kernel.netns import enter_netns
from netbpf.store.state import lock_file

from netbpf_cli import NETBPF, netbpf

IN_BASE, OUT_BASE, CONTROL = 7000, 8000, 7999
TAGS = range(0, 6)


def policy(tag: int, *, pad: int = 0, wide: bool = False, set_addr: str | None = None) -> str:
    """Policy `tag`: drops udp 7000+tag in, udp 8000+tag out. pad adds TCP rules (pad > 63
    needs more rule words); wide gives each its own source port too (pad 60: more classes
    than 64, the same word count). set_addr adds a set holding that address and a rule
    dropping packets to it."""
    sport = (lambda i: f" sport: {30000 + i},") if wide else (lambda i: "")
    extra = "".join(f"        - {{name: pad-{i}, proto: tcp,{sport(i)} dport: {20000 + i}, "
                    f"action: drop}}\n" for i in range(pad))
    sets = f"sets:\n  dst-set: [{set_addr}/32]\n" if set_addr else ""
    set_rule = ("        - {name: to-set, dst: \"@dst-set\", action: drop}\n" if set_addr else "")
    return (f"version: 1\n{sets}interfaces:\n  gw0:\n    xdp: {{mode: native}}\n"
            f"    ingress:\n      default: allow\n      rules:\n"
            f"        - {{name: in-{tag}, proto: udp, dport: {IN_BASE + tag}, action: drop}}\n"
            f"{set_rule}{extra}"
            f"    egress:\n      default: allow\n      rules:\n"
            f"        - {{name: out-{tag}, proto: udp, dport: {OUT_BASE + tag}, action: drop}}\n")


def status_row(lab) -> dict:
    """This lab's row of `netbpf status --json` (the machine may run other labs)."""
    p = subprocess.run([NETBPF, "status", "--json"], capture_output=True, text=True, timeout=60)
    rows = [r for r in json.loads(p.stdout) if r["netns"] == lab.ns("gw")]
    assert len(rows) == 1, rows
    return rows[0]


def rule_names(lab) -> set[str]:
    return {r["name"] for r in json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)["rules"]}


def _udp(ns: str, port: int | None = None) -> socket.socket:
    with enter_netns(ns):        # a socket stays in the namespace it was made in
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if port is not None:
            s.bind(("0.0.0.0", port))
    s.setblocking(False)
    return s


class Probes:
    """One UDP datagram per port, both ways through gw0, then a control datagram every policy
    allows: once the control one is in, the others have arrived or were dropped."""

    def __init__(self, lab, tags=TAGS):
        self.tags = list(tags)
        self.gw, self.client = lab.addr("gw", "gw0"), lab.addr("client", "client0")
        self.rx_in = {p: _udp(lab.ns("gw"), p) for p in [IN_BASE + t for t in tags] + [CONTROL]}
        self.rx_out = {p: _udp(lab.ns("client"), p)
                       for p in [OUT_BASE + t for t in tags] + [CONTROL]}
        self.tx_in, self.tx_out = _udp(lab.ns("client")), _udp(lab.ns("gw"))

    def close(self) -> None:
        for s in (*self.rx_in.values(), *self.rx_out.values(), self.tx_in, self.tx_out):
            s.close()

    @staticmethod
    def _drain(rx: dict, token: bytes, got: set) -> None:
        for port, s in rx.items():
            while True:
                try:
                    if s.recv(64) == token:
                        got.add(port)
                except BlockingIOError:
                    break

    def _round(self, tx, rx: dict, dst: str) -> set[int]:
        self._drain(rx, b"", set())
        token = os.urandom(8)
        for port in rx:
            if port != CONTROL:
                tx.sendto(token, (dst, port))
        tx.sendto(token, (dst, CONTROL))
        got: set[int] = set()
        deadline = time.monotonic() + 3.0
        while CONTROL not in got and time.monotonic() < deadline:
            select.select(list(rx.values()), [], [], 0.05)
            self._drain(rx, token, got)
        assert CONTROL in got, f"the control datagram to {dst}:{CONTROL} did not arrive"
        time.sleep(0.02)
        self._drain(rx, token, got)
        return got - {CONTROL}

    def dropped(self) -> tuple[set[int], set[int]]:
        """(tags whose ingress port is dropped, tags whose egress port is dropped)."""
        got_in = self._round(self.tx_in, self.rx_in, self.gw)
        got_out = self._round(self.tx_out, self.rx_out, self.client)
        return ({t for t in self.tags if IN_BASE + t not in got_in},
                {t for t in self.tags if OUT_BASE + t not in got_out})

    def enforced(self) -> int:
        """The one policy tag both hooks enforce; fails on a mix or on none."""
        ing, eg = self.dropped()
        assert len(ing) == 1 and ing == eg, f"ingress drops {ing}, egress drops {eg}: not one policy"
        return ing.pop()


@pytest.fixture
def gw(make_lab):
    lab = make_lab("two-hosts")
    probes = Probes(lab)
    try:
        yield lab, probes
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


class Apply:
    """`netbpf apply` in the background, its output read as it comes (unbuffered)."""

    def __init__(self, lab, path: Path):
        self.path = path
        self.proc = subprocess.Popen([NETBPF, "-n", lab.ns("gw"), "apply", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: text in self.output or self.proc.poll() is not None,
                                     timeout)
        assert ok and text in self.output, f"apply {self.path.name} never said {text!r}:\n{self.output}"

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)          # let the reader take the last lines
        return rc


@contextmanager
def apply_lock_held(lab):
    """Hold netbpf's apply lock of the lab's gw0 (waits if another apply has it)."""
    path = lock_file(f"{lab.ns('gw')}:gw0")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def apply_in_order(lab, first: Path, second: Path) -> tuple[Apply, Apply]:
    """Both plan while the lock is held; then `first` applies, then `second` with its plan made
    before `first` changed anything."""
    with apply_lock_held(lab):
        a = Apply(lab, first)
        a.wait_for("waiting for another netbpf apply")
        b = Apply(lab, second)
        b.wait_for("waiting for another netbpf apply")
        b.proc.send_signal(signal.SIGSTOP)
    try:
        a.finish()
    finally:
        b.proc.send_signal(signal.SIGCONT)
    b.finish()
    return a, b


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_whole(lab, probes: Probes, tags: dict[int, Path]) -> int:
    """Traffic, stats and status agree on one policy among tags; returns its tag."""
    tag = probes.enforced()
    assert tag in tags, f"policy {tag} runs, expected one of {sorted(tags)}"
    names = rule_names(lab)
    assert {f"in-{tag}", f"out-{tag}"} <= names, names
    assert not any(f"in-{t}" in names for t in tags if t != tag), names
    row = status_row(lab)
    assert row["health"] == "ok" and row["policy_path"] == str(tags[tag].resolve()), row
    return tag


def test_two_applies_at_once_both_succeed_and_one_whole_policy_runs(gw, tmp_path):
    lab, probes = gw
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0))))
    assert probes.enforced() == 0
    for a, b in ((1, 2), (3, 4)):
        pa, pb = write(tmp_path, f"p{a}.yaml", policy(a)), write(tmp_path, f"p{b}.yaml", policy(b))
        runs = [Apply(lab, pa), Apply(lab, pb)]
        for r in runs:
            assert r.finish() == 0, r.output
        assert_whole(lab, probes, {a: pa, b: pb})


def test_second_apply_waits_for_the_lock_then_its_policy_runs_whole(gw, tmp_path):
    lab, probes = gw
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0))))
    p1, p2 = write(tmp_path, "p1.yaml", policy(1)), write(tmp_path, "p2.yaml", policy(2))
    a, b = apply_in_order(lab, p1, p2)
    assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output + b.output
    assert assert_whole(lab, probes, {1: p1, 2: p2}) == 2


def test_applies_to_two_interfaces_do_not_wait_for_each_other(gw, make_lab, tmp_path):
    """gw0 of this lab is locked (as by a long apply); an apply to another lab's gw0 goes
    through meanwhile, and one to this gw0 waits."""
    lab, probes = gw
    other = make_lab("two-hosts")
    p1 = write(tmp_path, "p1.yaml", policy(1))
    with apply_lock_held(lab):
        elsewhere = Apply(other, p1)
        assert elsewhere.finish() == 0, elsewhere.output
        assert "waiting" not in elsewhere.output, elsewhere.output
        here = Apply(lab, p1)
        here.wait_for("waiting for another netbpf apply")
    assert here.finish() == 0, here.output
    assert probes.enforced() == 1
    netbpf(other, "detach", "gw0")


def test_apply_planned_before_a_shape_change_still_applies_whole(gw, tmp_path):
    lab, probes = gw
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0))))
    big = write(tmp_path, "p1.yaml", policy(1, pad=100))        # 2 words: new program
    small = write(tmp_path, "p2.yaml", policy(2))               # planned as a map update
    a, b = apply_in_order(lab, big, small)
    assert a.proc.returncode == 0, a.output
    assert b.proc.returncode == 0, b.output
    assert assert_whole(lab, probes, {1: big, 2: small}) == 2


def test_apply_planned_before_a_class_cap_change_still_enforces_its_policy(gw, tmp_path):
    lab, probes = gw
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0))))
    wide = write(tmp_path, "p1.yaml", policy(1, pad=60, wide=True))   # 64 -> 256 classes
    small = write(tmp_path, "p2.yaml", policy(2))
    a, b = apply_in_order(lab, wide, small)
    assert "shape changed" in a.output, a.output
    assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output + b.output
    assert assert_whole(lab, probes, {1: wide, 2: small}) == 2


def test_apply_planned_before_another_set_change_keeps_the_sets_apart(gw, tmp_path):
    lab, probes = gw
    for addr in ("192.0.2.1", "198.51.100.1"):
        lab.run("gw", ["ip", "addr", "add", f"{addr}/32", "dev", "gw0"])
    # the base policy has a set already, so both changes below are map writes, not programs
    netbpf(lab, "apply", str(write(tmp_path, "p0.yaml", policy(0, set_addr="203.0.113.1"))))
    s1 = write(tmp_path, "p1.yaml", policy(1, set_addr="192.0.2.1"))
    s2 = write(tmp_path, "p2.yaml", policy(2, set_addr="198.51.100.1"))
    a, b = apply_in_order(lab, s1, s2)
    assert "update maps only" in a.output and "update maps only" in b.output
    assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output + b.output
    assert assert_whole(lab, probes, {1: s1, 2: s2}) == 2
    blocked = [addr for addr in ("192.0.2.1", "198.51.100.1") if not reaches(lab, addr)]
    assert blocked == ["198.51.100.1"], f"policy 2 drops traffic to {blocked}"


def reaches(lab, addr: str) -> bool:
    """A datagram from the client to addr:7990 (an address of gw) arrives; a datagram to
    gw0's own address on port 7991, sent after it, marks the end of the wait."""
    rx, ctl, tx = _udp(lab.ns("gw"), 7990), _udp(lab.ns("gw"), 7991), _udp(lab.ns("client"))
    try:
        tx.sendto(b"probe", (addr, 7990))
        tx.sendto(b"ctl", (lab.addr("gw", "gw0"), 7991))
        select.select([ctl], [], [], 3.0)
        assert ctl.recv(16) == b"ctl", "the control datagram did not arrive"
        time.sleep(0.02)
        try:
            return rx.recv(16) == b"probe"
        except BlockingIOError:
            return False
    finally:
        for s in (rx, ctl, tx):
            s.close()


def test_two_first_applies_at_once_leave_nothing_behind_after_detach(gw, tmp_path):
    lab, probes = gw
    p1, p2 = write(tmp_path, "p1.yaml", policy(1)), write(tmp_path, "p2.yaml", policy(2))
    a, b = apply_in_order(lab, p1, p2)
    assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output + b.output
    assert assert_whole(lab, probes, {1: p1, 2: p2}) == 2
    netbpf(lab, "detach", "gw0")
    qdiscs = lab.run("gw", ["tc", "qdisc", "show", "dev", "gw0"]).stdout
    assert "clsact" not in qdiscs, qdiscs
