"""The format-neutral ruleset every importer parses into: tables of chains of source rules.

Plain data plus the few operations flattening needs (AND two rules' matches, negate one field).
Not a parser (iptables.py, nft.py, nftjson.py) and not an emitter (flatten.py, emit.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

# Fields that hold a netbpf rule value as it will be written; 'neg' names the negated ones.
ADDR_FIELDS = ("src", "dst")
PORT_FIELDS = ("sport", "dport")
NEGATABLE = ADDR_FIELDS + PORT_FIELDS


class ImportInputError(ValueError):
    """Input that cannot be parsed at all; str() is 'FILE:LINE: message'."""


@dataclass
class Note:
    where: str      # 'rules.v4:12'
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class SrcRule:
    where: str                                  # 'FILE:LINE' of the source rule
    text: str                                   # the source rule, one line
    fields: dict[str, Any] = field(default_factory=dict)   # netbpf rule keys -> values
    neg: frozenset[str] = frozenset()           # fields (of NEGATABLE) that are negated
    iif: tuple[tuple[str, ...], bool] | None = None    # (names, negated)
    oif: tuple[tuple[str, ...], bool] | None = None
    family: int | None = None                   # 4 or 6 when the rule (or table) is one family
    ct: frozenset[str] | None = None            # conntrack states matched (lower case)
    limit: tuple[int, int] | None = None        # (packets per second, burst)
    verdict: str | None = None                  # allow drop reject jump goto return log count
    target: str | None = None                   # chain of jump/goto
    comment: str | None = None
    unsupported: list[str] = field(default_factory=list)   # why the rule cannot be imported
    warnings: list[str] = field(default_factory=list)      # imported, but not quite the same


@dataclass
class Chain:
    name: str
    where: str
    hook: str | None = None                     # input | output | forward | other hooks; None: user
    policy: str | None = None                   # allow | drop for base chains
    rules: list[SrcRule] = field(default_factory=list)


@dataclass
class Table:
    name: str
    family: int | None                          # 4, 6, or None (nft inet: both)
    kind: str = "filter"                        # filter | nat | mangle | raw | security | ...
    chains: dict[str, Chain] = field(default_factory=dict)
    where: str = ""


@dataclass
class Ruleset:
    tables: list[Table] = field(default_factory=list)
    sets: dict[str, list[str]] = field(default_factory=dict)   # name -> CIDR strings
    set_where: dict[str, str] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)


def _nets(values: list[str]) -> list[ipaddress._BaseNetwork]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def intersect_addrs(a: list[str], b: list[str]) -> list[str]:
    """CIDR lists a AND b: the narrower of each overlapping pair (prefixes nest or are disjoint)."""
    out = []
    for x in _nets(a):
        for y in _nets(b):
            if x.version != y.version:
                continue
            if x.subnet_of(y):
                out.append(str(x))
            elif y.subnet_of(x):
                out.append(str(y))
    return list(dict.fromkeys(out))


def parse_ranges(values: list[Any]) -> list[tuple[int, int]]:
    out = []
    for v in values:
        lo, _, hi = str(v).partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def format_ranges(ranges: list[tuple[int, int]]) -> list[Any]:
    return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]


def intersect_ports(a: list[Any], b: list[Any]) -> list[Any]:
    out = []
    for lo1, hi1 in parse_ranges(a):
        for lo2, hi2 in parse_ranges(b):
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return format_ranges(sorted(set(out)))


def conjoin(outer: SrcRule, inner: SrcRule) -> tuple[SrcRule | None, str | None]:
    """inner's matches AND outer's (a jump's) matches, as one rule.

    Returns (rule, None), or (None, None) when no packet can match both, or (None, why) when
    the AND is not expressible in one netbpf rule.
    """
    fields = dict(inner.fields)
    neg = set(inner.neg)
    for key, value in outer.fields.items():
        if key not in fields:
            fields[key] = value
            if key in outer.neg:
                neg.add(key)
            continue
        if fields[key] == value and (key in neg) == (key in outer.neg):
            continue
        if key in outer.neg or key in neg:
            return None, f"'{key}' is matched both by the jump and in the chain, one negated"
        if key in ADDR_FIELDS and not str(value).startswith("@") and \
                not str(fields[key]).startswith("@"):
            fields[key] = intersect_addrs(_as_list(fields[key]), _as_list(value))
        elif key in PORT_FIELDS:
            fields[key] = intersect_ports(_as_list(fields[key]), _as_list(value))
        else:
            return None, f"'{key}' is matched both by the jump and in the chain, differently"
        if not fields[key]:
            return None, None
    iif, why = _conjoin_if(outer.iif, inner.iif)
    oif, why2 = _conjoin_if(outer.oif, inner.oif)
    if why or why2:
        return None, why or why2
    family = inner.family or outer.family
    if inner.family and outer.family and inner.family != outer.family:
        return None, None
    ct = inner.ct if outer.ct is None else (outer.ct if inner.ct is None else inner.ct & outer.ct)
    if ct is not None and not ct:
        return None, None
    return replace(inner, fields=fields, neg=frozenset(neg), iif=iif, oif=oif, family=family,
                   ct=ct, limit=inner.limit or outer.limit,
                   unsupported=outer.unsupported + inner.unsupported), None


def _conjoin_if(a, b):
    if a is None or a == b:
        return b, None
    if b is None:
        return a, None
    return None, "interface matched both by the jump and in the chain"


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
