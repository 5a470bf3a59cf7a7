"""CLI habits from ip/tc/git: bare `netbpf` is help (exit 0), -V, exit codes in --help, -n
before or after the subcommand, and man pages generated from the same text as --help."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from netbpf.cli import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, prog_name="netbpf")


def test_bare_netbpf_prints_help_and_exits_0():
    r = run()
    assert r.exit_code == 0 and "Usage: netbpf" in r.output and "apply" in r.output


def test_version_has_a_short_flag():
    for flag in ("-V", "--version"):
        r = run(flag)
        assert r.exit_code == 0 and r.output.startswith("netbpf, version ")


def test_help_documents_exit_codes_including_status_drift():
    text = run("--help").output
    assert "Exit status:" in text
    assert "0  success" in text and "2  bad input" in text and "drifted" in text


def test_netns_after_the_subcommand_is_the_same_as_before_it(monkeypatch):
    seen = {}
    monkeypatch.setattr("netbpf.cli.dataplane.require_privileges", lambda ctx: None)
    rows = [{"netns": "ns1", "interface": "a", "health": "ok"},
            {"netns": "ns2", "interface": "b", "health": "ok"}]
    monkeypatch.setattr("netbpf.observe.status.read_status",
                        lambda netns=None, ifname=None: seen.setdefault(netns, [
                            r for r in rows if netns is None or r["netns"] == netns]))
    after = run("status", "-n", "ns1", "-j")
    before = run("-n", "ns1", "status", "--json")
    assert after.exit_code == 0 and after.output == before.output
    assert '"ns1"' in after.output and '"ns2"' not in after.output


def test_netns_given_twice_differently_is_refused():
    r = run("-n", "a", "status", "-n", "b")
    assert r.exit_code == 2 and "-n given twice" in r.output


def test_man_pages_are_generated_from_the_help_text(tmp_path):
    from netbpf.cli.manpages import write_man_pages

    pages = {p.name: p.read_text() for p in write_man_pages(tmp_path)}
    for sub in ("apply", "detach", "status", "stats", "restore", "validate", "events"):
        assert f"netbpf-{sub}.1" in pages
    assert "drifted" in pages["netbpf-status.1"]       # from the status docstring
    assert "network-pre.target" in pages["netbpf-restore.1"]
