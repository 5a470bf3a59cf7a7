"""'ct: invalid' under BPF_PROG_TEST_RUN: the rule drops exactly the TCP flag combinations
Linux conntrack calls INVALID (tcp_valid_flags), whatever PSH/ECE/CWR say, and nothing else."""
from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP

from cases.firewall import eth, v4, v6

from netbpf.policy import load_policy
from netbpf.policy.vocab import CT_FLAG_BITS, CT_VALID_TCP_FLAGS

from fwprog import FwProg

POLICY = """\
version: 1
interfaces:
  eth0:
    conntrack: true
    ingress:
      rules:
        - {name: bad-flags, ct: invalid, action: drop}
"""


@pytest.fixture(scope="module")
def fw(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "p.yaml"
    path.write_text(POLICY)
    prog = FwProg(words=4, class_cap=256)
    prog.install(load_policy(path).ir.interfaces["eth0"].ingress)
    return prog


COMBOS = [sum(b for i, b in enumerate(CT_FLAG_BITS) if n >> i & 1) for n in range(32)]


@pytest.mark.parametrize("flags", COMBOS, ids=[f"0x{c:02x}" for c in COMBOS])
def test_every_flag_combination_meets_linux_verdict(fw, flags):
    expected = "pass" if flags in CT_VALID_TCP_FLAGS else "drop"
    for extra in (0, 0x08 | 0x40 | 0x80):          # PSH ECE CWR change nothing
        assert fw.run(eth(v4(TCP(flags=flags | extra)))) == expected
        assert fw.run(eth(v6(TCP(flags=flags | extra)))) == expected


def test_other_protocols_are_not_invalid(fw):
    assert fw.run(eth(v4(UDP(dport=53)))) == "pass"


def test_the_lowered_rules_count_as_one(fw):
    before = fw.totals()["drop"]
    fw.run(eth(v4(TCP(flags="SF"))))
    fw.run(eth(v4(TCP(flags=""))))
    assert fw.totals()["drop"] - before == 2
