"""The apply engine: plan (desired policy vs. what is pinned), then make it so, atomically.

Rule edits write the inactive generation of the pinned maps and flip one value, so each
packet sees the old policy or the new one, never a mix; the program and its id stay. A new
program (first apply, a shape that no longer fits, a new netbpf) is loaded with its maps fully
written before it replaces the old one in one netlink call. Any failure before the flip or
the replace leaves the previous policy running. Not the CLI (netbpf/cli/dataplane.py).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from netbpf import abi
from netbpf.compile import CompiledDirection, Shape, choose_shape, compile_direction
from netbpf.errors import InputError, NetbpfError
from netbpf.fwtables import FwTables
from netbpf.ir import DirectionIR, InterfaceIR, SetIR
from netbpf.kernel import attach, bpfsys
from netbpf.kernel.loader import load_program
from netbpf.kernel.netns import enter_netns, netns_label
from netbpf.state import (InterfaceState, RuleState, SetState, apply_lock, iface_key,
                          list_states, load_state, pin_dir, remove_state, save_state,
                          staging_dirs)

FW_SOURCE = abi.BPF_DIR / "xdp" / "firewall.bpf.c"
FW_PROG = "nb_fw_xdp"
PROG_PIN = "prog"
# A packet being classified holds the old generation for microseconds (XDP runs under RCU);
# the old generation's prefixes are removed only after this grace period.
GRACE_S = 0.05

Log = Callable[[str], None]


@dataclass
class RuleChange:
    name: str
    action: str
    what: str                # added | removed | changed | kept


@dataclass
class IfacePlan:
    key: str
    ifname: str
    netns: str | None
    what: str                                    # create | update | unchanged | remove
    mode: str = "auto"
    reasons: list[str] = field(default_factory=list)   # why a new program is loaded
    rules: list[RuleChange] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    shape: Shape | None = None
    compiled: CompiledDirection | None = None
    default_action: str = "allow"
    iface: InterfaceIR | None = None
    old: InterfaceState | None = None

    @property
    def new_program(self) -> bool:
        return bool(self.reasons)

    def changed_rules(self) -> list[RuleChange]:
        return [r for r in self.rules if r.what != "kept"]


@dataclass
class Plan:
    policy_path: str
    policy_hash: str
    netns: str | None
    interfaces: list[IfacePlan]
    sets: dict[str, SetIR]

    @property
    def changes(self) -> bool:
        return any(p.what != "unchanged" for p in self.interfaces)


# ---- planning (no kernel writes) ----

def program_hash(shape: Shape) -> str:
    h = hashlib.sha256(FW_SOURCE.read_bytes())
    for hdr in sorted((abi.BPF_DIR / "include").glob("*.h")):
        h.update(hdr.name.encode() + hdr.read_bytes())
    h.update(f"words={shape.words} classes={shape.class_cap}".encode())
    return h.hexdigest()[:16]


def _rule_states(c: CompiledDirection, ir: DirectionIR) -> list[tuple[str, str, str, int]]:
    """(name, action, digest, line) of every rule, terminal and count, in file order."""
    by_name = {r.name: r for r in ir.rules}
    out = [(r.name, by_name[r.name].action, r.digest, by_name[r.name].line) for r in c.rules]
    out += [(r.name, "count", r.digest, by_name[r.name].line) for r in c.count_rules]
    return out


def _check_supported(iface: InterfaceIR, policy) -> None:
    problems = []
    if iface.egress is not None and iface.egress.rules:
        problems.append("egress rules need the TC data plane, which this netbpf does not "
                        "have yet")
    if iface.conntrack:
        problems.append("conntrack needs the TC data plane, which this netbpf does not have yet")
    lbs = [lb.name for lb in policy.load_balancers.values() if lb.interface == iface.name]
    if lbs:
        problems.append(f"load balancer(s) {', '.join(lbs)} need the LB data plane, which "
                        "this netbpf does not have yet")
    if problems:
        raise InputError(f"interfaces.{iface.name}: " + "; ".join(problems))


def _interface_exists(ifname: str, netns: str | None) -> bool:
    with enter_netns(netns):
        try:
            socket.if_nametoindex(ifname)
            return True
        except OSError:
            return False


def _attached_ok(st: InterfaceState) -> str | None:
    """Why the interface no longer runs what the state says, or None if it does."""
    if not (pin_dir(st.key) / PROG_PIN).exists():
        return "pins are missing"
    try:
        cur = attach.xdp_state(st.ifname, netns=st.netns)
    except NetbpfError:
        return "the interface is gone"
    if cur is None:
        return "the program was detached by someone else"
    if cur.prog_id != st.prog_id:
        return f"another program (id {cur.prog_id}) replaced ours"
    return None


def plan_apply(loaded_policy, policy_path: str, netns: str | None) -> Plan:
    ir = loaded_policy.ir
    path = str(Path(policy_path).resolve())
    plans: list[IfacePlan] = []
    for name, iface in ir.interfaces.items():
        _check_supported(iface, ir)
        if not _interface_exists(name, netns):
            raise NetbpfError(f"no interface '{name}' in {netns_label(netns)}; "
                              f"see 'ip{' -n ' + netns if netns else ''} link'")
        key = iface_key(name, netns)
        direction = iface.ingress or DirectionIR(default="allow")
        compiled = compile_direction(direction, ir.sets)
        old = load_state(key)
        current = Shape(old.words, old.class_cap) if old else None
        shape = choose_shape(compiled.nrules, compiled.nclasses, current)
        p = IfacePlan(key=key, ifname=name, netns=netns, what="update", mode=iface.xdp_mode,
                      shape=shape, compiled=compiled, default_action=direction.default,
                      iface=iface, old=old)
        new = _rule_states(compiled, direction)
        if old is None:
            p.what = "create"
            p.reasons.append("first apply")
            p.rules = [RuleChange(n, a, "added") for n, a, _, _ in new]
        else:
            drift = _attached_ok(old)
            if drift:
                p.reasons.append(drift)
            if old.prog_hash != program_hash(shape):
                p.reasons.append("program shape changed" if shape != current
                                 else "program code changed")
            if old.requested_mode != iface.xdp_mode:
                p.reasons.append(f"xdp mode {old.requested_mode} -> {iface.xdp_mode}")
            was = {r.name: r for r in old.rules}
            for n, a, d, _ in new:
                r = was.pop(n, None)
                p.rules.append(RuleChange(n, a, "added" if r is None else
                                          "kept" if r.digest == d else "changed"))
            p.rules += [RuleChange(r.name, r.action, "removed") for r in was.values()]
            order_same = [r.name for r in old.rules] == [n for n, *_ in new]
            if (not p.reasons and not p.changed_rules() and order_same
                    and old.default_action == direction.default
                    and _set_digests(compiled, ir.sets) == {s.name: s.digest for s in old.sets}):
                p.what = "unchanged"
        p.sets = sorted({r.set_name for r in compiled.setrefs})
        plans.append(p)
    # Interfaces this same file configured before and no longer names are detached.
    wanted = {p.key for p in plans}
    for st in list_states():
        if st.policy_path == path and st.netns == netns and st.key not in wanted:
            plans.append(IfacePlan(key=st.key, ifname=st.ifname, netns=st.netns,
                                   what="remove", old=st))
    return Plan(path, loaded_policy.source_hash, netns, plans, dict(ir.sets))


def _set_digest(s: SetIR) -> str:
    h = hashlib.sha256()
    h.update(array("Q", (a << 8 | p for a, p in s.v4)).tobytes())
    for a, p in s.v6:
        h.update(a.to_bytes(16, "big") + bytes([p]))
    return h.hexdigest()[:16]


def _set_digests(c: CompiledDirection, sets: dict[str, SetIR]) -> dict[str, str]:
    return {n: _set_digest(sets[n]) for n in sorted({r.set_name for r in c.setrefs})}


# ---- execution ----

def apply_plan(plan: Plan, log: Log = print) -> list[InterfaceState]:
    """Make the plan so. Holds the apply lock; each interface either switches whole or not."""
    done = []
    with apply_lock(wait_message=log):
        for p in plan.interfaces:
            if p.what == "unchanged":
                done.append(p.old)
                continue
            if p.what == "remove":
                detach_key(p.key, log)
                continue
            st = _apply_new_program(plan, p, log) if p.new_program else _apply_update(plan, p, log)
            done.append(st)
    return done


def _allocate_slots(new: list[tuple[str, str, str, int]], old: InterfaceState | None,
                    cap: int, reuse: bool) -> tuple[list[int], list[int]]:
    """Counter slot per rule: an unchanged rule (same name and digest) keeps its slot; others
    get slots no rule of the running generation uses (those are still counting)."""
    kept = {}
    used = set()
    if old is not None:
        used = {r.slot for r in old.rules}
        if reuse:
            kept = {(r.name, r.digest): r.slot for r in old.rules}
    slots, fresh = [], []
    free = (s for s in range(cap) if s not in used)
    for name, _, digest, _ in new:
        s = kept.get((name, digest))
        if s is None:
            s = next(free, None)
            if s is None:
                raise NetbpfError(f"no free counter slot (capacity {cap})")
            fresh.append(s)
        slots.append(s)
    return slots, fresh


def _allocate_tags(c: CompiledDirection, sets: dict[str, SetIR],
                   old: InterfaceState | None, reuse: bool) -> tuple[dict[str, SetState], list[str]]:
    """Tag per referenced set: unchanged contents keep their tag (no rewrite of a big set)."""
    digests = _set_digests(c, sets)
    was = {s.name: s for s in old.sets} if old and reuse else {}
    used = {s.tag for s in old.sets} if old else set()
    out, to_write = {}, []
    nxt = 1
    for name, digest in digests.items():
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


def _state_for(plan: Plan, p: IfacePlan, *, mode: str, prog_id: int, gen: int,
               slots: list[int], tags: dict[str, SetState]) -> InterfaceState:
    direction = p.iface.ingress or DirectionIR(default="allow")
    rules = [RuleState(n, a, d, s, line) for (n, a, d, line), s in
             zip(_rule_states(p.compiled, direction), slots)]
    with enter_netns(p.netns):
        ifindex = socket.if_nametoindex(p.ifname)
    return InterfaceState(key=p.key, ifname=p.ifname, netns=p.netns, ifindex=ifindex,
                          mode=mode, requested_mode=p.mode, prog_id=prog_id,
                          prog_hash=program_hash(p.shape), words=p.shape.words,
                          class_cap=p.shape.class_cap, gen=gen,
                          default_action=p.default_action, policy_path=plan.policy_path,
                          policy_hash=plan.policy_hash, applied_at=time.time(), rules=rules,
                          sets=list(tags.values()))


def _split_slots(c: CompiledDirection, slots: list[int]) -> tuple[list[int], list[int]]:
    return slots[:len(c.rules)], slots[len(c.rules):]


def _apply_update(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Same program: write the inactive generation, flip, then clear the old one."""
    old, c = p.old, p.compiled
    direction = p.iface.ingress or DirectionIR(default="allow")
    tables = FwTables.from_pins(pin_dir(p.key), old.words, old.class_cap)
    try:
        active = tables.active_gen()
        gen = 1 - active
        cap = abi.slot_cap(old.words)
        slots, fresh = _allocate_slots(_rule_states(c, direction), old, cap, reuse=True)
        tags, to_write = _allocate_tags(c, plan.sets, old, reuse=True)
        for name in to_write:
            tables.write_set(tags[name].tag, plan.sets[name])
        tables.zero_slots(fresh)
        rule_slots, count_slots = _split_slots(c, slots)
        tables.write_generation(gen, c, rule_slots, count_slots,
                                {n: t.tag for n, t in tags.items()})
        tables.flip(gen)
        st = _state_for(plan, p, mode=old.mode, prog_id=old.prog_id, gen=gen, slots=slots,
                        tags=tags)
        save_state(st)
        time.sleep(GRACE_S)
        tables.clear_generation(active)
        live = {t.tag for t in tags.values()}
        for s in old.sets:
            if s.tag not in live:
                tables.delete_set(s.tag)
    finally:
        tables.close()
    log(f"{p.key}: generation {gen} active, {len(c.rules) + len(c.count_rules)} rules "
        f"(program id {old.prog_id} unchanged)")
    return st


def _pins_usable(old: InterfaceState | None) -> bool:
    return old is not None and (pin_dir(old.key) / "nb_fw_cnt").exists()


def _apply_new_program(plan: Plan, p: IfacePlan, log: Log) -> InterfaceState:
    """Load a program with fresh maps, fill generation 0, carry counters, replace, re-pin."""
    old, c, shape = p.old, p.compiled, p.shape
    direction = p.iface.ingress or DirectionIR(default="allow")
    loaded = load_program(FW_SOURCE, {"NB_WORDS": shape.words, "NB_CLASS_CAP": shape.class_cap},
                          {FW_PROG: "xdp"})
    try:
        tables = FwTables.from_loaded(loaded, shape.words, shape.class_cap)
        reuse = _pins_usable(old)
        slots, _ = _allocate_slots(_rule_states(c, direction), old if reuse else None,
                                   abi.slot_cap(shape.words), reuse=reuse)
        tags, _ = _allocate_tags(c, plan.sets, None, reuse=False)
        for name, t in tags.items():
            tables.write_set(t.tag, plan.sets[name])
        rule_slots, count_slots = _split_slots(c, slots)
        tables.write_generation(0, c, rule_slots, count_slots, {n: t.tag for n, t in tags.items()})
        tables.flip(0)
        if reuse:
            kept = {(r.name, r.digest) for r in old.rules}
            keep_slots = [s for (n, _, d, _), s in zip(_rule_states(c, direction), slots)
                          if (n, d) in kept]
            old_tables = FwTables.from_pins(pin_dir(old.key), old.words, old.class_cap)
            try:
                tables.copy_counters_from(old_tables, keep_slots)
            finally:
                old_tables.close()

        prog_fd = loaded.prog_fd(FW_PROG)
        prog_id = loaded.prog_id(FW_PROG)
        before = attach.xdp_state(p.ifname, netns=p.netns)
        mode = _attach(p, prog_fd, log)
        try:
            _repin(p.key, loaded, prog_fd)
            st = _state_for(plan, p, mode=mode, prog_id=prog_id, gen=0, slots=slots, tags=tags)
            save_state(st)
        except BaseException:
            _roll_back_attach(p, before, prog_id, mode)
            raise
    finally:
        loaded.close()
    why = ", ".join(p.reasons)
    log(f"{p.key}: attached {FW_PROG} (program id {prog_id}) in {mode} mode "
        f"[{why}]; {len(c.rules) + len(c.count_rules)} rules")
    return st


def _roll_back_attach(p: IfacePlan, before, prog_id: int, mode: str) -> None:
    """Put back what ran before a failed apply: the old program, or no program."""
    try:
        if before is None:
            attach.detach_xdp(p.ifname, mode, prog_id=prog_id, netns=p.netns)
            return
        old_fd = bpfsys.prog_get_fd_by_id(before.prog_id)
        new_fd = bpfsys.prog_get_fd_by_id(prog_id)
        try:
            attach.attach_xdp(p.ifname, old_fd, before.mode, replace_prog_fd=new_fd,
                              netns=p.netns)
        finally:
            old_fd.close()
            new_fd.close()
    except NetbpfError:
        pass  # the original error matters more; 'netbpf status' shows what is left


def _is_stray_netbpf(prog_id: int) -> bool:
    """A netbpf firewall program nobody recorded: left by an apply killed after attach."""
    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except NetbpfError:
        return False
    try:
        return bpfsys.prog_info(fd).name == FW_PROG
    finally:
        fd.close()


def _attach(p: IfacePlan, prog_fd: int, log: Log) -> str:
    cur = attach.xdp_state(p.ifname, netns=p.netns)
    old = p.old
    ours = cur is not None and old is not None and cur.prog_id == old.prog_id
    if cur is not None and not ours and _is_stray_netbpf(cur.prog_id):
        log(f"{p.key}: replacing netbpf program id {cur.prog_id} left by an interrupted apply")
        ours = True
    if cur is not None and not ours:
        raise NetbpfError(f"attach xdp to {p.ifname}: another XDP program (id {cur.prog_id}) "
                          f"is attached in {cur.mode} mode, not netbpf's; detach it first "
                          f"('ip link set dev {p.ifname} xdp off')")
    if ours and p.mode in ("auto", cur.mode):
        # one netlink call swaps the programs: no packet goes unfiltered
        old_fd = bpfsys.prog_get_fd_by_id(cur.prog_id)
        try:
            return attach.attach_xdp(p.ifname, prog_fd, cur.mode, replace_prog_fd=old_fd,
                                     netns=p.netns)
        finally:
            old_fd.close()
    if ours:
        # A mode change cannot be one call: the kernel keeps one program per mode.
        log(f"{p.key}: switching xdp mode {cur.mode} -> {p.mode} (brief detach)")
        attach.detach_xdp(p.ifname, cur.mode, netns=p.netns)
    mode = attach.attach_xdp(p.ifname, prog_fd, p.mode, netns=p.netns)
    if p.mode == "auto":
        log(f"{p.key}: xdp mode auto chose {mode}")
    return mode


def _repin(key: str, loaded, prog_fd: int) -> None:
    """Pin the new maps and program beside the old, then swap directories by rename."""
    final = pin_dir(key)
    staging, retired = staging_dirs(key)
    for d in (staging, retired):
        _remove_pins(d)
    retired.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    loaded.pin_maps(staging)
    bpfsys.obj_pin(prog_fd, staging / PROG_PIN)
    if final.exists():
        os.rename(final, retired)
    os.rename(staging, final)
    _remove_pins(retired)


def _remove_pins(d: Path) -> None:
    if not d.exists():
        return
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


# ---- detach ----

def detach_key(key: str, log: Log = print) -> bool:
    """Remove exactly what netbpf attached and pinned for key; leave anything else."""
    st = load_state(key)
    removed = False
    if st is not None:
        try:
            cur = attach.xdp_state(st.ifname, netns=st.netns)
        except NetbpfError:
            cur = None  # the interface is gone: its programs went with it
        if cur is not None and cur.prog_id == st.prog_id:
            attach.detach_xdp(st.ifname, cur.mode, netns=st.netns)
            removed = True
            log(f"{key}: detached {FW_PROG} (program id {st.prog_id}, {cur.mode} mode)")
        elif cur is not None:
            log(f"{key}: program id {cur.prog_id} is attached, not netbpf's "
                f"({st.prog_id}); left alone")
    d = pin_dir(key)
    for extra in (d, *staging_dirs(key)):
        if extra.exists():
            _remove_pins(extra)
            removed = True
    if st is not None:
        remove_state(key)
        removed = True
    return removed


def detach(ifname: str, netns: str | None, log: Log = print) -> None:
    key = iface_key(ifname, netns)
    with apply_lock(wait_message=log):
        if not detach_key(key, log):
            raise NetbpfError(f"{ifname}: netbpf manages nothing on it in {netns_label(netns)} "
                              "(see 'netbpf status')")
