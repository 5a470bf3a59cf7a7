"""'reject' under BPF_PROG_TEST_RUN: the XDP program answers with the refusal itself (XDP_TX).

TCP gets a RST (seq/ack as Linux's REJECT --reject-with tcp-reset sets them), anything else
ICMP / ICMPv6 port unreachable quoting the refused packet; checksums are checked by Scapy
recomputing them. RSTs, ICMP errors and fragments are dropped without an answer, and the
number of answers is bounded by the reject token bucket.
"""
from __future__ import annotations

import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from cases.firewall import C4, C6, MACS, S4, S6, eth, v4, v6
from unit.fw_builders import direction, rule

from netbpf import abi

from fwprog import FwProg


@pytest.fixture(scope="module")
def fw():
    prog = FwProg(words=4, class_cap=256)
    prog.install(direction(rule("refuse", "reject", proto=6, dport=25),
                           rule("refuse-udp", "reject", proto=17, dport=69),
                           rule("refuse-icmpv6", "reject", proto=58),
                           rule("refuse-gre", "reject", proto=47)))
    return prog


def answer(fw, frame: bytes):
    from netbpf.kernel.testrun import test_run
    res = test_run(fw.fd, frame)
    return {1: "drop", 2: "pass", 3: "tx"}.get(res.retval, res.retval), Ether(res.data_out)


def checksums_ok(pkt) -> bool:
    """Scapy recomputes every checksum when fields are deleted; equal bytes = they were right."""
    fresh = pkt.copy()
    for layer in (IP, TCP, ICMP, UDP):
        if layer in fresh:
            if hasattr(fresh[layer], "chksum"):
                del fresh[layer].chksum
    if ICMPv6DestUnreach in fresh:
        del fresh[ICMPv6DestUnreach].cksum
    if TCP in fresh and IPv6 in fresh:
        del fresh[TCP].chksum
    return bytes(Ether(bytes(fresh))) == bytes(pkt)


def test_tcp_syn_to_a_rejected_port_gets_a_rst_back(fw):
    verdict, out = answer(fw, eth(v4(TCP(sport=40000, dport=25, flags="S", seq=1000))))
    assert verdict == "tx"
    assert out.dst == MACS["src"] and out.src == MACS["dst"]
    assert out[IP].src == S4 and out[IP].dst == C4
    t = out[TCP]
    assert (t.sport, t.dport, str(t.flags), t.seq, t.ack) == (25, 40000, "RA", 0, 1001)
    assert checksums_ok(out)


def test_tcp_ack_segment_gets_a_rst_with_its_ack_as_seq(fw):
    _, out = answer(fw, eth(v4(TCP(dport=25, flags="A", seq=5, ack=777) / Raw(b"x" * 10))))
    assert (str(out[TCP].flags), out[TCP].seq) == ("R", 777)
    assert len(out) == 14 + 20 + 20 and checksums_ok(out)


def test_udp_gets_icmp_port_unreachable_quoting_the_packet(fw):
    sent = v4(UDP(sport=5000, dport=69) / Raw(b"payload-" * 20))
    verdict, out = answer(fw, eth(sent))
    assert verdict == "tx"
    assert out[IP].src == S4 and out[IP].dst == C4 and out[IP].proto == 1
    assert (out[ICMP].type, out[ICMP].code) == (3, 3)
    assert out[IPerror].src == C4 and out[UDPerror].dport == 69
    assert len(out) == 14 + 20 + 8 + abi.NB_REJECT_QUOTE
    assert bytes(out[ICMP].payload)[:28] == bytes(sent)[:28]
    assert checksums_ok(out)


def test_ipv6_tcp_gets_a_rst_and_udp_port_unreachable(fw):
    verdict, out = answer(fw, eth(v6(TCP(sport=40000, dport=25, flags="S", seq=9))))
    assert verdict == "tx" and out[IPv6].src == S6 and out[IPv6].dst == C6
    assert (str(out[TCP].flags), out[TCP].ack) == ("RA", 10) and checksums_ok(out)
    verdict, out = answer(fw, eth(v6(UDP(dport=69) / Raw(b"q" * 3))))
    assert verdict == "tx" and out[IPv6].nh == 58
    assert (out[ICMPv6DestUnreach].type, out[ICMPv6DestUnreach].code) == (1, 4)
    assert checksums_ok(out)


@pytest.mark.parametrize("frame", [
    eth(v4(TCP(dport=25, flags="R"))),                      # never answer a reset
    eth(v6(ICMPv6DestUnreach() / Raw(b"x" * 8))),           # nor an ICMP error
    eth(v4(Raw(b"x" * 16), proto=47, frag=10)),             # nor a non-first fragment
    eth(v4(UDP(dport=69), dst="224.0.0.9")),                # nor multicast
], ids=["rst", "icmp-error", "fragment", "multicast"])
def test_some_rejected_packets_are_only_dropped(fw, frame):
    assert answer(fw, frame)[0] == "drop"


def test_other_protocols_get_port_unreachable(fw):
    verdict, out = answer(fw, eth(v4(Raw(b"g" * 30), proto=47)))
    assert verdict == "tx" and (out[ICMP].type, out[ICMP].code) == (3, 3)
    assert checksums_ok(out)


def test_answers_are_bounded_by_the_reject_budget(fw):
    """At most NB_REJECT_BURST back to back, then NB_REJECT_PPS per second: the bound is
    computed from the time the sends took, so a slow machine loosens it, never breaks it."""
    before = fw.totals()["reject_sent"]
    frame = eth(v4(TCP(dport=25, flags="S")))
    start = time.monotonic()
    verdicts = [answer(fw, frame)[0] for _ in range(3 * abi.NB_REJECT_BURST)]
    elapsed = time.monotonic() - start
    sent = fw.totals()["reject_sent"] - before
    assert verdicts.count("tx") == sent
    assert verdicts.count("drop") == len(verdicts) - sent
    assert abi.NB_REJECT_BURST // 2 <= sent <= abi.NB_REJECT_BURST + abi.NB_REJECT_PPS * elapsed + 2
