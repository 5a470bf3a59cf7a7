"""Hostile policy input through the command line: huge files, symlinks and loops, unreadable
files, FIFOs, set files with bad lines, random YAML. Each ends in a clear error (file, and line
when there is one), exit 2, no traceback, and nothing touched: a rejected `apply` does not even
create the lock file.

Library-level fuzzing of load_policy lives in test_policy_fuzz.py; that a rejected apply leaves
the running policy alone on a real interface is tested in tests/netns/test_killed_apply.py.
Runs without root; as root, the unreadable-file cases drop to uid 65534 with setpriv.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netbpf.cli import main

NETBPF = str(Path(sys.executable).with_name("netbpf"))
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

POLICY = """\
version: 1
sets:
  bl: {file: bl.txt}
interfaces:
  lo:
    ingress:
      rules:
        - {name: drop-bl, src: "@bl", action: drop}
"""
GOOD_SET = "192.0.2.0/24\n2001:db8:bad::/48\n"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """netbpf in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), out.out, out.err


def assert_clear_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.strip(), err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"


def write_policy(d: Path, policy: str = POLICY, set_text: str = GOOD_SET) -> Path:
    (d / "bl.txt").write_text(set_text)
    p = d / "p.yaml"
    p.write_text(policy)
    for f in (p, d / "bl.txt"):
        f.chmod(0o644)
    return p


def run_netbpf(*args: str, as_nobody: bool = False, env_roots: Path | None = None):
    """netbpf in a subprocess (a real exit code, stderr as a user sees it). env_roots sends
    pins and state to a scratch directory, to show that nothing was created there."""
    env = dict(os.environ)
    if env_roots is not None:
        env["NETBPF_PIN_ROOT"] = str(env_roots / "pins")
        env["NETBPF_STATE_ROOT"] = str(env_roots / "state")
    cmd = [NETBPF, *args]
    if as_nobody and os.geteuid() == 0:
        cmd = NOBODY + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


# ---- size ----

def test_huge_policy_is_refused_by_apply_without_reading_it(capsys, tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(17 << 20)           # sparse: nothing is written, nothing must be read
    for args in (["validate", str(huge)], ["apply", str(huge)], ["apply", "--dry-run", str(huge)]):
        code, _, err = cli(capsys, *args)
        assert_clear_error(code, err, f"{huge}: policy is {17 << 20} bytes; the limit is")


def test_huge_set_file_is_refused_at_the_line_naming_it(capsys, tmp_path):
    p = write_policy(tmp_path)
    with open(tmp_path / "bl.txt", "wb") as f:
        f.truncate(300 << 20)
    code, _, err = cli(capsys, "apply", str(p))
    assert_clear_error(code, err, f"{p}:3:", "sets.bl.file", "the limit is")


# ---- set files ----

def test_bad_set_line_is_reported_with_its_line_number_and_nothing_is_touched(tmp_path):
    p = write_policy(tmp_path, set_text="192.0.2.0/24\n# ok\n\n10.0.0.300\n2001:db8::/48\n")
    r = run_netbpf("apply", str(p), env_roots=tmp_path)
    assert_clear_error(r.returncode, r.stderr, f"{tmp_path / 'bl.txt'}:4:1: sets.bl:",
                       "10.0.0.300")
    assert r.stderr.count("\n") == 1, r.stderr          # only the bad line is reported
    assert not (tmp_path / "pins").exists() and not (tmp_path / "state").exists()


def test_set_file_symlink_loop_is_a_clear_error(capsys, tmp_path):
    p = write_policy(tmp_path)
    (tmp_path / "bl.txt").unlink()
    (tmp_path / "bl.txt").symlink_to("bl.txt")
    code, _, err = cli(capsys, "validate", str(p))
    assert_clear_error(code, err, f"{p}:3:", "sets.bl.file",
                       "Too many levels of symbolic links")


# ---- symlinks ----

def test_symlinked_policy_in_the_same_folder_works(capsys, tmp_path):
    p = write_policy(tmp_path)
    link = tmp_path / "current.yaml"
    link.symlink_to(p.name)
    code, out, err = cli(capsys, "validate", str(link))
    assert code == 0 and out.startswith(f"{link}: ok — 1 interface"), err


def test_policy_symlink_loop_and_dangling_symlink_are_clear_errors(capsys, tmp_path):
    loop, dangling = tmp_path / "loop.yaml", tmp_path / "dangling.yaml"
    loop.symlink_to(loop.name)
    dangling.symlink_to("missing.yaml")
    for path, why in ((loop, "Too many levels of symbolic links"),
                      (dangling, "No such file or directory")):
        for args in (["validate", str(path)], ["apply", str(path)]):
            code, _, err = cli(capsys, *args)
            assert_clear_error(code, err, f"{path}: cannot read policy: {why}")


def test_symlinked_policy_reads_its_set_files_next_to_the_real_file(capsys, tmp_path):
    """Following a symlink must not change what a policy means: `ln -s /etc/netbpf/p.yaml
    ~/p.yaml` reads /etc/netbpf/bl.txt, as the recorded policy_path (resolved) would."""
    real = tmp_path / "real"
    real.mkdir()
    p = write_policy(real)
    links = tmp_path / "links"
    links.mkdir()
    (links / "p.yaml").symlink_to(p)
    code, out, err = cli(capsys, "validate", str(links / "p.yaml"))
    assert code == 0, err


# ---- unreadable and odd files ----

def test_unreadable_policy_and_set_file_are_clear_errors(world_dir):
    p = write_policy(world_dir)
    p.chmod(0o000)
    r = run_netbpf("apply", str(p), as_nobody=True, env_roots=world_dir)
    # apply's argument check (click) words it its own way: either is clear
    assert_clear_error(r.returncode, r.stderr, str(p))
    assert "Permission denied" in r.stderr or "is not readable" in r.stderr, r.stderr
    r = run_netbpf("validate", str(p), as_nobody=True)
    assert_clear_error(r.returncode, r.stderr, f"{p}: cannot read policy: Permission denied")
    p.chmod(0o644)
    (world_dir / "bl.txt").chmod(0o000)
    r = run_netbpf("validate", str(p), as_nobody=True)
    assert_clear_error(r.returncode, r.stderr, f"{p}:3:", "sets.bl.file",
                       "cannot read set file 'bl.txt': Permission denied")
    assert not (world_dir / "pins").exists() and not (world_dir / "state").exists()


def test_policy_in_an_unreadable_folder_is_a_clear_error(world_dir):
    sub = world_dir / "secret"
    sub.mkdir()
    p = write_policy(sub)
    sub.chmod(0o000)
    r = run_netbpf("validate", str(p), as_nobody=True)
    assert_clear_error(r.returncode, r.stderr, f"{p}: cannot read policy: Permission denied")


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
def test_policy_that_is_not_a_regular_file_is_refused_without_blocking(capsys, tmp_path, kind):
    path = tmp_path / "p.yaml"
    if kind == "fifo":
        os.mkfifo(path)              # opening it for reading would wait for a writer forever
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    code, _, err = cli(capsys, "validate", str(path))
    assert_clear_error(code, err, f"{path}: cannot read policy:")
    code, _, err = cli(capsys, "apply", str(path))
    assert_clear_error(code, err, str(path))
    assert "cannot read policy" in err or "is a directory" in err, err


def test_rejected_apply_in_a_subprocess_is_one_error_per_line_and_exit_2(tmp_path):
    """The real process: exit status 2 and stderr made only of FILE:LINE:COL lines."""
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\ninterfaces:\n  lo:\n    ingress:\n      rules:\n"
                 "        - {name: a, proto: tcp, dport: 70000, action: drop}\n"
                 "        - {name: a, proto: udp, dport: 53, action: dorp}\n")
    r = run_netbpf("apply", str(p), env_roots=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r
    lines = r.stderr.splitlines()
    assert len(lines) >= 2 and all(ln.startswith(f"{p}:") for ln in lines), r.stderr
    assert f"{p}:6:" in r.stderr and f"{p}:7:" in r.stderr
    assert not (tmp_path / "pins").exists() and not (tmp_path / "state").exists()


# ---- random YAML through the command line ----

yaml_text = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet="version:1 \n-[]{}&*!|>'\"#@,interfacesingressrulesdrop.0123456789/",
            max_size=300).map(lambda t: ("version: 1\n" + t).encode()),
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=yaml_text)
def test_random_yaml_through_validate_and_dry_run_never_crashes(capsys, tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    code, _, err = cli(capsys, "validate", str(path))
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        code, out, err = cli(capsys, "apply", "--dry-run", str(path))
        assert_clear_error(code, err)
        assert all(ln.startswith(f"{path}:") for ln in err.splitlines()), err

