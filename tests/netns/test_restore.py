"""`netbpf restore` after a "reboot": the pin root and the runtime directory wiped (what a
reboot does to bpffs and /run), then the saved policy applied again from NETBPF_LIB_ROOT, where
the state records and policy copies outlive the reboot: `status` says the interface is not
loaded, and `restore` (or an apply of the same file) loads it again.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab)
             10.10.0.2                             10.10.0.1
             UDP probes to gw:7001    ----------->  XDP ingress drops udp 7001
             UDP from gw:8001        <-----------   TC egress drops udp 8001
                                                    + a rule on a set read from a set file

The policy and its set file are changed on disk after the apply: restore must use the copies
taken at apply time. Pins, state and saved copies are this test run's own (env roots).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from netbpf.observe.status import NOT_LOADED
from netbpf.store.state import PIN_ROOT, STATE_ROOT

from netbpf_cli import NETBPF, netbpf
from test_races import Probes, policy, status_row


def wipe() -> None:
    """What a reboot leaves: no pins (their links go with them), an empty /run; the lib root
    (NETBPF_LIB_ROOT, this test's own) stays."""
    shutil.rmtree(PIN_ROOT, ignore_errors=True)
    shutil.rmtree(STATE_ROOT, ignore_errors=True)


def not_loaded_status(lab) -> None:
    """status after the "reboot": the record is listed, says nothing runs, exit 1."""
    p = subprocess.run([NETBPF, "status", "--json"], capture_output=True, text=True, timeout=60)
    rows = [r for r in json.loads(p.stdout) if r["netns"] == lab.ns("gw")]
    assert p.returncode == 1 and [r["health"] for r in rows] == [NOT_LOADED], p.stdout
    text = subprocess.run([NETBPF, "-n", lab.ns("gw"), "status"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert "pins are missing" in text.stdout and "netbpf restore" in text.stdout, text.stdout


def shown(lab) -> str:
    """`show` as YAML: what the kernel enforces, rebuilt from the pins (no timestamps)."""
    return netbpf(lab, "show", "gw0").stdout


def released(probes) -> tuple[set, set]:
    """Verdicts once the kernel has released the links whose last pin went (it frees a
    link from a workqueue, so that happens shortly after the unlink, not during it)."""
    for _ in range(50):
        got = probes.dropped()
        if got == (set(), set()):
            break
        time.sleep(0.1)
    return got


def rules(lab) -> list[tuple[str, str, str]]:
    s = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    return [(d, r["name"], r["action"]) for d, part in s["parts"].items() for r in part["rules"]]


def test_restore_after_wiping_pins_and_run_gives_the_same_verdicts(make_lab, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("NETBPF_LIB_ROOT", str(tmp_path / "lib"))
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=(1, 2))
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "doc.txt").write_text("192.0.2.0/24\n")
    text = policy(1).replace("interfaces:", "sets:\n  doc-net: {file: sets/doc.txt}\ninterfaces:")
    text = text.replace("      rules:\n", "      rules:\n        - {name: doc, src: \"@doc-net\", "
                                          "action: drop}\n", 1)
    path = tmp_path / "p.yaml"
    path.write_text(text)
    try:
        netbpf(lab, "apply", str(path))
        before = (probes.dropped(), rules(lab), status_row(lab))
        before_show = shown(lab)
        assert before[0] == ({1}, {1})
        # the files change after the apply: restore uses what was applied
        path.write_text(policy(2))
        (tmp_path / "sets" / "doc.txt").write_text("not an address\n")

        wipe()
        assert released(probes) == (set(), set())   # the links went with their pins
        not_loaded_status(lab)
        r = subprocess.run([NETBPF, "restore"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "restored" in r.stdout
        after = (probes.dropped(), rules(lab), status_row(lab))
        assert after[:2] == before[:2]
        same = ("interface", "netns", "mode", "attach", "rules", "policy_path", "policy_hash",
                "health")
        assert {k: after[2][k] for k in same} == {k: before[2][k] for k in same}
        assert shown(lab) == before_show

        # detached stays detached across a reboot
        netbpf(lab, "detach", "gw0")
        wipe()
        r = subprocess.run([NETBPF, "restore"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "nothing to restore" in r.stdout, r.stdout + r.stderr
        assert released(probes) == (set(), set())
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


def test_restore_skips_a_namespace_that_is_gone(tmp_path, monkeypatch):
    """At boot, namespaces made by `ip netns add` do not exist yet: say so, do not fail."""
    monkeypatch.setenv("NETBPF_LIB_ROOT", str(tmp_path / "lib"))
    rec = tmp_path / "lib" / "applied" / "0123456789abcdef"
    (rec / "root" / "p").mkdir(parents=True)
    (rec / "root" / "p" / "x.yaml").write_text("version: 1\n")
    (rec / "record.json").write_text(json.dumps({
        "policy_path": "/p/x.yaml", "netns": "nb-no-such-ns", "mirror": "/p/x.yaml",
        "interfaces": ["eth0"], "detached": [], "applied_at": 1}))
    r = subprocess.run([NETBPF, "restore"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "network namespace nb-no-such-ns does not exist" in r.stdout


def test_an_apply_after_a_reboot_loads_the_same_file_again(make_lab, tmp_path, monkeypatch):
    """The state record outlives the reboot, but the programs do not: an apply of the very
    file that was applied must load it (not report "unchanged"), and detach forgets a record
    whose pins are gone."""
    monkeypatch.setenv("NETBPF_LIB_ROOT", str(tmp_path / "lib"))
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=(1,))
    path = tmp_path / "p.yaml"
    path.write_text(policy(1))
    try:
        netbpf(lab, "apply", str(path))
        assert probes.dropped() == ({1}, {1})
        wipe()
        assert released(probes) == (set(), set())
        not_loaded_status(lab)
        out = netbpf(lab, "apply", str(path)).stdout
        assert "unchanged" not in out.splitlines()[-1], out
        assert probes.dropped() == ({1}, {1})
        assert status_row(lab)["health"] == "ok"

        wipe()
        netbpf(lab, "detach", "gw0")           # forgets the record; nothing to restore
        p = subprocess.run([NETBPF, "status", "--json"], capture_output=True, text=True,
                           timeout=60)
        assert not [r for r in json.loads(p.stdout) if r["netns"] == lab.ns("gw")], p.stdout
        r = subprocess.run([NETBPF, "restore"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "nothing to restore" in r.stdout, r.stdout + r.stderr
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)
