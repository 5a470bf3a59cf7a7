"""--json of validate and of apply on bad input (no root needed: input is checked first), and
the collection's rendering of netbpf's error records: what tools driving netbpf read.
Not the kernel outcome of apply --json (tests/netns/test_cli_json_lab.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from netbpf.safety.planreport import plan_diff

NETBPF = str(Path(sys.executable).with_name("netbpf"))
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ansible" / "collections"))

BAD = """\
version: 1
interfaces:
  eth0:
    ingress:
      rules:
        - {name: web, proto: tcp, dport: 80, action: accept}
        - {name: big, proto: tcp, dport: 70000, action: drop}
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NETBPF, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_validate_json_gives_every_error_as_a_record_and_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    (tmp_path / "good.yaml").write_text("version: 1\ninterfaces: {eth0: {}}\n")
    p = run("validate", "-j", "good.yaml", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 2
    out = json.loads(p.stdout)
    assert out["valid"] is False
    good, bad = out["files"]
    assert good["valid"] and good["errors"] == [] and good["summary"].startswith("good.yaml: ok")
    assert bad["errors"] == [
        {"file": "bad.yaml", "line": 6, "column": 54, "message":
         "must be allow, drop, reject, count or {rate_limit: ...} (got 'accept'); "
         "iptables' ACCEPT / nft's accept is 'allow' here",
         "path": "interfaces.eth0.ingress.rules[0].action"},
        {"file": "bad.yaml", "line": 7, "column": 42, "message": "must be 0-65535 (got 70000)",
         "path": "interfaces.eth0.ingress.rules[1].dport"},
    ]


def test_validate_json_points_into_the_set_file(tmp_path):
    (tmp_path / "p.yaml").write_text("version: 1\nsets:\n  b: {file: b.txt}\n"
                                     "interfaces: {eth0: {ingress: {rules: "
                                     "[{name: x, src: '@b', action: drop}]}}}\n")
    (tmp_path / "b.txt").write_text("192.0.2.0/24\n10.0.0.300/24\n")
    p = run("validate", "--json", "p.yaml", cwd=tmp_path)
    assert p.returncode == 2
    [err] = json.loads(p.stdout)["files"][0]["errors"]
    assert (err["file"], err["line"], err["column"]) == ("b.txt", 2, 1)
    assert "10.0.0.300/24" in err["message"]


def test_apply_json_on_a_bad_policy_changes_nothing_and_says_where(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    p = run("apply", "--json", "bad.yaml", cwd=tmp_path)
    assert p.returncode == 2
    out = json.loads(p.stdout)
    assert out["changed"] is False and out["interfaces"] == []
    assert [(e["line"], e["column"]) for e in out["errors"]] == [(6, 54), (7, 42)]
    assert "bad.yaml:6:54: interfaces.eth0.ingress.rules[0].action" in p.stderr


def test_plan_diff_lists_changing_interfaces_and_their_rules_only():
    records = [
        {"interface": "gw0", "netns": None, "action": "unchanged", "changed": False,
         "reasons": [], "parts": {}, "load_balancers": []},
        {"interface": "gw1", "netns": "ns1", "action": "update", "changed": True,
         "reasons": [], "load_balancers": [],
         "parts": {"ingress": {"rules": [
             {"name": "a", "action": "drop", "change": "kept"},
             {"name": "b", "action": "allow", "change": "added"},
             {"name": "c", "action": "drop", "change": "removed"}]}}},
        {"interface": "old0", "netns": None, "action": "remove", "changed": True,
         "reasons": [], "parts": {}, "load_balancers": []},
    ]
    assert plan_diff(records) == ("~ gw1 (netns ns1): update\n  + ingress b (allow)\n"
                                  "  - ingress c (drop)\n- old0: detach\n")


def test_the_collection_renders_netbpf_errors_as_netbpf_prints_them():
    from ansible_collections.netbpf.netbpf.plugins.module_utils.netbpf_cli import error_lines

    assert error_lines([
        {"file": "gw.yaml", "line": 3, "column": 7, "path": "sets.b", "message": "bad"},
        {"file": "b.txt", "line": None, "column": None, "path": None, "message": "too big"},
        {"file": None, "line": None, "column": None, "path": None, "message": "kernel said no"},
    ]) == ["gw.yaml:3:7: sets.b: bad", "b.txt: too big", "kernel said no"]


def test_the_collection_modules_document_every_option_ansible_doc_reads(tmp_path):
    exe = Path(sys.executable).with_name("ansible-doc")
    if not exe.exists():
        pytest.skip("ansible-doc is not in the venv: run 'make setup' (the test extra)")
    env = {"ANSIBLE_COLLECTIONS_PATH": str(REPO / "ansible" / "collections"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([str(exe), "--json", "netbpf.netbpf.netbpf_policy",
                        "netbpf.netbpf.netbpf_info"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    docs = json.loads(p.stdout)
    assert set(docs["netbpf.netbpf.netbpf_policy"]["doc"]["options"]) == {
        "content", "src", "filename", "sets", "dest_dir", "netns", "confirm", "state",
        "executable"}
    assert set(docs["netbpf.netbpf.netbpf_info"]["doc"]["options"]) == {
        "netns", "stats", "executable"}


def test_the_policy_module_writes_sets_as_text_or_lists_and_refuses_paths(tmp_path):
    from ansible_collections.netbpf.netbpf.plugins.modules.netbpf_policy import _write_tree

    _write_tree(tmp_path / "kept", "gw.yaml", "version: 1",
                {"a.txt": "192.0.2.0/24", "b.txt": ["10.0.0.0/8", "2001:db8::/32"]})
    assert (tmp_path / "kept" / "gw.yaml").read_text() == "version: 1\n"
    assert (tmp_path / "kept" / "a.txt").read_text() == "192.0.2.0/24\n"
    assert (tmp_path / "kept" / "b.txt").read_text() == "10.0.0.0/8\n2001:db8::/32\n"
    with pytest.raises(ValueError, match="plain file names"):
        _write_tree(tmp_path / "other", "gw.yaml", "", {"../escape.txt": "x"})
    assert not (tmp_path / "escape.txt").exists()
