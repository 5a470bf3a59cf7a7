"""A re-apply where only a bare-IPv4 set file changed (netbpf/engine/setfiles.py): the changed
lines are written in place, before the policy is parsed; everything else is the full path's.

    [client] client0 ---------------------------- gw0 [gw]   (the shared two-hosts lab)
             10.10.0.2                             10.10.0.1 (drops sources in @bl)

Verdicts by BPF_PROG_TEST_RUN on the attached program; the set as the kernel holds it is
compared with the file after every apply. Timing is for bench/ (control rows).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netbpf.engine import persist
from netbpf.fw.fwtables import FwTables
from netbpf.kernel import attach, bpfsys
from netbpf.kernel.testrun import XDP_DROP, XDP_PASS
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.store import snapshot
from netbpf.store.state import load_state, pin_dir

from netbpf_cli import NETBPF, netbpf

FAST = "only set file bl.txt changed"
UNCHANGED = "nothing to do: the running policy is this one (input unchanged)"


def _policy(extra_rule: str = "", protect: str = "") -> str:
    return ("version: 1\nsets:\n  bl: {file: bl.txt}\n" + protect +
            "interfaces:\n  gw0:\n    xdp: {mode: native}\n    ingress:\n      default: allow\n"
            "      rules:\n        - {name: bl, src: \"@bl\", action: drop}\n" + extra_rule)


def _hosts(n: int, base: int = 0xC6120000) -> list[str]:       # 198.18.0.0/15
    return [f"{(base + i) >> 24}.{(base + i) >> 16 & 255}.{(base + i) >> 8 & 255}."
            f"{(base + i) & 255}" for i in range(n)]


@pytest.fixture
def gw(two_hosts, tmp_path):
    lab = two_hosts
    (tmp_path / "bl.txt").write_text("\n".join(_hosts(3000)) + "\n")
    (tmp_path / "p.yaml").write_text(_policy())
    out = netbpf(lab, "apply", str(tmp_path / "p.yaml")).stdout
    assert "loaded new programs" in out, out
    try:
        yield lab, tmp_path
    finally:
        netbpf(lab, "detach", "gw0", check=False)


def _apply(lab, d, check=True):
    return netbpf(lab, "apply", str(d / "p.yaml"), check=check)


def _key(lab) -> str:
    return f"{lab.ns('gw')}:gw0"


def kernel_set(lab) -> set[str]:
    """The addresses the running program's set holds."""
    st = load_state(_key(lab))
    part = st.parts["ingress"]
    (s,) = [s for s in part.sets if s.name == "bl"]
    t = FwTables.from_pins(pin_dir(st.key) / "ingress", part.words, part.class_cap)
    try:
        got = t.read_set(s.tag)
    finally:
        t.close()
    assert not got.v6 and all(plen == 32 for _, plen in got.v4)
    return {f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}" for a, _ in got.v4}


def file_set(d) -> set[str]:
    return set((d / "bl.txt").read_text().split())


def verdict(lab, src: str) -> int:
    frame = bytes(Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) /
                  IP(src=src, dst="10.10.0.1") / UDP(sport=5000, dport=53))
    xdp = attach.xdp_state("gw0", netns=lab.ns("gw"))
    with bpfsys.prog_get_fd_by_id(xdp.prog_id) as fd:
        return run_prog(fd, frame).retval


def _edit(d, add: list[str] = (), drop: set[str] = frozenset(), insert_at: int | None = None):
    lines = [x for x in (d / "bl.txt").read_text().split("\n")[:-1] if x not in drop]
    at = len(lines) if insert_at is None else insert_at
    (d / "bl.txt").write_text("\n".join(lines[:at] + list(add) + lines[at:]) + "\n")


def test_a_blocklist_edit_is_written_line_by_line_and_recorded(gw):
    lab, d = gw
    hosts = _hosts(3000)
    gone = {hosts[10], hosts[1500], hosts[2999]}
    new = ["203.0.113.7", "203.0.113.8", "192.0.2.99"]
    _edit(d, add=new[:2], drop=gone)
    _edit(d, add=new[2:], insert_at=700)
    r = _apply(lab, d)
    assert f"{FAST}: +3 -3 lines" in r.stdout and "update maps only" not in r.stdout, r.stdout
    assert kernel_set(lab) == file_set(d)
    assert [verdict(lab, a) for a in new] == [XDP_DROP] * 3
    assert [verdict(lab, a) for a in sorted(gone)] == [XDP_PASS] * 3
    assert verdict(lab, hosts[0]) == XDP_DROP and verdict(lab, "10.10.0.2") == XDP_PASS
    st = load_state(_key(lab))
    assert [(s.name, s.v4) for s in st.parts["ingress"].sets] == [("bl", 3000)]
    # what the next apply and `status` compare with, and what `restore` brings back
    assert _apply(lab, d).stdout.strip() == UNCHANGED
    cur = snapshot.snapshot_dir(_key(lab)) / "files" / "bl.txt"
    assert cur.read_bytes() == (d / "bl.txt").read_bytes()
    (rec,) = [r for r in persist.records() if r.get("netns") == lab.ns("gw")]
    mirror = rec["dir"] + "/root" + str((d / "bl.txt").resolve())
    assert open(mirror, "rb").read() == (d / "bl.txt").read_bytes()
    status = subprocess.run([NETBPF, "-n", lab.ns("gw"), "status", "gw0", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    (row,) = [r for r in json.loads(status.stdout) if r["interface"] == "gw0"]
    assert row["policy_file"] == "unchanged" and row["health"] == "ok", row
    # a later full apply (a rule added) sees the set as it is: nothing to write for it
    (d / "p.yaml").write_text(_policy("        - {name: one, src: 192.0.2.200, action: drop}\n"))
    r = _apply(lab, d)
    assert FAST not in r.stdout and "set bl: unchanged (3000 entries)" in r.stdout, r.stdout
    assert kernel_set(lab) == file_set(d) and verdict(lab, new[0]) == XDP_DROP


@pytest.mark.parametrize("line, why", [
    ("# a comment", "comment"), ("198.51.100.0/24", "prefix"), ("2001:db8::1", "ipv6"),
    (None, "repeat of a line the file keeps"), ("", "blank line"),
])
def test_edits_the_line_diff_cannot_prove_go_to_the_full_path(gw, line, why):
    lab, d = gw
    _edit(d, add=[_hosts(3000)[5] if line is None else line], insert_at=100)
    r = _apply(lab, d)
    assert FAST not in r.stdout, (why, r.stdout)
    want = {x.split("#")[0].strip() for x in (d / "bl.txt").read_text().split("\n")} - {""}
    if why == "prefix":
        assert verdict(lab, "198.51.100.77") == XDP_DROP
    elif why == "ipv6":
        assert "2001:db8::1" in want
    else:
        assert kernel_set(lab) == want
    # and the next plain-looking edit of that file too: it is no longer one entry a line
    _edit(d, add=["203.0.113.50"])
    r = _apply(lab, d)
    assert FAST not in r.stdout, (why, r.stdout)
    assert verdict(lab, "203.0.113.50") == XDP_DROP


def test_a_bad_line_is_reported_by_file_and_line_and_changes_nothing(gw):
    lab, d = gw
    _edit(d, add=["203.0.113.1", "300.1.2.3"], insert_at=41)
    r = _apply(lab, d, check=False)
    assert r.returncode == 2 and "bl.txt:43" in r.stderr, r.stderr
    assert verdict(lab, "203.0.113.1") == XDP_PASS and kernel_set(lab) == set(_hosts(3000))


def test_emptying_the_file_goes_to_the_full_path(gw):
    lab, d = gw
    (d / "bl.txt").write_text("")
    r = _apply(lab, d)
    assert FAST not in r.stdout, r.stdout
    assert verdict(lab, _hosts(3000)[0]) == XDP_PASS


def test_a_change_touching_a_protected_flow_gets_the_lockout_check(gw):
    lab, d = gw
    (d / "p.yaml").write_text(_policy(protect="protect:\n  - {name: monitoring, src: 10.9.9.9, "
                                              "dst: 10.10.0.1, dport: 9100}\n"))
    _apply(lab, d)
    _edit(d, add=["10.9.9.9"])
    r = _apply(lab, d, check=False)
    assert r.returncode == 2 and "protected flow 'monitoring'" in r.stderr, r.stdout + r.stderr
    assert verdict(lab, "10.9.9.9") == XDP_PASS
    # an address no flow uses still takes the line diff
    _edit(d, drop={"10.9.9.9"}, add=["203.0.113.9"])
    r = _apply(lab, d)
    assert f"{FAST}: +1 -0 lines" in r.stdout, r.stdout


def test_a_change_touching_the_ssh_session_gets_the_lockout_check_even_under_sudo(gw):
    """The ssh session is found as the lockout guard finds it: SSH_CONNECTION in an
    ancestor's environment counts (sudo drops it from ours)."""
    lab, d = gw
    _edit(d, add=["10.9.9.8"])
    cmd = f"env -u SSH_CONNECTION {NETBPF} -n {lab.ns('gw')} apply {d / 'p.yaml'}; exit $?"
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SSH_CONNECTION": "10.9.9.8 50000 10.10.0.1 22"})
    assert r.returncode == 2 and "ssh session" in r.stderr, r.stdout + r.stderr
    assert FAST not in r.stdout and verdict(lab, "10.9.9.8") == XDP_PASS


@pytest.mark.parametrize("step", ["sets:journal", "sets:added", "sets:state-saved"])
def test_a_kill_during_the_line_diff_apply_is_repaired_by_the_next_apply(gw, step):
    lab, d = gw
    _edit(d, add=["203.0.113.20", "203.0.113.21"], drop={_hosts(3000)[7]})
    p = subprocess.run([NETBPF, "-n", lab.ns("gw"), "apply", str(d / "p.yaml")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NETBPF_KILL_AT": step})
    assert p.returncode == -9, p.stdout + p.stderr
    if step != "sets:state-saved":
        s = subprocess.run([NETBPF, "-n", lab.ns("gw"), "status", "gw0"], capture_output=True,
                           text=True, timeout=60)
        assert "interrupted" in s.stdout + s.stderr, s.stdout + s.stderr
    r = _apply(lab, d)
    assert r.returncode == 0
    assert kernel_set(lab) == file_set(d)
    assert verdict(lab, "203.0.113.21") == XDP_DROP and verdict(lab, _hosts(3000)[7]) == XDP_PASS
    assert _apply(lab, d).stdout.strip() == UNCHANGED
