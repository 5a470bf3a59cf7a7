"""Set-aware shadowing: an earlier rule covers a later one through the contents of sets.

The firehol case from issue 15: a blocklist holding 10.0.0.0/8 drops everything an '@admins'
ssh rule below it would allow. Checked through load_policy (the warning text) and against a
brute-force packet matcher (the cover claim is never wrong).
"""
from __future__ import annotations

import random

from netbpf.policy.ir import AddrMatch, Prefix, RuleIR, SetIR
from netbpf.policy import load_policy
from netbpf.policy.shadow import covers, find_shadowed

FIREHOL = """\
version: 1
sets:
  blocklist: {file: firehol.netset}
  admins: [10.20.30.40, "fd00:ad::7"]
interfaces:
  gw0:
    ingress:
      default: drop
      rules:
        - {name: drop-blocklist, src: "@blocklist", action: drop}
        - {name: ssh-admins, src: "@admins", proto: tcp, dport: 22, action: allow}
"""


def _netset(extra: list[str]) -> str:
    rng = random.Random(7)
    lines = ["# firehol_level1-style list"]
    # many unrelated networks, as in the real 20k-entry list
    lines += [f"{rng.randrange(11, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
              for _ in range(5000)]
    return "\n".join(lines + extra) + "\n"


def _warnings(tmp_path, extra: list[str]) -> list[str]:
    (tmp_path / "firehol.netset").write_text(_netset(extra))
    (tmp_path / "gw.yaml").write_text(FIREHOL)
    return load_policy(tmp_path / "gw.yaml").warnings


def test_blocklist_set_covering_admins_set_warns_naming_rules_and_entry(tmp_path):
    warnings = _warnings(tmp_path, ["10.0.0.0/8", "fd00::/8"])
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "gw.yaml:11:" in w
    assert "rule 'ssh-admins' is shadowed by rule 'drop-blocklist' (line 10)" in w
    assert "src 10.0.0.0/8 of @blocklist" in w


def test_admins_set_partly_outside_the_blocklist_gives_no_warning(tmp_path):
    # fd00:ad::7 is not covered (no IPv6 entry): some admin traffic still reaches the rule
    assert _warnings(tmp_path, ["10.0.0.0/8"]) == []


def test_ipv6_entries_are_looked_into_too(tmp_path):
    warnings = _warnings(tmp_path, ["10.20.30.0/24", "fd00:ad::/32"])
    assert len(warnings) == 1 and "ssh-admins" in warnings[0]


def _p4(text: str) -> Prefix:
    addr, _, plen = text.partition("/")
    a, b, c, d = (int(x) for x in addr.split("."))
    return Prefix(4, (a << 24) | (b << 16) | (c << 8) | d, int(plen or 32))


def test_prefix_rule_covers_a_set_and_a_set_covers_prefixes():
    sets = {"a": SetIR("a", v4=((_p4("10.1.0.0/16").addr, 16), (_p4("10.2.3.4").addr, 32)))}
    wide = RuleIR("wide", "drop", src=AddrMatch(prefixes=(_p4("10.0.0.0/8"),)))
    by_set = RuleIR("by-set", "allow", src=AddrMatch(set_name="a"))
    narrow = RuleIR("narrow", "allow", src=AddrMatch(prefixes=(_p4("10.1.9.0/24"),)))
    assert covers(wide, by_set, sets)
    assert not covers(wide, by_set)              # without contents: never claimed
    assert covers(by_set, narrow, sets)
    assert find_shadowed([wide, by_set], sets) == [(1, 0)]
    assert find_shadowed([by_set, narrow], sets) == [(1, 0)]
    assert find_shadowed([narrow, by_set], sets) == []


def test_set_cover_claim_is_never_wrong_on_random_sets():
    rng = random.Random(1)

    def rand_set(name):
        n = rng.randrange(1, 6)
        return SetIR(name, v4=tuple((rng.randrange(4) << 30 | rng.randrange(1 << 8) << 22,
                                     rng.choice((2, 4, 8, 10))) for _ in range(n)))

    def inside(s, addr):
        return any(addr >> (32 - p) == a >> (32 - p) for a, p in s.v4)

    for _ in range(300):
        sets = {"x": rand_set("x"), "y": rand_set("y")}
        sets = {k: SetIR(k, v4=tuple((a >> (32 - p) << (32 - p), p) for a, p in s.v4))
                for k, s in sets.items()}
        a = RuleIR("a", "drop", src=AddrMatch(set_name="x"))
        b = RuleIR("b", "allow", src=AddrMatch(set_name="y"))
        if covers(a, b, sets):
            for _ in range(200):
                addr = rng.randrange(1 << 32)
                assert not inside(sets["y"], addr) or inside(sets["x"], addr)
