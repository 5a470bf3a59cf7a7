"""Shadowed rules: rules that can never match because an earlier terminal rule covers them.

Rule A covers rule B when every packet B could match, A matches too, field by field (prefix
containment, the same set reference, protocol, port ranges, ICMP type/code, TCP flags). Sound,
not complete: a warning is never wrong, but some covered rules (e.g. by set contents) go unseen.
Candidate indexes keep this near-linear for long lists; not a verdict engine (compile.py is).
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

from netbpf.ir import AddrMatch, RuleIR
from netbpf.policy.addr import WIDTH
from netbpf.policy.vocab import PORT_PROTOCOLS

_TERMINAL = ("allow", "drop", "reject", "rate_limit")


def _protos(rule: RuleIR) -> frozenset[int] | None:
    """Protocols the rule can match; None = every protocol (and non-first fragments)."""
    if rule.proto is not None:
        return frozenset((rule.proto,))
    if rule.sport is not None or rule.dport is not None:
        return frozenset(PORT_PROTOCOLS)   # 'proto any' with ports means tcp or udp
    return None


def _ranges_cover(outer: tuple[tuple[int, int], ...] | None,
                  inner: tuple[tuple[int, int], ...] | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    # Both are merged (no two ranges touch), so each inner range must sit inside one outer range.
    return all(any(olo <= lo and hi <= ohi for olo, ohi in outer) for lo, hi in inner)


def _addr_cover(outer: AddrMatch | None, inner: AddrMatch | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    if outer.set_name is not None or inner.set_name is not None:
        return outer.set_name == inner.set_name
    for p in inner.prefixes:
        for o in outer.prefixes:
            if o.family == p.family and o.plen <= p.plen:
                shift = WIDTH[o.family] - o.plen
                if (p.addr >> shift) == (o.addr >> shift):
                    break
        else:
            return False
    return True


def covers(a: RuleIR, b: RuleIR) -> bool:
    """True when every packet rule b matches is also matched by rule a."""
    pa = _protos(a)
    if pa is not None:
        pb = _protos(b)
        if pb is None or not pb <= pa:
            return False
    if not (_ranges_cover(a.dport, b.dport) and _ranges_cover(a.sport, b.sport)):
        return False
    if a.icmp_type is not None:
        if b.icmp_type != a.icmp_type:
            return False
        if a.icmp_code is not None and b.icmp_code != a.icmp_code:
            return False
    if a.tcp_flags is not None:
        if b.tcp_flags is None:
            return False
        mask, bits = a.tcp_flags
        if b.tcp_flags[0] & mask != mask or b.tcp_flags[1] & mask != bits:
            return False
    return _addr_cover(a.src, b.src) and _addr_cover(a.dst, b.dst)


class _AddrIndex:
    """Earlier rules by one address field: a rule covering b must hold an ancestor prefix of
    b's first prefix (or be a wildcard, or name the same set)."""

    def __init__(self) -> None:
        self.wild: list[int] = []
        self.by_key: dict[tuple, list[int]] = {}
        self.plens: dict[int, set[int]] = {4: set(), 6: set()}

    def add(self, index: int, match: AddrMatch | None) -> None:
        if match is None:
            self.wild.append(index)
        elif match.set_name is not None:
            self.by_key.setdefault(("@", match.set_name), []).append(index)
        else:
            for p in match.prefixes:
                self.plens[p.family].add(p.plen)
                self.by_key.setdefault((p.family, p.addr, p.plen), []).append(index)

    def candidates(self, match: AddrMatch | None) -> list[list[int]]:
        if match is None:
            return [self.wild]
        if match.set_name is not None:
            return [self.wild, self.by_key.get(("@", match.set_name), [])]
        first = match.prefixes[0]
        width = WIDTH[first.family]
        out = [self.wild]
        for plen in self.plens[first.family]:
            if plen <= first.plen:
                shift = width - plen
                key = (first.family, (first.addr >> shift) << shift if plen else 0, plen)
                found = self.by_key.get(key)
                if found:
                    out.append(found)
        return out


class _PortIndex:
    """Earlier rules by one port field. A rule covering b contains b's first port: single-port
    rules are found by that port, range rules through 256-port blocks they overlap."""

    BLOCK_BITS = 8

    def __init__(self) -> None:
        self.wild: list[int] = []
        self.by_port: dict[int, list[int]] = {}
        self.by_block: dict[int, list[int]] = {}

    def add(self, index: int, ranges: tuple[tuple[int, int], ...] | None) -> None:
        if ranges is None:
            self.wild.append(index)
        elif len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            self.by_port.setdefault(ranges[0][0], []).append(index)
        else:
            blocks = {b for lo, hi in ranges
                      for b in range(lo >> self.BLOCK_BITS, (hi >> self.BLOCK_BITS) + 1)}
            for b in sorted(blocks):
                self.by_block.setdefault(b, []).append(index)

    def candidates(self, ranges: tuple[tuple[int, int], ...] | None) -> list[list[int]]:
        if ranges is None:
            return [self.wild]
        first = ranges[0][0]
        out = [self.wild, self.by_block.get(first >> self.BLOCK_BITS, [])]
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            out.append(self.by_port.get(first, []))
        return out


class _IcmpIndex:
    def __init__(self) -> None:
        self.wild: list[int] = []
        self.by_type: dict[int, list[int]] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        if rule.icmp_type is None:
            self.wild.append(index)
        else:
            self.by_type.setdefault(rule.icmp_type, []).append(index)

    def candidates(self, rule: RuleIR) -> list[list[int]]:
        if rule.icmp_type is None:
            return [self.wild]
        return [self.wild, self.by_type.get(rule.icmp_type, [])]


class _FlagsIndex:
    """A rule covering b tests a subset of b's flags with the same values: enumerate subsets."""

    def __init__(self) -> None:
        self.wild: list[int] = []
        self.by_flags: dict[tuple[int, int], list[int]] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        if rule.tcp_flags is None:
            self.wild.append(index)
        else:
            self.by_flags.setdefault(rule.tcp_flags, []).append(index)

    def candidates(self, rule: RuleIR) -> list[list[int]]:
        if rule.tcp_flags is None:
            return [self.wild]
        mask, bits = rule.tcp_flags
        out = [self.wild]
        sub = mask
        while True:  # every subset of mask, mask itself down to 0
            found = self.by_flags.get((sub, bits & sub))
            if found:
                out.append(found)
            if sub == 0:
                break
            sub = (sub - 1) & mask
        return out


class _ProtoIndex:
    def __init__(self) -> None:
        self.by_protos: dict[frozenset[int] | None, list[int]] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        self.by_protos.setdefault(_protos(rule), []).append(index)

    def candidates(self, rule: RuleIR) -> list[list[int]]:
        mine = _protos(rule)
        return [found for protos, found in self.by_protos.items()
                if protos is None or (mine is not None and mine <= protos)]


def find_shadowed(rules: Sequence[RuleIR]) -> list[tuple[int, int]]:
    """(shadowed index, index of the first earlier terminal rule covering it), in order.

    Count rules never shadow (packets go on after them) but can be shadowed.
    """
    src, dst = _AddrIndex(), _AddrIndex()
    sport, dport = _PortIndex(), _PortIndex()
    proto = _ProtoIndex()
    icmp, flags = _IcmpIndex(), _FlagsIndex()
    found: list[tuple[int, int]] = []
    for j, rule in enumerate(rules):
        options = (src.candidates(rule.src), dst.candidates(rule.dst),
                   dport.candidates(rule.dport), sport.candidates(rule.sport),
                   proto.candidates(rule), icmp.candidates(rule), flags.candidates(rule))
        # Any covering rule appears in every field's candidates: walk the smallest field's,
        # lowest index first (each list is in rule order), so the first cover found is the
        # earliest rule and the walk stops there.
        smallest = min(options, key=lambda lists: sum(map(len, lists)))
        for i in heapq.merge(*smallest):
            if covers(rules[i], rule):
                found.append((j, i))
                break
        if rule.action in _TERMINAL:
            src.add(j, rule.src)
            dst.add(j, rule.dst)
            sport.add(j, rule.sport)
            dport.add(j, rule.dport)
            proto.add(j, rule)
            icmp.add(j, rule)
            flags.add(j, rule)
    return found
