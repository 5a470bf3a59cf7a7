"""Saved policies for `netbpf restore`, without root: what is kept (policy and set files as
applied), and what a later apply, a detach or a namespace going away takes out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from netbpf.engine import persist
from netbpf.store import state
from netbpf.policy import load_policy

POLICY = """\
version: 1
sets:
  doc: {{file: sets/doc.txt}}
interfaces:
{ifaces}
"""
IFACE = """\
  {name}:
    ingress:
      rules:
        - {{name: r, src: "@doc", action: drop}}
"""


@pytest.fixture(autouse=True)
def lib(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    return tmp_path / "lib"


def write(tmp_path: Path, name: str, ifaces: list[str]) -> Path:
    (tmp_path / "sets").mkdir(exist_ok=True)
    (tmp_path / "sets" / "doc.txt").write_text("192.0.2.0/24\n")
    path = tmp_path / name
    path.write_text(POLICY.format(ifaces="".join(IFACE.format(name=i) for i in ifaces)))
    return path


def test_policy_and_set_files_are_kept_as_applied(tmp_path):
    path = write(tmp_path, "p.yaml", ["eth0"])
    applied = load_policy(path)
    saved = persist.save_applied(applied, str(path), "ns1")
    (tmp_path / "sets" / "doc.txt").write_text("garbage\n")       # changed after the apply
    [rec] = persist.records()
    assert rec["policy_path"] == str(path.resolve()) and rec["netns"] == "ns1"
    assert rec["interfaces"] == ["eth0"] and rec["policy_hash"] == applied.source_hash
    root = saved / "root"
    again = load_policy(root / rec["mirror"].lstrip("/"), root=root)
    assert again.source_hash == applied.source_hash        # the same bytes, set file included


def test_a_later_policy_takes_its_interfaces_from_older_records(tmp_path):
    a = write(tmp_path, "a.yaml", ["eth0", "eth1"])
    persist.save_applied(load_policy(a), str(a), None)
    b = write(tmp_path, "b.yaml", ["eth1"])
    persist.save_applied(load_policy(b), str(b), None)
    recs = {Path(r["policy_path"]).name: r for r in persist.records()}
    assert recs["a.yaml"]["detached"] == ["eth1"] and recs["b.yaml"]["detached"] == []
    persist.forget_interface("eth0", None)      # a's last interface: its record goes
    assert [Path(r["policy_path"]).name for r in persist.records()] == ["b.yaml"]


def test_other_namespaces_are_left_alone_and_a_gone_namespace_forgotten(tmp_path):
    p = write(tmp_path, "p.yaml", ["eth0"])
    persist.save_applied(load_policy(p), str(p), "ns1")
    persist.save_applied(load_policy(p), str(p), "ns2")
    persist.forget_interface("eth0", "ns1")
    assert [r["netns"] for r in persist.records()] == ["ns2"]
    persist.forget_netns("ns2")
    assert persist.records() == []


def test_restore_with_nothing_saved_says_so():
    said = []
    assert persist.restore(log=said.append) == 0
    assert said and said[0].startswith("nothing to restore")
    json.dumps(said)
