"""Builders for firewall tests: rules, sets and parsed packets (netbpf.fw.compile.Pkt) from strings.

Only consistent packets: ports only on TCP/UDP first fragments, ICMP fields only on ICMP in IPv4
or ICMPv6 in IPv6, flags only on TCP. Not a packet-bytes builder (the bpf tier has Scapy for that).
"""
from __future__ import annotations

import ipaddress

from netbpf import abi
from netbpf.fw.compile import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Pkt
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR, SetIR

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def addr(text: str) -> tuple[int, int]:
    """(family, integer) of an address."""
    a = ipaddress.ip_address(text)
    return a.version, int(a)


def prefix(text: str) -> Prefix:
    n = ipaddress.ip_network(text, strict=False)
    return Prefix(n.version, int(n.network_address), n.prefixlen)


def nets(*cidrs: str) -> AddrMatch:
    return AddrMatch(prefixes=tuple(prefix(c) for c in cidrs))


def in_set(name: str) -> AddrMatch:
    return AddrMatch(set_name=name)


def ip_set(name: str, *cidrs: str) -> SetIR:
    ps = [prefix(c) for c in cidrs]
    return SetIR(name, v4=tuple((p.addr, p.plen) for p in ps if p.family == 4),
                 v6=tuple((p.addr, p.plen) for p in ps if p.family == 6), source="inline")


def _ports(v) -> tuple[tuple[int, int], ...] | None:
    """80 -> ((80, 80),); (1000, 2000) -> ((1000, 2000),); [22, (80, 90)] -> both."""
    if v is None:
        return None
    if isinstance(v, int):
        return ((v, v),)
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (v,)
    return tuple((x, x) if isinstance(x, int) else tuple(x) for x in v)


def rule(name: str, action: str = "allow", *, src=None, dst=None, sport=None, dport=None,
         **kw) -> RuleIR:
    """src/dst: a CIDR string, a list of them, an AddrMatch, or '@set' for a set reference."""
    def match(v):
        if v is None or isinstance(v, AddrMatch):
            return v
        if isinstance(v, str):
            return in_set(v[1:]) if v.startswith("@") else nets(v)
        return nets(*v)
    if action == "rate_limit":
        kw.setdefault("rate_pps", 100)
    return RuleIR(name, action, src=match(src), dst=match(dst), sport=_ports(sport),
                  dport=_ports(dport), **kw)


def direction(*rules: RuleIR, default: str = "allow") -> DirectionIR:
    return DirectionIR(default=default, rules=tuple(rules))


def _ip(src: str, dst: str) -> tuple[int, int, int]:
    fs, s = addr(src)
    fd, d = addr(dst)
    assert fs == fd, "src and dst of one packet share a family"
    return fs, s, d


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 80, flags: int = SYN,
        fragment: bool = False) -> Pkt:
    fam, s, d = _ip(src, dst)
    if fragment:
        return Pkt(fam, s, d, PROTO_TCP)
    return Pkt(fam, s, d, PROTO_TCP, sport=sport, dport=dport, tcp_flags=flags)


def udp(src: str, dst: str, sport: int = 40000, dport: int = 53, fragment: bool = False) -> Pkt:
    fam, s, d = _ip(src, dst)
    if fragment:
        return Pkt(fam, s, d, PROTO_UDP)
    return Pkt(fam, s, d, PROTO_UDP, sport=sport, dport=dport)


def icmp(src: str, dst: str, type_: int = 8, code: int = 0, fragment: bool = False) -> Pkt:
    """ICMP echo request by default; ICMPv6 (proto 58) when the addresses are IPv6."""
    fam, s, d = _ip(src, dst)
    proto = PROTO_ICMP if fam == 4 else PROTO_ICMPV6
    if fragment:
        return Pkt(fam, s, d, proto)
    return Pkt(fam, s, d, proto, icmp_type=type_, icmp_code=code)


def ip(src: str, dst: str, proto: int) -> Pkt:
    """Any other protocol (or a non-first fragment of any protocol): no L4 fields."""
    fam, s, d = _ip(src, dst)
    return Pkt(fam, s, d, proto)


def make_pkt(family: int, src: int, dst: int, proto: int, sport: int = 0, dport: int = 0,
             icmp_type: int = 0, icmp_code: int = 0, tcp_flags: int = 0,
             fragment: bool = False) -> Pkt:
    """A consistent Pkt from raw values: drops the fields this protocol/family does not carry."""
    if fragment:
        return Pkt(family, src, dst, proto)
    has_ports = proto in (PROTO_TCP, PROTO_UDP)
    has_icmp = (family, proto) in ((4, PROTO_ICMP), (6, PROTO_ICMPV6))
    return Pkt(family, src, dst, proto,
               sport=sport if has_ports else None, dport=dport if has_ports else None,
               icmp_type=icmp_type if has_icmp else None,
               icmp_code=icmp_code if has_icmp else None,
               tcp_flags=tcp_flags if proto == PROTO_TCP else None)


def check_table_invariants(c) -> None:
    """What every compilation keeps: dense deduplicated ids, each one referenced somewhere,
    a wildcard class exactly for the fields looked up. The classes of each address field and of
    the destination port are one contiguous range of their own (the pair summaries rank them
    by id), deduplicated inside it; every other class is shared by all fields that have its
    vector."""
    assert sorted(c.vecs) == list(range(1, c.nclasses))
    ranges = []
    for f in (abi.NB_F_SRC, abi.NB_F_DST):
        ids = {i for g, *_, i in (*c.lpm4, *c.lpm6) if g == f} | (
            {c.wild_id[f]} if c.wild_id[f] else set())
        if ids:
            assert sorted(ids) == list(range(min(ids), max(ids) + 1))
            assert c.wild_id[f] == max(ids)           # the wildcard closes the range
            ranges.append(ids)
    if c.ports.get(1) is not None:                   # destination ports: a range of their own
        ids = set(c.ports[1]) | {c.wild_id[abi.NB_F_DPORT]}
        assert sorted(ids) == list(range(min(ids), max(ids) + 1))
        ranges.append(ids)
    for ids in [*ranges, set(c.vecs) - set().union(*ranges)]:
        assert len({c.vecs[i] for i in ids}) == len(ids)
    used = {i for *_, i in c.lpm4} | {i for *_, i in c.lpm6}
    for a in [*c.ports.values(), c.proto, c.icmp, c.flags]:
        if a is not None:
            used |= set(a)
    used |= {i for i in c.wild_id if i}
    used |= {r.member_id for r in c.setrefs} | {r.nonmember_id for r in c.setrefs}
    assert used == set(c.vecs)
    for f in range(abi.NB_NFIELDS_BASE):
        assert (c.wild_id[f] != 0) == bool(c.field_mask >> f & 1)
    for count_bits, rule_bits in c.vecs.values():
        assert count_bits >> c.ncount == 0 and rule_bits >> c.nrules == 0
