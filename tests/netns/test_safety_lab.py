"""Lockout guard and commit-confirmed apply, through the real CLI in a private lab.

    [client] client0 ------------------------------ gw0 [gw]
             10.10.0.2  "ssh" 10.10.0.2:50000 -> 10.10.0.1:22 (SSH_CONNECTION, simulated)
                                                    XDP ingress: ok.yaml, then bad.yaml that
                                                    drops 10.0.0.0/8 through a set

What runs is read from the attached program with BPF_PROG_TEST_RUN (an ssh packet from the
client) and from the state file, never assumed from the CLI's output.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netbpf.kernel import attach, bpfsys
from netbpf.kernel.testrun import XDP_DROP, XDP_PASS
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.procs import pid_alive
from netbpf.safety.confirm import read_pending
from netbpf.store.state import STATE_ROOT, load_state

from netbpf_cli import NETBPF, netbpf

SSH = "10.10.0.2 50000 10.10.0.1 22"

OK = """\
version: 1
interfaces:
  gw0:
    xdp: {mode: generic}
    ingress:
      default: allow
      rules:
        - {name: web, proto: tcp, dport: [80, 443], action: allow}
"""

BAD = """\
version: 1
sets:
  blocklist: [192.0.2.0/24, 10.0.0.0/8]
interfaces:
  gw0:
    xdp: {mode: generic}
    ingress:
      default: allow
      rules:
        - {name: drop-blocklist, src: "@blocklist", action: drop}
        - {name: web, proto: tcp, dport: [80, 443, 8081], action: allow}
"""

PROTECTED = BAD.replace("version: 1\n", "version: 1\nprotect:\n"
                        "  - {name: monitoring, src: 10.9.9.9, dst: 10.10.0.1, dport: 9100}\n")


@pytest.fixture
def gw(make_lab, tmp_path, monkeypatch):
    # not an nb<hex>- prefix: an older netbpf's cleanup (another checkout on a shared
    # machine) takes unrecorded nb<hex>- namespaces for leftovers
    lab = make_lab("two-hosts", prefix=f"sf{secrets.token_hex(3)}-")
    for name, text in (("ok.yaml", OK), ("bad.yaml", BAD), ("protected.yaml", PROTECTED)):
        (tmp_path / name).write_text(text)
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    try:
        yield lab, tmp_path
    finally:
        subprocess.run([NETBPF, "-n", lab.ns("gw"), "confirm"], capture_output=True)
        netbpf(lab, "detach", "gw0", check=False)


def ssh_verdict(lab) -> int:
    """XDP verdict of the attached program for the simulated ssh session's next packet."""
    frame = bytes(Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) /
                  IP(src="10.10.0.2", dst="10.10.0.1") / TCP(sport=50000, dport=22, flags="A"))
    xdp = attach.xdp_state("gw0", netns=lab.ns("gw"))
    with bpfsys.prog_get_fd_by_id(xdp.prog_id) as fd:
        return run_prog(fd, frame).retval


def rule_names(lab) -> list[str]:
    return [r.name for r in load_state(f"{lab.ns('gw')}:gw0").rules]


def wait_for(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_policy_dropping_the_ssh_session_is_refused_and_changes_nothing(gw, monkeypatch):
    lab, d = gw
    netbpf(lab, "apply", str(d / "ok.yaml"))
    monkeypatch.setenv("SSH_CONNECTION", SSH)
    p = netbpf(lab, "apply", str(d / "bad.yaml"), check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "rule 'drop-blocklist' (line 10) would drop the ssh session" in p.stderr
    assert "10.10.0.2:50000 -> 10.10.0.1:22" in p.stderr
    assert rule_names(lab) == ["web"] and ssh_verdict(lab) == XDP_PASS


def test_protected_flow_is_refused_even_without_ssh(gw):
    lab, d = gw
    p = netbpf(lab, "apply", str(d / "protected.yaml"), check=False)
    assert p.returncode == 2 and "protected flow 'monitoring'" in p.stderr, p.stderr
    forced = netbpf(lab, "apply", str(d / "protected.yaml"), "--force")
    assert "applied anyway" in forced.stderr and ssh_verdict(lab) == XDP_DROP


def test_confirm_timeout_rolls_back_to_the_previous_policy(gw, monkeypatch):
    lab, d = gw
    netbpf(lab, "apply", str(d / "ok.yaml"))
    monkeypatch.setenv("SSH_CONNECTION", SSH)
    netbpf(lab, "apply", str(d / "bad.yaml"), "--force", "--confirm", "5")
    applied = time.monotonic()
    assert ssh_verdict(lab) == XDP_DROP and rule_names(lab) == ["drop-blocklist", "web"]
    assert wait_for(lambda: ssh_verdict(lab) == XDP_PASS, 6.0 - (time.monotonic() - applied))
    assert wait_for(lambda: rule_names(lab) == ["web"], 2)
    assert "previous policy" in (STATE_ROOT / "confirm" / "rollback.log").read_text()


def test_rollback_happens_when_the_apply_is_sigkilled_right_after_applying(gw, monkeypatch):
    lab, d = gw
    netbpf(lab, "apply", str(d / "ok.yaml"))
    monkeypatch.setenv("SSH_CONNECTION", SSH)
    proc = subprocess.Popen([NETBPF, "-n", lab.ns("gw"), "apply", str(d / "bad.yaml"),
                             "--force", "--confirm", "5"], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:
            if "rules (program id" in line or "loaded new programs" in line:
                break                 # the new policy is live: kill before anything else
        os.kill(proc.pid, signal.SIGKILL)
        applied = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    assert ssh_verdict(lab) == XDP_DROP
    assert wait_for(lambda: ssh_verdict(lab) == XDP_PASS, 6.0 - (time.monotonic() - applied))


def test_confirm_keeps_the_new_policy(gw, monkeypatch):
    lab, d = gw
    netbpf(lab, "apply", str(d / "ok.yaml"))
    # a window no busy machine misses before `confirm` runs; after the confirm the timer is
    # gone, so no rollback can come at the deadline
    netbpf(lab, "apply", str(d / "bad.yaml"), "--confirm", "60")
    timer = read_pending()["timer_pid"]
    assert pid_alive(timer)
    out = netbpf(lab, "confirm").stdout
    assert "confirmed" in out
    assert wait_for(lambda: not pid_alive(timer), 10), "the confirm timer is still running"
    assert read_pending() is None
    assert rule_names(lab) == ["drop-blocklist", "web"] and ssh_verdict(lab) == XDP_DROP
    again = netbpf(lab, "confirm", check=False)
    assert again.returncode == 1 and "nothing to confirm" in again.stderr


def test_first_apply_with_confirm_rolls_back_to_nothing(gw):
    lab, d = gw
    netbpf(lab, "apply", str(d / "ok.yaml"), "--confirm", "1")
    # the rollback detaches the programs first, then forgets pins and state: wait for both
    assert wait_for(lambda: attach.xdp_state("gw0", netns=lab.ns("gw")) is None
                    and load_state(f"{lab.ns('gw')}:gw0") is None, 6)
