"""netbpf import, pure: every format parses to a policy netbpf accepts; what cannot be expressed
is warned about with its line; unparseable input exits 2; fuzzed input never raises."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from netbpf.cli import cli
from netbpf.errors import NetbpfError
from netbpf.importer import import_ruleset
from netbpf.importer.nftjson import parse_nft_json
from netbpf.policy.convert import complement_prefixes

pytestmark = pytest.mark.unit
CASES = Path(__file__).parent.parent / "cases" / "import"


class Result:
    """CliRunner's result with netbpf.cli.main's exit codes (NetbpfError -> its exit_code)."""
    def __init__(self, r):
        self.stdout, self.stderr, self.output, self.exception = r.stdout, r.stderr, r.output, \
            r.exception
        self.exit_code = r.exception.exit_code if isinstance(r.exception, NetbpfError) \
            else r.exit_code


def run(*args, stdin=None):
    return Result(CliRunner().invoke(cli, ["import", *args], input=stdin))


@pytest.mark.parametrize("args", [
    ["iptables", str(CASES / "host.v4"), str(CASES / "host.v6"), "-i", "gw0"],
    ["iptables", str(CASES / "router.v4"), "--ipset", str(CASES / "router.ipset"), "-i", "gw0"],
    ["nft", str(CASES / "edge.nft"), "-i", "gw0"],
])
def test_real_world_rulesets_import_to_valid_policies(args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "version: 1" in r.stdout and "gw0:" in r.stdout


def test_source_lines_are_named_in_comments_and_warnings():
    r = run("iptables", str(CASES / "router.v4"), "-i", "gw0")
    assert f"# {CASES / 'router.v4'}:17: -A services -p tcp" in r.stdout
    assert f"{CASES / 'router.v4'}:19: warning: --reject-with" not in r.stderr
    assert "ipset 'blocked': contents unknown" in r.stderr


def test_user_chain_is_flattened_with_the_jump_matches_and_return_negated():
    r = run("iptables", str(CASES / "router.v4"), "-i", "gw0")
    # '-A mgmt -s 10.10.0.0/25 -j RETURN' then '-p tcp --dport 22 -j REJECT'
    assert 'src: {not: ["10.10.0.0/25"]}, proto: "tcp", dport: [22], action: "reject"' in r.stdout
    # '-A INPUT -i gw0 -j services': services' rules land on gw0
    assert 'dport: {not: ["1024-65535"]}' in r.stdout


def test_stdin_and_unsupported_constructs_warn_with_their_line():
    text = ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m owner --uid-owner 0 -j DROP\n"
            "-A INPUT -j MARK --set-mark 1\nCOMMIT\n*nat\n:POSTROUTING ACCEPT [0:0]\n"
            "-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n")
    r = run("iptables", "-", "-i", "eth0", stdin=text)
    assert r.exit_code == 0, r.output
    assert "<stdin>:3: warning: match '-m owner' has no netbpf counterpart" in r.stderr
    assert "<stdin>:4: warning: target MARK has no netbpf counterpart" in r.stderr
    assert "<stdin>:6: warning: table nat (nat) is not imported" in r.stderr


@pytest.mark.parametrize("kind,text", [
    ("iptables", "-A INPUT -j ACCEPT\n"),
    ("iptables", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 99999 -j DROP\nCOMMIT\n"),
    ("iptables", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\n"),
    ("nft", "table inet f {\n chain c {\n"),
    ("nft", '{"nftables": 3}'),
    ("ipvs", "-a -t 10.0.0.1:80 -r 10.0.0.2:80 -m\n"),
])
def test_unparseable_input_exits_2_naming_the_line(kind, text):
    r = run(kind, "-", stdin=text)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_nft_json_reads_like_the_text():
    doc = ('{"nftables": [{"table": {"family": "inet", "name": "f"}}, {"chain": {"family": '
           '"inet", "table": "f", "name": "in", "type": "filter", "hook": "input", "prio": 0, '
           '"policy": "drop"}}, {"rule": {"family": "inet", "table": "f", "chain": "in", '
           '"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": '
           '"dport"}}, "right": {"set": [22, {"range": [8000, 8010]}]}}}, {"accept": null}]}}, '
           '{"rule": {"family": "inet", "table": "f", "chain": "in", "expr": [{"match": '
           '{"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": '
           '{"prefix": {"addr": "10.0.0.0", "len": 8}}}}, {"drop": null}]}}]}')
    res = import_ruleset(parse_nft_json(doc, "r.json"), "t", ["eth0"])
    assert 'dport: [22, "8000-8010"], action: "allow"' in res.policy
    assert 'src: {not: ["10.0.0.0/8"]}' in res.policy


def test_ipvs_services_become_load_balancers_with_modes_and_weights():
    text = ("-A -t 10.0.0.100:80 -s rr\n-a -t 10.0.0.100:80 -r 10.1.0.1:8080 -m -w 3\n"
            "-A -u 10.0.0.100:53 -s mh\n-a -u 10.0.0.100:53 -r 10.1.0.2:53 -g -w 1\n")
    r = run("ipvs", "-", "-i", "eth0", stdin=text)
    assert r.exit_code == 0, r.output
    assert '{address: "10.1.0.1", port: 8080, weight: 3}' in r.stdout
    assert 'mode: "dsr"' in r.stdout and 'mode: "nat"' in r.stdout
    assert "<stdin>:1: warning: scheduler rr" in r.stderr


ALPHABET = st.sampled_from(["*filter\n", ":INPUT DROP [0:0]\n", "-A INPUT ", "-p tcp ", "! ",
                            "--dport 22 ", "-s 10.0.0.0/8 ", "-j ACCEPT\n", "-j foo\n",
                            ":foo - [0:0]\n", "-A foo -j RETURN\n", "COMMIT\n", "-m set ",
                            "--match-set x src ", "--tcp-flags SYN,ACK SYN ", "\"", "{", "}",
                            "table inet t {\n", "chain c {\n", "type filter hook input ",
                            "policy drop;\n", "tcp dport { 1, 2 } ", "accept\n", "ip saddr != ",
                            "@s ", "vmap { 1 : drop }\n", "\x00", "é", "-"])


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=30), st.sampled_from(["iptables", "nft", "ipvs"]))
def test_fuzzed_input_never_raises(parts, kind):
    r = run(kind, "-", "-i", "eth0", stdin="".join(parts))
    assert r.exit_code in (0, 2), (r.output, repr(r.exception))
    assert r.exception is None or isinstance(r.exception, (SystemExit, NetbpfError)), \
        repr(r.exception)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=8))
def test_complement_prefixes_cover_exactly_the_rest(entries):
    entries = [(a >> (32 - p) << (32 - p) if p else 0, p) for a, p in entries]
    out = complement_prefixes(entries, 32)
    inside = [ipaddress.ip_network((a, p)) for a, p in entries]
    rest = [ipaddress.ip_network((a, p)) for a, p in out]
    for probe in [0, 2**32 - 1] + [a for a, _ in entries] + [a + 1 for a, _ in out]:
        addr = ipaddress.ip_address(min(probe, 2**32 - 1))
        assert any(addr in n for n in inside) != any(addr in n for n in rest)
