"""Validated models -> the normalised IR (netbpf/policy/ir.py) the compiler consumes.

Pure translation: every check has already run (models.py, checks.py). Set files not read yet
(a model built in Python rather than by load_policy) are read here, relative to base_dir.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from netbpf.errors import InputError
from netbpf.policy.ir import (AddrMatch, BackendIR, DirectionIR, InterfaceIR, LoadBalancerIR, PolicyIR,
                       Prefix, RuleIR, SetIR)
from netbpf.policy import vocab
from netbpf.policy.models import (ConntrackOptions, Direction, LoadBalancer, Policy, RateLimitAction, Rule,
                                  SetFile)


def policy_to_ir(model: Policy, base_dir: str | Path | None = None) -> PolicyIR:
    sets = {name: _set_ir(name, spec, Path(base_dir or ".")) for name, spec in model.sets.items()}
    interfaces = {
        name: InterfaceIR(name=name, xdp_mode=iface.xdp.mode, conntrack=_ct_on(iface.conntrack),
                          ct_timeouts=_ct_timeouts(iface.conntrack),
                          ingress=_direction_ir(iface.ingress, sets),
                          egress=_direction_ir(iface.egress, sets))
        for name, iface in model.interfaces.items()}
    lbs = {name: _lb_ir(name, lb) for name, lb in model.load_balancers.items()}
    return PolicyIR(interfaces=interfaces, sets=sets, load_balancers=lbs)


def _ct_on(ct: ConntrackOptions) -> bool:
    return ct.enabled


def _ct_timeouts(ct: ConntrackOptions) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(ct.timeouts.model_dump().items())) if ct.enabled else ()


def _set_ir(name: str, spec: list | SetFile, base_dir: Path) -> SetIR:
    if isinstance(spec, SetFile):
        if spec._entries is None:
            from netbpf.policy.load import read_set_file
            read_set_file(spec, base_dir, name)
        v4, v6 = spec._entries
        return SetIR(name=name, v4=tuple(v4), v6=tuple(v6), source=spec._path or spec.file,
                     file_sha=spec._sha)
    unique = list(dict.fromkeys(spec))
    return SetIR(name=name, v4=tuple((a, p) for f, a, p in unique if f == 4),
                 v6=tuple((a, p) for f, a, p in unique if f == 6), source="inline")


def _direction_ir(direction: Direction | None, sets: dict[str, SetIR]) -> DirectionIR | None:
    if direction is None:
        return None
    return DirectionIR(default=direction.default,
                       rules=tuple(x for i, r in enumerate(direction.rules)
                                   for x in rules_ir(r, sets, i)),
                       sample=direction.sample or 0, hook=direction.hook)


def rules_ir(rule: Rule, sets: dict[str, SetIR], index: int) -> list[RuleIR]:
    """One file rule -> its IR rules: one, or for 'ct: invalid' one per TCP-flag match that
    covers the combinations Linux conntrack calls invalid (the classifier matches one
    (mask, value) per rule; they share the name, so 'netbpf stats' adds them up)."""
    base = replace(rule_ir(rule, sets), source_index=index)
    if rule.ct != "invalid":
        return [base]
    return [replace(base, proto=vocab.PROTO_TCP, tcp_flags=flags)
            for flags in vocab.ct_invalid_flag_matches()]


def rule_ir(rule: Rule, sets: dict[str, SetIR] | None = None) -> RuleIR:
    rate = rule.action.rate_limit if isinstance(rule.action, RateLimitAction) else None
    return RuleIR(
        name=rule.name, action=rule.action_name, src=expand_negation(rule.src, sets or {}),
        dst=expand_negation(rule.dst, sets or {}), proto=rule.proto,
        sport=rule.sport, dport=rule.dport,
        icmp_type=rule._icmp_number if rule.icmp_type is not None else None,
        icmp_code=rule.icmp_code, tcp_flags=rule.tcp_flags,
        rate_pps=rate.pps if rate else 0,
        rate_burst=(rate.burst or rate.pps) if rate else 0,
        rate_per=rate.per if rate else "src",
        sample=rule.sample or 0,
        line=rule._line)


def _lb_ir(name: str, lb: LoadBalancer) -> LoadBalancerIR:
    family, vip = lb.vip
    return LoadBalancerIR(
        name=name, interface=lb.interface, family=family, vip=vip, port=lb.port,
        proto=vocab.PROTOCOLS[lb.proto], mode=lb.mode, table_size=lb.table_size,
        idle_timeout=lb.idle_timeout,
        backends=tuple(BackendIR(family=b.address[0], addr=b.address[1],
                                 port=b.port if b.port is not None else lb.port,
                                 weight=b.weight) for b in lb.backends))


# Negating a set of n entries costs up to n x 32 (IPv4) or n x 128 (IPv6) rule prefixes; past
# this many entries the complement would not fit NB_PREFIX_CAP anyway.
NEGATED_SET_MAX = 2048
WIDTH = {4: 32, 6: 128}


def expand_negation(match: AddrMatch | None, sets: dict[str, SetIR]) -> AddrMatch | None:
    """{not: X} -> the prefixes covering everything but X: the classifier only knows 'in'."""
    if match is None or not match.negated:
        return match
    if match.set_name is not None:
        s = sets.get(match.set_name)
        if s is None:
            raise InputError(f"unknown set '@{match.set_name}'")
        if len(s.v4) + len(s.v6) > NEGATED_SET_MAX:
            raise InputError(f"{{not: '@{match.set_name}'}}: the set has {len(s.v4) + len(s.v6)} "
                             f"entries; at most {NEGATED_SET_MAX} can be negated (each entry "
                             "costs up to 32 or 128 rule prefixes)")
        by_family = {4: list(s.v4), 6: list(s.v6)}
    else:
        by_family = {}
        for p in match.prefixes:
            by_family.setdefault(p.family, []).append((p.addr, p.plen))
    out: list[Prefix] = []
    for family, entries in sorted(by_family.items()):
        out += [Prefix(family, a, l) for a, l in complement_prefixes(entries, WIDTH[family])]
    if not out:
        raise InputError("{not: ...} of every address matches nothing")
    return AddrMatch(prefixes=tuple(out))


def complement_prefixes(entries: list[tuple[int, int]], width: int) -> list[tuple[int, int]]:
    """The fewest aligned prefixes covering the address space minus the given prefixes."""
    spans = sorted((a, a + (1 << (width - l)) - 1) for a, l in entries)
    out: list[tuple[int, int]] = []
    nxt = 0
    for lo, hi in spans:
        if lo > nxt:
            out += _range_prefixes(nxt, lo - 1, width)
        nxt = max(nxt, hi + 1)
    if nxt <= (1 << width) - 1:
        out += _range_prefixes(nxt, (1 << width) - 1, width)
    return out


def _range_prefixes(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    out = []
    while lo <= hi:
        size = (lo & -lo).bit_length() - 1 if lo else width
        while size > 0 and lo + (1 << size) - 1 > hi:
            size -= 1
        out.append((lo, width - size))
        lo += 1 << size
    return out
