"""The cheap paths of `apply`: unchanged input is recognised before parsing, and a rule-only
change writes maps without importing the BPF compiler (bcc/LLVM).

    [client] client0 ---------------------------- gw0 [gw]   (the shared two-hosts lab)
             10.10.0.2                             10.10.0.1 (policy N drops udp 7000+N in)

Timing is for bench/ (control rows); here only which path was taken.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from netbpf_cli import netbpf
from test_races import policy, write

UNCHANGED = "nothing to do: the running policy is this one (input unchanged)"


@pytest.fixture
def gw(two_hosts):
    yield two_hosts
    netbpf(two_hosts, "detach", "gw0", check=False)


def with_set(tag: int, set_file: str) -> str:
    return policy(tag).replace("version: 1\n", f"version: 1\nsets:\n  bl: {{file: {set_file}}}\n") \
        .replace("      rules:\n", "      rules:\n        - {name: bl, src: \"@bl\", action: drop}\n",
                 1)


def test_unchanged_input_is_recognised_before_parsing(gw, tmp_path):
    lab = gw
    (tmp_path / "bl.txt").write_text("192.0.2.0/24\n")
    p = write(tmp_path, "p.yaml", with_set(1, "bl.txt"))
    assert UNCHANGED not in netbpf(lab, "apply", str(p)).stdout
    assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout

    # a set file's content is part of the input
    (tmp_path / "bl.txt").write_text("192.0.2.0/24\n198.51.100.0/24\n")
    out = netbpf(lab, "apply", str(p)).stdout
    assert UNCHANGED not in out and "update maps only" in out, out
    assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout

    # a comment changes the bytes but not the tables: a full plan finds nothing, once
    p.write_text(p.read_text() + "# reviewed\n")
    out = netbpf(lab, "apply", str(p)).stdout
    assert "nothing to do" in out and UNCHANGED not in out, out
    assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout

    # drift is never "unchanged": the full path repairs it
    # (a link-attached program: only its link can be detached, 'ip ... xdp off' cannot)
    from netbpf.store.state import pin_dir
    subprocess.run(["bpftool", "link", "detach", "pinned",
                    str(pin_dir(f"{lab.ns('gw')}:gw0") / "ingress" / "link")], check=True)
    out = netbpf(lab, "apply", str(p)).stdout
    assert "nothing to do" not in out, out
    assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout

    # the same bytes under a bad set file name are not skipped either: errors still show
    (tmp_path / "bl.txt").unlink()
    r = netbpf(lab, "apply", str(p), check=False)
    assert r.returncode == 2 and "bl.txt" in r.stderr, r.stderr


RULE_ONLY = """
import sys
from netbpf.cli import main
try:
    main(["-n", sys.argv[1], "apply", sys.argv[2]])
except SystemExit as e:
    assert not e.code, e.code
print("bcc imported" if "bcc" in sys.modules else "bcc not imported")
"""


def test_a_rule_only_change_does_not_import_the_compiler(gw, tmp_path):
    lab = gw
    netbpf(lab, "apply", str(write(tmp_path, "p1.yaml", policy(1))))
    p2 = write(tmp_path, "p2.yaml", policy(2))
    r = subprocess.run([sys.executable, "-c", RULE_ONLY, lab.ns("gw"), str(p2)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "update maps only" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("bcc not imported"), r.stdout
    # and a change that needs a new program does compile (the check above can fail)
    # (with an empty object cache: a program compiled before loads without bcc, objcache.py)
    p3 = write(tmp_path, "p3.yaml", policy(3, pad=100))
    r = subprocess.run([sys.executable, "-c", RULE_ONLY, lab.ns("gw"), str(p3)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NETBPF_OBJ_CACHE": str(tmp_path / "objcache")})
    assert r.returncode == 0 and r.stdout.strip().endswith("bcc imported"), r.stdout + r.stderr


def _on_a_terminal(cmd: list[str]) -> str:
    """Run cmd with stdout on a pseudo-terminal; everything it wrote there."""
    import os
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, env={**os.environ,
                         "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:           # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(120) == 0, p.stderr.read()
    return out.decode(errors="replace")


def test_long_steps_show_progress_on_a_terminal_and_nothing_in_a_pipe(gw, tmp_path):
    from netbpf_cli import NETBPF
    lab = gw
    p1 = write(tmp_path, "p1.yaml", policy(1))
    tty = _on_a_terminal([NETBPF, "-n", lab.ns("gw"), "apply", str(p1)])
    assert "compiling and verifying nb_fw_xdp" in tty, tty
    netbpf(lab, "detach", "gw0")
    piped = netbpf(lab, "apply", str(p1)).stdout
    assert "compiling" not in piped and "\x1b" not in piped, piped
