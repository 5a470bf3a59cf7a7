"""CLI habits from ip/tc/nft, against a real apply: -n after the subcommand, a policy on
stdin, stats of every interface, piped output (full width, no trailing spaces, ASCII under
LANG=C) and --watch streaming into a pipe.

    [client] client0 ---------------------------- gw0 [gw]   (one lab for the module)
             10.10.0.2                             10.10.0.1  XDP in, TC out (test_races.policy)
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from netbpf_cli import NETBPF
from test_races import policy

# a key column longer than 80 columns once the namespace prefix is added
LONG = "rule-with-a-long-name-" + "x" * 40


@pytest.fixture(scope="module")
def gw(two_hosts):
    lab = two_hosts
    text = policy(1).replace("name: in-1", f"name: {LONG}")
    # a policy on stdin, and -n after the subcommand
    r = subprocess.run([NETBPF, "apply", "-", "-n", lab.ns("gw")], input=text,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield lab
    finally:
        subprocess.run([NETBPF, "-n", lab.ns("gw"), "detach", "gw0"], capture_output=True)


def run(*args: str, lang: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if lang is not None:
        for k in ("LC_ALL", "LC_CTYPE", "LANG", "PYTHONUTF8"):
            env.pop(k, None)
        env["LANG"] = lang
    return subprocess.run([NETBPF, *args], capture_output=True, text=True, timeout=60, env=env)


def test_piped_stats_are_full_width_without_trailing_spaces(gw):
    out = run("stats", "gw0", "-n", gw.ns("gw")).stdout
    assert LONG in out                                    # nothing cut at 80 columns
    assert all(line == line.rstrip() for line in out.splitlines())
    assert max(len(line) for line in out.splitlines()) > 80


def test_piped_status_shows_the_whole_key_and_exits_0(gw):
    r = run("status", "-n", gw.ns("gw"))
    assert r.returncode == 0, r.stdout
    assert f"{gw.ns('gw')}:gw0" in r.stdout and "link" in r.stdout
    assert all(line == line.rstrip() for line in r.stdout.splitlines())


def test_lang_c_gives_plain_ascii(gw):
    for args in (("status",), ("stats", "gw0", "-n", gw.ns("gw"))):
        out = run(*args, lang="C").stdout
        assert out and out.isascii(), out
        assert "+--" in out or "|" in out                 # rich's ASCII box, still a table


def test_stats_without_an_interface_shows_every_managed_one(gw):
    one = json.loads(run("-n", gw.ns("gw"), "stats", "gw0", "-j").stdout)
    every = json.loads(run("-n", gw.ns("gw"), "stats", "-j").stdout)
    assert isinstance(every, list) and [s["interface"] for s in every] == ["gw0"]
    assert every[0]["parts"].keys() == one["parts"].keys()
    table = run("-n", gw.ns("gw"), "stats").stdout
    assert LONG in table


def test_watch_streams_blocks_into_a_pipe(gw):
    p = subprocess.Popen([NETBPF, "-n", gw.ns("gw"), "stats", "gw0", "--watch", "0.2"],
                         stdout=subprocess.PIPE, text=True)
    try:
        stamps = 0
        for line in p.stdout:
            if line.startswith("--- "):
                stamps += 1
                if stamps == 2:
                    break
        assert stamps == 2
    finally:
        p.kill()
        p.wait()


def test_watch_json_streams_one_line_per_interval(gw):
    p = subprocess.Popen([NETBPF, "-n", gw.ns("gw"), "stats", "gw0", "-j", "--watch", "0.2"],
                         stdout=subprocess.PIPE, text=True)
    try:
        lines = [p.stdout.readline() for _ in range(2)]
        assert all(json.loads(line)["interface"] == "gw0" for line in lines)
    finally:
        p.kill()
        p.wait()


def test_validate_reads_stdin():
    r = subprocess.run([NETBPF, "validate", "-"], input=policy(1), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("<stdin>: ok"), r.stdout + r.stderr
    bad = subprocess.run([NETBPF, "validate", "-"], input="version: 2\n", capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("<stdin>:1:10: version:"), bad.stderr
