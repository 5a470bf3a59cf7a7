"""Copies of applied policy files: what `status` says about the named file, what rollback loads.

Plain files under a temporary STATE_ROOT; no kernel.
"""
from __future__ import annotations

import pytest

from netbpf.store import snapshot

from netbpf.store import state
from netbpf.policy import load_policy

POLICY = """\
version: 1
sets:
  bad: {file: lists/bad.txt}
interfaces:
  eth0:
    ingress:
      rules:
        - {name: drop-bad, src: "@bad", action: drop}
"""


@pytest.fixture
def applied(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "STATE_ROOT", tmp_path / "state")
    monkeypatch.setattr(state, "LIB_ROOT", tmp_path / "lib")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bad.txt").write_text("192.0.2.0/24\n")
    policy = tmp_path / "gw.yaml"
    policy.write_text(POLICY)
    snapshot.record(["eth0"], load_policy(policy), str(policy), None)
    return policy


def test_unchanged_files_read_unchanged(applied):
    assert snapshot.file_status("eth0", str(applied)) == "unchanged"


def test_an_edited_set_file_reads_changed(applied):
    (applied.parent / "lists" / "bad.txt").write_text("192.0.2.0/24\n198.51.100.0/24\n")
    assert snapshot.file_status("eth0", str(applied)) == "changed"


def test_an_edited_policy_reads_changed_and_a_deleted_one_gone(applied):
    applied.write_text(POLICY + "# edited\n")
    assert snapshot.file_status("eth0", str(applied)) == "changed"
    applied.unlink()
    assert snapshot.file_status("eth0", str(applied)) == "gone"


def test_the_copy_loads_the_applied_contents_after_the_files_changed(applied):
    (applied.parent / "lists" / "bad.txt").write_text("10.0.0.0/8\n")
    again = load_policy(snapshot.policy_copy("eth0"))
    assert again.ir.sets["bad"].v4 == ((0xC0000200, 24),)


def test_a_second_apply_keeps_the_first_as_previous(applied):
    applied.write_text(POLICY.replace("drop-bad", "drop-them"))
    snapshot.record(["eth0"], load_policy(applied), str(applied), None)
    prev = load_policy(snapshot.policy_copy("eth0", "previous"))
    assert prev.ir.interfaces["eth0"].ingress.rules[0].name == "drop-bad"
    snapshot.forget("eth0")
    assert snapshot.manifest("eth0") is None
    assert snapshot.file_status("eth0", str(applied)) == "unknown"
