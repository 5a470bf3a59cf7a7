"""Firewall compilation: one direction's rules (netbpf.policy.ir) -> the classifier's map contents.

Pure and deterministic (same IR, same tables): no kernel, no bcc, no map keys with generations
or tags (the apply layer adds those). Also holds the two Python models tests compare: simulate()
(what the BPF program does with these tables) and reference_match() (the plain rule loop).

How the tables work (bpf/include/classify.h): each field maps a packet value to a class id, each
id names a vector (count bitmap, terminal-rule bitmap); the program ANDs one vector per field and
the lowest set rule bit wins. Internally a vector is ONE Python int: count bits in bits 0-63,
terminal rule t at bit 64 + t, so every OR/XOR/AND below is a single big-int operation.

Over 400 lines because the compiler and the reference model it is property-tested against
(simulate) must change together.
"""
from __future__ import annotations

import functools
import itertools
import hashlib
import json
import math
from array import array
from dataclasses import dataclass, field
from operator import itemgetter

from netbpf import abi

from netbpf.fw import dirtable, pairs
from netbpf.fw.pairs import PairTable
from netbpf.fw.dirtable import DirTables, root_index
from netbpf.errors import InputError
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR, SetIR

ACTIONS = {"allow": abi.NB_ACT_ALLOW, "drop": abi.NB_ACT_DROP, "rate_limit": abi.NB_ACT_RATE,
           "reject": abi.NB_ACT_REJECT}
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}
DEFAULTS = {"allow": abi.NB_ACT_ALLOW, "drop": abi.NB_ACT_DROP}
RATE_PER = {"src": abi.NB_RL_PER_SRC, "rule": abi.NB_RL_PER_RULE}
ADDR_BITS = {4: 32, 6: 128}

PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6 = 6, 17, 1, 58

PAIR_DENSITY = 3.0        # mean non-zero rule words per class for a pair table (pairs.density)
_COUNT_MASK = (1 << 64) - 1
_RULE_SHIFT = 64
_ARRAY_FIELDS = {abi.NB_F_PROTO: 256, abi.NB_F_SPORT: 65536, abi.NB_F_DPORT: 65536,
                 abi.NB_F_ICMP: 65536, abi.NB_F_FLAGS: 256}


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class SetRef:
    set_name: str
    field: int              # NB_F_SRC or NB_F_DST
    member_id: int
    nonmember_id: int
    hashed: int = 0         # NB_SETREF_HASH4 | NB_SETREF_HASH6: families kept in a hash map


def set_hash_flags(s: SetIR) -> int:
    """Families whose entries are all full-length addresses: those go in a hash map (one
    lookup per packet); a family with any shorter prefix keeps the prefix trie."""
    flags = 0
    # min over a C-level map: a million entries in milliseconds, not a Python loop
    if s.v4 and min(map(itemgetter(1), s.v4)) == 32:
        flags |= abi.NB_SETREF_HASH4
    if s.v6 and min(map(itemgetter(1), s.v6)) == 128:
        flags |= abi.NB_SETREF_HASH6
    return flags


@dataclass(frozen=True)
class RuleEntry:
    name: str
    action: int             # NB_ACT_*
    count_mask: int         # count rules (by index) placed before this rule
    rl_rate: int
    rl_burst: int
    rl_per: int             # NB_RL_PER_*
    digest: str


@dataclass(frozen=True)
class CountEntry:
    name: str
    digest: str


@dataclass
class CompiledDirection:
    nrules: int
    ncount: int
    default_action: int
    field_mask: int                              # base fields, plus bit NB_F_SET0+k per setref
    wild_id: list[int]                           # len NB_NFIELDS_BASE; 0 for unused fields
    setrefs: list[SetRef]
    rules: list[RuleEntry]
    count_rules: list[CountEntry]
    vecs: dict[int, tuple[int, int]]             # id -> (count_bits, rule_bits); no id 0
    lpm4: list[tuple[int, bytes, int, int]]      # (field, addr, plen, id)
    lpm6: list[tuple[int, bytes, int, int]]
    ports: dict[int, array] = field(default_factory=dict)    # 0 = sport, 1 = dport
    proto: array | None = None
    icmp: array | None = None
    flags: array | None = None
    nclasses: int = 1                            # max id + 1
    dir: DirTables = field(default_factory=DirTables)   # address fields (built from lpm4/6)
    # pair summaries of large policies (pairs.py): table 0 source x destination, table 1 an
    # address field x destination port; None where the policy has no such pair
    pairs: tuple[PairTable | None, PairTable | None] = (None, None)

    @functools.cached_property
    def _lookup(self) -> _Tables:
        # built on the first simulate(); a CompiledDirection is not meant to be edited after
        return _Tables(self)


@dataclass(frozen=True)
class Shape:
    words: int              # NB_WORDS
    class_cap: int          # NB_CLASS_CAP
    chunks: int = 64        # NB_DIR_CHUNKS


@dataclass(frozen=True)
class Pkt:
    """What the parser hands the classifier; None where the packet has no such header.

    sport/dport: TCP or UDP, first fragment. icmp_type/code: ICMP in IPv4 or ICMPv6 in IPv6,
    first fragment. tcp_flags: TCP, first fragment. tests/unit/fw_builders.py builds
    consistent ones."""
    family: int
    src: int
    dst: int
    proto: int
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int | None = None


@dataclass(frozen=True)
class Decision:
    terminal: int | None    # terminal rule index, None = default action
    counted: list[int]      # count rule indices, ascending


# ---------------------------------------------------------------- compilation

def compile_direction(d: DirectionIR, sets: dict[str, SetIR] | None = None,
                      pair_cells: tuple[int, int] = (abi.NB_PAIR0_CELLS, abi.NB_PAIR1_CELLS),
                      pair_density: float = PAIR_DENSITY) -> CompiledDirection:
    """Tables for one direction. sets, when given, is only used to check references exist.
    pair_cells: cells each pair table may take; pair_density: the mean non-zero rule words
    both fields' classes need for a pair table to be worth building (pairs.py; tests pass
    other values)."""
    if d.default not in DEFAULTS:
        raise InputError(f"default action must be allow or drop (got {d.default!r})")
    terminal = [r for r in d.rules if r.action != "count"]
    counting = [r for r in d.rules if r.action == "count"]
    if len(terminal) > abi.NB_MAX_RULES:
        raise InputError(f"{len(terminal)} terminal rules: at most {abi.NB_MAX_RULES} "
                         f"(NB_MAX_RULES) per direction")
    if len(counting) > abi.NB_MAX_COUNT_RULES:
        raise InputError(f"{len(counting)} count rules: at most {abi.NB_MAX_COUNT_RULES} "
                         f"(NB_MAX_COUNT_RULES) per direction")

    rules: list[RuleEntry] = []
    count_rules: list[CountEntry] = []
    bits: list[int] = []                          # combined vector bit of each rule, file order
    for r in d.rules:
        _check_rule(r, sets)
        digest = rule_digest(r)
        if r.action == "count":
            bits.append(1 << len(count_rules))
            count_rules.append(CountEntry(r.name, digest))
        else:
            bits.append(1 << (_RULE_SHIFT + len(rules)))
            rules.append(RuleEntry(
                name=r.name, action=ACTIONS[r.action],
                count_mask=(1 << len(count_rules)) - 1,
                rl_rate=r.rate_pps if r.action == "rate_limit" else 0,
                # a zero burst would drop everything: one second's worth is the natural depth
                rl_burst=(r.rate_burst or r.rate_pps) if r.action == "rate_limit" else 0,
                rl_per=RATE_PER[r.rate_per] if r.action == "rate_limit" else 0,
                digest=digest))
    all_bits = ((1 << len(rules)) - 1) << _RULE_SHIFT | ((1 << len(count_rules)) - 1)

    b = _Builder()
    wild_id = [0] * abi.NB_NFIELDS_BASE
    field_mask = 0

    # Addresses: prefix lists go to the per-family tries; set references are pseudo-fields and
    # leave the rule unconstrained in the address field itself.
    lpm: dict[int, list[tuple[int, bytes, int, int]]] = {4: [], 6: []}
    ranges: dict[int, tuple[int, int]] = {}       # src, dst, dport -> (first id, ids)
    setref_bits: dict[tuple[str, int], int] = {}
    for f, attr in ((abi.NB_F_SRC, "src"), (abi.NB_F_DST, "dst")):
        constrained = 0
        own: dict[int, dict[tuple[int, int], int]] = {4: {}, 6: {}}
        for r, bit in zip(d.rules, bits):
            m: AddrMatch | None = getattr(r, attr)
            if m is None:
                continue
            if m.set_name is not None:
                key = (m.set_name, f)
                setref_bits[key] = setref_bits.get(key, 0) | bit
                continue
            constrained |= bit
            for p in m.prefixes:
                k = (_network(p.addr, p.plen, p.family), p.plen)
                own[p.family][k] = own[p.family].get(k, 0) | bit
        if not constrained:
            continue
        field_mask |= 1 << f
        base = all_bits & ~constrained
        # this field's classes: one contiguous id range in address order, the wildcard last
        # (pairs.py ranks them by id), not shared with the other address field
        local: dict[int, int] = {}
        first = b.next_id
        for fam in (4, 6):
            width = ADDR_BITS[fam]
            for addr, plen, vec in _prefix_classes(own[fam], width):
                lpm[fam].append((f, addr.to_bytes(width // 8, "big"), plen,
                                 b.own(local, base | vec)))
        wild_id[f] = b.own(local, base)
        ranges[f] = (first, b.next_id - first)
    for fam in (4, 6):
        if len(lpm[fam]) > abi.NB_PREFIX_CAP:
            raise InputError(f"{len(lpm[fam])} distinct IPv{fam} rule prefixes: at most "
                             f"{abi.NB_PREFIX_CAP} (NB_PREFIX_CAP) per direction")
    dirt = DirTables()
    for f in (abi.NB_F_SRC, abi.NB_F_DST):
        if field_mask & (1 << f):
            for fam in (4, 6):
                own = [(int.from_bytes(a, "big"), plen, i) for g, a, plen, i in lpm[fam] if g == f]
                dirt.add_root(root_index(f, fam), ADDR_BITS[fam], wild_id[f], own)
    dirtable.chunk_cap(len(dirt.chunks))       # refuses tables no program can hold

    # Array fields: each distinct constraint becomes disjoint inclusive intervals of indices.
    arrays: dict[int, array] = {}
    for f in (abi.NB_F_PROTO, abi.NB_F_SPORT, abi.NB_F_DPORT, abi.NB_F_ICMP, abi.NB_F_FLAGS):
        groups: dict[object, int] = {}            # canonical constraint -> rules with it
        for r, bit in zip(d.rules, bits):
            key = _array_constraint(r, f)
            if key is not None:
                groups[key] = groups.get(key, 0) | bit
        if not groups:
            continue
        constrained = 0
        for v in groups.values():
            constrained |= v
        field_mask |= 1 << f
        base = all_bits & ~constrained
        # destination ports: a contiguous range of their own in port order (pair table 1)
        local = {} if f == abi.NB_F_DPORT else b.ids
        first = b.next_id
        wild_id[f] = b.own(local, base)
        intervals = [(_intervals(f, key), v) for key, v in groups.items()]
        arrays[f] = _sweep(_ARRAY_FIELDS[f], base, intervals,
                           lambda v, local=local: b.own(local, v))
        if f == abi.NB_F_DPORT:
            ranges[f] = (first, b.next_id - first)

    if len(setref_bits) > abi.NB_MAX_SETREFS:
        raise InputError(f"{len(setref_bits)} distinct (set, src|dst) references: at most "
                         f"{abi.NB_MAX_SETREFS} (NB_MAX_SETREFS) per direction")
    setrefs = []
    # dict order = first reference in file order (src before dst): deterministic
    for k, ((name, f), referencing) in enumerate(setref_bits.items()):
        field_mask |= 1 << (abi.NB_F_SET0 + k)
        hashed = set_hash_flags(sets[name]) if sets and name in sets else 0
        setrefs.append(SetRef(name, f, b.intern(all_bits), b.intern(all_bits & ~referencing),
                              hashed))

    vecs = {i: (v & _COUNT_MASK, v >> _RULE_SHIFT) for i, v in b.vec.items()}
    tables = _pair_tables(vecs, ranges, len(rules), words_for(len(rules)), pair_cells,
                          pair_density)
    return CompiledDirection(
        nrules=len(rules), ncount=len(count_rules), default_action=DEFAULTS[d.default],
        field_mask=field_mask, wild_id=wild_id, setrefs=setrefs, rules=rules,
        count_rules=count_rules, vecs=vecs, pairs=tables,
        lpm4=sorted(lpm[4]), lpm6=sorted(lpm[6]),
        ports={w: arrays[f] for w, f in ((0, abi.NB_F_SPORT), (1, abi.NB_F_DPORT)) if f in arrays},
        proto=arrays.get(abi.NB_F_PROTO), icmp=arrays.get(abi.NB_F_ICMP),
        flags=arrays.get(abi.NB_F_FLAGS), nclasses=b.next_id, dir=dirt)


def _pair_tables(vecs: dict[int, tuple[int, int]], ranges: dict[int, tuple[int, int]],
                 nrules: int, words: int, cells: tuple[int, int], min_density: float):
    """Both pair tables, where the policy uses their fields, is large enough to scan many
    words (abi.NB_PAIR_MIN_WORDS) and both fields' classes are dense (pairs.density: else
    the fields' own summaries already keep the scan short, and numpy is not even loaded);
    table 1 takes the address field with fewer classes (the one grouped least)."""
    if words < abi.NB_PAIR_MIN_WORDS:
        return (None, None)
    rules = {i: rb for i, (_, rb) in vecs.items()}
    dense: dict[int, bool] = {}

    def is_dense(f: int) -> bool:
        if f not in dense:
            dense[f] = pairs.density(rules, *ranges[f], nrules) >= min_density
        return dense[f]

    def table(fa: int, fb: int, cap: int) -> PairTable | None:
        if fa not in ranges or fb not in ranges or cap <= 1:
            return None
        if not (is_dense(fa) and is_dense(fb)):
            return None
        (a0, na), (b0, nb) = ranges[fa], ranges[fb]
        return pairs.build(rules, (fa, fb), (a0, b0), (na, nb), nrules, words, cap)

    addr = [f for f in (abi.NB_F_SRC, abi.NB_F_DST) if f in ranges]
    fa = min(addr, key=lambda f: ranges[f][1]) if addr else abi.NB_F_SRC
    return (table(abi.NB_F_SRC, abi.NB_F_DST, cells[0]),
            table(fa, abi.NB_F_DPORT, cells[1]))


class _Builder:
    """Interns vectors: identical vectors share one id; ids are dense from 1 (0 = all-ones).
    own() interns in a caller's namespace instead (an address field's contiguous range)."""

    def __init__(self):
        self.ids: dict[int, int] = {}
        self.vec: dict[int, int] = {}             # id -> vector
        self.next_id = 1

    def own(self, local: dict[int, int], vec: int) -> int:
        i = local.get(vec)
        if i is None:
            i = local[vec] = self.next_id
            self.vec[i] = vec
            self.next_id += 1
        return i

    def intern(self, vec: int) -> int:
        return self.own(self.ids, vec)


def _network(addr: int, plen: int, family: int) -> int:
    host = ADDR_BITS[family] - plen
    return (addr >> host) << host


def _prefix_classes(own: dict[tuple[int, int], int], width: int):
    """(addr, plen, vec) per distinct prefix P: vec = OR of own bits of every prefix containing P.

    Sorted by (network, plen), prefixes come in containment-tree preorder, so the prefixes
    containing P are exactly the stack left after popping those that do not contain it."""
    stack: list[tuple[int, int, int]] = []        # (addr, plen, accumulated vec)
    for (addr, plen), vec in sorted(own.items()):
        while stack:
            qa, qp, _ = stack[-1]
            if (addr >> (width - qp)) == (qa >> (width - qp)):
                break
            stack.pop()
        acc = (stack[-1][2] if stack else 0) | vec
        stack.append((addr, plen, acc))
        yield addr, plen, acc


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent inclusive ranges (so XOR toggling below is exact)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _array_constraint(r: RuleIR, f: int):
    """Canonical, hashable form of rule r's constraint on array field f; None = unconstrained."""
    if f == abi.NB_F_PROTO:
        return r.proto
    if f == abi.NB_F_SPORT:
        return None if r.sport is None else _merge(r.sport)
    if f == abi.NB_F_DPORT:
        return None if r.dport is None else _merge(r.dport)
    if f == abi.NB_F_ICMP:
        if r.icmp_type is None and r.icmp_code is None:
            return None
        return (r.icmp_type, r.icmp_code)
    return r.tcp_flags


def _intervals(f: int, key) -> tuple[tuple[int, int], ...]:
    if f == abi.NB_F_PROTO:
        return ((key, key),)
    if f in (abi.NB_F_SPORT, abi.NB_F_DPORT):
        return key
    if f == abi.NB_F_ICMP:
        t, c = key
        if t is not None and c is not None:
            return ((t << 8 | c,) * 2,)
        if t is not None:
            return ((t << 8, t << 8 | 0xff),)
        return tuple((ty << 8 | c,) * 2 for ty in range(256))
    mask, value = key
    return _merge((v, v) for v in range(256) if v & mask == value)


def _sweep(size: int, base: int, groups: list[tuple[tuple[tuple[int, int], ...], int]],
           intern) -> array:
    """Array of class ids over 0..size-1 by a boundary sweep: O(boundaries), not O(size*rules).

    Each group's intervals are disjoint and its bits belong to no other group, so toggling the
    bits on at lo and off at hi+1 (XOR) leaves exactly the covering groups' bits set."""
    delta: dict[int, int] = {0: 0}
    for ivs, v in groups:
        for lo, hi in ivs:
            delta[lo] = delta.get(lo, 0) ^ v
            delta[hi + 1] = delta.get(hi + 1, 0) ^ v
    points = sorted(p for p in delta if p < size)
    out = array("I", bytes(4 * size))
    cur = 0
    for i, start in enumerate(points):
        end = points[i + 1] if i + 1 < len(points) else size
        cur ^= delta[start]
        out[start:end] = array("I", [intern(base | cur)]) * (end - start)
    return out


def _check_rule(r: RuleIR, sets: dict[str, SetIR] | None) -> None:
    def bad(what: str) -> InputError:
        return InputError(f"rule {r.name!r}: {what}")

    if r.action not in ACTIONS and r.action != "count":
        raise bad(f"unknown action {r.action!r}")
    if r.action == "rate_limit":
        if r.rate_pps <= 0:
            raise bad(f"rate_limit needs a rate above 0 packets/s (got {r.rate_pps})")
        if r.rate_per not in RATE_PER:
            raise bad(f"rate_limit per must be src or rule (got {r.rate_per!r})")
    for attr in ("src", "dst"):
        m: AddrMatch | None = getattr(r, attr)
        if m is None:
            continue
        if m.set_name is not None:
            if sets is not None and m.set_name not in sets:
                raise bad(f"{attr}: unknown set {m.set_name!r}")
            continue
        for p in m.prefixes:
            if p.family not in ADDR_BITS or not 0 <= p.plen <= ADDR_BITS[p.family]:
                raise bad(f"{attr}: invalid prefix {p}")
    if r.proto is not None and not 0 <= r.proto <= 255:
        raise bad(f"proto must be 0-255 (got {r.proto})")
    for attr in ("sport", "dport"):
        for lo, hi in getattr(r, attr) or ():
            if not 0 <= lo <= hi <= 65535:
                raise bad(f"{attr}: range {lo}-{hi} is not within 0-65535")
    for attr in ("icmp_type", "icmp_code"):
        v = getattr(r, attr)
        if v is not None and not 0 <= v <= 255:
            raise bad(f"{attr} must be 0-255 (got {v})")
    if r.tcp_flags is not None and not all(0 <= x <= 255 for x in r.tcp_flags):
        raise bad(f"tcp_flags mask and value must be 0-255 (got {r.tcp_flags})")


def merge_prefixes(prefixes) -> tuple[Prefix, ...]:
    """The fewest prefixes covering exactly the same addresses (per family, in order): how
    the kernel's address tables read back, and how `show` compares a rule with the file."""
    out: list[Prefix] = []
    for fam in (4, 6):
        width = ADDR_BITS[fam]
        spans = sorted((_network(p.addr, p.plen, fam), _network(p.addr, p.plen, fam)
                        + (1 << (width - p.plen)) - 1) for p in prefixes if p.family == fam)
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            while lo <= hi:
                size = (lo & -lo).bit_length() - 1 if lo else width
                while lo + (1 << size) - 1 > hi:
                    size -= 1
                out.append(Prefix(fam, lo, width - size))
                lo += 1 << size
    return tuple(out)


def _canon_addr(m: AddrMatch | None):
    if m is None:
        return None
    if m.set_name is not None:
        return {"set": m.set_name}
    return sorted({(p.family, _network(p.addr, p.plen, p.family), p.plen) for p in m.prefixes})


def rule_digest(r: RuleIR) -> str:
    """Short stable hash of what a rule is (not where it is: line and position are left out),
    so the apply layer can keep the counters of rules an edit did not change. Event sampling
    is a suffix, not part of the hash: it changes the rule, not what its counters count."""
    rate = (r.rate_pps, r.rate_burst, r.rate_per) if r.action == "rate_limit" else None
    content = [r.name, r.action, _canon_addr(r.src), _canon_addr(r.dst), r.proto,
               None if r.sport is None else _merge(r.sport),
               None if r.dport is None else _merge(r.dport),
               r.icmp_type, r.icmp_code, r.tcp_flags, rate]
    text = json.dumps(content, separators=(",", ":"))
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return f"{digest}/s{r.sample}" if r.sample else digest


def counter_key(digest: str) -> str:
    """The part of a rule digest its counters belong to: match and action (not sampling)."""
    return digest.partition("/")[0]


# ---------------------------------------------------------------- decoding

def _bits(x: int):
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _runs(values: array):
    """(lo, hi, id) of maximal runs of one class id (groupby and list run in C: 64k entries
    take milliseconds)."""
    lo = 0
    for cid, group in itertools.groupby(values):
        n = len(list(group))
        yield lo, lo + n - 1, cid
        lo += n


def decompile(c: CompiledDirection, names: list[str], count_names: list[str]) -> list[RuleIR]:
    """The rules tables c enforce, in file order: the inverse of compile_direction for every
    field (names come from the caller: the kernel keeps counter slots, not names). Set
    references keep c's set names. Works on tables read back from the kernel, so a map edit
    shows up as a rule that differs from the file."""
    combined = {i: (rb << _RULE_SHIFT) | cb for i, (cb, rb) in c.vecs.items()}
    combined[0] = -1
    valid = ((1 << c.nrules) - 1) << _RULE_SHIFT | ((1 << c.ncount) - 1)
    out: dict[int, dict] = {b: {} for b in range(c.ncount)}
    out.update({_RULE_SHIFT + t: {} for t in range(c.nrules)})

    def vec(i: int) -> int:
        return combined.get(i, 0)

    def constrained(f: int) -> int:
        """Rules constrained on field f: those missing from its wildcard class."""
        if not c.field_mask >> f & 1:
            return 0
        return ~vec(c.wild_id[f]) & valid

    for f, attr in ((abi.NB_F_SRC, "src"), (abi.NB_F_DST, "dst")):
        cons = constrained(f)
        if not cons:
            continue
        for b in _bits(cons):
            out[b][attr] = []                 # constrained, even if no value matches
        for fam, entries in ((4, c.lpm4), (6, c.lpm6)):
            width = ADDR_BITS[fam]
            stack: list[tuple[int, int, int]] = []
            for field_, addr_b, plen, cid in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
                if field_ != f:
                    continue
                addr = int.from_bytes(addr_b, "big")
                while stack and (addr >> (width - stack[-1][1])) != (stack[-1][0] >> (width - stack[-1][1])):
                    stack.pop()
                acc = vec(cid) & cons
                own = acc & ~(stack[-1][2] if stack else 0)
                stack.append((addr, plen, acc))
                for b in _bits(own):
                    out[b].setdefault(attr, []).append(Prefix(fam, addr, plen))
    for ref in c.setrefs:
        refs = vec(ref.member_id) & ~vec(ref.nonmember_id) & valid
        attr = "src" if ref.field == abi.NB_F_SRC else "dst"
        for b in _bits(refs):
            out[b][attr] = ref.set_name
    for f, attr, values in ((abi.NB_F_PROTO, "proto", c.proto),
                            (abi.NB_F_SPORT, "sport", c.ports.get(0)),
                            (abi.NB_F_DPORT, "dport", c.ports.get(1)),
                            (abi.NB_F_ICMP, "icmp", c.icmp), (abi.NB_F_FLAGS, "flags", c.flags)):
        cons = constrained(f)
        if not cons or values is None:
            continue
        for b in _bits(cons):
            out[b][attr] = []
        for lo, hi, cid in _runs(values):
            for b in _bits(vec(cid) & cons):
                out[b].setdefault(attr, []).append((lo, hi))

    rules: list[RuleIR] = []
    emitted = 0
    for t, r in enumerate(c.rules):
        for i in _bits(r.count_mask & ~emitted & ((1 << c.ncount) - 1)):
            rules.append(_rule_from(count_names[i], "count", out[i]))
        emitted |= r.count_mask
        action = ACTION_NAMES.get(r.action, f"action{r.action}")
        rules.append(_rule_from(names[t], action, out[_RULE_SHIFT + t], r))
    for i in _bits(((1 << c.ncount) - 1) & ~emitted):
        rules.append(_rule_from(count_names[i], "count", out[i]))
    return rules


def _rule_from(name: str, action: str, m: dict, r: RuleEntry | None = None) -> RuleIR:
    def addr(v):
        if v is None:
            return None
        return AddrMatch(set_name=v) if isinstance(v, str) else \
            AddrMatch(prefixes=merge_prefixes(v))

    never = any(not m[k] for k in ("proto", "icmp", "flags") if k in m)
    proto = None
    if m.get("proto"):
        values = [v for lo, hi in m["proto"] for v in range(lo, hi + 1)]
        proto = values[0] if len(values) == 1 else None
    icmp_type = icmp_code = None
    if m.get("icmp"):
        points = {v for lo, hi in m["icmp"] for v in range(lo, hi + 1)}
        types = {v >> 8 for v in points}
        codes = {v & 0xff for v in points}
        icmp_type = types.pop() if len(types) == 1 else None
        icmp_code = codes.pop() if len(codes) == 1 else None
    flags = None
    if m.get("flags"):
        points = [v for lo, hi in m["flags"] for v in range(lo, hi + 1)]
        mask = 0xff
        for v in points:
            mask &= ~(v ^ points[0])
        flags = (mask, points[0] & mask)
    if never:
        flags = (0, 1)                        # matches no packet, like the tables
    rate = {}
    if r is not None and r.action == abi.NB_ACT_RATE:
        rate = dict(rate_pps=r.rl_rate, rate_burst=r.rl_burst,
                    rate_per={v: k for k, v in RATE_PER.items()}.get(r.rl_per, "src"))
    return RuleIR(name=name, action=action, src=addr(m.get("src")), dst=addr(m.get("dst")),
                  proto=proto, sport=_merge(m["sport"]) if "sport" in m else None,
                  dport=_merge(m["dport"]) if "dport" in m else None,
                  icmp_type=icmp_type, icmp_code=icmp_code, tcp_flags=flags, **rate)


# ---------------------------------------------------------------- program shape

def words_for(nrules: int) -> int:
    """NB_WORDS of the smallest program shape that holds nrules terminal rules."""
    words = next((w for w in abi.WORD_BUCKETS if w * 64 >= max(nrules, 1)), None)
    if words is None:
        raise InputError(f"{nrules} terminal rules: at most {abi.NB_MAX_RULES} (NB_MAX_RULES)")
    return words


def choose_shape(nrules: int, nclasses: int, current: Shape | None = None,
                 nchunks: int = 0) -> Shape:
    """Smallest program shape for the tables, with class and chunk headroom so later edits fit.

    The current shape is kept while it still fits with the same word count: then an apply only
    rewrites maps and the attached program (and its id) stays."""
    words = words_for(nrules)
    if (current is not None and current.words == words and current.words * 64 >= nrules
            and current.class_cap >= nclasses and current.chunks >= nchunks):
        return current
    class_cap = 1 << math.ceil(math.log2(max(64, 2 * nclasses)))
    return Shape(words, class_cap, dirtable.chunk_cap(nchunks))


# ---------------------------------------------------------------- models for tests

class _Tables:
    """Lookup-friendly views of a CompiledDirection, built once per compilation."""

    def __init__(self, c: CompiledDirection):
        self.vec = {i: (rb << _RULE_SHIFT) | cb for i, (cb, rb) in c.vecs.items()}
        self._masks: dict[int, int] = {}

    def word_mask(self, summary: int) -> int:
        """Rule bits of the words a summary names."""
        m = self._masks.get(summary)
        if m is None:
            m = self._masks[summary] = sum(((1 << 64) - 1) << (64 * w) for w in _bits(summary))
        return m


def _longest_match(by_len: dict[int, dict[int, int]], addr: int, family: int) -> int | None:
    """Value of the longest prefix containing addr (by_len ordered longest first), else None."""
    for plen, nets in by_len.items():
        hit = nets.get(_network(addr, plen, family))
        if hit is not None:
            return hit
    return None


_SET_INDEX: dict[int, tuple[SetIR, dict[int, dict[int, dict[int, int]]]]] = {}


def _set_index(s: SetIR) -> dict[int, dict[int, dict[int, int]]]:
    """family -> plen -> {network: 1}; cached by identity (hashing a 1M-entry SetIR costs)."""
    cached = _SET_INDEX.get(id(s))
    if cached is not None and cached[0] is s:
        return cached[1]
    idx: dict[int, dict[int, dict[int, int]]] = {}
    for fam, entries in ((4, s.v4), (6, s.v6)):
        by_len: dict[int, dict[int, int]] = {}
        for addr, plen in entries:
            by_len.setdefault(plen, {})[_network(addr, plen, fam)] = 1
        idx[fam] = dict(sorted(by_len.items(), reverse=True))
    if len(_SET_INDEX) >= 16:
        _SET_INDEX.clear()
    _SET_INDEX[id(s)] = (s, idx)
    return idx


def _lookup_set(sets: dict[str, SetIR] | None, name: str) -> SetIR:
    if not sets or name not in sets:
        raise InputError(f"unknown set {name!r}")
    return sets[name]


def simulate(c: CompiledDirection, sets: dict[str, SetIR] | None, pkt: Pkt) -> Decision:
    """What the BPF program (bpf/include/classify.h) decides with tables c for packet pkt."""
    t = c._lookup
    fid = dict.fromkeys(range(abi.NB_NFIELDS_BASE), abi.NB_CLASS_ALL)   # unused: NB_CLASS_ALL
    for f in range(abi.NB_NFIELDS_BASE):
        if not c.field_mask & (1 << f):
            continue
        wild = c.wild_id[f]
        if f in (abi.NB_F_SRC, abi.NB_F_DST):
            addr = pkt.src if f == abi.NB_F_SRC else pkt.dst
            fid[f] = c.dir.lookup(root_index(f, pkt.family), addr, ADDR_BITS[pkt.family])
        elif f == abi.NB_F_PROTO:
            fid[f] = c.proto[pkt.proto]
        elif f in (abi.NB_F_SPORT, abi.NB_F_DPORT):
            port = pkt.sport if f == abi.NB_F_SPORT else pkt.dport
            fid[f] = wild if port is None else c.ports[f - abi.NB_F_SPORT][port]
        elif f == abi.NB_F_ICMP:
            fid[f] = (wild if pkt.icmp_type is None
                      else c.icmp[pkt.icmp_type << 8 | pkt.icmp_code])
        else:
            fid[f] = wild if pkt.tcp_flags is None else c.flags[pkt.tcp_flags]
    ids = [i for f, i in fid.items() if c.field_mask >> f & 1]
    for ref in c.setrefs:
        s = _set_index(_lookup_set(sets, ref.set_name))
        addr = pkt.src if ref.field == abi.NB_F_SRC else pkt.dst
        member = _longest_match(s[pkt.family], addr, pkt.family) is not None
        ids.append(ref.member_id if member else ref.nonmember_id)

    acc = -1                                      # all ones: class 0 of every unused field
    for i in ids:
        acc &= t.vec[i]
    rule_bits = (acc >> _RULE_SHIFT) & ((1 << c.nrules) - 1)
    for p in c.pairs:                             # the scan skips the words a pair rules out
        cell = p.cell(fid[p.fields[0]], fid[p.fields[1]]) if p is not None else None
        if cell is not None:
            rule_bits &= t.word_mask(p.summary(cell))
    counted = acc & _COUNT_MASK & ((1 << c.ncount) - 1)
    terminal = None
    if rule_bits:
        terminal = (rule_bits & -rule_bits).bit_length() - 1
        counted &= c.rules[terminal].count_mask
    return Decision(terminal, [i for i in range(c.ncount) if counted >> i & 1])


def _addr_matches(m: AddrMatch, sets, family: int, addr: int) -> bool:
    if m.set_name is not None:
        s = _lookup_set(sets, m.set_name)
        entries = s.v4 if family == 4 else s.v6
        return any(_contains(family, a, plen, addr) for a, plen in entries)
    return any(p.family == family and _contains(family, p.addr, p.plen, addr)
               for p in m.prefixes)


def _contains(family: int, net: int, plen: int, addr: int) -> bool:
    return _network(net, plen, family) == _network(addr, plen, family)


def rule_matches(r: RuleIR, sets: dict[str, SetIR] | None, pkt: Pkt) -> bool:
    if r.src is not None and not _addr_matches(r.src, sets, pkt.family, pkt.src):
        return False
    if r.dst is not None and not _addr_matches(r.dst, sets, pkt.family, pkt.dst):
        return False
    if r.proto is not None and pkt.proto != r.proto:
        return False
    for ranges, port in ((r.sport, pkt.sport), (r.dport, pkt.dport)):
        if ranges is not None and (port is None or not any(lo <= port <= hi for lo, hi in ranges)):
            return False
    if r.icmp_type is not None or r.icmp_code is not None:
        if pkt.icmp_type is None:
            return False
        if r.icmp_type is not None and pkt.icmp_type != r.icmp_type:
            return False
        if r.icmp_code is not None and pkt.icmp_code != r.icmp_code:
            return False
    if r.tcp_flags is not None:
        mask, value = r.tcp_flags
        if pkt.tcp_flags is None or pkt.tcp_flags & mask != value:
            return False
    return True


def reference_match(d: DirectionIR, sets: dict[str, SetIR] | None, pkt: Pkt) -> Decision:
    """First match by file order, the obvious way: the oracle simulate() is tested against."""
    counted: list[int] = []
    ci = ti = 0
    for r in d.rules:
        hit = rule_matches(r, sets, pkt)
        if r.action == "count":
            if hit:
                counted.append(ci)
            ci += 1
            continue
        if hit:
            return Decision(ti, counted)
        ti += 1
    return Decision(None, counted)


def verdict(decision: Decision, c: CompiledDirection) -> str:
    """'allow', 'drop', 'rate_limit' (the rule's action), or 'default-allow'/'default-drop'."""
    if decision.terminal is None:
        return "default-" + ("drop" if c.default_action == abi.NB_ACT_DROP else "allow")
    return ACTION_NAMES[c.rules[decision.terminal].action]
