"""The words of the policy language: protocol names, ICMP/ICMPv6 type names, TCP flag names.

Plain tables and lookups shared by the models, the docs and the tests. No validation logic.
"""
from __future__ import annotations

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP = 1
PROTO_ICMPV6 = 58

# 'any' is spelled by the user but stored as None (no protocol match).
PROTOCOLS: dict[str, int] = {
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "icmp": PROTO_ICMP,
    "icmpv6": PROTO_ICMPV6,
    "sctp": 132,
    "gre": 47,
    "esp": 50,
    "ah": 51,
}
PROTO_NAMES: dict[int, str] = {number: name for name, number in PROTOCOLS.items()}

# Protocols whose header carries ports the data plane parses.
PORT_PROTOCOLS = (PROTO_TCP, PROTO_UDP)

# Names follow nftables where it has one; the same name maps to different numbers per protocol.
ICMP_TYPES: dict[str, int] = {
    "echo-reply": 0,
    "dest-unreachable": 3,
    "source-quench": 4,
    "redirect": 5,
    "echo-request": 8,
    "router-advertisement": 9,
    "router-solicitation": 10,
    "time-exceeded": 11,
    "parameter-problem": 12,
    "timestamp-request": 13,
    "timestamp-reply": 14,
}
ICMPV6_TYPES: dict[str, int] = {
    "dest-unreachable": 1,
    "packet-too-big": 2,
    "time-exceeded": 3,
    "parameter-problem": 4,
    "echo-request": 128,
    "echo-reply": 129,
    "mld-query": 130,
    "mld-report": 131,
    "mld-done": 132,
    "router-solicitation": 133,
    "router-advertisement": 134,
    "neighbor-solicitation": 135,
    "neighbor-advertisement": 136,
    "redirect": 137,
    "mldv2-report": 143,
}
ICMP_ALIASES: dict[str, str] = {"destination-unreachable": "dest-unreachable"}

TCP_FLAGS: dict[str, int] = {
    "fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08,
    "ack": 0x10, "urg": 0x20, "ece": 0x40, "cwr": 0x80,
}


def proto_name(proto: int | None) -> str:
    if proto is None:
        return "any"
    return PROTO_NAMES.get(proto, str(proto))


def icmp_type_number(proto: int, name: str) -> int | None:
    """ICMP type number of name for proto 1 (ICMP) or 58 (ICMPv6); None when unknown there."""
    name = ICMP_ALIASES.get(name, name)
    table = ICMP_TYPES if proto == PROTO_ICMP else ICMPV6_TYPES
    return table.get(name)


def icmp_type_names(proto: int) -> list[str]:
    return list(ICMP_TYPES if proto == PROTO_ICMP else ICMPV6_TYPES)


# Linux conntrack (nf_conntrack_proto_tcp.c, tcp_valid_flags) calls a TCP packet INVALID, whatever
# its connection, unless its FIN SYN RST ACK URG bits (PSH ECE CWR ignored) are one of these.
CT_VALID_TCP_FLAGS = frozenset({0x02, 0x22, 0x12, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30})
CT_FLAG_BITS = (0x01, 0x02, 0x04, 0x10, 0x20)


def ct_invalid_flag_matches() -> list[tuple[int, int]]:
    """The invalid combinations as few (mask, value) TCP-flag matches: a greedy cube cover."""
    combos = [sum(b for i, b in enumerate(CT_FLAG_BITS) if n >> i & 1) for n in range(32)]
    invalid = {m for m in combos if m not in CT_VALID_TCP_FLAGS}
    cubes = []
    for mask in combos:
        for value in combos:
            members = {m for m in combos if m & mask == value}
            if mask and not value & ~mask and members <= invalid:
                cubes.append((mask, value, members))
    left, out = set(invalid), []
    while left:
        mask, value, members = max(cubes, key=lambda c: (len(c[2] & left), -bin(c[0]).count("1")))
        left -= members
        out.append((mask, value))
    return out
