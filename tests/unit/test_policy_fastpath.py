"""The fast path of load_policy: a valid policy is parsed once without most positions and bare
IPv4 set files skip the line-by-line parser; anything to report is read again with positions,
so messages are exactly those of the full reading. Speed itself is shown in bench/."""
from __future__ import annotations

import pytest

from netbpf.errors import PolicyError
from netbpf.policy import load, source
from netbpf.policy.addr import parse_set_text
from netbpf.policy.addr import parse_hosts_v4 as _hosts_v4
from netbpf.policy.load import load_policy

POLICY = """version: 1
sets:
  bl: {file: bl.txt}
interfaces:
  eth0:
    ingress:
      default: allow
      rules:
        - {name: bl, src: "@bl", action: drop}
        - name: web
          proto: tcp
          dport: 80
          action: allow
"""


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = source.parse_yaml

    def spy(text, positions=True):
        seen.append(positions)
        return real(text, positions=positions)

    monkeypatch.setattr(load, "parse_yaml", spy)
    return seen


def test_a_valid_policy_is_parsed_once_without_positions(tmp_path, calls):
    (tmp_path / "bl.txt").write_text("192.0.2.1\n192.0.2.2\n")
    (tmp_path / "p.yaml").write_text(POLICY)
    lp = load_policy(tmp_path / "p.yaml")
    assert calls == [False]
    rules = lp.ir.interfaces["eth0"].ingress.rules
    assert [r.line for r in rules] == [9, 10]          # rule lines still come from the file


def test_an_error_is_reported_from_a_second_reading_with_positions(tmp_path, calls):
    (tmp_path / "bl.txt").write_text("192.0.2.1\n")
    (tmp_path / "p.yaml").write_text(POLICY.replace("dport: 80", "dport: 80000"))
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path / "p.yaml")
    assert calls == [False, True]
    assert str(tmp_path / "p.yaml") + ":12:18: interfaces.eth0.ingress.rules[1].dport:" \
        in str(e.value), str(e.value)


def _full_reading(monkeypatch) -> None:
    real = load._load
    monkeypatch.setattr(load, "_load", lambda *a, **k: real(*a, **{**k, "positions": True}))


def test_a_warning_on_a_mapping_is_placed_by_the_first_reading(tmp_path, calls, monkeypatch):
    """Warnings name rules and sets, whose starts even the reading without positions keeps:
    no second reading, and the same FILE:LINE:COL as the full one (a 10k-rule set with many
    shadowed rules used to be read twice)."""
    (tmp_path / "bl.txt").write_text("192.0.2.1\n")
    text = POLICY.replace("sets:\n", "sets:\n  unused: [10.0.0.1]\n") + \
        "        - {name: web-again, proto: tcp, dport: 80, action: drop}\n"
    (tmp_path / "p.yaml").write_text(text)
    lp = load_policy(tmp_path / "p.yaml")
    assert calls == [False]
    assert any(":3:" in w and "unused" in w for w in lp.warnings), lp.warnings
    assert any(":15:11:" in w and "shadowed" in w for w in lp.warnings), lp.warnings
    _full_reading(monkeypatch)
    assert load_policy(tmp_path / "p.yaml").warnings == lp.warnings


@pytest.mark.parametrize("text", [
    "10.0.0.1\n10.0.0.2\n", "10.0.0.1\n10.0.0.1\n", "10.0.0.1", "", "\n", "10.0.0.1\n\n10.0.0.2\n",
    "10.0.0.1 \n", "10.0.0.1\r\n", "010.0.0.1\n", "10.0.0.1/32\n", "10.0.0.256\n",
    "::1\n", "10.0.0.1 # x\n", "1.2.3.4 5.6.7.8\n", "255.255.255.255\n0.0.0.0\n",
])
def test_the_bare_ipv4_reader_agrees_with_the_line_parser_or_declines(text):
    fast = _hosts_v4(text)
    assert fast is None or fast == parse_set_text(text)
    if text in ("10.0.0.1\n10.0.0.2\n", "10.0.0.1\n10.0.0.1\n", "255.255.255.255\n0.0.0.0\n"):
        assert fast is not None
