"""show, explain and selftest against real attached programs in a private lab.

    [client] client0 ---------------------- gw0 [gw]   XDP ingress + TC egress, netbpf's pins
             10.10.0.2, fd00:10::2          10.10.0.1, fd00:10::1

`show` decodes the pinned maps back into a policy: it must equal the applied file for every
field of the language, and report a manual map edit. `explain` and `selftest` run packets
through a copy of the attached program: they must agree with the model on the firewall case
table and on a generated 10,000-rule policy, and a corrupted map entry must fail naming the
rule. The policies are applied through the library (apply_policy), as the CLI does.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import time

import pytest

from cases.firewall import CASES
from netbpf import abi
from netbpf.engine.apply import apply_policy, detach
from netbpf.fw.compile import rule_digest
from netbpf.safety.explain import explain, parse_packet
from netbpf.observe.inspect import open_tables, read_enforced
from netbpf.policy.ir import InterfaceIR, PolicyIR
from netbpf.kernel import bpfsys
from netbpf.policy import load_policy
from netbpf.safety.probe import parse_frame
from netbpf.policy.render import policy_dict
from netbpf.safety.selftest import selftest
from netbpf.store.state import load_state

from netbpf_cli import NETBPF

EVERY_FIELD = """\
version: 1
sets:
  bad: {file: bad.txt}
  admins: [10.10.0.2, "fd00:10::2"]
interfaces:
  gw0:
    xdp: {mode: generic}
    conntrack: {timeouts: {udp: 20}}
    ingress:
      default: drop
      sample: 1000
      rules:
        - {name: count-all, action: count}
        - {name: drop-bad, src: "@bad", action: drop, sample: 10}
        - {name: ssh, src: "@admins", proto: tcp, dport: 22, tcp_flags: "syn,!ack", action: allow}
        - {name: web, dst: [10.10.0.1, "fd00:10::/64"], proto: tcp, dport: [80, 443, 8000-8081],
           action: allow}
        - name: dns
          proto: udp
          sport: 1024-65535
          dport: 53
          action: {rate_limit: {pps: 100, burst: 200, per: rule}}
        - {name: ping, proto: icmp, icmp_type: echo-request, icmp_code: 0,
           action: {rate_limit: {pps: 5}}}
        - {name: unreach6, proto: icmpv6, icmp_type: 1, icmp_code: 4, action: allow}
        - {name: gre, proto: gre, src: 192.0.2.0/24, action: allow}
        - {name: any-port, dport: 9000-9100, action: drop}
    egress:
      default: allow
      rules:
        - {name: no-smtp, proto: tcp, dport: 25, action: drop}
        - {name: count-dns, proto: udp, dport: 53, action: count}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, _no_lab_left_behind):
    from netbpf.lab import Lab

    if os.geteuid() != 0:
        pytest.skip("the netns lab needs root: run 'make test' as root")
    # not an nb<hex>- prefix: an older netbpf's cleanup on a shared machine would take it
    with Lab.from_file("two-hosts", prefix=f"si{secrets.token_hex(3)}-") as lab:
        d = tmp_path_factory.mktemp("inspect")
        try:
            yield lab, d
        finally:
            try:
                detach("gw0", lab.ns("gw"), log=lambda m: None)
            except Exception:  # noqa: BLE001 - nothing attached is fine
                pass


def apply_text(lab, d, text: str, name: str = "p.yaml"):
    (d / name).write_text(text)
    loaded = load_policy(d / name)
    apply_policy(loaded, str(d / name), lab.ns("gw"), log=lambda m: None)
    return loaded


def key(lab) -> str:
    return f"{lab.ns('gw')}:gw0"


def test_show_equals_the_applied_policy_for_every_field(gw):
    lab, d = gw
    (d / "bad.txt").write_text("192.0.2.0/24\n198.51.100.0/24\n2001:db8:bad::/48\n")
    applied = apply_text(lab, d, EVERY_FIELD)
    out = subprocess.run([NETBPF, "-n", lab.ns("gw"), "show", "gw0", "--json"],
                         capture_output=True, text=True)
    shown = json.loads(out.stdout)
    assert out.returncode == 0 and shown["equals_applied"] is True, out.stdout + out.stderr
    # the YAML show prints is itself a policy: load it and compare with the file, rule by rule
    yaml_out = subprocess.run([NETBPF, "-n", lab.ns("gw"), "show", "gw0"],
                              capture_output=True, text=True).stdout
    (d / "shown.yaml").write_text(yaml_out)
    again = load_policy(d / "shown.yaml").ir
    for direction in ("ingress", "egress"):
        a = getattr(applied.ir.interfaces["gw0"], direction)
        b = getattr(again.interfaces["gw0"], direction)
        assert (a.default, a.sample) == (b.default, b.sample)
        assert [rule_digest(r) for r in a.rules] == [rule_digest(r) for r in b.rules]
    for name, s in applied.ir.sets.items():
        assert sorted(s.v4) == sorted(again.sets[name].v4)
        assert sorted(s.v6) == sorted(again.sets[name].v6)
    assert "# equals the last applied file" in yaml_out


def test_selftest_and_explain_agree_on_the_every_field_policy(gw):
    lab, d = gw
    results = selftest(key(lab))
    assert [r.name for r in results if r.failures] == [], [r.failures for r in results]
    for words, verdict, rule in (
            (["tcp", "10.10.0.2:40000", "10.10.0.1:22", "flags=syn"], "pass", "ssh"),
            (["tcp", "10.10.0.2:40000", "10.10.0.1:22", "flags=syn,ack"], "drop", "default"),
            (["tcp", "198.51.100.9:1", "10.10.0.1:443"], "drop", "drop-bad"),
            (["udp", "[fd00:10::2]:5000", "[fd00:10::1]:9050"], "drop", "any-port")):
        pkt, data = parse_packet(words)
        x = explain(key(lab), pkt, data)
        assert x.agree and (x.program_verdict, x.program_rule) == (verdict, rule), x
        assert x.counted == ["count-all"]


def test_a_corrupted_map_entry_fails_selftest_naming_the_rule_and_shows_in_show(gw):
    lab, d = gw
    st = load_state(key(lab))
    tables = open_tables(st, "ingress")
    try:
        gen = tables.active_gen()
        cfg = abi.NbFwCfg.from_buffer_copy(bpfsys.map_lookup(
            tables.fd("nb_fw_cfg"), gen.to_bytes(4, "little"), ctypes.sizeof(abi.NbFwCfg)))
        wild = cfg.wild_id[abi.NB_F_DPORT]
        idx = abi.port_idx(gen, 1, 8081).to_bytes(4, "little")
        good = bpfsys.map_lookup(tables.fd("nb_fw_ports"), idx, 4)
        bpfsys.map_update(tables.fd("nb_fw_ports"), idx, wild.to_bytes(4, "little"))
        try:
            failed = {r.name: r.failures for r in selftest(key(lab)) if r.failures}
            assert "web" in failed and any(":8081" in f for f in failed["web"]), failed
            out = subprocess.run([NETBPF, "-n", lab.ns("gw"), "show", "gw0"],
                                 capture_output=True, text=True)
            assert out.returncode == 1
            assert "ingress rule 'web': dport kernel [80, 443, '8000-8080'" in out.stdout
            cli = subprocess.run([NETBPF, "-n", lab.ns("gw"), "selftest", "gw0"],
                                 capture_output=True, text=True)
            assert cli.returncode == 1 and "FAIL ingress web" in cli.stdout
        finally:
            bpfsys.map_update(tables.fd("nb_fw_ports"), idx, good)
    finally:
        tables.close()
    assert not [r for r in selftest(key(lab)) if r.failures]


def _case_policy_yaml(case) -> str:
    ir = PolicyIR(interfaces={"gw0": InterfaceIR("gw0", "generic", ingress=case.policy)},
                  sets=case.sets)
    return json.dumps(policy_dict(ir))           # JSON is YAML


def test_explain_and_selftest_agree_with_the_firewall_case_table(gw):
    lab, d = gw
    groups: dict[str, list] = {}
    for case in CASES:
        if case.model:
            groups.setdefault(_case_policy_yaml(case), []).append(case)
    for text, cases in groups.items():
        apply_text(lab, d, text, "case.yaml")
        bad = [r for r in selftest(key(lab)) if r.failures]
        assert not bad, (cases[0].id, [(r.name, r.failures) for r in bad])
        for case in cases:
            x = explain(key(lab), parse_frame(case.packet), case.packet)
            assert x.agree, (case.id, x)
            assert x.program_verdict == case.verdict, (case.id, x)
            assert x.program_rule == (case.rule or "default"), (case.id, x)


def test_selftest_and_explain_on_a_generated_10k_rule_policy(gw):
    lab, d = gw
    lines = ["version: 1", "interfaces:", "  gw0:", "    xdp: {mode: generic}", "    ingress:",
             "      default: allow", "      rules:"]
    for i in range(10_000):
        action = "drop" if i % 3 else "allow"
        lines.append(f"        - {{name: r{i}, src: 10.{i >> 8 & 255}.{i & 255}.0/24, "
                     f"proto: {'tcp' if i % 2 else 'udp'}, dport: {1000 + i % 4000}-"
                     f"{1000 + i % 4000 + i % 7}, action: {action}}}")
    apply_text(lab, d, "\n".join(lines) + "\n", "big.yaml")
    start = time.monotonic()
    results = selftest(key(lab))
    took = time.monotonic() - start
    print(f"selftest of 10,000 rules: {took:.1f} s, {sum(r.probes for r in results)} probes")
    assert len(results) == 10_000 and not [r for r in results if r.failures]
    pkt, data = parse_packet(["tcp", "10.39.15.1:5000", "10.10.0.1:3000"])   # rule 9999
    x = explain(key(lab), pkt, data)
    assert x.agree and x.program_rule == "r9999" and x.program_verdict == "pass"
    pkt, data = parse_packet(["udp", "10.0.4.9:5000", "10.10.0.1:1004"])
    x = explain(key(lab), pkt, data)
    assert x.agree and x.program_rule == "r4" and x.program_verdict == "drop"


REJECTING = """\
version: 1
interfaces:
  gw0:
    xdp: {mode: native}
    ingress:
      default: allow
      rules:
        - {name: rej-ssh, proto: tcp, dport: 22, action: reject}
        - {name: rej-dns, proto: udp, dport: 53, action: reject}
        - {name: not-web, proto: tcp, src: 10.10.0.0/24, dport: {not: [80, 443]}, action: drop}
    egress:
      default: allow
      rules:
        - {name: rej-smtp, proto: tcp, dport: 25, action: reject}
"""


def test_explain_and_selftest_know_reject_and_negation(gw):
    """The program copy answers a rejected SYN (XDP_TX) like the attached program does; a
    rejected packet that gets no answer is dropped, which the policy allows too."""
    lab, d = gw
    apply_text(lab, d, REJECTING, "rej.yaml")
    results = selftest(key(lab))
    assert [r.name for r in results if r.failures] == [], [r.failures for r in results]
    for words, verdict, rule in (
            (["tcp", "10.10.0.2:40000", "10.10.0.1:22", "flags=syn"], "reject", "rej-ssh"),
            (["udp", "10.10.0.2:40000", "10.10.0.1:53"], "reject", "rej-dns"),
            (["tcp", "10.10.0.2:40000", "10.10.0.1:8080", "flags=syn"], "drop", "not-web"),
            (["tcp", "10.10.0.2:40000", "10.10.0.1:443", "flags=syn"], "pass", "default")):
        pkt, data = parse_packet(words)
        x = explain(key(lab), pkt, data)
        assert x.agree and (x.program_verdict, x.program_rule) == (verdict, rule), x
