"""Valid policies: IR conversion, set files, warnings, limits, examples, schema and the CLI.

Error positions and wording for invalid files are in test_policy_errors.py; random input in
test_policy_fuzz.py; shadowed rules in test_shadow.py.
"""
from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from netbpf import abi
from netbpf.cli import main
from netbpf.errors import PolicyError
from netbpf.policy.ir import AddrMatch, Prefix
from netbpf.policy import Policy, load_policy, policy_schema, policy_to_ir

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def v4(text: str) -> int:
    return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")


def v6(text: str) -> int:
    return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FULL = """\
version: 1
sets:
  admins: [10.0.0.0/24, "2001:db8::/48", 10.0.0.0/24]
  blocklist: {file: lists/block.txt}
interfaces:
  eth0:
    xdp: {mode: native}
    conntrack: true
    ingress:
      default: drop
      rules:
        - {name: drop-block, src: "@blocklist", action: drop}
        - {name: ssh, src: "@admins", proto: tcp, dport: 22, action: allow}
        - {name: web, proto: tcp, dport: [443, 80, "81-90", 85], action: allow}
        - name: dns
          proto: udp
          dport: 53
          action: {rate_limit: {pps: 1000, per: rule}}
        - {name: ping, proto: icmp, icmp_type: echo-request, action: allow}
        - {name: ping6, proto: icmpv6, icmp_type: echo-request, action: allow}
        - {name: unreach, proto: icmp, icmp_type: 3, icmp_code: 4, action: allow}
        - {name: syn, proto: tcp, tcp_flags: "syn,!ack", action: count}
        - {name: hosts, dst: [192.0.2.1, "2001:db8::/32"], sport: 1024-65535, action: count}
    egress:
      rules:
        - {name: no-smtp, proto: 6, dport: 25, dst: 10.9.0.0/16, action: drop}
load_balancers:
  web:
    interface: eth1
    vip: "2001:db8::100"
    port: 443
    proto: tcp
    mode: dsr
    table_size: 197
    backends:
      - {address: "2001:db8::11", weight: 2}
      - {address: "2001:db8::12", weight: 0}
    health: {tcp: {interval: 2s, timeout: 500ms}}
"""

BLOCK = """\
# bad actors
192.0.2.0/24
198.51.100.7      # one host
2001:db8:bad::/48

192.0.2.0/24
"""


@pytest.fixture
def policy_full(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "block.txt").write_text(BLOCK)
    return load_policy(write(tmp_path, FULL))


def test_rules_convert_to_normalised_ir(policy_full):
    eth0 = policy_full.ir.interfaces["eth0"]
    assert (eth0.xdp_mode, eth0.conntrack) == ("native", True)
    assert eth0.ingress.default == "drop" and eth0.egress.default == "allow"
    r = {rule.name: rule for rule in eth0.ingress.rules}
    assert r["drop-block"].src == AddrMatch(set_name="blocklist")
    assert r["drop-block"].line == 12
    assert (r["ssh"].proto, r["ssh"].dport, r["ssh"].action) == (6, ((22, 22),), "allow")
    assert r["web"].dport == ((80, 90), (443, 443))
    assert (r["dns"].action, r["dns"].rate_pps, r["dns"].rate_burst, r["dns"].rate_per) == \
        ("rate_limit", 1000, 1000, "rule")
    assert (r["ping"].proto, r["ping"].icmp_type) == (1, 8)
    assert (r["ping6"].proto, r["ping6"].icmp_type) == (58, 128)
    assert (r["unreach"].icmp_type, r["unreach"].icmp_code) == (3, 4)
    assert r["syn"].tcp_flags == (0x12, 0x02) and r["syn"].action == "count"
    assert r["hosts"].proto is None and r["hosts"].sport == ((1024, 65535),)
    assert r["hosts"].dst.prefixes == (Prefix(4, v4("192.0.2.1"), 32),
                                       Prefix(6, v6("2001:db8::"), 32))
    smtp = eth0.egress.rules[0]
    assert (smtp.proto, smtp.dst.prefixes) == (6, (Prefix(4, v4("10.9.0.0"), 16),))


def test_sets_convert_with_duplicates_removed(policy_full):
    admins = policy_full.ir.sets["admins"]
    assert admins.v4 == ((v4("10.0.0.0"), 24),) and admins.v6 == ((v6("2001:db8::"), 48),)
    assert admins.source == "inline"
    block = policy_full.ir.sets["blocklist"]
    assert block.v4 == ((v4("192.0.2.0"), 24), (v4("198.51.100.7"), 32))
    assert block.v6 == ((v6("2001:db8:bad::"), 48),)
    assert block.source.endswith("lists/block.txt")


def test_load_balancer_converts_with_port_and_family_defaults(policy_full):
    lb = policy_full.ir.load_balancers["web"]
    assert (lb.interface, lb.family, lb.vip, lb.port, lb.proto, lb.mode, lb.table_size) == \
        ("eth1", 6, v6("2001:db8::100"), 443, 6, "dsr", 197)
    assert [(b.family, b.addr, b.port, b.weight) for b in lb.backends] == \
        [(6, v6("2001:db8::11"), 443, 2), (6, v6("2001:db8::12"), 443, 0)]
    assert policy_full.model.load_balancers["web"].health.tcp.timeout == 0.5


def test_summary_counts_everything(policy_full):
    assert policy_full.summary().startswith(
        f"{policy_full.display}: ok — 1 interface, 10 rules (9 ingress, 1 egress), "
        "2 sets (admins 2, blocklist 3), 1 load balancer, 2 backends")


def test_small_maglev_table_warns(policy_full):
    assert any("table_size 197 is below 100 x 2 backends" in w for w in policy_full.warnings)


def test_tcp_flags_spellings_mean_the_same(tmp_path):
    flags = ['"syn,!ack"', '"SYN !ACK"', '[syn, "!ack"]', "{syn: true, ack: false}"]
    got = set()
    for i, spelling in enumerate(flags):
        text = ("version: 1\ninterfaces:\n  eth0:\n    ingress:\n      rules:\n"
                f"        - {{name: r, proto: tcp, tcp_flags: {spelling}, action: drop}}\n")
        got.add(load_policy(write(tmp_path, text, f"p{i}.yaml"))
                .ir.interfaces["eth0"].ingress.rules[0].tcp_flags)
    assert got == {(0x12, 0x02)}


def test_set_file_is_relative_to_the_policy_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "bl.txt").write_text("10.0.0.0/8\n")
    write(tmp_path / "conf", "version: 1\nsets:\n  bl: {file: bl.txt}\ninterfaces: {eth0: {}}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_policy("conf/p.yaml")
    assert loaded.ir.sets["bl"].v4 == ((v4("10.0.0.0"), 8),)
    assert loaded.ir.sets["bl"].source == "conf/bl.txt"
    assert loaded.warnings == ["conf/p.yaml:3:7: sets.bl: set 'bl' is not used by any rule"]


def test_source_hash_covers_set_files(tmp_path):
    (tmp_path / "bl.txt").write_text("10.0.0.0/8\n")
    path = write(tmp_path, "version: 1\nsets:\n  bl: {file: bl.txt}\n")
    first = load_policy(path).source_hash
    assert load_policy(path).source_hash == first
    (tmp_path / "bl.txt").write_text("10.0.0.0/9\n")
    assert load_policy(path).source_hash != first
    assert len(first) == 64


def test_policy_to_ir_reads_set_files_for_models_built_in_python(tmp_path):
    (tmp_path / "bl.txt").write_text("192.0.2.0/24\n2001:db8::/32\n")
    model = Policy.model_validate({"version": 1, "sets": {"bl": {"file": "bl.txt"}}})
    ir = policy_to_ir(model, tmp_path)
    assert ir.sets["bl"].v4 == ((v4("192.0.2.0"), 24),)
    assert ir.sets["bl"].v6 == ((v6("2001:db8::"), 32),)


def test_model_validate_runs_cross_checks_too():
    rule = {"name": "a", "action": "drop"}
    with pytest.raises(ValidationError, match="duplicate rule name 'a'"):
        Policy.model_validate({"version": 1, "interfaces": {"eth0": {"ingress": {
            "rules": [rule, rule]}}}})


def _without_lines(ir):
    def strip(d):
        return d and replace(d, rules=tuple(replace(r, line=0) for r in d.rules))
    return replace(ir, interfaces={name: replace(i, ingress=strip(i.ingress),
                                                 egress=strip(i.egress))
                                   for name, i in ir.interfaces.items()})


def test_model_dump_is_valid_input_again(policy_full):
    dumped = policy_full.model.model_dump(mode="json", exclude_none=True)
    again = Policy.model_validate(dumped)
    assert policy_to_ir(again, policy_full.path.parent) == _without_lines(policy_full.ir)


def test_yaml_anchors_merge_keys_and_x_keys(tmp_path):
    text = ("version: 1\nx-common: &web {proto: tcp, action: allow}\n"
            "interfaces:\n  eth0:\n    ingress:\n      rules:\n"
            "        - {<<: *web, name: http, dport: 80}\n"
            "        - {<<: *web, name: https, dport: 443, action: drop}\n")
    rules = load_policy(write(tmp_path, text)).ir.interfaces["eth0"].ingress.rules
    assert [(r.name, r.proto, r.dport, r.action) for r in rules] == \
        [("http", 6, ((80, 80),), "allow"), ("https", 6, ((443, 443),), "drop")]


def test_all_zero_weights_is_valid_with_a_warning(tmp_path):
    text = ("version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.1, port: 80, "
            "proto: udp, backends: [{address: 10.0.0.2, weight: 0}]}\n")
    loaded = load_policy(write(tmp_path, text))
    assert loaded.ir.load_balancers["web"].proto == 17
    assert any("every backend has weight 0" in w for w in loaded.warnings)


@pytest.mark.parametrize("proto,given,idle_s", [
    ("tcp", "", 900.0), ("udp", "", 30.0), ("udp", ", idle_timeout: 2h", 7200.0),
    ("tcp", ", idle_timeout: 1d", 86400.0), ("udp", ", idle_timeout: 5", 5.0)])
def test_load_balancer_idle_timeout_defaults_by_protocol(tmp_path, proto, given, idle_s):
    text = ("version: 1\nload_balancers:\n  web: {interface: eth0, vip: 10.0.0.1, port: 80, "
            f"proto: {proto}{given}, backends: [{{address: 10.0.0.2}}]}}\n")
    assert load_policy(write(tmp_path, text)).ir.load_balancers["web"].idle_s == idle_s


def test_mixed_families_in_one_field_are_allowed(tmp_path):
    text = ("version: 1\ninterfaces:\n  eth0:\n    ingress:\n      rules:\n"
            "        - {name: r, src: [10.0.0.0/8, '2001:db8::/32'], action: drop}\n")
    rule = load_policy(write(tmp_path, text)).ir.interfaces["eth0"].ingress.rules[0]
    assert {p.family for p in rule.src.prefixes} == {4, 6}


@pytest.mark.parametrize("limit,value,text,where,message", [
    ("NB_MAX_RULES", 2,
     "".join(f"        - {{name: r{i}, proto: tcp, dport: {i + 1}, action: drop}}\n"
             for i in range(3)), ":8:11: interfaces.eth0.ingress.rules[2]: ",
     "more than 2 allow/drop/rate_limit rules"),
    ("NB_PREFIX_CAP", 2,
     "".join(f"        - {{name: r{i}, src: 10.0.0.{i}, action: drop}}\n" for i in range(3)),
     ":8:27: interfaces.eth0.ingress.rules[2].src: ",
     "more than 2 distinct IPv4 src/dst prefixes"),
    ("NB_DIR_MAX_CHUNKS", 3,
     "".join(f"        - {{name: r{i}, src: 10.0.{i}.1, action: drop}}\n" for i in range(3)),
     ":8:27: interfaces.eth0.ingress.rules[2].src: ",
     "need more than 3 address-table chunks"),
])
def test_direction_limits_name_the_limit(tmp_path, monkeypatch, limit, value, text, where,
                                         message):
    monkeypatch.setattr(abi, limit, value)
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, "version: 1\ninterfaces:\n  eth0:\n    ingress:\n"
                                    "      rules:\n" + text))
    assert len(info.value.errors) == 1
    assert message in info.value.errors[0] and f"({limit})" in info.value.errors[0]
    assert where in info.value.errors[0]


def test_set_capacity_counts_entries_per_family(tmp_path, monkeypatch):
    monkeypatch.setattr(abi, "NB_SET_CAP", 3)
    text = ("version: 1\nsets:\n  a: [10.0.0.1, 10.0.0.2, '2001:db8::1']\n"
            "  b: ['2001:db8::2', 10.0.0.3, 10.0.0.4]\n")
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text))
    assert info.value.errors == [
        f"{tmp_path}/p.yaml:4:6: sets.b: sets hold 4 IPv4 entries up to and including 'b': "
        "the data plane holds at most 3 per family over all sets (NB_SET_CAP)"]


def test_load_balancer_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(abi, "NB_LB_MAX_VIPS", 1)
    monkeypatch.setattr(abi, "NB_LB_MAX_BACKENDS", 2)
    text = ("version: 1\nload_balancers:\n"
            "  a: {interface: eth0, vip: 10.0.0.1, port: 80, proto: tcp, "
            "backends: [{address: 10.1.0.1}, {address: 10.1.0.2}]}\n"
            "  b: {interface: eth0, vip: 10.0.0.1, port: 81, proto: tcp, "
            "backends: [{address: 10.1.0.1}]}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text))
    text = "\n".join(info.value.errors)
    assert "more than 1 load balancers" in text and "(NB_LB_MAX_VIPS)" in text
    assert "3 backends in load balancers up to and including 'b'" in text
    assert "(NB_LB_MAX_BACKENDS)" in text


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.yaml")))
def test_example_policies_validate_without_warnings(name):
    loaded = load_policy(POLICIES / name)
    assert loaded.warnings == []
    assert (POLICIES / name).read_text().startswith("# "), "examples open with a header comment"


def test_examples_cover_what_the_docs_promise():
    names = {p.name for p in POLICIES.iterdir()}
    assert {"demo.yaml", "firewall.yaml", "lb.yaml", "ddos-blocklist.yaml",
            "blocklist.txt"} <= names
    demo = load_policy(POLICIES / "demo.yaml").ir
    gw0 = demo.interfaces["gw0"]
    assert gw0.ingress.default == "allow"
    assert {"drop-udp-9999", "count-web"} <= {r.name for r in gw0.ingress.rules}
    assert {r.action for r in gw0.ingress.rules} == {"drop", "count", "rate_limit"}
    assert demo.sets["blocklist"].v4 and demo.sets["blocklist"].v6
    lb = load_policy(POLICIES / "lb.yaml").ir.load_balancers
    assert [len(x.backends) for x in lb.values()] == [3]
    assert 40 <= len(load_policy(POLICIES / "ddos-blocklist.yaml").ir.sets["blocklist"].v4
                     + load_policy(POLICIES / "ddos-blocklist.yaml").ir.sets["blocklist"].v6)


def test_schema_is_json_with_descriptions_of_the_yaml_form():
    schema = json.loads(json.dumps(policy_schema()))
    rule = schema["$defs"]["Rule"]["properties"]
    assert all(field.get("description") for field in rule.values())
    assert schema["properties"]["version"]["const"] == 1
    assert {"enum": ["allow", "drop", "reject", "count"]} in rule["action"]["oneOf"]
    assert schema["$defs"]["Rule"]["additionalProperties"] is False
    assert "$schema" in schema


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_cli_validate_valid_file_exits_0_with_summary(capsys):
    code, out, err = run_cli(["validate", str(POLICIES / "demo.yaml")], capsys)
    assert code == 0
    assert out.strip() == (f"{POLICIES / 'demo.yaml'}: ok — 1 interface, 5 rules (4 ingress, "
                           "1 egress), 1 set (blocklist 2), 0 load balancers")
    assert err == ""


def test_cli_validate_invalid_file_exits_2_with_plain_error_lines(tmp_path, capsys):
    path = write(tmp_path, "version: 1\ninterfaces:\n  eth0:\n    xdp: {mode: turbo}\n")
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"{path}:4:17: interfaces.eth0.xdp.mode: must be auto, native, generic or offload "
        "(got 'turbo')",
        f"{path}: invalid — 1 error"]


def test_cli_validate_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert "nope.yaml: cannot read policy: No such file or directory" in err


def test_cli_validate_prints_warnings_to_stderr(tmp_path, capsys):
    path = write(tmp_path, "version: 1\nsets: {a: [10.0.0.1]}\ninterfaces: {eth0: {}}\n")
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0 and "(1 warning)" in out
    assert err == f"{path}:2:11: sets.a: set 'a' is not used by any rule\n"


def test_cli_schema_prints_json(capsys):
    code, out, _ = run_cli(["schema"], capsys)
    assert code == 0 and json.loads(out)["title"] == "netbpf policy"


def test_million_line_set_file_loads_every_entry(tmp_path):
    """Correctness only: how fast it loads is measured in bench/ (the machine is shared)."""
    lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i % 4 else
             f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::/64" for i in range(1_000_000)]
    (tmp_path / "big.txt").write_text("# generated\n" + "\n".join(lines) + "\n")
    path = write(tmp_path, "version: 1\nsets:\n  big: {file: big.txt}\ninterfaces:\n  eth0:\n"
                           "    ingress:\n      rules:\n"
                           "        - {name: drop-big, src: '@big', action: drop}\n")
    loaded = load_policy(path)
    assert (len(loaded.ir.sets["big"].v4), len(loaded.ir.sets["big"].v6)) == (750_000, 250_000)
