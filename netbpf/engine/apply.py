"""The apply engine: plan (desired policy vs. what is pinned), then make it so, atomically.

An interface runs up to two programs ("parts"): the XDP ingress firewall and, when the policy
has egress rules or conntrack, the TC egress firewall. Rule edits write the inactive
generation of each part's pinned maps and flip one value, so each packet sees the old policy
or the new one, never a mix; program ids stay. New programs (first apply, a shape that no
longer fits, conntrack switched, a new netbpf) are filled before they replace the old ones,
each in one netlink call. Any failure before that leaves the previous policy running.
Not the CLI (netbpf/cli/dataplane.py), not map layouts (netbpf/fw/fwtables.py).
"""
from __future__ import annotations

import hashlib
import socket
import time
from array import array
from glob import escape as glob_escape
from operator import itemgetter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from netbpf import abi

from netbpf.engine import progress

from netbpf.store import snapshot
from netbpf.fw.compile import (CompiledDirection, Shape, choose_shape, compile_direction,
                            counter_key)
from netbpf.observe.drift import drift, is_netbpf_program, netns_gone, tc_filter
from netbpf.errors import NetbpfError
from netbpf.engine.faults import kill_point
from netbpf.fw.fwtables import CounterCarry, FwTables
from netbpf.policy.ir import DirectionIR, InterfaceIR, LoadBalancerIR, SetIR
from netbpf.fw.program import build_program, write_policy
from netbpf.lb.lbtables import (LbState, LbTables, RingFull, plan_lb, ring_cap_for,
                                stale_shared_maps)
from netbpf.kernel import attach, bpfsys, link
from netbpf.kernel.netns import enter_netns, netns_label
from netbpf.store.progspec import (FW_PROG, FW_SOURCE, PROG_PIN, PROGRAMS, SHARED_MAPS,  # noqa: F401
                             TC_EGRESS_PROG, TC_INGRESS_PROG, TC_SOURCE, ProgramSpec)
from netbpf.engine.recover import recover, recover_all
from netbpf.engine.setdelta import write_set_deltas
from netbpf.store.state import (REPAIR_HASH, apply_lock, health_down, iface_key, InterfaceState,
                          Journal, list_states, load_journal, load_state, make_pin_dirs,
                          PartState, pin_dir, prune_pin_roots, remove_journal, remove_lock,
                          remove_state, rename_pins, RuleState, save_journal, save_state,
                          SetState, split_key, staging_dirs, state_file, unpin_tree)

# A packet being classified holds the old generation for microseconds (XDP and TC run under
# RCU); the old generation's prefixes are removed only after this grace period.
GRACE_S = 0.05
BIG_SET = 10_000       # entries: writing a set this big is worth a progress line

Log = Callable[[str], None]


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


# ---- planning (no kernel writes) ----

def _rule_states(c: CompiledDirection, ir: DirectionIR) -> list[tuple[str, str, str, int]]:
    """(name, action, digest, line) of every rule, terminal and count, in file order."""
    by_name = {r.name: r for r in ir.rules}
    out = [(r.name, by_name[r.name].action, r.digest, by_name[r.name].line) for r in c.rules]
    out += [(r.name, "count", r.digest, by_name[r.name].line) for r in c.count_rules]
    return out


def _ifindex(ifname: str, netns: str | None) -> int | None:
    with enter_netns(netns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None


def _live_link(path: Path) -> link.LinkInfo | None:
    """The link pinned at path if it still holds a hook (not detached, device not gone)."""
    try:
        info = link.pinned_link_info(path)
    except NetbpfError:
        return None
    return info if info is not None and info.ifindex else None


def _ct_timeouts(iface: InterfaceIR) -> dict:
    t = dict(abi.CT_DEFAULT_TIMEOUTS)
    t.update(dict(iface.ct_timeouts))
    return t if iface.conntrack else {}


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
    new = _rule_states(compiled, ir)
    was = {r.name: r for r in old_part.rules} if old_part else {}
    for n, a, d, _ in new:
        r = was.pop(n, None)
        pp.rules.append(RuleChange(n, a, "added" if r is None else
                                   "kept" if r.digest == d else "changed"))
    pp.rules += [RuleChange(r.name, r.action, "removed") for r in was.values()]
    return pp


def _part_unchanged(pp: PartPlan, sets) -> bool:
    return _rules_unchanged(pp) and \
        _set_digests(pp.compiled, sets) == {s.name: s.digest for s in pp.old.sets}


def _rules_unchanged(pp: PartPlan) -> bool:
    """Everything but the sets' contents is as the running generation has it."""
    old = pp.old
    return (old is not None and not pp.changed_rules()
            and [r.name for r in old.rules] == [n for n, *_ in _rule_states(pp.compiled, pp.ir)]
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
        ifindex = _ifindex(name, netns)
        if ifindex is None:
            raise NetbpfError(f"no interface '{name}' in {netns_label(netns)}; "
                              f"see 'ip{' -n ' + netns if netns else ''} link'")
        key = iface_key(name, netns)
        old = load_state(key)
        lbs = [lb for lb in ir.load_balancers.values() if lb.interface == name]
        p = IfacePlan(key=key, ifname=name, netns=netns, what="update", mode=iface.xdp_mode,
                      conntrack=iface.conntrack, ct_timeouts=_ct_timeouts(iface), old=old,
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
        path = f"/proc/sys/net/{conf}/conf/{p.ifname}/forwarding"
        with enter_netns(p.netns):
            try:
                on = Path(path).read_text().strip() == "1"
            except OSError:
                on = True  # cannot tell: let the data plane's counters speak
        if not on:
            raise NetbpfError(f"{p.ifname}: load balancing needs IPv{fam} forwarding on the "
                              f"interface; run 'sysctl -w net.{conf}.conf.{p.ifname}.forwarding=1'"
                              + (f" in namespace {p.netns}" if p.netns else ""))


def _check_vips(p: IfacePlan) -> None:
    """A NAT VIP nobody answers ARP/ND for applies fine and then no connection works."""
    from netbpf.policy.ir import addr_text
    from netbpf.kernel.reach import vip_problem

    for lb in p.lbs:
        if lb.mode != "nat":
            continue
        vip = addr_text(lb.family, lb.vip)
        why = vip_problem(p.ifname, vip, p.netns)
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


def _set_digest(s: SetIR) -> str:
    h = hashlib.sha256()
    # addresses, then prefix lengths: C-level loops over a million entries
    h.update(array("I", map(itemgetter(0), s.v4)).tobytes())
    h.update(bytes(map(itemgetter(1), s.v4)))
    for a, p in s.v6:
        h.update(a.to_bytes(16, "big") + bytes([p]))
    return h.hexdigest()[:16]


def _set_digests(c: CompiledDirection, sets: dict[str, SetIR]) -> dict[str, str]:
    return {n: _set_digest(sets[n]) for n in sorted({r.set_name for r in c.setrefs})}


# ---- execution ----

def apply_policy(loaded_policy, policy_path: str, netns: str | None, log: Log = print,
                 show_plan: Callable[[Plan], None] | None = None) -> Plan:
    """Plan and apply under the locks of the interfaces the plan touches, so the plan is made
    against the state it changes (a plan made before waiting for another apply would work
    from a stale state). Applies to other interfaces go on meanwhile."""
    keys = _policy_keys(loaded_policy, policy_path, netns)
    while True:
        with apply_lock(keys, wait_message=log):
            unrepaired = recover_all(log, keys)
            remove_leftovers(keys, keep=unrepaired)
            plan = plan_apply(loaded_policy, policy_path, netns)
            more = {p.key for p in plan.interfaces} - keys
            if more:          # another apply of this file added an interface meanwhile
                keys |= more
                continue
            if show_plan:
                show_plan(plan)
            if plan.changes:
                apply_plan(plan, log, locked=True)
            _record_inputs(plan)
            # copies of the files for status, show and commit-confirmed rollback
            snapshot.record([p.key for p in plan.interfaces if p.what != "remove"],
                            loaded_policy, policy_path, netns)
            return plan


def _record_inputs(plan: Plan) -> None:
    """An interface whose tables did not change still records this apply's input (file, its
    hash, set files, sibling interfaces), so the next identical apply is known unchanged
    before parsing (netbpf/engine/unchanged.py)."""
    keys = [q.key for q in plan.interfaces if q.what != "remove"]
    for p in plan.interfaces:
        st = p.old
        if p.what != "unchanged" or st is None:
            continue
        now = (plan.policy_path, plan.policy_hash, plan.set_files, keys)
        if (st.policy_path, st.policy_hash, st.set_files, st.policy_keys) != now:
            st.policy_path, st.policy_hash, st.set_files, st.policy_keys = now
            save_state(st)


def _policy_keys(loaded_policy, policy_path: str, netns: str | None) -> set[str]:
    """The interfaces an apply of this file may change: those it names, and those it named
    before (removed by the plan)."""
    ir = loaded_policy.ir
    names = set(ir.interfaces) | {lb.interface for lb in ir.load_balancers.values()}
    path = str(Path(policy_path).resolve())
    return {iface_key(n, netns) for n in names} | \
        {st.key for st in list_states() if st.policy_path == path and st.netns == netns}


def remove_leftovers(keys, keep: frozenset[str] = frozenset()) -> None:
    """Staging pins and half-written state files of an apply of keys killed before it wrote
    its journal (only an apply holding a key's lock uses them); keep: keys being repaired."""
    for key in set(keys) - keep:
        for d in staging_dirs(key):
            unpin_tree(d)
        for kind in ("json", "journal"):
            for tmp in state_file(key).parent.glob(f"{glob_escape(key)}.{kind}.tmp*"):
                tmp.unlink(missing_ok=True)


def apply_plan(plan: Plan, log: Log = print, locked: bool = False) -> list[InterfaceState]:
    """Make the plan so; each interface either switches whole or not. Takes the apply lock
    unless the caller holds it (apply_policy)."""
    if not locked:
        with apply_lock({p.key for p in plan.interfaces}, wait_message=log):
            return apply_plan(plan, log, locked=True)
    done = []
    for p in plan.interfaces:
        if p.what == "unchanged":
            done.append(p.old)
            continue
        if p.what == "remove":
            detach_key(p.key, log)
            continue
        st = _apply_new_programs(plan, p, log) if p.new_program else _apply_update(plan, p, log)
        done.append(st)
    return done


def _allocate_slots(new: list[tuple[str, str, str, int]], old: PartState,
                    cap: int) -> tuple[list[int], list[int]]:
    """Counter slots for a rule update of a running program: an unchanged rule (same name and
    digest) keeps its slot; the others get slots the running generation does not count into.
    Returns (slot per rule, the fresh slots to zero)."""
    kept = {(r.name, counter_key(r.digest)): r.slot for r in old.rules}
    used = {r.slot for r in old.rules}
    slots, fresh = [], []
    free = (s for s in range(cap) if s not in used)
    for name, _, digest, _ in new:
        s = kept.get((name, counter_key(digest)))
        if s is None:
            s = next(free, None)
            if s is None:
                raise NetbpfError(f"no free counter slot (capacity {cap})")
            fresh.append(s)
        slots.append(s)
    return slots, fresh


def _allocate_tags(c: CompiledDirection, sets: dict[str, SetIR],
                   old: PartState | None) -> tuple[dict[str, SetState], list[str]]:
    """Tag per referenced set: unchanged contents keep their tag (no rewrite of a big set)."""
    was = {s.name: s for s in old.sets} if old else {}
    used = {s.tag for s in old.sets} if old else set()
    out, to_write = {}, []
    nxt = 1
    for name, digest in _set_digests(c, sets).items():
        prev = was.get(name)
        if prev and prev.digest == digest:
            out[name] = prev
            continue
        while nxt in used:
            nxt += 1
        used.add(nxt)
        s = sets[name]
        out[name] = SetState(name, digest, nxt, len(s.v4), len(s.v6))
        to_write.append(name)
    return out, to_write


def _part_state(pp: PartPlan, *, mode: str, prog_id: int, slots: list[int],
                tags: dict[str, SetState], gen: int = 0, attach: str = "netlink") -> PartState:
    pos = {r.name: i for i, r in enumerate(pp.ir.rules)}
    rules = [RuleState(n, a, d, s, line, pp.direction, pos[n]) for (n, a, d, line), s in
             zip(_rule_states(pp.compiled, pp.ir), slots)]
    return PartState(direction=pp.direction, hook=pp.hook, fields=pp.fields, mode=mode,
                     prog_id=prog_id,
                     prog_hash=pp.prog_hash, words=pp.shape.words,
                     class_cap=pp.shape.class_cap, dir_chunks=pp.shape.chunks,
                     default_action=pp.ir.default,
                     rules=rules, sets=list(tags.values()), sample=pp.ir.sample, gen=gen,
                     attach=attach,
                     sampled=bool(pp.ir.sample or any(r.sample for r in pp.ir.rules)))


def _iface_state(plan: Plan, p: IfacePlan, parts: dict[str, PartState],
                 created_clsact: bool) -> InterfaceState:
    return InterfaceState(key=p.key, ifname=p.ifname, netns=p.netns, ifindex=p.ifindex,
                          requested_mode=p.mode, conntrack=p.conntrack,
                          ct_timeouts=p.ct_timeouts, created_clsact=created_clsact,
                          policy_path=plan.policy_path, policy_hash=plan.policy_hash,
                          set_files=plan.set_files,
                          policy_keys=[q.key for q in plan.interfaces if q.what != "remove"],
                          applied_at=time.time(), parts=parts,
                          lb=p.lb_state.to_json() if p.lb_state else {})


def _write_ct_timeouts(fd, timeouts: dict) -> None:
    cfg = abi.NbCtCfg()
    for name, seconds in timeouts.items():
        cfg.timeout_ns[abi.CT_TIMEOUT_INDEX[name]] = int(seconds * 1e9)
    bpfsys.map_update(fd, abi.U32.pack(0), bytes(cfg))


def _fill(tables: FwTables, pp: PartPlan, sets, gen: int, slots: list[int],
          tags: dict[str, SetState], to_write: list[str]) -> None:
    def announce(name: str, s: SetIR) -> None:
        if len(s.v4) + len(s.v6) >= BIG_SET:
            progress.step(f"writing set {name} ({len(s.v4) + len(s.v6):,} entries)")

    c = pp.compiled
    by_name = {r.name: r for r in pp.ir.rules}
    samples = [by_name[r.name].sample or pp.ir.sample for r in c.rules]
    write_policy(tables, gen, c, slots, {n: t.tag for n, t in tags.items()},
                 {name: sets[name] for name in to_write}, samples, pp.ir.sample, announce)


def _apply_sets_in_place(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState | None:
    """Only sets' contents changed (no rule, balancer or timeout): update them in place under
    their running tags (setdelta.py). None when that does not apply."""
    if (p.old is None or p.lb_changed or p.lb_removed or p.ct_timeouts != p.old.ct_timeouts
            or set(p.parts) != set(p.old.parts)
            or not all(_rules_unchanged(pp) for pp in p.parts.values())):
        return None
    parts = {}
    for d, pp in p.parts.items():
        old = pp.old
        slots, _ = _allocate_slots(_rule_states(pp.compiled, pp.ir), old, abi.slot_cap(old.words))
        was = {s.name: s for s in old.sets}
        tags = {n: SetState(n, digest, was[n].tag, len(plan.sets[n].v4), len(plan.sets[n].v6))
                for n, digest in _set_digests(pp.compiled, plan.sets).items()}
        parts[d] = _part_state(pp, mode=old.mode, prog_id=old.prog_id, slots=slots, tags=tags,
                               gen=old.gen, attach=old.attach)
    st = _iface_state(plan, p, parts, p.old.created_clsact)
    return write_set_deltas(p.old, st, plan.sets, log)


def _apply_update(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Same programs: write every part's inactive generation, flip the parts back to back,
    record it, then clear the old generations. A kill between the two flips leaves the state
    file at the old generations: drift() sees the mismatch and the next apply repairs it."""
    st = _apply_sets_in_place(plan, p, log)
    if st is not None:
        return st
    parts, opened, olds = {}, {}, {}
    try:
        for d, pp in p.parts.items():
            old = pp.old
            tables = opened[d] = FwTables.from_pins(pin_dir(p.key) / d, old.words, old.class_cap)
            active = tables.active_gen()
            slots, fresh = _allocate_slots(_rule_states(pp.compiled, pp.ir), old,
                                           abi.slot_cap(old.words))
            tags, to_write = _allocate_tags(pp.compiled, plan.sets, old)
            for name in to_write:
                tables.delete_set(tags[name].tag)   # a killed apply may have left entries
            tables.zero_slots(fresh)
            _fill(tables, pp, plan.sets, 1 - active, slots, tags, to_write)
            olds[d] = active
            parts[d] = _part_state(pp, mode=old.mode, prog_id=old.prog_id, slots=slots,
                                   tags=tags, gen=1 - active, attach=old.attach)
        kill_point("update:written")
        st = _iface_state(plan, p, parts, p.old.created_clsact)
        # Balancer tables and conntrack timeouts are written after the flip; a kill there
        # leaves them behind the rules, so a roll-forward asks for new programs (recover.py).
        reload = bool(p.lbs or p.lb_removed or
                      (p.conntrack and p.ct_timeouts != p.old.ct_timeouts))
        save_journal(Journal("update", st, reload=reload))
        kill_point("update:journal")
        for d, tables in opened.items():
            tables.flip(1 - olds[d])
            kill_point(f"update:flipped-{d}")
        time.sleep(GRACE_S)
        for d, tables in opened.items():
            tables.clear_generation(olds[d])
            live = {t.tag for t in parts[d].sets}
            for s in p.parts[d].old.sets:
                if s.tag not in live:
                    tables.delete_set(s.tag)
    finally:
        for tables in opened.values():
            tables.close()
    for d, ps in parts.items():
        log(f"{p.key}: {d} generation {ps.gen} active, {len(ps.rules)} rules "
            f"(program id {ps.prog_id} unchanged)")
    if p.conntrack:
        with bpfsys.obj_get(pin_dir(p.key) / "ingress" / abi.NB_MAP_CT_CFG) as fd:
            _write_ct_timeouts(fd, p.ct_timeouts)
    if p.lbs or p.lb_removed:
        lbt = LbTables.from_pins(pin_dir(p.key) / "ingress")
        try:
            lbt.write(p.lbs, p.lb_state or LbState(), p.lb_changed,
                      LbState.from_json(p.old.lb), p.down)
        finally:
            lbt.close()
        for name in p.lb_changed:
            log(f"{p.key}: load balancer {name}: new Maglev table live")
    save_state(st)
    remove_journal(p.key)
    kill_point("update:state-saved")
    return st


def _pins_usable(key: str, old: PartState | None) -> bool:
    return old is not None and (pin_dir(key) / old.direction / abi.NB_MAP_FW_CNT).exists()


def _load_part(plan: Plan, p: IfacePlan, pp: PartPlan, staging: Path, shared: Path):
    """Compile, load and fill one part; pin its maps and program into staging."""
    spec = pp.spec(shared if (p.conntrack or p.lbs) else None)
    progress.step(f"{p.key}: compiling and verifying {pp.func}")
    if pp.hook == "xdp" and p.mode == "offload":
        # an offloaded program is loaded for its device (bcc resolves the name in this netns);
        # attach refuses first on drivers that cannot offload
        attach.check_offload(p.ifname, netns=p.netns)
        with enter_netns(p.netns):
            built = build_program(spec, device=p.ifname)
    else:
        built = build_program(spec, stored=True)
    loaded, tables = built.loaded, built.tables
    try:
        # Fresh counter maps: rules take slots 0..n-1 whatever the old program used, and the
        # counters of rules that stay (same name and match) are carried to their new slot.
        states = _rule_states(pp.compiled, pp.ir)
        slots = list(range(len(states)))
        if len(slots) > abi.slot_cap(pp.shape.words):
            raise NetbpfError(f"{len(slots)} rules need more counter slots than a program "
                              f"built for {pp.shape.words * 64} rules has")
        tags, to_write = _allocate_tags(pp.compiled, plan.sets, None)
        _fill(tables, pp, plan.sets, 0, slots, tags, to_write)
        tables.flip(0)
        carry = None
        if not p.stale and _pins_usable(p.key, pp.old):
            # sampling is not what a counter counts: counter_key leaves it out
            was = {(r.name, counter_key(r.digest)): r.slot for r in pp.old.rules}
            pairs = [(was[(n, counter_key(d))], s) for (n, _, d, _), s in zip(states, slots)
                     if (n, counter_key(d)) in was]
            old_tables = FwTables.from_pins(pin_dir(p.key) / pp.direction, pp.old.words,
                                            pp.old.class_cap)
            carry = CounterCarry(old_tables, tables, pairs)
        # bcc pins a BPF_TABLE_PINNED map itself when it creates one: skip what is there
        names = [n for n in loaded.maps if (pp.direction == "ingress" or n not in SHARED_MAPS)
                 and not (staging / pp.direction / n).exists()]
        loaded.pin_maps(staging / pp.direction, names)
        bpfsys.obj_pin(loaded.prog_fd(pp.func), staging / pp.direction / PROG_PIN)
        return loaded, slots, tags, carry
    except BaseException:
        loaded.close()
        raise


def _apply_new_programs(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Load every part with fresh maps, fill generation 0, carry counters, then replace the
    running programs (one netlink call each) and swap the pin directories."""
    final = pin_dir(p.key)
    staging, retired = staging_dirs(p.key)
    for d in (staging, retired):
        unpin_tree(d)
    make_pin_dirs(staging, retired.parent, final.parent)
    # Tracked connections and balanced flows survive a program change: the new programs open
    # the shared maps where the running ones pinned them (or create them in staging).
    shared = final / "ingress" if (p.old and not p.stale and (final / "ingress").is_dir()) \
        else staging / "ingress"
    if p.lbs and shared != staging / "ingress" and stale_shared_maps(shared):
        log(f"{p.key}: the pinned flow tables are an older netbpf's layout: new ones are made "
            "(open flows are balanced again)")
        shared = staging / "ingress"
    loaded, parts, attached, carries, hows = {}, {}, [], [], {}
    before_xdp = attach.xdp_state(p.ifname, netns=p.netns)
    before_tc = {d: tc_filter(p.old, d) for d, part in (p.old.parts.items() if p.old else ())
                 if part.hook == "tc"}
    try:
        for d in ("ingress", "egress"):
            if d not in p.parts:
                continue
            pp = p.parts[d]
            loaded[d], slots, tags, carry = _load_part(plan, p, pp, staging, shared)
            parts[d] = (pp, slots, tags)
            if carry:
                carries.append(carry)
        if p.conntrack:
            _write_ct_timeouts(loaded["ingress"].maps[abi.NB_MAP_CT_CFG].fd, p.ct_timeouts)
        if p.lbs:
            _fill_lb(p, loaded["ingress"])

        created_clsact = p.old.created_clsact if p.old else _clsact_only_ours(p)
        kill_point("program:loaded")
        # What the interface is once this apply is done, before the kernel runs any of it:
        # a kill from here on is finished or undone by the next apply (recover.py).
        states = {d: _part_state(pp, mode="tc" if pp.hook == "tc" else p.mode,
                                 prog_id=loaded[d].prog_id(pp.func), slots=slots, tags=tags)
                  for d, (pp, slots, tags) in parts.items()}
        save_journal(Journal("programs", _iface_state(plan, p, states, created_clsact)))
        kill_point("program:journal")
        for carry in carries:       # as late as possible: see CounterCarry
            carry.copy()
        for d, (pp, slots, tags) in parts.items():
            fd = loaded[d].prog_fd(pp.func)
            pin = staging / d / link.LINK_PIN
            if pp.hook == "xdp":
                states[d].mode, hows[d] = _attach_xdp(p, fd, log, pin)
            else:
                hows[d], created = _attach_tc(p, d, fd, pp.func, pin, log)
                created_clsact = created or created_clsact
            states[d].attach = "netlink" if hows[d][0] == "netlink" else "link"
            attached.append(d)
            kill_point(f"program:attached-{d}")
        # What the old state ran and the new one does not (a part gone, or a hook changed):
        # removed only after its replacement is attached, so no packet goes unfiltered.
        for d, part in (p.old.parts.items() if p.old else ()):
            new = states.get(d)
            if new is not None and new.hook == part.hook:
                continue
            if part.attach == "link":
                link.detach_pinned(pin_dir(p.key) / d / link.LINK_PIN)
            elif part.hook == "xdp":
                attach.detach_xdp(p.ifname, None, prog_id=part.prog_id, netns=p.netns)
            else:
                attach.detach_tc(p.ifname, d, netns=p.netns)
        kill_point("program:old-detached")
        if p.old and p.old.created_clsact and not any(s.hook == "tc" for s in states.values()):
            if attach.remove_clsact_if_unused(p.ifname, netns=p.netns):
                created_clsact = False

        for carry in carries:
            carry.catch_up()
        if final.exists():
            rename_pins(final, retired)
            kill_point("program:pins-retired")
        rename_pins(staging, final)
        kill_point("program:pins-renamed")
        unpin_tree(retired)
        st = _iface_state(plan, p, states, created_clsact)
        save_state(st)
        remove_journal(p.key)
        kill_point("program:state-saved")
    except BaseException:
        _roll_back(p, attached, before_xdp, before_tc, loaded, hows, staging)
        unpin_tree(staging)
        remove_journal(p.key)
        raise
    finally:
        for carry in carries:
            carry.old.close()
        for l in loaded.values():
            l.close()
    for d, ps in states.items():
        where = f"in {ps.mode} mode" if ps.hook == "xdp" else f"on tc {d}"
        where += " through a bpf_link" if ps.attach == "link" else " through netlink"
        log(f"{p.key}: attached {PROGRAMS[(d, ps.hook)][1]} (program id {ps.prog_id}) {where}; "
            f"{len(ps.rules)} {d} rules")
    log(f"{p.key}: loaded new programs ({', '.join(p.reasons)})")
    return st


def _clsact_only_ours(p: IfacePlan) -> bool:
    """No state to say who added the clsact qdisc (first apply, or the state file was lost):
    it is ours when nothing but netbpf's filters hang on it."""
    try:
        filters = [f for d in ("ingress", "egress")
                   for f in attach.list_tc_filters(p.ifname, d, netns=p.netns)]
    except NetbpfError:
        return False
    return bool(filters) and all(f.prio == attach.NB_TC_PRIO and f.handle == attach.NB_TC_HANDLE
                                 for f in filters)


def _fill_lb(p: IfacePlan, loaded) -> None:
    """Fresh LB maps: every VIP written anew (indexes and backend ids kept: the shared flow
    table and counters still refer to them)."""
    old = LbState.from_json(p.old.lb) if p.old else LbState()
    cap = p.parts["ingress"].lb_ring_cap
    p.lb_state, p.lb_changed = plan_lb(p.lbs, LbState(-1, old.vips, old.backends), cap, p.down)
    LbTables.from_loaded(loaded).write(p.lbs, p.lb_state, p.lb_changed, None, p.down)


def _roll_back(p: IfacePlan, attached: list[str], before_xdp, before_tc: dict,
               loaded, hows: dict, staging: Path) -> None:
    """Put back what ran before a failed apply: the old programs, or none."""
    for d in attached:
        pp = p.parts[d]
        try:
            new_id = loaded[d].prog_id(pp.func)
            how, before_id = hows.get(d, ("netlink", 0))
            if how == "link-new":
                link.detach_pinned(staging / d / link.LINK_PIN)
            elif how == "link-update":
                with bpfsys.prog_get_fd_by_id(before_id) as old_fd:
                    link.update_pinned(pin_dir(p.key) / d / link.LINK_PIN, old_fd, new_id)
            elif pp.hook == "xdp":
                if before_xdp is None:
                    attach.detach_xdp(p.ifname, None, prog_id=new_id, netns=p.netns)
                    continue
                with bpfsys.prog_get_fd_by_id(before_xdp.prog_id) as old_fd, \
                        bpfsys.prog_get_fd_by_id(new_id) as new_fd:
                    attach.attach_xdp(p.ifname, old_fd, before_xdp.mode, replace_prog_fd=new_fd,
                                      netns=p.netns)
            elif before_tc.get(d) is None:
                attach.detach_tc(p.ifname, d, netns=p.netns)
            else:
                with bpfsys.prog_get_fd_by_id(before_tc[d].prog_id) as old_fd:
                    attach.attach_tc(p.ifname, d, old_fd, before_tc[d].name or pp.func,
                                     netns=p.netns)
        except NetbpfError:
            pass  # the original error matters more; 'netbpf status' shows what is left


def _our_link(p: IfacePlan, d: str, hook: str) -> link.LinkInfo | None:
    """netbpf's live link for direction d: the state says so, or (state lost) one is pinned
    where netbpf pins it."""
    if p.stale:
        return None
    old = p.old.parts.get(d) if p.old else None
    if old is not None and (old.hook != hook or old.attach != "link"):
        return None
    return _live_link(pin_dir(p.key) / d / link.LINK_PIN)


def _attach_xdp(p: IfacePlan, prog_fd: int, log: Log,
                pin: Path) -> tuple[str, tuple[str, int]]:
    """Attach or swap the XDP program; returns (mode, (how, program id before)): how is
    link-update or link-new (a bpf_link pinned at pin) or netlink. An interface keeps the way
    it is attached, since moving a program from netlink to a link cannot be one step."""
    old = p.old.parts.get("ingress") if p.old and not p.stale else None
    old_pin = pin_dir(p.key) / "ingress" / link.LINK_PIN
    ours_linked = _our_link(p, "ingress", "xdp")
    if ours_linked is not None:
        was = old.mode if old else attach.xdp_state(p.ifname, netns=p.netns).mode
        if p.mode in ("auto", was):
            link.update_pinned(old_pin, prog_fd, ours_linked.prog_id, also_pin=pin)
            return was, ("link-update", ours_linked.prog_id)
        log(f"{p.key}: switching xdp mode {was} -> {p.mode} (brief detach)")
        link.detach_pinned(old_pin)
    cur = attach.xdp_state(p.ifname, netns=p.netns)
    ours = cur is not None and old is not None and old.hook == "xdp" and cur.prog_id == old.prog_id
    if cur is not None and not ours and is_netbpf_program(cur.prog_id):
        log(f"{p.key}: replacing netbpf program id {cur.prog_id} left by an interrupted apply")
        ours = True
    if cur is not None and not ours:
        raise NetbpfError(f"attach xdp to {p.ifname}: another XDP program (id {cur.prog_id}) "
                          f"is attached in {cur.mode} mode, not netbpf's; detach it first "
                          f"('ip link set dev {p.ifname} xdp off')")
    if ours and p.mode in ("auto", cur.mode):
        # one netlink call swaps the programs: no packet goes unfiltered
        with bpfsys.prog_get_fd_by_id(cur.prog_id) as old_fd:
            return attach.attach_xdp(p.ifname, prog_fd, cur.mode, replace_prog_fd=old_fd,
                                     netns=p.netns), ("netlink", cur.prog_id)
    if ours:
        # A mode change cannot be one call: the kernel keeps one program per mode.
        log(f"{p.key}: switching xdp mode {cur.mode} -> {p.mode} (brief detach)")
        attach.detach_xdp(p.ifname, cur.mode, netns=p.netns)
    try:
        fd, mode = link.create_link(prog_fd, p.ifname, "xdp", p.mode, netns=p.netns)
        with fd:
            bpfsys.obj_pin(fd, pin)
        how = ("link-new", 0)
    except link.LinkUnsupported as e:
        log(f"{p.key}: {e}; attaching through netlink")
        mode, how = attach.attach_xdp(p.ifname, prog_fd, p.mode, netns=p.netns), ("netlink", 0)
    if p.mode == "auto":
        log(f"{p.key}: xdp mode auto chose {mode}")
    return mode, how


def _attach_tc(p: IfacePlan, d: str, prog_fd: int, name: str, pin: Path,
               log: Log) -> tuple[tuple[str, int], bool]:
    """Attach or swap the TC program of direction d: a TCX link where the kernel has them
    (appended after other TCX programs), else our cls_bpf filter on clsact. Returns ((how,
    program id before), whether a clsact qdisc was added)."""
    old = p.old.parts.get(d) if p.old and not p.stale else None
    old_pin = pin_dir(p.key) / d / link.LINK_PIN
    ours_linked = _our_link(p, d, "tc")
    if ours_linked is not None:
        link.update_pinned(old_pin, prog_fd, ours_linked.prog_id, also_pin=pin)
        return ("link-update", ours_linked.prog_id), False
    keep_filter = old is not None and old.hook == "tc" and old.attach == "netlink" and \
        tc_filter(p.old, d) is not None
    if not keep_filter:
        try:
            fd, _ = link.create_link(prog_fd, p.ifname, d, netns=p.netns)
            with fd:
                bpfsys.obj_pin(fd, pin)
            return ("link-new", 0), False
        except link.LinkUnsupported as e:
            log(f"{p.key}: {e}; attaching through clsact")
    created = attach.ensure_clsact(p.ifname, netns=p.netns)
    attach.attach_tc(p.ifname, d, prog_fd, name, netns=p.netns)
    return ("netlink", 0), created


# ---- detach ----

def detach_key(key: str, log: Log = print) -> bool:
    """Remove exactly what netbpf attached and pinned for key; leave anything else. netbpf's
    programs are known by what they are (their name, or an id the state, the journal or the
    pins record), so a program left by an interrupted apply goes too."""
    netns, ifname = split_key(key)
    known = load_state(key, not_loaded=True) is not None or load_journal(key) is not None or \
        any(d.exists() for d in (pin_dir(key), *staging_dirs(key)))
    if not known:
        return False
    gone = "namespace" if netns_gone(netns) else None
    if gone is None:
        try:
            recover(key, log)
        except NetbpfError as e:
            log(f"{key}: {e}; detaching what runs")
        try:
            with enter_netns(netns):
                socket.if_nametoindex(ifname)
        except (NetbpfError, OSError):
            gone = "interface"
    if gone is None:
        _detach_programs(key, ifname, netns, log)
    else:
        log(f"{key}: the {gone} is gone (its programs went with it); forgot netbpf's pins "
            "and state for it")
    for d in (pin_dir(key), *staging_dirs(key)):
        unpin_tree(d)
    remove_state(key)
    remove_journal(key)
    remove_lock(key)
    snapshot.forget(key)
    prune_pin_roots()
    return True


def _recorded_ids(key: str) -> set[int]:
    ids = set()
    for st in (load_state(key), getattr(load_journal(key), "state", None)):
        ids |= {p.prog_id for p in st.parts.values()} if st else set()
    for root in (pin_dir(key), *staging_dirs(key)):
        for pin in root.glob(f"*/{PROG_PIN}"):
            try:
                with bpfsys.obj_get(pin) as fd:
                    ids.add(bpfsys.prog_info(fd).id)
            except NetbpfError:
                pass
    return ids


def _detach_programs(key: str, ifname: str, netns: str | None, log: Log) -> None:
    # Links first (pinned beside the maps, or in a staging tree a killed apply left): netlink
    # cannot remove what they hold.
    for root in (pin_dir(key), *staging_dirs(key)):
        for pin in sorted(root.glob(f"*/{link.LINK_PIN}")):
            try:
                info = link.detach_pinned(pin)
            except NetbpfError:
                continue
            if info is not None and info.ifindex:
                log(f"{key}: detached program id {info.prog_id} ({info.kind} link {info.id}, "
                    f"{pin.parent.name})")
    st = load_state(key) or getattr(load_journal(key), "state", None)
    ours = _recorded_ids(key)
    cur = attach.xdp_state(ifname, netns=netns)
    if cur is not None:
        if cur.prog_id in ours or is_netbpf_program(cur.prog_id):
            attach.detach_xdp(ifname, cur.mode, netns=netns)
            log(f"{key}: detached {FW_PROG} (program id {cur.prog_id}, {cur.mode} mode)")
        else:
            log(f"{key}: XDP program id {cur.prog_id} is not netbpf's; left alone")
    for d in ("ingress", "egress"):
        f = next((f for f in attach.list_tc_filters(ifname, d, netns=netns)
                  if f.kind == "bpf" and f.prio == attach.NB_TC_PRIO
                  and f.handle == attach.NB_TC_HANDLE), None)
        if f is None:
            continue
        if f.prog_id in ours or is_netbpf_program(f.prog_id):
            attach.detach_tc(ifname, d, netns=netns)
            log(f"{key}: detached {PROGRAMS[(d, 'tc')][1]} (program id {f.prog_id}, tc {d})")
        else:
            log(f"{key}: tc {d} filter holds program {f.prog_id}, not netbpf's; left alone")
    created = st.created_clsact if st else False
    if created and attach.remove_clsact_if_unused(ifname, netns=netns):
        log(f"{key}: removed the clsact qdisc netbpf added")


def detach(ifname: str, netns: str | None, log: Log = print) -> None:
    key = iface_key(ifname, netns)
    with apply_lock([key], wait_message=log):
        if not detach_key(key, log):
            raise NetbpfError(f"{ifname}: netbpf manages nothing on it in {netns_label(netns)} "
                              "(see 'netbpf status')")
