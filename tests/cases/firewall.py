"""One table of firewall behaviours: (policy, packet bytes, expected verdict, expected rule).

Run by tests/bpf/test_firewall.py through BPF_PROG_TEST_RUN on the real program and by
tests/unit/test_firewall_cases.py through the Python model (compile.simulate), so the kernel,
the compiler and the reference matcher are held to the same answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from unit.fw_builders import direction, ip_set, rule

from netbpf.policy.ir import DirectionIR, SetIR

C4, S4 = "10.0.0.2", "10.0.0.1"
C6, S6 = "fd00::2", "fd00::1"
MACS = dict(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")


def eth(payload, *tags) -> bytes:
    frame = Ether(**MACS)
    for t in tags:
        frame = frame / t
    return bytes(frame / payload)


def v4(l4=None, src=C4, dst=S4, **kw):
    p = IP(src=src, dst=dst, **kw)
    return p / l4 if l4 is not None else p


def v6(l4=None, src=C6, dst=S6, **kw):
    p = IPv6(src=src, dst=dst, **kw)
    return p / l4 if l4 is not None else p


@dataclass
class Case:
    id: str
    policy: DirectionIR
    packet: bytes
    verdict: str                      # pass | drop
    rule: str | None                  # terminal rule expected to match; None = default/none
    sets: dict[str, SetIR] = field(default_factory=dict)
    counted: tuple[str, ...] = ()     # count rules expected to count this packet
    model: bool = True                # False: parse-level behaviour the Python model lacks


def _case(id, policy, packet, verdict, rule=None, **kw) -> Case:
    return Case(id, policy, packet, verdict, rule, **kw)


DROP_UDP53 = direction(rule("no-dns", "drop", proto=17, dport=53))
DROP_SRC_NET = direction(rule("bad-net", "drop", src="10.0.0.0/24"))

CASES: list[Case] = [
    # -- every match field, IPv4 and IPv6 --
    _case("src4-match", DROP_SRC_NET, eth(v4(UDP(dport=1))), "drop", "bad-net"),
    _case("src4-miss", DROP_SRC_NET, eth(v4(UDP(dport=1), src="10.0.1.2")), "pass"),
    _case("dst4-match", direction(rule("to-srv", "drop", dst="10.0.0.1/32")),
          eth(v4(UDP())), "drop", "to-srv"),
    _case("dst4-miss", direction(rule("to-srv", "drop", dst="10.0.0.9/32")),
          eth(v4(UDP())), "pass"),
    _case("src6-match", direction(rule("bad6", "drop", src="fd00::/64")),
          eth(v6(UDP())), "drop", "bad6"),
    _case("src6-miss", direction(rule("bad6", "drop", src="fd01::/64")),
          eth(v6(UDP())), "pass"),
    _case("dst6-match", direction(rule("to6", "drop", dst="fd00::1/128")),
          eth(v6(TCP(dport=22))), "drop", "to6"),
    _case("v4-rule-ignores-v6", direction(rule("v4only", "drop", src="0.0.0.0/0")),
          eth(v6(UDP())), "pass"),
    _case("v6-rule-ignores-v4", direction(rule("v6only", "drop", src="::/0")),
          eth(v4(UDP())), "pass"),
    _case("proto-udp", direction(rule("udp", "drop", proto=17)), eth(v4(UDP())), "drop", "udp"),
    _case("proto-udp-not-tcp", direction(rule("udp", "drop", proto=17)),
          eth(v4(TCP())), "pass"),
    _case("proto-number-47", direction(rule("gre", "drop", proto=47)),
          eth(v4(Raw(b"x" * 8), proto=47)), "drop", "gre"),
    _case("dport-exact", DROP_UDP53, eth(v4(UDP(dport=53))), "drop", "no-dns"),
    _case("dport-other", DROP_UDP53, eth(v4(UDP(dport=54))), "pass"),
    _case("dport-udp-only-not-tcp", DROP_UDP53, eth(v4(TCP(dport=53))), "pass"),
    _case("dport-v6", DROP_UDP53, eth(v6(UDP(dport=53))), "drop", "no-dns"),
    _case("sport-exact", direction(rule("from-ntp", "drop", proto=17, sport=123)),
          eth(v4(UDP(sport=123, dport=9))), "drop", "from-ntp"),
    _case("dport-range-in", direction(rule("hi", "drop", proto=6, dport=(8000, 8999))),
          eth(v4(TCP(dport=8999))), "drop", "hi"),
    _case("dport-range-out", direction(rule("hi", "drop", proto=6, dport=(8000, 8999))),
          eth(v4(TCP(dport=9000))), "pass"),
    _case("dport-list", direction(rule("web", "drop", proto=6, dport=[80, 443])),
          eth(v4(TCP(dport=443))), "drop", "web"),
    _case("dport-any-proto-tcp-or-udp", direction(rule("p5000", "drop", dport=5000)),
          eth(v6(TCP(dport=5000))), "drop", "p5000"),
    _case("ports-rule-ignores-icmp", direction(rule("p0", "drop", dport=0)),
          eth(v4(ICMP())), "pass"),
    _case("icmp-echo-request", direction(rule("ping", "drop", proto=1, icmp_type=8)),
          eth(v4(ICMP(type=8))), "drop", "ping"),
    _case("icmp-echo-reply-passes", direction(rule("ping", "drop", proto=1, icmp_type=8)),
          eth(v4(ICMP(type=0))), "pass"),
    _case("icmp-type-code", direction(rule("unreach-port", "drop", proto=1, icmp_type=3,
                                           icmp_code=3)),
          eth(v4(ICMP(type=3, code=3))), "drop", "unreach-port"),
    _case("icmp-type-code-other", direction(rule("unreach-port", "drop", proto=1, icmp_type=3,
                                                 icmp_code=3)),
          eth(v4(ICMP(type=3, code=1))), "pass"),
    _case("icmpv6-echo-request", direction(rule("ping6", "drop", proto=58, icmp_type=128)),
          eth(v6(ICMPv6EchoRequest())), "drop", "ping6"),
    _case("icmpv6-echo-reply-passes", direction(rule("ping6", "drop", proto=58, icmp_type=128)),
          eth(v6(ICMPv6EchoReply())), "pass"),
    _case("tcp-flags-syn-only", direction(rule("syn", "drop", proto=6, tcp_flags=(0x12, 0x02))),
          eth(v4(TCP(flags="S"))), "drop", "syn"),
    _case("tcp-flags-synack-passes", direction(rule("syn", "drop", proto=6,
                                                    tcp_flags=(0x12, 0x02))),
          eth(v4(TCP(flags="SA"))), "pass"),
    # -- rule order, default, count --
    _case("first-match-wins", direction(rule("ok-net", "allow", src="10.0.0.0/8"),
                                        rule("bad-host", "drop", src="10.0.0.2/32"),
                                        default="drop"),
          eth(v4(UDP())), "pass", "ok-net"),
    _case("first-match-later-rule", direction(rule("bad-host", "drop", src="10.0.0.2/32"),
                                              rule("ok-net", "allow", src="10.0.0.0/8")),
          eth(v4(UDP())), "drop", "bad-host"),
    _case("default-drop", direction(rule("web", "allow", proto=6, dport=80), default="drop"),
          eth(v4(UDP(dport=80))), "drop"),
    _case("default-allow", direction(rule("web", "drop", proto=6, dport=80)),
          eth(v4(UDP(dport=80))), "pass"),
    _case("count-then-drop", direction(rule("cnt-udp", "count", proto=17),
                                       rule("no-dns", "drop", proto=17, dport=53)),
          eth(v4(UDP(dport=53))), "drop", "no-dns", counted=("cnt-udp",)),
    _case("count-after-terminal-not-counted", direction(rule("no-dns", "drop", proto=17, dport=53),
                                                        rule("cnt-udp", "count", proto=17)),
          eth(v4(UDP(dport=53))), "drop", "no-dns"),
    _case("count-only-default", direction(rule("cnt", "count", proto=17), default="drop"),
          eth(v4(UDP())), "drop", counted=("cnt",)),
    # -- sets --
    _case("set-member", direction(rule("block", "drop", src="@bl")),
          eth(v4(UDP(), src="192.0.2.7")), "drop", "block",
          sets={"bl": ip_set("bl", "192.0.2.0/24", "2001:db8:bad::/48")}),
    _case("set-member-v6", direction(rule("block", "drop", src="@bl")),
          eth(v6(UDP(), src="2001:db8:bad::9")), "drop", "block",
          sets={"bl": ip_set("bl", "192.0.2.0/24", "2001:db8:bad::/48")}),
    _case("set-nonmember", direction(rule("block", "drop", src="@bl")),
          eth(v4(UDP(), src="192.0.3.7")), "pass",
          sets={"bl": ip_set("bl", "192.0.2.0/24", "2001:db8:bad::/48")}),
    _case("set-dst-member", direction(rule("to-bl", "drop", dst="@bl", proto=6)),
          eth(v4(TCP(), dst="192.0.2.1")), "drop", "to-bl",
          sets={"bl": ip_set("bl", "192.0.2.0/24")}),
    # -- encapsulation and headers --
    _case("vlan-8021q", DROP_UDP53, eth(v4(UDP(dport=53)), Dot1Q(vlan=10)), "drop", "no-dns"),
    _case("vlan-qinq", DROP_UDP53, eth(v4(UDP(dport=53)), Dot1AD(vlan=100), Dot1Q(vlan=10)),
          "drop", "no-dns"),
    _case("vlan-v6", DROP_UDP53, eth(v6(UDP(dport=53)), Dot1Q(vlan=7)), "drop", "no-dns"),
    _case("ipv4-options", DROP_UDP53,
          eth(v4(UDP(dport=53), options=b"\x01\x01\x01\x00")), "drop", "no-dns"),
    _case("ipv6-hop-by-hop", DROP_UDP53, eth(v6(IPv6ExtHdrHopByHop() / UDP(dport=53))),
          "drop", "no-dns"),
    _case("ipv6-routing-destopts", DROP_UDP53,
          eth(v6(IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / UDP(dport=53))), "drop", "no-dns"),
    _case("ipv6-first-fragment-has-ports", DROP_UDP53,
          eth(v6(IPv6ExtHdrFragment(offset=0, m=1) / UDP(dport=53))), "drop", "no-dns"),
    # -- fragments: non-first fragments carry no L4 header --
    _case("ipv4-later-fragment-skips-port-rule", DROP_UDP53,
          eth(v4(Raw(b"y" * 16), proto=17, frag=100)), "pass"),
    _case("ipv4-later-fragment-matches-proto-rule", direction(rule("udp", "drop", proto=17)),
          eth(v4(Raw(b"y" * 16), proto=17, frag=100)), "drop", "udp"),
    _case("ipv6-later-fragment-skips-port-rule", DROP_UDP53,
          eth(v6(IPv6ExtHdrFragment(offset=10, nh=17) / Raw(b"y" * 16))), "pass"),
    _case("ipv6-later-fragment-matches-proto-rule", direction(rule("udp", "drop", proto=17)),
          eth(v6(IPv6ExtHdrFragment(offset=10, nh=17) / Raw(b"y" * 16))), "drop", "udp"),
    # -- never classified --
    _case("arp-passes-default-drop", direction(default="drop"),
          bytes(Ether(**MACS, type=0x0806) / ARP()), "pass", model=False),
    # -- malformed: dropped, whatever the policy --
    _case("malformed-truncated-ipv4", direction(), eth(v4(UDP()))[:14 + 12], "drop",
          model=False),
    _case("malformed-ipv4-ihl-below-5", direction(),
          eth(v4(UDP()))[:14] + bytes([0x44]) + eth(v4(UDP()))[15:], "drop", model=False),
    _case("malformed-ipv4-bad-version", direction(),
          eth(v4(UDP()))[:14] + bytes([0x65]) + eth(v4(UDP()))[15:], "drop", model=False),
    _case("malformed-truncated-tcp", direction(), eth(v4(TCP()))[:14 + 20 + 10], "drop",
          model=False),
    _case("malformed-truncated-udp", direction(), eth(v4(UDP()))[:14 + 20 + 4], "drop",
          model=False),
    _case("malformed-truncated-ipv6", direction(), eth(v6(UDP()))[:14 + 30], "drop",
          model=False),
    _case("malformed-truncated-vlan", direction(), eth(v4(UDP()), Dot1Q())[:16], "drop",
          model=False),
    _case("malformed-too-many-ipv6-ext-headers", direction(),
          eth(v6(IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                 IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                 IPv6ExtHdrDestOpt() / UDP())), "drop", model=False),
]
