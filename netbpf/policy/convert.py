"""Validated models -> the normalised IR (netbpf/ir.py) the compiler consumes.

Pure translation: every check has already run (models.py, checks.py). Set files not read yet
(a model built in Python rather than by load_policy) are read here, relative to base_dir.
"""
from __future__ import annotations

from pathlib import Path

from netbpf.ir import (BackendIR, DirectionIR, InterfaceIR, LoadBalancerIR, PolicyIR, RuleIR,
                       SetIR)
from netbpf.policy import vocab
from netbpf.policy.models import (ConntrackOptions, Direction, LoadBalancer, Policy, RateLimitAction, Rule,
                                  SetFile)


def policy_to_ir(model: Policy, base_dir: str | Path | None = None) -> PolicyIR:
    sets = {name: _set_ir(name, spec, Path(base_dir or ".")) for name, spec in model.sets.items()}
    interfaces = {
        name: InterfaceIR(name=name, xdp_mode=iface.xdp.mode, conntrack=_ct_on(iface.conntrack),
                          ct_timeouts=_ct_timeouts(iface.conntrack),
                          ingress=_direction_ir(iface.ingress), egress=_direction_ir(iface.egress))
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
        return SetIR(name=name, v4=tuple(v4), v6=tuple(v6), source=spec._path or spec.file)
    unique = list(dict.fromkeys(spec))
    return SetIR(name=name, v4=tuple((a, p) for f, a, p in unique if f == 4),
                 v6=tuple((a, p) for f, a, p in unique if f == 6), source="inline")


def _direction_ir(direction: Direction | None) -> DirectionIR | None:
    if direction is None:
        return None
    return DirectionIR(default=direction.default,
                       rules=tuple(rule_ir(r) for r in direction.rules),
                       sample=direction.sample or 0, hook=direction.hook)


def rule_ir(rule: Rule) -> RuleIR:
    rate = rule.action.rate_limit if isinstance(rule.action, RateLimitAction) else None
    return RuleIR(
        name=rule.name, action=rule.action_name, src=rule.src, dst=rule.dst, proto=rule.proto,
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
