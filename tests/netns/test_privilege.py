"""Without root (uid 65534, no capabilities): every data-plane command refuses in one line that
says what it needs, and changes nothing; what netbpf leaves on disk (pins, lock, state) cannot
be written by other users, whatever the umask of the root that ran `apply`.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab)
             10.10.0.2                             10.10.0.1
             UDP probes to gw:7001    ----------->  XDP ingress drops udp 7001 (applied as root)
             UDP from gw:8001        <-----------   TC egress drops udp 8001

Not policy input (tests/unit/test_policy_input_hardening.py).
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from netbpf.store.state import PIN_ROOT, STATE_ROOT, lock_file, pin_dir, staging_dirs, state_file

from netbpf_cli import NETBPF, netbpf
from test_races import Probes, policy, status_row

UNPRIVILEGED = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                "--inh-caps=-all"]
NEEDS = re.compile(r"\broot\b|CAP_BPF|CAP_NET_ADMIN")


@pytest.fixture
def gw(make_lab, world_dir):
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=(1, 2))
    for tag in (1, 2):
        p = world_dir / f"p{tag}.yaml"
        p.write_text(policy(tag))
        p.chmod(0o644)
    netbpf(lab, "apply", str(world_dir / "p1.yaml"))
    try:
        yield lab, probes, world_dir
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(UNPRIVILEGED + list(args), capture_output=True, text=True, timeout=60)


def commands(lab, d: Path) -> dict[str, list[str]]:
    ns = lab.ns("gw")
    return {
        "apply": [NETBPF, "-n", ns, "apply", str(d / "p2.yaml")],
        "apply-dry-run": [NETBPF, "-n", ns, "apply", "--dry-run", str(d / "p2.yaml")],
        "stats": [NETBPF, "-n", ns, "stats", "gw0"],
        "status": [NETBPF, "status"],
        "detach": [NETBPF, "-n", ns, "detach", "gw0"],
    }


def running(lab) -> tuple:
    s = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    return tuple((d, p["prog_id"], p["generation"]) for d, p in sorted(s["parts"].items()))


def test_unprivileged_commands_fail_without_a_traceback_and_change_nothing(gw):
    lab, probes, d = gw
    before, row = running(lab), status_row(lab)
    for what, cmd in commands(lab, d).items():
        r = as_nobody(*cmd)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (what, r.returncode, r.stderr)
    assert running(lab) == before and status_row(lab) == row
    assert probes.dropped() == ({1}, {1})


@pytest.mark.parametrize("what", ["apply", "apply-dry-run", "stats", "status", "detach"])
def test_unprivileged_command_says_in_one_line_that_it_needs_root(gw, what):
    lab, probes, d = gw
    r = as_nobody(*commands(lab, d)[what])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(lines) == 1 and NEEDS.search(lines[0]), r.stdout + r.stderr
    assert "Errno" not in lines[0] and r.stdout == "", r.stdout + r.stderr


def _not_writable_by_others(path: Path) -> str | None:
    st = path.lstat()
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}"
    if stat.S_IMODE(st.st_mode) & 0o022:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):o}"
    return None


def _netbpf_files(lab) -> list[Path]:
    key = f"{lab.ns('gw')}:gw0"
    paths = [PIN_ROOT, pin_dir(key), *sorted(pin_dir(key).rglob("*")),
             STATE_ROOT, lock_file(key).parent, lock_file(key), state_file(key).parent,
             state_file(key)]
    paths += [d.parent for d in staging_dirs(key) if d.parent.exists()]
    return paths


def _unprivileged_writes(lab) -> list[str]:
    """What uid 65534 managed to change: a pinned map, the lock, a pin's name."""
    key = f"{lab.ns('gw')}:gw0"
    gen = pin_dir(key) / "ingress" / "nb_fw_gen"
    done = []
    if as_nobody("bpftool", "map", "update", "pinned", str(gen), "key", "0", "0", "0", "0",
                 "value", "1", "0", "0", "0").returncode == 0:
        done.append(f"updated {gen}")
    if as_nobody("sh", "-c", f"echo 1 >> '{lock_file(key)}'").returncode == 0:
        done.append("wrote the interface's apply lock")
    if as_nobody("mv", str(gen), str(gen) + "_moved").returncode == 0:
        os.rename(str(gen) + "_moved", gen)
        done.append(f"renamed {gen}")
    return done


def test_pins_lock_and_state_are_not_writable_by_other_users(gw):
    lab, probes, d = gw
    bad = [why for p in _netbpf_files(lab) if (why := _not_writable_by_others(p))]
    assert bad == []
    for p in sorted(pin_dir(f"{lab.ns('gw')}:gw0").rglob("*")):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    assert _unprivileged_writes(lab) == []
    assert probes.dropped() == ({1}, {1})


def test_apply_under_umask_0_leaves_nothing_writable_by_other_users(gw):
    lab, probes, d = gw
    netbpf(lab, "detach", "gw0")
    r = subprocess.run([NETBPF, "-n", lab.ns("gw"), "apply", str(d / "p2.yaml")],
                       capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    assert probes.dropped() == ({2}, {2})
    bad = [why for p in _netbpf_files(lab) if (why := _not_writable_by_others(p))]
    writes = _unprivileged_writes(lab)
    assert bad == [] and writes == [], f"{bad}; uid 65534 {writes}"
