"""Checks across the whole policy: rule names, set references, VIP overlaps, data-plane limits.

They run on a PolicyView, which can be built from a partly invalid file (every error at once):
it holds whichever rules, sets and load balancers validated on their own. Per-object checks are
in models.py, shadowed rules in shadow.py. Results are (loc, message) pairs; load.py places them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from netbpf import abi
from netbpf.policy.addr import format_address
from netbpf.policy.models import (LoadBalancer, Policy, Rule, SetFile, SetSpec,
                                  address_families, family_conflict)
from netbpf.policy.source import format_path

Loc = tuple[Any, ...]
Finding = tuple[Loc, str]


@dataclass
class SetView:
    loc: Loc
    spec: Any = None            # list of (family, addr, plen), a SetFile, or None when invalid

    def sizes(self) -> tuple[int, int] | None:
        """(IPv4 entries, IPv6 entries), duplicates removed; None when not known."""
        if isinstance(self.spec, list):
            unique = set(self.spec)
            n4 = sum(1 for e in unique if e[0] == 4)
            return n4, len(unique) - n4
        if isinstance(self.spec, SetFile) and self.spec._entries is not None:
            v4, v6 = self.spec._entries
            return len(v4), len(v6)
        return None


@dataclass
class DirectionView:
    ifname: str
    direction: str              # ingress | egress
    rules: list[tuple[int, Rule]] = field(default_factory=list)  # (index in file, rule)

    @property
    def loc(self) -> Loc:
        return ("interfaces", self.ifname, self.direction)


@dataclass
class PolicyView:
    sets: dict[str, SetView] = field(default_factory=dict)
    directions: list[DirectionView] = field(default_factory=list)
    load_balancers: dict[str, LoadBalancer] = field(default_factory=dict)
    interfaces: list[str] = field(default_factory=list)


def view_of_model(policy: Policy) -> PolicyView:
    view = PolicyView(interfaces=list(policy.interfaces),
                      load_balancers=dict(policy.load_balancers))
    for name, spec in policy.sets.items():
        view.sets[name] = SetView(("sets", name), spec)
    for ifname, iface in policy.interfaces.items():
        for direction in ("ingress", "egress"):
            d = getattr(iface, direction)
            if d is not None:
                view.directions.append(DirectionView(ifname, direction, list(enumerate(d.rules))))
    return view


_set_adapter: TypeAdapter[Any] = TypeAdapter(SetSpec)


def view_of_data(data: Any) -> PolicyView:
    """A view of the pieces of a raw (invalid) policy that are valid on their own."""
    view = PolicyView()
    if not isinstance(data, dict):
        return view
    sets = data.get("sets")
    if isinstance(sets, dict):
        for name, spec in sets.items():
            try:
                valid = _set_adapter.validate_python(spec, strict=True)
            except ValidationError:
                valid = None
            view.sets[name] = SetView(("sets", name), valid)
    interfaces = data.get("interfaces")
    if isinstance(interfaces, dict):
        for ifname, iface in interfaces.items():
            view.interfaces.append(ifname)
            if not isinstance(iface, dict):
                continue
            for direction in ("ingress", "egress"):
                d = iface.get(direction)
                rules = d.get("rules") if isinstance(d, dict) else None
                if not isinstance(rules, list):
                    continue
                dv = DirectionView(ifname, direction)
                for i, raw in enumerate(rules):
                    try:
                        dv.rules.append((i, Rule.model_validate(raw)))
                    except ValidationError:
                        pass
                view.directions.append(dv)
    lbs = data.get("load_balancers")
    if isinstance(lbs, dict):
        for name, raw in lbs.items():
            try:
                view.load_balancers[name] = LoadBalancer.model_validate(raw)
            except ValidationError:
                pass
    return view


def check_policy(view: PolicyView, line_of: Callable[[Loc], int] | None = None
                 ) -> tuple[list[Finding], list[Finding]]:
    """(errors, warnings) for everything that needs more than one object to see."""
    errors: list[Finding] = []
    warnings: list[Finding] = []

    def where(loc: Loc) -> str:
        line = line_of(loc) if line_of else 0
        return f"line {line}" if line else format_path(loc)

    used_sets: set[str] = set()
    set_families = {name: _families(s.sizes()) for name, s in view.sets.items()}
    names_by_interface: dict[str, dict[str, Loc]] = {}
    for dv in view.directions:
        names = names_by_interface.setdefault(dv.ifname, {})
        for index, rule in dv.rules:
            loc = dv.loc + ("rules", index)
            if rule.name in names:
                errors.append((loc + ("name",), f"duplicate rule name '{rule.name}' on "
                                                f"{dv.ifname} (first at {where(names[rule.name])})"))
            else:
                names[rule.name] = loc
            for key in ("src", "dst"):
                match = getattr(rule, key)
                if match is None or match.set_name is None:
                    continue
                used_sets.add(match.set_name)
                if match.set_name not in view.sets:
                    known = ", ".join(sorted(view.sets)) or "none defined"
                    errors.append((loc + (key,), f"unknown set '@{match.set_name}' "
                                                 f"(sets: {known})"))
            if _uses_set(rule):
                src = _rule_families(rule.src, set_families)
                dst = _rule_families(rule.dst, set_families)
                conflict = family_conflict(rule, src, dst)
                if conflict:
                    errors.append((loc + conflict[0], conflict[1]))
        errors.extend(_direction_limits(dv))
    errors.extend(_set_limits(view))
    for name, s in view.sets.items():
        if name not in used_sets:
            warnings.append((s.loc, f"set '{name}' is not used by any rule"))
    lb_errors, lb_warnings = _load_balancer_checks(view, where)
    errors.extend(lb_errors)
    warnings.extend(lb_warnings)
    if not view.interfaces and not view.load_balancers and not errors:
        warnings.append(((), "the policy has no interfaces and no load balancers"))
    return errors, warnings


def _families(sizes: tuple[int, int] | None) -> frozenset[int] | None:
    if sizes is None or sizes == (0, 0):
        return None
    return frozenset(f for f, n in zip((4, 6), sizes) if n)


def _uses_set(rule: Rule) -> bool:
    return any(m is not None and m.set_name is not None for m in (rule.src, rule.dst))


def _rule_families(match: Any, set_families: dict[str, frozenset[int] | None]
                   ) -> frozenset[int] | None:
    if match is not None and match.set_name is not None:
        return set_families.get(match.set_name)
    return address_families(match)


def _direction_limits(dv: DirectionView) -> list[Finding]:
    """The data plane's per-direction capacities (netbpf/abi.py), each named in its message."""
    errors: list[Finding] = []
    terminal = count = 0
    setrefs: set[tuple[str, str]] = set()
    prefixes: dict[int, set[tuple[str, int, int]]] = {4: set(), 6: set()}
    chunks: set[tuple[str, int, int, int]] = set()
    where = format_path(dv.loc)
    reported: set[str] = set()

    def over(limit_name: str, loc: Loc, msg: str) -> None:
        if limit_name not in reported:
            reported.add(limit_name)
            errors.append((loc, msg))

    for index, rule in dv.rules:
        loc = dv.loc + ("rules", index)
        if rule.action_name == "count":
            count += 1
            if count > abi.NB_MAX_COUNT_RULES:
                over("count", loc, f"more than {abi.NB_MAX_COUNT_RULES} count rules on {where}: "
                                   "the data plane counts at most that many per direction "
                                   "(NB_MAX_COUNT_RULES)")
        else:
            terminal += 1
            if terminal > abi.NB_MAX_RULES:
                over("rules", loc, f"more than {abi.NB_MAX_RULES} allow/drop/rate_limit rules "
                                   f"on {where}: the data plane holds at most that many per "
                                   "direction (NB_MAX_RULES)")
        for key in ("src", "dst"):
            match = getattr(rule, key)
            if match is None:
                continue
            if match.set_name is not None:
                setrefs.add((match.set_name, key))
                if len(setrefs) > abi.NB_MAX_SETREFS:
                    over("setrefs", loc + (key,),
                         f"'@{match.set_name}' as {key} is set reference number "
                         f"{len(setrefs)} on {where}: the data plane looks up at most "
                         f"{abi.NB_MAX_SETREFS} distinct (set, src/dst) pairs per direction "
                         "(NB_MAX_SETREFS)")
                continue
            for p in match.prefixes:
                bucket = prefixes[p.family]
                bucket.add((key, p.addr, p.plen))
                # the address tables' chunks (netbpf/fw/dirtable.py): one per (field, family,
                # 16 + 8k leading bits) that a longer prefix passes through
                width = 32 if p.family == 4 else 128
                chunks.update((key, p.family, d, p.addr >> (width - d))
                              for d in range(16, p.plen, 8))
                if len(chunks) > abi.NB_DIR_MAX_CHUNKS:
                    over("chunks", loc + (key,),
                         f"the src/dst prefixes of the rules of {where} need more than "
                         f"{abi.NB_DIR_MAX_CHUNKS} address-table chunks (NB_DIR_MAX_CHUNKS), "
                         "about one per distinct /16 and /24 that longer prefixes fall in; put "
                         "large address lists in a set")
                if len(bucket) > abi.NB_PREFIX_CAP:
                    over(f"prefix{p.family}", loc + (key,),
                         f"more than {abi.NB_PREFIX_CAP} distinct IPv{p.family} src/dst "
                         f"prefixes in the rules of {where} (NB_PREFIX_CAP); put large "
                         "address lists in a set")
    return errors


def _set_limits(view: PolicyView) -> list[Finding]:
    errors: list[Finding] = []
    totals = [0, 0]
    for name, s in view.sets.items():
        sizes = s.sizes()
        if sizes is None:
            continue
        for i, family in enumerate((4, 6)):
            before = totals[i]
            totals[i] += sizes[i]
            if before <= abi.NB_SET_CAP < totals[i]:
                errors.append((s.loc, f"sets hold {totals[i]} IPv{family} entries up to and "
                                      f"including '{name}': the data plane holds at most "
                                      f"{abi.NB_SET_CAP} per family over all sets "
                                      "(NB_SET_CAP)"))
    return errors


def _load_balancer_checks(view: PolicyView, where: Callable[[Loc], str]
                          ) -> tuple[list[Finding], list[Finding]]:
    errors: list[Finding] = []
    warnings: list[Finding] = []
    vips: dict[tuple[int, int, int, str], str] = {}
    backends = 0
    for n, (name, lb) in enumerate(view.load_balancers.items(), 1):
        loc = ("load_balancers", name)
        if n == abi.NB_LB_MAX_VIPS + 1:
            errors.append((loc, f"more than {abi.NB_LB_MAX_VIPS} load balancers: the data plane "
                                "serves at most that many VIPs (NB_LB_MAX_VIPS)"))
        before = backends
        backends += len(lb.backends)
        if before <= abi.NB_LB_MAX_BACKENDS < backends:
            errors.append((loc + ("backends",),
                           f"{backends} backends in load balancers up to and including '{name}'"
                           f": the data plane holds at most {abi.NB_LB_MAX_BACKENDS} over all load "
                           "balancers (NB_LB_MAX_BACKENDS)"))
        key = (*lb.vip, lb.port, lb.proto)
        if key in vips:
            other = vips[key]
            errors.append((loc + ("vip",),
                           f"VIP {format_address(*lb.vip)} port {lb.port}/{lb.proto} is "
                           f"already served by load balancer '{other}' "
                           f"(at {where(('load_balancers', other))})"))
        else:
            vips[key] = name
        if lb.backends and all(b.weight == 0 for b in lb.backends):
            warnings.append((loc + ("backends",),
                             "every backend has weight 0 (draining): existing flows stay, but "
                             "new flows to this VIP find no backend"))
        if lb.backends and lb.table_size < 100 * len(lb.backends):
            warnings.append((loc + ("table_size",),
                             f"table_size {lb.table_size} is below 100 x {len(lb.backends)} "
                             "backends: Maglev spreads flows less evenly and moves more of "
                             "them when backends change"))
    return errors, warnings
