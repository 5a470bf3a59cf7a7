"""Plan an apply: the desired policy (compiled) against what the state file says runs, per
interface and part, and why new programs are needed. Reads state, drift and the kernel
(netbpf/kernel/api.py); writes nothing. Not execution (update.py, programs.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from netbpf.engine.records import ct_timeouts, rule_states, set_digests
from netbpf.errors import NetbpfError
from netbpf.fw.compile import CompiledDirection, Shape, choose_shape, compile_direction
from netbpf.kernel.api import kernel
from netbpf.kernel.netns import netns_label
from netbpf.lb.lbtables import LbState, RingFull, plan_lb, ring_cap_for
from netbpf.observe.drift import drift
from netbpf.policy.ir import DirectionIR, InterfaceIR, LoadBalancerIR, SetIR, addr_text
from netbpf.store.progspec import ProgramSpec
from netbpf.store.state import (REPAIR_HASH, health_down, iface_key, InterfaceState,
                                list_states, load_state, PartState)


@dataclass
class RuleChange:
    name: str
    action: str
    what: str                # added | removed | changed | kept


@dataclass
class PartPlan:
    direction: str
    ir: DirectionIR
    compiled: CompiledDirection
    shape: Shape
    conntrack: bool
    hook: str = "xdp"                        # xdp | tc (egress is always tc)
    fields: int = 0                          # classifier fields compiled in (NB_FIELDS)
    lb_ring_cap: int = 0                     # >0: built with the load balancer
    rules: list[RuleChange] = field(default_factory=list)
    old: PartState | None = None

    @property
    def func(self) -> str:
        return self.spec().func

    def spec(self, shared: Path | None = None) -> ProgramSpec:
        """What to build for this part (shared: where the shared maps are pinned)."""
        return ProgramSpec.for_part(self.direction, self.hook, words=self.shape.words,
                                    class_cap=self.shape.class_cap, chunks=self.shape.chunks,
                                    fields=self.fields, conntrack=self.conntrack,
                                    lb_ring_cap=self.lb_ring_cap, shared_pin=shared)

    @property
    def prog_hash(self) -> str:
        return self.spec().hash()

    def changed_rules(self) -> list[RuleChange]:
        return [r for r in self.rules if r.what != "kept"]


@dataclass
class IfacePlan:
    key: str
    ifname: str
    netns: str | None
    what: str                                    # create | update | unchanged | remove
    mode: str = "auto"
    conntrack: bool = False
    ct_timeouts: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)   # why new programs are loaded
    parts: dict[str, PartPlan] = field(default_factory=dict)
    old: InterfaceState | None = None
    lbs: list[LoadBalancerIR] = field(default_factory=list)
    lb_state: LbState | None = None
    lb_changed: list[str] = field(default_factory=list)
    lb_removed: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    stale: bool = False          # the interface was re-created: old pins describe nothing live
    ifindex: int = 0

    @property
    def new_program(self) -> bool:
        return bool(self.reasons)

    @property
    def rules(self) -> list[RuleChange]:
        return [r for p in self.parts.values() for r in p.rules]

    def changed_rules(self) -> list[RuleChange]:
        return [r for p in self.parts.values() for r in p.changed_rules()]


@dataclass
class Plan:
    policy_path: str
    policy_hash: str
    netns: str | None
    interfaces: list[IfacePlan]
    sets: dict[str, SetIR]
    set_files: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return any(p.what != "unchanged" for p in self.interfaces)


def _plan_part(direction: str, ir: DirectionIR, sets, old: InterfaceState | None,
               conntrack: bool) -> PartPlan:
    compiled = compile_direction(ir, sets)
    old_part = old.parts.get(direction) if old else None
    current = Shape(old_part.words, old_part.class_cap, old_part.dir_chunks) if old_part else None
    shape = choose_shape(compiled.nrules, compiled.nclasses, current,
                         len(compiled.dir.chunks))
    hook = "tc" if direction == "egress" else ir.hook
    # Fields the program is built with: the ones the rules use; a running program that
    # already has them all is kept (rule edits stay map writes).
    used = compiled.field_mask
    fields = old_part.fields if old_part and used & ~old_part.fields == 0 else used
    pp = PartPlan(direction, ir, compiled, shape, conntrack, hook=hook, fields=fields,
                  old=old_part)
    new = rule_states(compiled, ir)
    was = {r.name: r for r in old_part.rules} if old_part else {}
    for n, a, d, _ in new:
        r = was.pop(n, None)
        pp.rules.append(RuleChange(n, a, "added" if r is None else
                                   "kept" if r.digest == d else "changed"))
    pp.rules += [RuleChange(r.name, r.action, "removed") for r in was.values()]
    return pp


def _part_unchanged(pp: PartPlan, sets) -> bool:
    return rules_unchanged(pp) and \
        set_digests(pp.compiled, sets) == {s.name: s.digest for s in pp.old.sets}


def rules_unchanged(pp: PartPlan) -> bool:
    """Everything but the sets' contents is as the running generation has it."""
    old = pp.old
    return (old is not None and not pp.changed_rules()
            and [r.name for r in old.rules] == [n for n, *_ in rule_states(pp.compiled, pp.ir)]
            # rule states list terminal rules before count rules: the file order tells
            # whether a count rule moved across a terminal one (found by selftest)
            and [r.name for r in sorted(old.rules, key=lambda r: (r.pos, r.line))]
            == [r.name for r in pp.ir.rules]
            and old.default_action == pp.ir.default and old.sample == pp.ir.sample
            and {r.set_name for r in pp.compiled.setrefs} == {s.name for s in old.sets})


def plan_apply(loaded_policy, policy_path: str, netns: str | None) -> Plan:
    ir = loaded_policy.ir
    path = str(Path(policy_path).resolve())
    plans: list[IfacePlan] = []
    names = list(ir.interfaces)
    names += [lb.interface for lb in ir.load_balancers.values() if lb.interface not in names]
    for name in dict.fromkeys(names):
        iface = ir.interfaces.get(name) or InterfaceIR(name=name)
        ifindex = kernel().ifindex(name, netns)
        if ifindex is None:
            raise NetbpfError(f"no interface '{name}' in {netns_label(netns)}; "
                              f"see 'ip{' -n ' + netns if netns else ''} link'")
        key = iface_key(name, netns)
        old = load_state(key)
        lbs = [lb for lb in ir.load_balancers.values() if lb.interface == name]
        p = IfacePlan(key=key, ifname=name, netns=netns, what="update", mode=iface.xdp_mode,
                      conntrack=iface.conntrack, ct_timeouts=ct_timeouts(iface), old=old,
                      lbs=lbs, down=health_down(key))
        p.parts["ingress"] = _plan_part("ingress", iface.ingress or DirectionIR("allow"),
                                        ir.sets, old, iface.conntrack)
        if iface.conntrack or (iface.egress and iface.egress.rules) or \
                any(lb.mode == "nat" for lb in lbs):
            p.parts["egress"] = _plan_part("egress", iface.egress or DirectionIR("allow"),
                                           ir.sets, old, iface.conntrack)
        if lbs and p.parts["ingress"].hook != "xdp":
            raise NetbpfError(f"interfaces.{name}.ingress.hook: load balancer(s) "
                              f"{', '.join(lb.name for lb in lbs)} need the xdp ingress hook")
        _plan_lb(p)
        _check_forwarding(p)
        _check_vips(p)
        p.ifindex = ifindex
        if old is not None and old.ifindex != ifindex:
            p.stale = True
            p.reasons.append(f"interface was re-created (ifindex {old.ifindex} -> {ifindex})")
        if old is None:
            p.what = "create"
            p.reasons.append("first apply")
        else:
            why = drift(old)
            if why:
                p.reasons.append(why)
            for d in sorted(set(p.parts) | set(old.parts)):
                if d not in old.parts:
                    p.reasons.append(f"{d} program added")
                elif d not in p.parts:
                    p.reasons.append(f"{d} program removed")
                elif old.parts[d].hook != p.parts[d].hook:
                    p.reasons.append(f"{d} hook {old.parts[d].hook} -> {p.parts[d].hook}")
                elif old.parts[d].prog_hash == REPAIR_HASH:
                    p.reasons.append(f"{d} program reloaded to finish an interrupted apply")
                elif old.parts[d].prog_hash != p.parts[d].prog_hash:
                    shape_now = p.parts[d].shape
                    was = Shape(old.parts[d].words, old.parts[d].class_cap, old.parts[d].dir_chunks)
                    if shape_now != was:
                        why = "shape changed"
                    elif old.parts[d].fields != p.parts[d].fields:
                        why = "rules use new match fields"
                    else:
                        why = "code or features changed"
                    p.reasons.append(f"{d} program {why}")
            if old.requested_mode != iface.xdp_mode:
                p.reasons.append(f"xdp mode {old.requested_mode} -> {iface.xdp_mode}")
            if (not p.reasons and all(_part_unchanged(pp, ir.sets) for pp in p.parts.values())
                    and old.ct_timeouts == p.ct_timeouts and not p.lb_changed
                    and not p.lb_removed):
                p.what = "unchanged"
        plans.append(p)
    # Interfaces this same file configured before and no longer names are detached.
    wanted = {p.key for p in plans}
    for st in list_states():
        if st.policy_path == path and st.netns == netns and st.key not in wanted:
            plans.append(IfacePlan(key=st.key, ifname=st.ifname, netns=st.netns,
                                   what="remove", old=st))
    return Plan(path, loaded_policy.source_hash, netns, plans, dict(ir.sets),
                list(getattr(loaded_policy, "set_files", [])))


def _check_forwarding(p: IfacePlan) -> None:
    """Balanced packets are forwarded (by the kernel for NAT, by bpf_fib_lookup's route for
    DSR), and both only work on an interface with forwarding on: say so before applying."""
    for fam in sorted({lb.family for lb in p.lbs}):
        conf = "ipv4" if fam == 4 else "ipv6"
        # None: cannot tell; let the data plane's counters speak
        if kernel().forwarding(p.ifname, fam, p.netns) is False:
            raise NetbpfError(f"{p.ifname}: load balancing needs IPv{fam} forwarding on the "
                              f"interface; run 'sysctl -w net.{conf}.conf.{p.ifname}.forwarding=1'"
                              + (f" in namespace {p.netns}" if p.netns else ""))


def _check_vips(p: IfacePlan) -> None:
    """A NAT VIP nobody answers ARP/ND for applies fine and then no connection works."""
    for lb in p.lbs:
        if lb.mode != "nat":
            continue
        vip = addr_text(lb.family, lb.vip)
        why = kernel().vip_problem(p.ifname, vip, p.netns)
        if why:
            ip = f"ip -n {p.netns}" if p.netns else "ip"
            plen = 32 if lb.family == 4 else 128
            raise NetbpfError(f"load balancer {lb.name}: {why}; give the VIP to this host "
                              f"('{ip} addr add {vip}/{plen} dev lo') or route it here from "
                              f"the clients' router")


def _plan_lb(p: IfacePlan) -> None:
    """Backend ids, VIP indexes and ring regions; a bigger program when the rings outgrow it."""
    old = LbState.from_json(p.old.lb) if p.old else LbState()
    if not p.lbs:
        p.lb_removed = list(old.vips)
        return
    cap = old.ring_cap if old.ring_cap else ring_cap_for(p.lbs)
    try:
        p.lb_state, p.lb_changed = plan_lb(p.lbs, old, cap, p.down)
    except RingFull:
        cap = ring_cap_for(p.lbs)
        p.lb_state, p.lb_changed = plan_lb(p.lbs, old, cap, p.down)
    p.lb_removed = [n for n in old.vips if n not in p.lb_state.vips]
    p.parts["ingress"].lb_ring_cap = cap
    if "egress" in p.parts:
        p.parts["egress"].lb_ring_cap = cap
