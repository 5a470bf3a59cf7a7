"""ClassBench-like five-field rule sets and header traces (acl, fw, ipc shapes), IPv4 or IPv6.

Not ClassBench itself and not its seed files: a small generator with the same traits, tuned to
the measured shape of the public acl1/fw1/ipc1 10k sets (DESIGN.md): nested address prefixes
clustered under shared /16s and /24s, many wildcards, exact ports, well-known ranges and odd
ranges. Deterministic for a seed. Used by bench/ (cost rows) and tests (property, test_run).
A trace header is drawn inside a random rule's fields (ClassBench's trace generator does the
same), so it matches that rule or an earlier one; a share of headers is random (mostly misses).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from netbpf.fw.compile import Pkt
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR

V6_BASE = 0x20010DB8 << 96          # IPv6 sets: each IPv4 prefix mapped under 2001:db8::/32


@dataclass(frozen=True)
class Kind:
    """Per field: distinct prefixes in the pool, share of wildcards, prefix-length mix."""
    src_pool: int
    src_wild: float
    src_lens: tuple[tuple[int, int], ...]     # (plen, weight)
    dst_pool: int
    dst_wild: float
    dst_lens: tuple[tuple[int, int], ...]
    dports: int                               # distinct destination-port constraints
    sport_wild: float
    clusters: int                             # /16s the prefixes gather under


KINDS = {
    # acl: sources diverse (hosts and small nets), few destinations (servers), many ports
    "acl": Kind(4200, 0.15, ((32, 60), (28, 8), (24, 20), (20, 5), (16, 5), (8, 2)),
                120, 0.05, ((32, 70), (30, 10), (24, 20)), 100, 0.97, 40),
    # fw: both addresses diverse and nested, many wildcards, few ports
    "fw": Kind(3400, 0.30, ((32, 45), (24, 20), (20, 10), (16, 15), (12, 5), (8, 5)),
               6600, 0.20, ((32, 50), (28, 10), (24, 25), (16, 10), (8, 5)), 40, 0.85, 60),
    # ipc: medium diversity on both sides
    "ipc": Kind(1300, 0.20, ((32, 40), (24, 30), (16, 20), (8, 10)),
                900, 0.20, ((32, 40), (24, 30), (16, 20), (8, 10)), 50, 0.90, 30),
}

WELL_KNOWN = [20, 21, 22, 23, 25, 53, 69, 80, 110, 123, 137, 138, 139, 143, 161, 162, 179,
              389, 443, 445, 514, 636, 993, 995, 1433, 1521, 1723, 3306, 3389, 5060, 5432,
              8080, 8443]
RANGES = [(0, 1023), (1024, 65535), (6000, 6063), (49152, 65535), (1024, 5000)]


def _weighted(rng: random.Random, choices) -> int:
    return rng.choices([c for c, _ in choices], [w for _, w in choices])[0]


def _pool(rng: random.Random, n: int, lens, clusters: list[int]) -> list[tuple[int, int]]:
    """n distinct IPv4 prefixes, nested: mostly inside a few /16 clusters and /24s in them."""
    subnets = [c | rng.randrange(256) << 8 for c in clusters for _ in range(8)]
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        plen = _weighted(rng, lens)
        if plen >= 24:
            addr = rng.choice(subnets) | rng.randrange(256)
        elif plen >= 16:
            addr = rng.choice(clusters) | rng.randrange(1 << 16)
        else:
            addr = rng.choice(clusters) | rng.randrange(1 << 24)
        out.add((addr >> (32 - plen) << (32 - plen), plen))
    return sorted(out)


def _port_constraints(rng: random.Random, n: int):
    pool: list[tuple[tuple[int, int], ...]] = [((p, p),) for p in WELL_KNOWN]
    pool += [(r,) for r in RANGES]
    while len(pool) < n:
        lo = rng.randrange(1024, 65000)
        pool.append(((lo, lo),) if rng.random() < 0.6 else ((lo, lo + rng.randrange(1, 500)),))
    return pool[:n]


def _addr(p: tuple[int, int], family: int) -> AddrMatch:
    a, plen = p
    if family == 6:
        return AddrMatch((Prefix(6, V6_BASE | a << 64, plen + 32),))
    return AddrMatch((Prefix(4, a, plen),))


def ruleset(kind: str, n: int, family: int = 4, seed: int = 1, count_rules: int = 0,
            default: str = "allow") -> DirectionIR:
    """n terminal rules of a ClassBench-like kind (acl | fw | ipc), plus count_rules count
    rules spread through the list. Pools scale with n (a 10k set has the measured sizes)."""
    k = KINDS[kind]
    rng = random.Random(f"{kind}-{n}-{family}-{seed}")
    scale = min(1.0, n / 10_000)
    clusters = [rng.randrange(1, 224) << 24 | rng.randrange(256) << 16 for _ in range(k.clusters)]
    srcs = _pool(rng, max(4, int(k.src_pool * scale)), k.src_lens, clusters)
    dsts = _pool(rng, max(4, int(k.dst_pool * scale)), k.dst_lens, clusters)
    dports = _port_constraints(rng, max(8, k.dports))
    rules: list[RuleIR] = []
    every = max(1, n // (count_rules + 1)) if count_rules else 0
    for i in range(n):
        if every and i % every == every - 1 and sum(r.action == "count" for r in rules) < count_rules:
            rules.append(RuleIR(f"c{i}", "count", proto=rng.choice([6, 17, None]),
                                src=_addr(rng.choice(srcs), family)))
        src = None if rng.random() < k.src_wild else _addr(rng.choice(srcs), family)
        dst = None if rng.random() < k.dst_wild else _addr(rng.choice(dsts), family)
        if src is None and dst is None:       # every rule names an address: misses exist
            src = _addr(rng.choice(srcs), family)
        proto = rng.choices([6, 17, None, 1 if family == 4 else 58], [70, 18, 10, 2])[0]
        sport = dport = None
        if proto in (6, 17):
            dport = None if rng.random() < 0.15 else rng.choice(dports)
            if rng.random() > k.sport_wild:
                sport = rng.choice([((1024, 65535),), ((0, 1023),), ((53, 53),)])
        action = "drop" if rng.random() < 0.5 else "allow"
        rules.append(RuleIR(f"r{i}", action, src=src, dst=dst, proto=proto, sport=sport,
                            dport=dport))
    # as in real sets, broad rules (two or more open fields among addresses and dport) come
    # after the specific ones; otherwise a few catch-alls at the top would take every packet
    def broad(r: RuleIR) -> bool:
        return r.action != "count" and (r.src is None) + (r.dst is None) + (r.dport is None) >= 2
    rules = [r for r in rules if not broad(r)] + [r for r in rules if broad(r)]
    return DirectionIR(default=default, rules=tuple(rules))


def miss(family: int = 4) -> Pkt:
    """A header no rule matches: both addresses outside every pool (no /0 is ever drawn)."""
    if family == 4:
        return Pkt(4, 1, 2, 17, sport=7, dport=7)
    return Pkt(6, 1, 2, 17, sport=7, dport=7)


def _point(rng: random.Random, m: AddrMatch | None, family: int) -> int:
    width = 32 if family == 4 else 128
    if m is None:
        if family == 4:
            return rng.randrange(1 << 32)
        return V6_BASE | rng.randrange(1 << 32) << 64 | rng.randrange(1 << 64)
    p = m.prefixes[0]
    return p.addr | rng.randrange(1 << (width - p.plen))


def trace(d: DirectionIR, n: int, family: int = 4, seed: int = 1,
          random_share: float = 0.1) -> list[Pkt]:
    """n headers: most drawn inside a random rule's fields, random_share drawn at random."""
    rng = random.Random(f"trace-{seed}-{family}-{len(d.rules)}")
    out = []
    for _ in range(n):
        r = None if rng.random() < random_share else rng.choice(d.rules)
        proto = r.proto if r is not None and r.proto is not None else rng.choice([6, 17, 6, 1])
        if family == 6 and proto == 1:
            proto = 58
        src = _point(rng, r.src if r else None, family)
        dst = _point(rng, r.dst if r else None, family)
        if proto in (6, 17):
            ports = []
            for ranges in ((r.sport if r else None), (r.dport if r else None)):
                if ranges is None:
                    ports.append(rng.randrange(65536))
                else:
                    lo, hi = rng.choice(ranges)
                    ports.append(rng.randint(lo, hi))
            out.append(Pkt(family, src, dst, proto, sport=ports[0], dport=ports[1],
                           tcp_flags=0x10 if proto == 6 else None))
        else:
            out.append(Pkt(family, src, dst, proto, icmp_type=8, icmp_code=0))
    return out


def frame(p: Pkt) -> bytes:
    """Ethernet frame of a header (Scapy): what the bench and the tests feed the program."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    from netbpf.policy.ir import addr_text

    ip = (IP if p.family == 4 else IPv6)(src=addr_text(p.family, p.src),
                                         dst=addr_text(p.family, p.dst))
    if p.proto == 6:
        l4 = TCP(sport=p.sport, dport=p.dport, flags="A")
    elif p.proto == 17:
        l4 = UDP(sport=p.sport, dport=p.dport)
    elif p.proto == 1:
        l4 = ICMP(type=p.icmp_type, code=p.icmp_code)
    else:
        l4 = ICMPv6EchoRequest()
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4)

