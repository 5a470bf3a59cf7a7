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


def test_the_same_input_after_an_upgrade_gets_the_new_programs(gw, tmp_path):
    """Input unchanged but the running programs built from other BPF sources (a netbpf
    upgrade, shown here by the recorded build hash of an older build): `apply` rebuilds and
    replaces them instead of answering "nothing to do"; then the answer comes back. With
    conntrack (both parts) and without."""
    import json

    from netbpf.store.state import state_file
    lab = gw
    key = f"{lab.ns('gw')}:gw0"
    for text in (policy(1), policy(2).replace("xdp: {mode: native}\n",
                                              "xdp: {mode: native}\n    conntrack: true\n")):
        p = write(tmp_path, "p.yaml", text)
        netbpf(lab, "apply", str(p))
        assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout     # every part's hash matches
        path = state_file(key)
        st = json.loads(path.read_text())
        before = st["parts"]["ingress"]["prog_id"]
        st["parts"]["ingress"]["prog_hash"] = "0123456789abcdef"       # an older build
        path.write_text(json.dumps(st))
        out = netbpf(lab, "apply", str(p)).stdout
        assert "nothing to do" not in out, out
        now = json.loads(path.read_text())["parts"]["ingress"]
        assert now["prog_id"] != before and now["prog_hash"] != "0123456789abcdef"
        assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout


UNCHANGED_ONLY = """
import sys
from netbpf.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
heavy = [m for m in ("click", "rich", "pyroute2", "pydantic", "bcc", "yaml") if m in sys.modules]
print("imported: " + (" ".join(heavy) or "none"))
"""


def test_unchanged_input_is_answered_before_the_cli_and_netlink_load(gw, tmp_path):
    """`netbpf apply` of what runs (link-attached programs) is answered from pins and state
    with bpf() calls: no CLI framework, no netlink library, no policy models."""
    lab = gw
    p = write(tmp_path, "p.yaml", policy(1))
    netbpf(lab, "apply", str(p))
    for args in (["-n", lab.ns("gw"), "apply", str(p)], ["apply", str(p), "--netns", lab.ns("gw")]):
        r = subprocess.run([sys.executable, "-c", UNCHANGED_ONLY, *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines() == [UNCHANGED, "imported: none"], r.stdout
    # any other command line takes the full path (which gives the same answer)
    r = subprocess.run([sys.executable, "-c", UNCHANGED_ONLY, "-n", lab.ns("gw"), "apply",
                        str(p), "-v"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and UNCHANGED in r.stdout and "click" in r.stdout, r.stdout


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


# ---- sets updated in place ----

SET_POLICY = """version: 1
sets:
  hosts: {file: hosts.txt}
  nets: {file: nets.txt}
interfaces:
  gw0:
    xdp: {mode: native}
    ingress:
      default: allow
      rules:
        - {name: hosts, src: "@hosts", action: drop}
        - {name: nets, src: "@nets", action: drop}
"""


def _host(i: int) -> str:             # hash-map set: full-length addresses
    return f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}"


def _net(i: int) -> str:              # prefix-trie set
    return f"10.{100 + i // 256}.{i % 256}.0/24"


def _write_sets(tmp_path, hosts: range, nets: range) -> None:
    (tmp_path / "hosts.txt").write_text("".join(f"{_host(i)}\n" for i in hosts))
    (tmp_path / "nets.txt").write_text("".join(f"{_net(i)}\n" for i in nets))


def _verdicts_while(lab, sources: list[str], running: subprocess.Popen) -> dict[str, list[int]]:
    """XDP verdict of a packet from each source, round after round (BPF_PROG_TEST_RUN on the
    attached program, so on its live maps) until the process ends, then once more."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from netbpf.kernel import attach, bpfsys
    from netbpf.kernel.testrun import test_run as run_prog

    cur = attach.xdp_state("gw0", netns=lab.ns("gw"))
    frames = {s: bytes(Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) /
                       IP(src=s, dst=lab.addr("gw", "gw0")) / UDP(sport=40000, dport=9) /
                       b"probe") for s in sources}
    seen: dict[str, list[int]] = {s: [] for s in sources}
    with bpfsys.prog_get_fd_by_id(cur.prog_id) as fd:
        done = False
        while not done:
            done = running.poll() is not None
            for s, frame in frames.items():
                v = run_prog(fd, frame).retval
                if not seen[s] or seen[s][-1] != v:
                    seen[s].append(v)
    return seen


def test_a_set_delta_under_traffic_never_changes_the_verdict_of_untouched_entries(gw, tmp_path):
    """hosts 0..29999 -> 3000..32999 and nets 0..1999 -> 500..2499, applied while packets are
    classified in a loop: an untouched member stays dropped and an untouched non-member
    passed throughout; an added or removed entry changes verdict once; the program stays."""
    from netbpf.kernel import attach
    from netbpf.kernel.testrun import XDP_DROP, XDP_PASS
    from netbpf_cli import NETBPF
    lab = gw
    _write_sets(tmp_path, range(30000), range(2000))
    p = write(tmp_path, "p.yaml", SET_POLICY)
    netbpf(lab, "apply", str(p))
    prog = attach.xdp_state("gw0", netns=lab.ns("gw")).prog_id
    _write_sets(tmp_path, range(3000, 33000), range(500, 2500))
    kept = [_host(i) for i in (3000, 9999, 29999)] + [_net(i).replace(".0/24", ".7")
                                                     for i in (500, 1000, 1999)]
    outside = ["10.9.0.1", "192.0.2.1", _host(40000), _net(3000).replace(".0/24", ".7")]
    added = [_host(i) for i in (30000, 32999)] + [_net(i).replace(".0/24", ".7")
                                                   for i in (2000, 2499)]
    removed = [_host(i) for i in (0, 2999)] + [_net(i).replace(".0/24", ".7") for i in (0, 499)]
    running = subprocess.Popen([NETBPF, "-n", lab.ns("gw"), "apply", str(p)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = _verdicts_while(lab, kept + outside + added + removed, running)
    out, err = running.communicate()
    assert running.returncode == 0, out + err
    assert "ingress set hosts updated in place: +3000 -3000 entries" in out, out
    assert "ingress set nets updated in place: +500 -500 entries" in out, out
    assert attach.xdp_state("gw0", netns=lab.ns("gw")).prog_id == prog
    assert {s: seen[s] for s in kept} == {s: [XDP_DROP] for s in kept}
    assert {s: seen[s] for s in outside} == {s: [XDP_PASS] for s in outside}
    assert {s: seen[s] for s in added} == {s: [XDP_PASS, XDP_DROP] for s in added}
    assert {s: seen[s] for s in removed} == {s: [XDP_DROP, XDP_PASS] for s in removed}
    assert UNCHANGED in netbpf(lab, "apply", str(p)).stdout


def test_a_set_that_changes_storage_takes_a_new_generation(gw, tmp_path):
    """A host set gaining a /16 moves from the hash map to the prefix trie: the running
    generation looks elsewhere, so the update writes a new one (and still drops both)."""
    from netbpf.kernel import attach
    from netbpf.kernel.testrun import XDP_DROP, XDP_PASS
    lab = gw
    _write_sets(tmp_path, range(100), range(10))
    p = write(tmp_path, "p.yaml", SET_POLICY)
    netbpf(lab, "apply", str(p))
    (tmp_path / "hosts.txt").write_text("".join(f"{_host(i)}\n" for i in range(50, 100))
                                        + "10.50.0.0/16\n")
    out = netbpf(lab, "apply", str(p)).stdout
    assert "in place" not in out and "generation 1 active" in out, out
    done = subprocess.Popen(["true"])
    done.wait()                           # one round of verdicts
    seen = _verdicts_while(lab, [_host(0), _host(60), "10.50.3.4"], done)
    assert seen == {_host(0): [XDP_PASS], _host(60): [XDP_DROP], "10.50.3.4": [XDP_DROP]}
