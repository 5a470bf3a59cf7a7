"""The language additions the importer needs: reject, {not: ...} negation, ct: invalid.

Pure: models, lowering to the IR (complements, flag matches) and shadowing, no kernel."""
from __future__ import annotations

import pytest

from netbpf.errors import PolicyError
from netbpf.policy import load_policy
from netbpf.policy.vocab import CT_FLAG_BITS, CT_VALID_TCP_FLAGS, ct_invalid_flag_matches

pytestmark = pytest.mark.unit


def load(tmp_path, rules: str, conntrack: str = "true"):
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nsets:\n  adm: [10.0.0.0/8, \"2001:db8::/32\"]\ninterfaces:\n"
                 f"  eth0:\n    conntrack: {conntrack}\n    ingress:\n      rules:\n{rules}")
    return load_policy(p)


def errors(tmp_path, rules: str, conntrack: str = "true") -> str:
    with pytest.raises(PolicyError) as e:
        load(tmp_path, rules, conntrack)
    return "\n".join(e.value.errors)


def test_reject_is_an_action(tmp_path):
    rules = load(tmp_path, "        - {name: r, proto: tcp, dport: 25, action: reject}\n")
    assert rules.ir.interfaces["eth0"].ingress.rules[0].action == "reject"


def test_negated_ports_become_the_complement_ranges(tmp_path):
    p = load(tmp_path, "        - {name: r, proto: tcp, dport: {not: [22, 80-90]}, action: drop}\n")
    assert p.ir.interfaces["eth0"].ingress.rules[0].dport == ((0, 21), (23, 79), (91, 65535))


def test_negated_networks_and_sets_become_complement_prefixes(tmp_path):
    p = load(tmp_path, "        - {name: a, src: {not: 10.0.0.0/8}, action: drop}\n"
                       "        - {name: b, dst: {not: \"@adm\"}, action: drop}\n")
    a, b = p.ir.interfaces["eth0"].ingress.rules
    # 0/5 8/7 11/8 12/6 16/4 32/3 64/2 128/1: everything but 10.0.0.0/8, in eight prefixes
    assert sorted(x.plen for x in a.src.prefixes) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(x.family == 4 for x in a.src.prefixes)
    assert {x.family for x in b.dst.prefixes} == {4, 6} and b.dst.set_name is None


@pytest.mark.parametrize("value,message", [
    ("{not: [0-65535]}", "matches no port"),
    ("{nor: 22}", "write {not: VALUE}"),
    ("{not: {not: 22}}", "negate once"),
])
def test_bad_negations_are_errors(tmp_path, value, message):
    assert message in errors(tmp_path, f"        - {{name: r, proto: tcp, dport: {value}, "
                                       "action: drop}\n")


def test_ct_invalid_lowers_to_tcp_flag_matches_counted_as_one_rule(tmp_path):
    p = load(tmp_path, "        - {name: bad, ct: invalid, action: drop}\n"
                       "        - {name: web, proto: tcp, dport: 80, action: allow}\n")
    ir = p.ir.interfaces["eth0"].ingress.rules
    assert [r.name for r in ir].count("bad") == len(ct_invalid_flag_matches())
    assert {r.source_index for r in ir if r.name == "bad"} == {0} and ir[-1].source_index == 1
    assert not [w for w in p.warnings if "shadowed" in w]


def test_ct_invalid_matches_exactly_linux_invalid_combinations():
    combos = [sum(b for i, b in enumerate(CT_FLAG_BITS) if n >> i & 1) for n in range(32)]
    for flags in combos:
        hit = any(flags & m == v for m, v in ct_invalid_flag_matches())
        assert hit == (flags not in CT_VALID_TCP_FLAGS), hex(flags)


@pytest.mark.parametrize("rule,conntrack,message", [
    ("{name: r, ct: invalid, action: drop}", "false", "needs conntrack: true"),
    ("{name: r, ct: invalid, proto: udp, action: drop}", "true", "proto must be tcp"),
    ("{name: r, ct: invalid, proto: tcp, tcp_flags: syn, action: drop}", "true",
     "remove tcp_flags"),
    ("{name: r, ct: established, action: drop}", "true", "must be invalid"),
])
def test_bad_ct_rules_are_errors(tmp_path, rule, conntrack, message):
    assert message in errors(tmp_path, f"        - {rule}\n", conntrack)


def test_shadowing_sees_reject_and_the_whole_ct_rule(tmp_path):
    p = load(tmp_path, "        - {name: all-tcp, proto: tcp, action: reject}\n"
                       "        - {name: bad, ct: invalid, action: drop}\n"
                       "        - {name: ssh, proto: tcp, dport: 22, action: allow}\n")
    text = "\n".join(p.warnings)
    assert "rule 'bad' is shadowed by rule 'all-tcp'" in text
    assert "rule 'ssh' is shadowed by rule 'all-tcp'" in text
    part = load(tmp_path, "        - {name: syn-fin, proto: tcp, tcp_flags: \"syn,fin\", "
                          "action: drop}\n        - {name: bad, ct: invalid, action: drop}\n")
    assert not [w for w in part.warnings if "shadowed" in w]   # one flag match is covered
