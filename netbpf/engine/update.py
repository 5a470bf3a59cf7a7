"""A rule update of running programs: write every part's inactive generation, flip, record,
clear the old generation. Program ids stay. Not program changes (programs.py).
"""
from __future__ import annotations

import time
from typing import Callable

from netbpf import abi
from netbpf.engine import faults, progress
from netbpf.engine.plan import IfacePlan, PartPlan, Plan, rules_unchanged
from netbpf.engine.setdelta import write_set_deltas
from netbpf.engine.records import GRACE_S, iface_state, part_state, rule_states, set_digests
from netbpf.errors import NetbpfError
from netbpf.fw.compile import CompiledDirection, counter_key
from netbpf.fw.fwtables import FwTables
from netbpf.fw.program import write_policy
from netbpf.kernel.api import kernel
from netbpf.lb.lbtables import LbState, LbTables
from netbpf.policy.ir import SetIR
from netbpf.store.state import (Journal, PartState, pin_dir, remove_journal, save_journal,
                                save_state, SetState, InterfaceState)

BIG_SET = 10_000       # entries: writing a set this big is worth a progress line

Log = Callable[[str], None]


def allocate_slots(new: list[tuple[str, str, str, int]], old: PartState,
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


def allocate_tags(c: CompiledDirection, sets: dict[str, SetIR],
                   old: PartState | None) -> tuple[dict[str, SetState], list[str]]:
    """Tag per referenced set: unchanged contents keep their tag (no rewrite of a big set)."""
    was = {s.name: s for s in old.sets} if old else {}
    used = {s.tag for s in old.sets} if old else set()
    out, to_write = {}, []
    nxt = 1
    for name, digest in set_digests(c, sets).items():
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


def write_ct_timeouts(fd, timeouts: dict) -> None:
    cfg = abi.NbCtCfg()
    for name, seconds in timeouts.items():
        cfg.timeout_ns[abi.CT_TIMEOUT_INDEX[name]] = int(seconds * 1e9)
    kernel().map_update(fd, abi.U32.pack(0), bytes(cfg))


def kept_carried(old: PartState, slots: list[int], fresh: list[int]) -> dict:
    """The remainders of the last counter carry (PartState.carried) that still belong to a
    rule: a slot now fresh is zeroed, so its remainder goes with it; totals keep theirs."""
    keep = {str(s) for s in set(slots) - set(fresh)}
    out = {n: dict(v) for n, v in old.carried.items() if n != abi.NB_MAP_FW_CNT}
    cnt = {k: v for k, v in old.carried.get(abi.NB_MAP_FW_CNT, {}).items() if k in keep}
    if cnt:
        out[abi.NB_MAP_FW_CNT] = cnt
    return out


def fill(tables: FwTables, pp: PartPlan, sets, gen: int, slots: list[int],
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
            or not all(rules_unchanged(pp) for pp in p.parts.values())):
        return None
    parts = {}
    for d, pp in p.parts.items():
        old = pp.old
        slots, fresh = allocate_slots(rule_states(pp.compiled, pp.ir), old,
                                      abi.slot_cap(old.words))
        was = {s.name: s for s in old.sets}
        tags = {n: SetState(n, digest, was[n].tag, len(plan.sets[n].v4), len(plan.sets[n].v6))
                for n, digest in set_digests(pp.compiled, plan.sets).items()}
        parts[d] = part_state(pp, mode=old.mode, prog_id=old.prog_id, slots=slots, tags=tags,
                              gen=old.gen, attach=old.attach)
        parts[d].carried = kept_carried(old, slots, fresh)
    st = iface_state(plan, p, parts, p.old.created_clsact)
    return write_set_deltas(p.old, st, plan.sets, log)


def apply_update(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Same programs: write every part's inactive generation, flip the parts back to back,
    record it, then clear the old generations. A kill between the two flips leaves the state
    file at the old generations: drift() sees the mismatch and the next apply repairs it.
    A change of sets' contents only is written in place instead (setdelta.py)."""
    st = _apply_sets_in_place(plan, p, log)
    if st is not None:
        return st
    parts, opened, olds = {}, {}, {}
    try:
        for d, pp in p.parts.items():
            old = pp.old
            tables = opened[d] = FwTables.from_pins(pin_dir(p.key) / d, old.words, old.class_cap)
            active = tables.active_gen()
            slots, fresh = allocate_slots(rule_states(pp.compiled, pp.ir), old,
                                           abi.slot_cap(old.words))
            tags, to_write = allocate_tags(pp.compiled, plan.sets, old)
            for name in to_write:
                tables.delete_set(tags[name].tag)   # a killed apply may have left entries
            tables.zero_slots(fresh)
            fill(tables, pp, plan.sets, 1 - active, slots, tags, to_write)
            olds[d] = active
            parts[d] = part_state(pp, mode=old.mode, prog_id=old.prog_id, slots=slots,
                                   tags=tags, gen=1 - active, attach=old.attach)
            parts[d].carried = kept_carried(old, slots, fresh)
        faults.kill_point("update:written")
        st = iface_state(plan, p, parts, p.old.created_clsact)
        # Balancer tables and conntrack timeouts are written after the flip; a kill there
        # leaves them behind the rules, so a roll-forward asks for new programs (recover.py).
        reload = bool(p.lbs or p.lb_removed or
                      (p.conntrack and p.ct_timeouts != p.old.ct_timeouts))
        save_journal(Journal("update", st, reload=reload))
        faults.kill_point("update:journal")
        for d, tables in opened.items():
            tables.flip(1 - olds[d])
            faults.kill_point(f"update:flipped-{d}")
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
        with kernel().obj_get(pin_dir(p.key) / "ingress" / abi.NB_MAP_CT_CFG) as fd:
            write_ct_timeouts(fd, p.ct_timeouts)
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
    faults.kill_point("update:state-saved")
    return st
