"""Shadowed rules: rules that can never match because an earlier terminal rule covers them.

Rule A covers rule B when every packet B could match, A matches too, field by field (prefix
containment, the same set reference or, given the sets, set contents by prefix containment,
protocol, port ranges, ICMP type/code, TCP flags). Sound, not complete: a warning is never
wrong. Candidate indexes keep this near-linear for long lists; not a verdict engine.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from netbpf.policy.ir import AddrMatch, Prefix, RuleIR, SetIR, addr_text
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


def _entries(m: AddrMatch, sets: Mapping[str, SetIR] | None) -> list[Prefix] | None:
    """The prefixes an address match stands for; None when a set's contents are unknown."""
    if m.set_name is None:
        return list(m.prefixes)
    s = (sets or {}).get(m.set_name)
    if s is None:
        return None
    return [Prefix(4, a, p) for a, p in s.v4] + [Prefix(6, a, p) for a, p in s.v6]


class _PrefixCover:
    """Which of many prefixes contains a given one: one dict probe per shorter length."""

    def __init__(self, prefixes: list[Prefix]):
        self.by_len: dict[tuple[int, int], dict[int, Prefix]] = {}
        for o in prefixes:
            shift = WIDTH[o.family] - o.plen
            self.by_len.setdefault((o.family, o.plen), {}).setdefault(o.addr >> shift, o)
        self.lens = sorted(self.by_len)

    def container(self, p: Prefix) -> Prefix | None:
        for fam, plen in self.lens:
            if fam == p.family and plen <= p.plen:
                hit = self.by_len[(fam, plen)].get(p.addr >> (WIDTH[fam] - plen))
                if hit is not None:
                    return hit
        return None


_COVER_CACHE: dict[tuple[str, int], tuple[object, _PrefixCover]] = {}


def _addr_cover_entry(outer: AddrMatch | None, inner: AddrMatch | None,
                      sets: Mapping[str, SetIR] | None = None):
    """False when outer may miss an address inner matches; else True, or the outer set entry
    that covers inner when the proof went through set contents (for the warning)."""
    if outer is None:
        return True
    if inner is None:
        return False
    if outer.set_name is not None and outer.set_name == inner.set_name:
        return True
    if (outer.set_name is not None or inner.set_name is not None) and sets is None:
        return False
    outer_list, inner_list = _entries(outer, sets), _entries(inner, sets)
    if outer_list is None or inner_list is None or not inner_list:
        return False
    index = None
    if outer.set_name is not None:         # a big set is indexed once per policy
        key = (outer.set_name, id(sets))
        cached = _COVER_CACHE.get(key)
        if cached is not None and cached[0] is sets:
            index = cached[1]
    if index is None:
        index = _PrefixCover(outer_list)
        if outer.set_name is not None:
            if len(_COVER_CACHE) > 64:
                _COVER_CACHE.clear()
            _COVER_CACHE[(outer.set_name, id(sets))] = (sets, index)
    used = None
    for p in inner_list:
        o = index.container(p)
        if o is None:
            return False
        used = used or o
    if outer.set_name is None and inner.set_name is None:
        return True
    return used


def _addr_cover(outer: AddrMatch | None, inner: AddrMatch | None,
                sets: Mapping[str, SetIR] | None = None) -> bool:
    return _addr_cover_entry(outer, inner, sets) is not False


def covers(a: RuleIR, b: RuleIR, sets: Mapping[str, SetIR] | None = None) -> bool:
    """True when every packet rule b matches is also matched by rule a (set contents are
    looked into when sets is given)."""
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
    return _addr_cover(a.src, b.src, sets) and _addr_cover(a.dst, b.dst, sets)


def covering_entries(a: RuleIR, b: RuleIR, sets: Mapping[str, SetIR]) -> list[str]:
    """Where a's cover of b went through set contents: 'src 10.0.0.0/8 of @blocklist'."""
    out = []
    for attr in ("src", "dst"):
        outer, inner = getattr(a, attr), getattr(b, attr)
        hit = _addr_cover_entry(outer, inner, sets)
        if isinstance(hit, Prefix):
            where = f" of @{outer.set_name}" if outer.set_name else ""
            out.append(f"{attr} {addr_text(hit.family, hit.addr)}/{hit.plen}{where}")
    return out


# Rule index sets are Python ints (bit i = rule i): a union is one OR, an intersection one
# AND, whatever the number of rules.
def _put(table: dict, key, index: int) -> None:
    table[key] = table.get(key, 0) | 1 << index


class _AddrIndex:
    """Earlier rules by one address field: a rule covering b must hold an ancestor prefix of
    b's first prefix (or be a wildcard, or name the same set)."""

    def __init__(self) -> None:
        self.wild = 0
        self.by_key: dict[tuple, int] = {}
        self.plens: dict[int, set[int]] = {4: set(), 6: set()}
        self.with_set = 0                  # may cover anything, through their contents
        self.all = 0                       # prefix rules: may cover a set, through its contents

    def add(self, index: int, match: AddrMatch | None) -> None:
        bit = 1 << index
        if match is None:
            self.wild |= bit
        elif match.set_name is not None:
            _put(self.by_key, ("@", match.set_name), index)
            self.with_set |= bit
        else:
            self.all |= bit
            for p in match.prefixes:
                self.plens[p.family].add(p.plen)
                _put(self.by_key, (p.family, p.addr, p.plen), index)

    def candidates(self, match: AddrMatch | None) -> int:
        if match is None:
            return self.wild
        if match.set_name is not None:
            return self.wild | self.with_set | self.all
        first = match.prefixes[0]
        width = WIDTH[first.family]
        out = self.wild | self.with_set
        for plen in self.plens[first.family]:
            if plen <= first.plen:
                shift = width - plen
                key = (first.family, (first.addr >> shift) << shift if plen else 0, plen)
                out |= self.by_key.get(key, 0)
        return out


class _PortIndex:
    """Earlier rules by one port field. A rule covering b contains b's first port: single-port
    rules are found by that port, range rules through 256-port blocks they overlap."""

    BLOCK_BITS = 8

    def __init__(self) -> None:
        self.wild = 0
        self.by_port: dict[int, int] = {}
        self.by_block: dict[int, int] = {}

    def add(self, index: int, ranges: tuple[tuple[int, int], ...] | None) -> None:
        if ranges is None:
            self.wild |= 1 << index
        elif len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            _put(self.by_port, ranges[0][0], index)
        else:
            blocks = {b for lo, hi in ranges
                      for b in range(lo >> self.BLOCK_BITS, (hi >> self.BLOCK_BITS) + 1)}
            for b in blocks:
                _put(self.by_block, b, index)

    def candidates(self, ranges: tuple[tuple[int, int], ...] | None) -> int:
        if ranges is None:
            return self.wild
        first = ranges[0][0]
        out = self.wild | self.by_block.get(first >> self.BLOCK_BITS, 0)
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            out |= self.by_port.get(first, 0)
        return out


class _IcmpIndex:
    def __init__(self) -> None:
        self.wild = 0
        self.by_type: dict[int, int] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        if rule.icmp_type is None:
            self.wild |= 1 << index
        else:
            _put(self.by_type, rule.icmp_type, index)

    def candidates(self, rule: RuleIR) -> int:
        if rule.icmp_type is None:
            return self.wild
        return self.wild | self.by_type.get(rule.icmp_type, 0)


class _FlagsIndex:
    """A rule covering b tests a subset of b's flags with the same values: enumerate subsets."""

    def __init__(self) -> None:
        self.wild = 0
        self.by_flags: dict[tuple[int, int], int] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        if rule.tcp_flags is None:
            self.wild |= 1 << index
        else:
            _put(self.by_flags, rule.tcp_flags, index)

    def candidates(self, rule: RuleIR) -> int:
        if rule.tcp_flags is None:
            return self.wild
        mask, bits = rule.tcp_flags
        out = self.wild
        sub = mask
        while True:  # every subset of mask, mask itself down to 0
            out |= self.by_flags.get((sub, bits & sub), 0)
            if sub == 0:
                break
            sub = (sub - 1) & mask
        return out


class _ProtoIndex:
    def __init__(self) -> None:
        self.by_protos: dict[frozenset[int] | None, int] = {}

    def add(self, index: int, rule: RuleIR) -> None:
        _put(self.by_protos, _protos(rule), index)

    def candidates(self, rule: RuleIR) -> int:
        mine = _protos(rule)
        out = 0
        for protos, found in self.by_protos.items():
            if protos is None or (mine is not None and mine <= protos):
                out |= found
        return out


def find_shadowed(rules: Sequence[RuleIR],
                  sets: Mapping[str, SetIR] | None = None) -> list[tuple[int, int]]:
    """(shadowed index, index of the first earlier terminal rule covering it), in order.

    Count rules never shadow (packets go on after them) but can be shadowed.
    """
    src, dst = _AddrIndex(), _AddrIndex()
    sport, dport = _PortIndex(), _PortIndex()
    proto = _ProtoIndex()
    icmp, flags = _IcmpIndex(), _FlagsIndex()
    found: list[tuple[int, int]] = []
    for j, rule in enumerate(rules):
        # A covering rule is a candidate in every field: the AND of the fields' candidate
        # sets holds it, usually with few others. covers() decides, lowest index first, so
        # the first cover found is the earliest rule and the walk stops there.
        cand = (src.candidates(rule.src) & dst.candidates(rule.dst)
                & dport.candidates(rule.dport) & sport.candidates(rule.sport)
                & proto.candidates(rule) & icmp.candidates(rule) & flags.candidates(rule))
        while cand:
            low = cand & -cand
            i = low.bit_length() - 1
            if covers(rules[i], rule, sets):
                found.append((j, i))
                break
            cand ^= low
        if rule.action in _TERMINAL:
            src.add(j, rule.src)
            dst.add(j, rule.dst)
            sport.add(j, rule.sport)
            dport.add(j, rule.dport)
            proto.add(j, rule)
            icmp.add(j, rule)
            flags.add(j, rule)
    return found
