"""The firewall case table through the Python model: compile -> simulate, and the reference.

Same cases as tests/bpf/test_firewall.py runs on the kernel; cases about parsing the model
does not do (non-IP, malformed) are marked model=False and checked only there.
"""
from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, _ICMPv6)
from scapy.layers.l2 import Ether

from cases.firewall import CASES

from netbpf.fw.compile import Pkt, compile_direction, reference_match, simulate

MODEL_CASES = [c for c in CASES if c.model]


def parse(frame: bytes) -> Pkt:
    """What the BPF parser extracts, computed with Scapy."""
    pkt = Ether(frame)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    fam = 4 if isinstance(ip, IP) else 6
    src, dst = int(ipaddress.ip_address(ip.src)), int(ipaddress.ip_address(ip.dst))
    if fam == 4:
        proto, later_fragment = ip.proto, ip.frag != 0
    else:
        frag = pkt.getlayer(IPv6ExtHdrFragment)
        later_fragment = frag is not None and frag.offset != 0
        proto = frag.nh if later_fragment else None
    l4 = None if later_fragment else ip.payload
    ext = (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment)
    while fam == 6 and isinstance(l4, ext):
        l4 = l4.payload
    if later_fragment:
        return Pkt(fam, src, dst, proto)
    if isinstance(l4, TCP):
        return Pkt(fam, src, dst, 6, sport=l4.sport, dport=l4.dport, tcp_flags=int(l4.flags))
    if isinstance(l4, UDP):
        return Pkt(fam, src, dst, 17, sport=l4.sport, dport=l4.dport)
    if isinstance(l4, ICMP):
        return Pkt(fam, src, dst, 1, icmp_type=l4.type, icmp_code=l4.code)
    if isinstance(l4, _ICMPv6):
        return Pkt(fam, src, dst, 58, icmp_type=l4.type, icmp_code=l4.code)
    return Pkt(fam, src, dst, ip.proto if fam == 4 else ip.nh)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_case_through_model(case):
    c = compile_direction(case.policy, case.sets)
    pkt = parse(case.packet)
    got = simulate(c, case.sets, pkt)
    assert got == reference_match(case.policy, case.sets, pkt)
    terminal = c.rules[got.terminal].name if got.terminal is not None else None
    assert terminal == case.rule
    assert tuple(c.count_rules[i].name for i in got.counted) == case.counted
    action = c.rules[got.terminal].action if got.terminal is not None else c.default_action
    assert {1: "pass", 2: "drop"}[action] == case.verdict
