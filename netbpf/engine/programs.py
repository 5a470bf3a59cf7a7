"""A program change: load and fill new programs beside the running ones, carry counters,
replace the running programs (one kernel call each), swap the pin directories, record.
Any failure puts back what ran. Not rule updates (update.py), not the hooks (hooks.py).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from netbpf import abi
from netbpf.engine import faults, progress
from netbpf.engine.hooks import clsact_only_ours, roll_back, swap_tc, swap_xdp
from netbpf.engine.plan import IfacePlan, PartPlan, Plan
from netbpf.engine.records import iface_state, part_state, rule_states
from netbpf.engine.update import allocate_tags, fill, write_ct_timeouts
from netbpf.errors import NetbpfError
from netbpf.fw.compile import counter_key
from netbpf.fw.fwtables import CounterCarry, FwTables
from netbpf.fw.program import build_program
from netbpf.kernel import link
from netbpf.kernel.api import kernel
from netbpf.lb.lbtables import LbState, LbTables, plan_lb, stale_shared_maps
from netbpf.observe.drift import tc_filter
from netbpf.store.progspec import PROG_PIN, PROGRAMS, SHARED_MAPS
from netbpf.store.state import (InterfaceState, Journal, PartState, make_pin_dirs, pin_dir,
                                remove_journal, rename_pins, save_journal, save_state,
                                staging_dirs, unpin_tree)

Log = Callable[[str], None]


def pins_usable(key: str, old: PartState | None) -> bool:
    return old is not None and (pin_dir(key) / old.direction / abi.NB_MAP_FW_CNT).exists()


def _load_part(plan: Plan, p: IfacePlan, pp: PartPlan, staging: Path, shared: Path):
    """Compile, load and fill one part; pin its maps and program into staging."""
    spec = pp.spec(shared if (p.conntrack or p.lbs) else None)
    progress.step(f"{p.key}: compiling and verifying {pp.func}")
    load = partial(kernel().load_program, netns=p.netns)
    if pp.hook == "xdp" and p.mode == "offload":
        # an offloaded program is loaded for its device (bcc resolves the name in the
        # namespace); attach refuses first on drivers that cannot offload
        kernel().check_offload(p.ifname, netns=p.netns)
        built = build_program(spec, device=p.ifname, load=load)
    else:
        built = build_program(spec, load=load, stored=True)
    loaded, tables = built.loaded, built.tables
    try:
        # Fresh counter maps: rules take slots 0..n-1 whatever the old program used, and the
        # counters of rules that stay (same name and match) are carried to their new slot.
        states = rule_states(pp.compiled, pp.ir)
        slots = list(range(len(states)))
        if len(slots) > abi.slot_cap(pp.shape.words):
            raise NetbpfError(f"{len(slots)} rules need more counter slots than a program "
                              f"built for {pp.shape.words * 64} rules has")
        tags, to_write = allocate_tags(pp.compiled, plan.sets, None)
        fill(tables, pp, plan.sets, 0, slots, tags, to_write)
        tables.flip(0)
        carry = None
        if not p.stale and pins_usable(p.key, pp.old):
            # sampling is not what a counter counts: counter_key leaves it out
            was = {(r.name, counter_key(r.digest)): r.slot for r in pp.old.rules}
            pairs = [(was[(n, counter_key(d))], s) for (n, _, d, _), s in zip(states, slots)
                     if (n, counter_key(d)) in was]
            old_tables = FwTables.from_pins(pin_dir(p.key) / pp.direction, pp.old.words,
                                            pp.old.class_cap)
            carry = CounterCarry(old_tables, tables, pairs,
                                 {n: pp.old.carried_counts(n) for n in pp.old.carried})
        # bcc pins a BPF_TABLE_PINNED map itself when it creates one: skip what is there
        names = [n for n in loaded.maps if (pp.direction == "ingress" or n not in SHARED_MAPS)
                 and not (staging / pp.direction / n).exists()]
        loaded.pin_maps(staging / pp.direction, names)
        kernel().obj_pin(loaded.prog_fd(pp.func), staging / pp.direction / PROG_PIN)
        return loaded, slots, tags, carry
    except BaseException:
        loaded.close()
        raise


def apply_new_programs(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Load every part with fresh maps, fill generation 0, carry counters, then replace the
    running programs (one netlink call each) and swap the pin directories."""
    final = pin_dir(p.key)
    staging, retired = staging_dirs(p.key)
    # What runs now (put back if this apply fails), read before anything is made
    before_xdp = kernel().xdp_state(p.ifname, netns=p.netns)
    before_tc = {d: tc_filter(p.old, d) for d, part in (p.old.parts.items() if p.old else ())
                 if part.hook == "tc"}
    # Tracked connections and balanced flows survive a program change: the new programs open
    # the shared maps where the running ones pinned them (or create them in staging).
    shared = final / "ingress" if (p.old and not p.stale and (final / "ingress").is_dir()) \
        else staging / "ingress"
    if p.lbs and shared != staging / "ingress" and stale_shared_maps(shared):
        log(f"{p.key}: the pinned flow tables are an older netbpf's layout: new ones are made "
            "(open flows are balanced again)")
        shared = staging / "ingress"
    loaded, parts, attached, carries, hows = {}, {}, [], {}, {}
    for d in (staging, retired):
        unpin_tree(d)
    try:
        make_pin_dirs(staging, retired.parent, final.parent)
        for d in ("ingress", "egress"):
            if d not in p.parts:
                continue
            pp = p.parts[d]
            loaded[d], slots, tags, carry = _load_part(plan, p, pp, staging, shared)
            parts[d] = (pp, slots, tags)
            if carry:
                carries[d] = carry
        if p.conntrack:
            write_ct_timeouts(loaded["ingress"].maps[abi.NB_MAP_CT_CFG].fd, p.ct_timeouts)
        if p.lbs:
            fill_lb(p, loaded["ingress"])

        created_clsact = p.old.created_clsact if p.old else clsact_only_ours(p)
        faults.kill_point("program:loaded")
        # What the interface is once this apply is done, before the kernel runs any of it:
        # a kill from here on is finished or undone by the next apply (recover.py).
        states = {d: part_state(pp, mode="tc" if pp.hook == "tc" else p.mode,
                                 prog_id=loaded[d].prog_id(pp.func), slots=slots, tags=tags)
                  for d, (pp, slots, tags) in parts.items()}
        save_journal(Journal("programs", iface_state(plan, p, states, created_clsact)))
        faults.kill_point("program:journal")
        for carry in carries.values():      # as late as possible: see CounterCarry
            carry.copy()
        for d, (pp, slots, tags) in parts.items():
            fd = loaded[d].prog_fd(pp.func)
            pin = staging / d / link.LINK_PIN
            attached.append(d)      # before the call: a failed one may have taken effect
            if pp.hook == "xdp":
                states[d].mode = swap_xdp(p, fd, log, pin, hows)
            else:
                created = swap_tc(p, d, fd, pp.func, pin, log, hows)
                created_clsact = created or created_clsact
            states[d].attach = "netlink" if hows[d][0] == "netlink" else "link"
            faults.kill_point(f"program:attached-{d}")
        # What the old state ran and the new one does not (a part gone, or a hook changed):
        # removed only after its replacement is attached, so no packet goes unfiltered.
        for d, part in (p.old.parts.items() if p.old else ()):
            new = states.get(d)
            if new is not None and new.hook == part.hook:
                continue
            if part.attach == "link":
                kernel().detach_pinned(pin_dir(p.key) / d / link.LINK_PIN)
            elif part.hook == "xdp":
                kernel().detach_xdp(p.ifname, None, prog_id=part.prog_id, netns=p.netns)
            else:
                kernel().detach_tc(p.ifname, d, netns=p.netns)
        faults.kill_point("program:old-detached")
        if p.old and p.old.created_clsact and not any(s.hook == "tc" for s in states.values()):
            if kernel().remove_clsact_if_unused(p.ifname, netns=p.netns):
                created_clsact = False

        for d, carry in carries.items():
            states[d].carried = carry.catch_up()
        if final.exists():
            rename_pins(final, retired)
            faults.kill_point("program:pins-retired")
        rename_pins(staging, final)
        faults.kill_point("program:pins-renamed")
        unpin_tree(retired)
        st = iface_state(plan, p, states, created_clsact)
        save_state(st)
        remove_journal(p.key)
        faults.kill_point("program:state-saved")
    except BaseException:
        roll_back(p, attached, before_xdp, before_tc, loaded, hows, staging)
        unpin_tree(staging)
        remove_journal(p.key)
        raise
    finally:
        for carry in carries.values():
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


def fill_lb(p: IfacePlan, loaded) -> None:
    """Fresh LB maps: every VIP written anew (indexes and backend ids kept: the shared flow
    table and counters still refer to them)."""
    old = LbState.from_json(p.old.lb) if p.old else LbState()
    cap = p.parts["ingress"].lb_ring_cap
    p.lb_state, p.lb_changed = plan_lb(p.lbs, LbState(-1, old.vips, old.backends), cap, p.down)
    LbTables.from_loaded(loaded).write(p.lbs, p.lb_state, p.lb_changed, None, p.down)
