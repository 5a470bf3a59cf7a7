"""Test packets: a classifier view (compile.Pkt) to Ethernet frame bytes and back, and the
probes selftest sends for a rule (inside and at the edges of each field, plus near misses).

Frames are built with struct (tens of thousands per selftest; Scapy would take seconds);
checksums are left zero since the programs never check them. Parsing uses Scapy (explain,
one packet). Pure; no kernel.
"""
from __future__ import annotations

import struct

from netbpf.fw.compile import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Pkt
from netbpf.policy.ir import RuleIR, SetIR

_MACS = bytes.fromhex("020000000002" "020000000001")


def frame(p: Pkt) -> bytes:
    """Ethernet + IPv4/IPv6 + L4 header for p (payload: 8 bytes)."""
    if p.proto in (PROTO_TCP, PROTO_UDP) and p.sport is not None:
        if p.proto == PROTO_TCP:
            l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, 1, 0, 5 << 4,
                             p.tcp_flags or 0, 65535, 0, 0)
        else:
            l4 = struct.pack("!HHHH", p.sport, p.dport, 16, 0)
    elif p.icmp_type is not None:
        l4 = struct.pack("!BBHI", p.icmp_type, p.icmp_code or 0, 0, 0)
    else:
        l4 = b""
    body = l4 + b"netbpfpr"
    if p.family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, p.proto, 0,
                         p.src.to_bytes(4, "big"), p.dst.to_bytes(4, "big"))
        return _MACS + b"\x08\x00" + ip + body
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(body), p.proto, 64,
                     p.src.to_bytes(16, "big"), p.dst.to_bytes(16, "big"))
    return _MACS + b"\x86\xdd" + ip + body


def parse_frame(data: bytes) -> Pkt:
    """The classifier's view of an Ethernet frame: addresses of the first IP header, and the
    L4 fields unless the packet is a non-first fragment."""
    import ipaddress

    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
    from scapy.layers.l2 import Ether

    pkt = Ether(data)
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    if ip is None:
        raise ValueError("not an IPv4 or IPv6 packet")
    fam = 4 if ip.version == 4 else 6
    src, dst = int(ipaddress.ip_address(ip.src)), int(ipaddress.ip_address(ip.dst))
    if fam == 4 and ip.frag:
        return Pkt(fam, src, dst, ip.proto)
    frag = pkt.getlayer(IPv6ExtHdrFragment)
    if frag is not None and frag.offset:
        return Pkt(fam, src, dst, frag.nh)
    for layer in (TCP, UDP):
        l4 = pkt.getlayer(layer)
        if l4 is not None:
            return Pkt(fam, src, dst, PROTO_TCP if layer is TCP else PROTO_UDP,
                       sport=l4.sport, dport=l4.dport,
                       tcp_flags=int(l4.flags) if layer is TCP else None)
    icmp = pkt.getlayer(ICMP)
    if fam == 4 and icmp is not None:
        return Pkt(fam, src, dst, PROTO_ICMP, icmp_type=icmp.type, icmp_code=icmp.code)
    if fam == 6:
        layer = ip
        while layer.payload and hasattr(layer, "nh") and layer.nh != PROTO_ICMPV6:
            layer = layer.payload
        if getattr(layer, "nh", None) == PROTO_ICMPV6:
            raw = bytes(layer.payload)
            if len(raw) >= 2:
                return Pkt(fam, src, dst, PROTO_ICMPV6, icmp_type=raw[0], icmp_code=raw[1])
        return Pkt(fam, src, dst, getattr(layer, "nh", ip.nh))
    return Pkt(fam, src, dst, ip.proto)


# ---- probes for a rule ----

_WIDTH = {4: 32, 6: 128}
_ANY = {4: (0xC6120001, 0xC6120002), 6: (0x20010DB8FFFF << 80 | 1, 0x20010DB8FFFF << 80 | 2)}


def _addr_points(m, sets: dict[str, SetIR], family: int) -> list[tuple[int, bool]]:
    """(address, inside) near the edges of the match's first prefixes of this family."""
    if m is None:
        return [(_ANY[family][0], True)]
    if m.set_name is not None:
        s = sets.get(m.set_name)
        entries = (s.v4 if family == 4 else s.v6)[:2] if s else ()
    else:
        entries = [(p.addr, p.plen) for p in m.prefixes if p.family == family][:8]
    w = _WIDTH[family]
    out = []
    for addr, plen in entries:
        lo = addr >> (w - plen) << (w - plen) if plen else 0
        hi = lo | ((1 << (w - plen)) - 1)
        out += [(lo, True), (hi, True)]
        if lo > 0:
            out.append((lo - 1, False))
        if hi < (1 << w) - 1:
            out.append((hi + 1, False))
    return out


def _ports(ranges) -> list[tuple[int, bool]]:
    if ranges is None:
        return [(40000, True)]
    out = []
    for lo, hi in ranges[:8]:
        out += [(lo, True), (hi, True)]
        if lo > 0:
            out.append((lo - 1, False))
        if hi < 65535:
            out.append((hi + 1, False))
    return out


def rule_probes(r: RuleIR, sets: dict[str, SetIR]) -> list[Pkt]:
    """Packets inside the rule (every field at its edges, one at a time) and just outside."""
    families = sorted({p.family for m in (r.src, r.dst) if m is not None and m.set_name is None
                       for p in m.prefixes}) or [4, 6]
    proto = r.proto if r.proto is not None else PROTO_TCP
    icmp = {4: PROTO_ICMP, 6: PROTO_ICMPV6}
    out = []
    for fam in families:
        srcs = _addr_points(r.src, sets, fam) or [(_ANY[fam][0], True)]
        dsts = _addr_points(r.dst, sets, fam) or [(_ANY[fam][1], True)]
        sports, dports = _ports(r.sport), _ports(r.dport)
        base_src = next((a for a, ok in srcs if ok), srcs[0][0])
        base_dst = next((a for a, ok in dsts if ok), dsts[0][0])
        p = proto
        if r.icmp_type is not None or r.icmp_code is not None:
            p = r.proto if r.proto is not None else icmp[fam]
        flags = r.tcp_flags[1] if r.tcp_flags else 0x10

        def make(src=base_src, dst=base_dst, sport=sports[0][0], dport=dports[0][0],
                 fl=flags, itype=r.icmp_type or 0, icode=r.icmp_code or 0, pr=p):
            if pr in (PROTO_TCP, PROTO_UDP):
                return Pkt(fam, src, dst, pr, sport=sport, dport=dport,
                           tcp_flags=fl if pr == PROTO_TCP else None)
            if pr == icmp[fam]:
                return Pkt(fam, src, dst, pr, icmp_type=itype, icmp_code=icode)
            return Pkt(fam, src, dst, pr)

        out.append(make())
        out += [make(src=a) for a, _ in srcs[1:]] + [make(dst=a) for a, _ in dsts[1:]]
        if p in (PROTO_TCP, PROTO_UDP):
            out += [make(sport=x) for x, _ in sports[1:]] + [make(dport=x) for x, _ in dports[1:]]
            if r.tcp_flags:
                out.append(make(fl=flags ^ (r.tcp_flags[0] & -r.tcp_flags[0])))
            if r.proto is not None:
                out.append(make(pr=PROTO_UDP if p == PROTO_TCP else PROTO_TCP))
        if r.icmp_type is not None:
            out.append(make(itype=(r.icmp_type + 1) & 0xff))
    return out
