"""IR -> policy-language values: a rule, direction or set written back as the YAML would say it.

Used by the plan diff (field by field) and by `netbpf show` (a whole policy). Pure; the
inverse of netbpf/policy/convert.py for everything the IR keeps (ICMP types come out as
numbers, ports as merged ranges). Not a YAML writer (the CLI dumps these dicts).
"""
from __future__ import annotations

from netbpf.policy.ir import AddrMatch, DirectionIR, InterfaceIR, PolicyIR, RuleIR, SetIR
from netbpf.policy import vocab
from netbpf.policy.addr import format_prefix

RULE_FIELDS = ("src", "dst", "proto", "sport", "dport", "icmp_type", "icmp_code",
               "tcp_flags", "action", "sample")


def addr_value(m: AddrMatch | None):
    if m is None:
        return None
    if m.set_name is not None:
        return f"@{m.set_name}"
    items = [format_prefix(p.family, p.addr, p.plen) for p in m.prefixes]
    return items[0] if len(items) == 1 else items


def ports_value(ranges):
    if ranges is None:
        return None
    items = [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
    return items[0] if len(items) == 1 else items


def flags_value(flags):
    if flags is None:
        return None
    mask, value = flags
    return ",".join(("" if value & bit else "!") + name
                    for name, bit in vocab.TCP_FLAGS.items() if mask & bit)


def action_value(r: RuleIR):
    if r.action != "rate_limit":
        return r.action
    spec = {"pps": r.rate_pps}
    if r.rate_burst and r.rate_burst != r.rate_pps:
        spec["burst"] = r.rate_burst
    if r.rate_per != "src":
        spec["per"] = r.rate_per
    return {"rate_limit": spec}


def rule_values(r: RuleIR) -> dict:
    """Every field of the rule language, None where the rule leaves it open."""
    proto = r.proto
    if proto is None and (r.sport is not None or r.dport is not None):
        proto_v = None                    # 'any' with ports: tcp or udp, as written
    else:
        proto_v = None if proto is None else vocab.proto_name(proto)
    return {"src": addr_value(r.src), "dst": addr_value(r.dst), "proto": proto_v,
            "sport": ports_value(r.sport), "dport": ports_value(r.dport),
            "icmp_type": r.icmp_type, "icmp_code": r.icmp_code,
            "tcp_flags": flags_value(r.tcp_flags), "action": action_value(r),
            "sample": r.sample or None}


def rule_dict(r: RuleIR) -> dict:
    return {"name": r.name} | {k: v for k, v in rule_values(r).items() if v is not None}


def direction_dict(d: DirectionIR, egress: bool = False) -> dict:
    out: dict = {"default": d.default}
    if d.sample:
        out["sample"] = d.sample
    if not egress and d.hook != "xdp":
        out["hook"] = d.hook
    out["rules"] = [rule_dict(r) for r in d.rules]
    return out


def set_entries(s: SetIR) -> list[str]:
    return ([format_prefix(4, a, p) for a, p in s.v4] +
            [format_prefix(6, a, p) for a, p in s.v6])


def interface_dict(i: InterfaceIR) -> dict:
    out: dict = {"xdp": {"mode": i.xdp_mode}}
    if i.conntrack:
        out["conntrack"] = {"timeouts": dict(i.ct_timeouts)} if i.ct_timeouts else True
    if i.ingress is not None:
        out["ingress"] = direction_dict(i.ingress)
    if i.egress is not None:
        out["egress"] = direction_dict(i.egress, egress=True)
    return out


def policy_dict(ir: PolicyIR) -> dict:
    out: dict = {"version": 1}
    if ir.sets:
        out["sets"] = {n: set_entries(s) for n, s in sorted(ir.sets.items())}
    out["interfaces"] = {n: interface_dict(i) for n, i in ir.interfaces.items()}
    return out
