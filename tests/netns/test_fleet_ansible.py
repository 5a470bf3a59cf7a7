"""The Ansible collection on a fleet of four gateways: the example playbook (ansible/playbooks/
rollout.yml) run by the real ansible-playbook against network namespaces of this machine, each
a "host" reached with the local connection and the module's netns option.

             c1 10.40.1.2 ---------- gw0 10.40.1.1 [gw1]
    [client] c2 10.40.2.2 ---------- gw0 10.40.2.1 [gw2]     (netns-lab/fleet.yaml, one lab
             c3 10.40.3.2 ---------- gw0 10.40.3.1 [gw3]      for the module: ansible-playbook
             c4 10.40.4.2 ---------- gw0 10.40.4.1 [gw4]      starts slowly)

Verdicts are pings from the client: closed.yaml drops ICMP echo requests, open.yaml lets them
through (deaf.yaml drops echo replies, so the gateways' own self-check pings fail). The tests
run in file order; each checks the state it starts from.

The commit-confirmed runs use `serial: 1`: netbpf keeps one pending confirm per machine, and
the four "hosts" here share this one (on a real fleet each host has its own).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netbpf.lab import TOPOLOGY_DIR, Lab
from netbpf.safety import confirm

from netbpf_cli import NETBPF

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLAYBOOK = ANSIBLE_DIR / "playbooks" / "rollout.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HOSTS = ("gw1", "gw2", "gw3", "gw4")

POLICY = """\
version: 1
sets:
  blocklist: {{file: blocklist.txt}}
interfaces:
  gw0:
    ingress:
      default: allow
      rules:
        - {{name: drop-blocklist, src: "@blocklist", action: drop}}
{extra}"""
DROP_PING = "        - {name: drop-ping, proto: icmp, icmp_type: echo-request, action: drop}\n"
DROP_UDP = "        - {name: drop-udp-9999, proto: udp, dport: 9999, action: drop}\n"
POLICIES = {
    "open.yaml": POLICY.format(extra=""),
    "closed.yaml": POLICY.format(extra=DROP_PING),
    "closed2.yaml": POLICY.format(extra=DROP_PING + DROP_UDP),
    # line 10, column 54: the action value
    "bad.yaml": POLICY.format(extra="        - {name: web, proto: tcp, dport: 80, action: accept}\n"),
    "blocklist.txt": "192.0.2.0/24\n",
    "bad-blocklist.txt": "192.0.2.0/24\n10.0.0.300/24\n",
    # a policy that cuts the gateway off: the answers to its own pings are dropped
    "deaf.yaml": POLICY.format(
        extra="        - {name: drop-replies, proto: icmp, icmp_type: echo-reply, action: drop}\n"),
}
BAD_POLICY_ERROR = ("bad.yaml:10:54: interfaces.gw0.ingress.rules[1].action: "
                    "must be allow, drop, reject, count or {rate_limit: ...} (got 'accept'); "
                    "iptables' ACCEPT / nft's accept is 'allow' here")
RECAP = re.compile(r"^(gw\d)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)",
                   re.MULTILINE)


class Fleet:
    def __init__(self, lab: Lab, root: Path):
        self.lab, self.root = lab, root
        self.files = root / "files"
        self.dest = root / "kept"
        self.files.mkdir()
        for name, text in POLICIES.items():
            (self.files / name).write_text(text)
        self.env = dict(os.environ, ANSIBLE_HOME=str(root / "ansible-home"),
                        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
                        ANSIBLE_COLLECTIONS_PATH=str(ANSIBLE_DIR / "collections"),
                        ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(root / "tmp"),
                        ANSIBLE_REMOTE_TMP=str(root / "remote-tmp"))

    def inventory(self, host_vars: dict[str, dict] | None = None) -> Path:
        hosts = {h: {"netbpf_netns": self.lab.ns(h),
                     "netbpf_selfcheck_ping": [self.lab.addr("client", f"c{h[-1]}")],
                     **(host_vars or {}).get(h, {})} for h in HOSTS}
        inv = {"gateways": {"vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "netbpf_executable": NETBPF,
            "netbpf_dest_dir": str(self.dest),
            "netbpf_set_files": {"blocklist.txt": str(self.files / "blocklist.txt")},
        }, "hosts": hosts}}
        path = self.root / "inventory.yml"
        path.write_text(json.dumps(inv))  # JSON is YAML: the yaml inventory plugin reads it
        return path

    def playbook(self, policy: str, *args: str, batch: int = 4,
                 host_vars: dict[str, dict] | None = None) -> tuple[int, str, dict]:
        """(exit code, output, {host: (ok, changed, failed)}) of the example playbook."""
        p = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory(host_vars)), str(PLAYBOOK),
             "-e", f"netbpf_policy_file={self.files / policy}", "-e", f"netbpf_batch={batch}",
             *args], capture_output=True, text=True, env=self.env, timeout=600)
        out = p.stdout + p.stderr
        recap = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in RECAP.finditer(p.stdout)}
        return p.returncode, out, recap

    def status(self) -> dict[str, dict]:
        """netbpf status --json rows of gw0, by host."""
        p = subprocess.run([NETBPF, "status", "--json"], capture_output=True, text=True,
                           timeout=60)
        rows = json.loads(p.stdout)
        by_ns = {r["netns"]: r for r in rows if r["interface"] == "gw0"}
        return {h: by_ns[self.lab.ns(h)] for h in HOSTS if self.lab.ns(h) in by_ns}

    def answers_ping(self, host: str) -> bool:
        return self.lab.ping("client", self.lab.addr(host, "gw0"), timeout=1.0)

    def verdicts(self) -> dict[str, bool]:
        return {h: self.answers_ping(h) for h in HOSTS}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, _no_lab_left_behind):
    if not ANSIBLE_PLAYBOOK.exists():
        why = "ansible-playbook is not in the venv: run 'make setup' (installs the test extra)"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("the fleet lab needs root")
    # Not a random nb<hex>- prefix: another checkout's test session (private lab state dir)
    # takes those for leftovers of killed runs and removes them.
    with Lab.from_file(TOPOLOGY_DIR / "fleet.yaml", prefix=f"fleet{os.getpid()}-") as lab:
        try:
            yield Fleet(lab, tmp_path_factory.mktemp("fleet"))
        finally:
            for h in HOSTS:
                subprocess.run([NETBPF, "-n", lab.ns(h), "detach", "gw0"], capture_output=True,
                               timeout=120)


def _same_programs(before: dict, after: dict) -> None:
    for h in before:
        for key in ("programs", "policy_hash", "applied_at"):
            assert after[h][key] == before[h][key], (h, key, before[h], after[h])


def test_rollout_applies_to_every_host_and_a_second_run_changes_nothing(fleet):
    assert fleet.status() == {}
    assert all(fleet.verdicts().values()), "every gateway answers ping before any policy"

    rc, out, recap = fleet.playbook("closed.yaml", batch=2)
    assert rc == 0, out
    assert {h: recap[h][1:] for h in HOSTS} == {h: (1, 0) for h in HOSTS}, out
    status = fleet.status()
    assert {h: status[h]["health"] for h in HOSTS} == {h: "ok" for h in HOSTS}
    assert len({status[h]["policy_hash"] for h in HOSTS}) == 1
    assert fleet.verdicts() == {h: False for h in HOSTS}, "closed.yaml drops pings everywhere"

    rc, out, recap = fleet.playbook("closed.yaml")
    assert rc == 0, out
    assert {h: recap[h][1:] for h in HOSTS} == {h: (0, 0) for h in HOSTS}, out
    _same_programs(status, fleet.status())


def test_check_mode_reports_the_hosts_that_would_change_and_touches_nothing(fleet):
    rc, out, recap = fleet.playbook("open.yaml", "--limit", "gw3,gw4")
    assert rc == 0, out
    assert {h: recap[h][1] for h in ("gw3", "gw4")} == {"gw3": 1, "gw4": 1}, out
    before = fleet.status()
    kept = {p: p.read_bytes() for p in fleet.dest.rglob("*") if p.is_file()}
    assert fleet.verdicts() == {"gw1": False, "gw2": False, "gw3": True, "gw4": True}

    rc, out, recap = fleet.playbook("open.yaml", "--check", "--diff")
    assert rc == 0, out
    assert {h: recap[h][1:] for h in HOSTS} == \
        {"gw1": (1, 0), "gw2": (1, 0), "gw3": (0, 0), "gw4": (0, 0)}, out
    for h in ("gw1", "gw2"):
        assert f"~ gw0 (netns {fleet.lab.ns(h)}): update\n  - ingress drop-ping (drop)" in out
    assert fleet.lab.ns("gw3") + "): update" not in out
    _same_programs(before, fleet.status())
    assert {p: p.read_bytes() for p in fleet.dest.rglob("*") if p.is_file()} == kept
    assert fleet.verdicts() == {"gw1": False, "gw2": False, "gw3": True, "gw4": True}


def test_bad_policy_fails_with_file_line_col_and_every_old_policy_stays(fleet):
    before = fleet.status()
    kept = {p: p.read_bytes() for p in fleet.dest.rglob("*") if p.is_file()}

    rc, out, recap = fleet.playbook("bad.yaml")
    assert rc != 0
    assert {h: recap[h][2] for h in HOSTS} == {h: 1 for h in HOSTS}, out
    assert out.count(BAD_POLICY_ERROR) >= len(HOSTS), out
    assert "FAILED (exit 2)" in out
    _same_programs(before, fleet.status())
    assert {p: p.read_bytes() for p in fleet.dest.rglob("*") if p.is_file()} == kept
    assert fleet.verdicts() == {"gw1": False, "gw2": False, "gw3": True, "gw4": True}


def test_batch_rollout_stops_at_the_first_failing_host(fleet):
    """gw2's own set file is broken: gw1 takes closed2.yaml, gw2 fails and keeps closed.yaml,
    gw3 and gw4 (still on open.yaml) are never reached."""
    before = fleet.status()
    bad_set = {"gw2": {"netbpf_set_files": {"blocklist.txt":
                                            str(fleet.files / "bad-blocklist.txt")}}}

    rc, out, recap = fleet.playbook("closed2.yaml", batch=1, host_vars=bad_set)
    assert rc != 0
    assert recap["gw1"][1:] == (1, 0), out
    assert recap["gw2"][2] == 1, out
    assert "blocklist.txt:2:1:" in out and "10.0.0.300/24" in out, out
    assert all(recap.get(h, (0, 0, 0)) == (0, 0, 0) for h in ("gw3", "gw4")), out
    after = fleet.status()
    assert after["gw1"]["policy_hash"] != before["gw1"]["policy_hash"]
    _same_programs({h: before[h] for h in ("gw2", "gw3", "gw4")},
                   {h: after[h] for h in ("gw2", "gw3", "gw4")})
    assert fleet.verdicts() == {"gw1": False, "gw2": False, "gw3": True, "gw4": True}


def test_batch_rollout_stops_at_the_first_failing_self_check(fleet):
    """deaf.yaml applies fine but the gateway's self-check ping gets no answer: gw1 is the
    only host that took it; gw2-gw4 keep what they ran."""
    before = fleet.status()

    rc, out, recap = fleet.playbook("deaf.yaml", batch=1)
    assert rc != 0
    assert recap["gw1"][1:] == (1, 1), out
    assert f"gw1: applied, self-check FAILED: no answer from {fleet.lab.addr('client', 'c1')}" \
        in out, out
    assert all(recap.get(h, (0, 0, 0)) == (0, 0, 0) for h in ("gw2", "gw3", "gw4")), out
    after = fleet.status()
    assert after["gw1"]["policy_hash"] != before["gw1"]["policy_hash"]
    _same_programs({h: before[h] for h in ("gw2", "gw3", "gw4")},
                   {h: after[h] for h in ("gw2", "gw3", "gw4")})
    assert fleet.verdicts() == {"gw1": True, "gw2": False, "gw3": True, "gw4": True}


def _our_timers() -> list[int]:
    """Rollback timer processes (python -m netbpf.safety.confirm ID) of this test run's
    state root: other checkouts on the machine have their own."""
    root = os.environ.get("NETBPF_STATE_ROOT")
    mine = (lambda env: f"NETBPF_STATE_ROOT={root}".encode() in env) if root else \
        (lambda env: not any(e.startswith(b"NETBPF_STATE_ROOT=") for e in env))
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"netbpf.safety.confirm" in cmd and mine(env):
            pids.append(int(proc.name))
    return pids


def _hashes(status: dict) -> dict[str, str]:
    return {h: status[h]["policy_hash"] for h in HOSTS}


def test_confirm_window_then_check_then_confirm_keeps_the_new_policy(fleet):
    """apply --confirm 60 on each gateway, its self-checks, `netbpf confirm`: the new policy
    stays, no rollback timer is left and nothing is pending."""
    before = fleet.status()
    assert fleet.verdicts() == {"gw1": True, "gw2": False, "gw3": True, "gw4": True}
    assert confirm.read_pending() is None

    rc, out, recap = fleet.playbook("closed2.yaml", "-e", "netbpf_confirm_seconds=60", batch=1)
    assert rc == 0, out
    # changed twice per host: the apply, then the confirm
    assert {h: recap[h][1:] for h in HOSTS} == {h: (2, 0) for h in HOSTS}, out
    assert "Confirm the apply" in out and "FAILED" not in out, out
    assert confirm.read_pending() is None, "every host's apply was confirmed"
    assert _our_timers() == [], "confirm stops the rollback timers: nothing will roll back"
    after = fleet.status()
    assert len(set(_hashes(after).values())) == 1
    assert all(_hashes(after)[h] != before[h]["policy_hash"] for h in HOSTS)
    assert fleet.verdicts() == {h: False for h in HOSTS}, "closed2.yaml drops pings everywhere"


def test_confirm_window_without_confirm_rolls_every_host_back(fleet):
    """The controller never confirms (its confirm task skipped, as when it dies): within the
    window + 1 s of the playbook's end every gateway runs its previous policy again."""
    window = 6
    before = fleet.status()
    assert fleet.verdicts() == {h: False for h in HOSTS}, "starts on closed2.yaml"

    rc, out, recap = fleet.playbook("open.yaml", "-e", f"netbpf_confirm_seconds={window}",
                                    "--skip-tags", "netbpf_confirm", batch=1)
    ended = time.monotonic()
    assert rc == 0, out
    assert {h: recap[h][1:] for h in HOSTS} == {h: (1, 0) for h in HOSTS}, out
    assert "Confirm the apply" not in out
    back: dict[str, float] = {}
    while len(back) < len(HOSTS) and time.monotonic() < ended + window + 30:
        now = fleet.status()
        for h in HOSTS:
            if h not in back and now[h]["policy_hash"] == before[h]["policy_hash"]:
                back[h] = time.monotonic() - ended
        time.sleep(0.2)
    assert set(back) == set(HOSTS), f"rolled back: {back}; log: " + \
        confirm.rollback_log().read_text()[-2000:]
    late = {h: round(t, 1) for h, t in back.items() if t > window + 1}
    assert not late, f"rolled back later than {window} + 1 s after the playbook: {late}"
    assert confirm.read_pending() is None
    assert fleet.verdicts() == {h: False for h in HOSTS}, "closed2.yaml is back everywhere"
