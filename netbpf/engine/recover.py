"""Finish or undo an apply that was killed: the journal says what it was making true, the
kernel says how far it got. Rolls forward when any part already runs the new policy (the
programs are attached, or the generation flipped), back when none does.

Called under the apply lock by apply and detach, before they plan. Not planning, not drift
reporting (netbpf/observe/drift.py).
"""
from __future__ import annotations

import time
from typing import Callable

from netbpf.engine.records import GRACE_S
from netbpf.errors import NetbpfError
from netbpf.fw.fwtables import FwTables
from netbpf.kernel import link
from netbpf.kernel.api import kernel
from netbpf.kernel.netns import interface_is
from netbpf.observe.drift import is_netbpf_program, journal_progress, netns_gone, tc_filter
from netbpf.store.progspec import PROG_PIN, PROGRAMS
from netbpf.store.state import (REPAIR_HASH, InterfaceState, Journal, list_journal_keys,
                                load_journal, load_state, pin_dir, remove_journal, rename_pins,
                                save_state, staging_dirs, unpin_tree)

Log = Callable[[str], None]


def recover_all(log: Log, keys) -> frozenset[str]:
    """Repair the interrupted applies of keys (the caller holds their locks); returns the keys
    that could not be repaired (each logged)."""
    failed = set()
    for key in sorted(set(keys) & set(list_journal_keys())):
        try:
            recover(key, log)
        except NetbpfError as e:
            log(f"{key}: cannot finish an interrupted apply: {e}")
            failed.add(key)
    return frozenset(failed)


def recover(key: str, log: Log) -> None:
    j = load_journal(key)
    if j is None:
        return
    old = load_state(key)
    when = time.strftime("%H:%M:%S", time.localtime(j.started_at))
    what = f"{key}: the apply of {j.state.policy_path} started {when} was interrupted"
    st = j.state
    if netns_gone(st.netns) or not interface_is(st.ifname, st.netns, st.ifindex):
        for d in staging_dirs(key):
            unpin_tree(d)
        remove_journal(key)
        log(f"{what}; its interface is gone, nothing to repair")
        return
    if j.kind == "sets":
        # a set updated in place: its state says 'partial', so this apply writes it again
        save_state(j.state)
        remove_journal(key)
        log(f"{what} while updating sets in place; the rules in force are unchanged")
        return
    progress = journal_progress(j)
    if not any(progress.values()):
        _roll_back(j, old)
        log(f"{what} before it changed anything the kernel runs; the previous policy stays")
        return
    if j.kind == "programs":
        _forward_programs(j, old, progress)
    else:
        _forward_update(j, old, progress)
    remove_journal(key)
    log(f"{what} after the new policy took effect on "
        f"{', '.join(d for d, v in progress.items() if v)}; finished it")


def _roll_back(j: Journal, old: InterfaceState | None) -> None:
    key = j.state.key
    if j.kind == "programs":
        for d in staging_dirs(key):
            unpin_tree(d)
    else:
        # sets the journal wrote under new tags: nobody refers to them
        for d, part in j.state.parts.items():
            was = {s.tag for s in old.parts[d].sets} if old and d in old.parts else set()
            stale = [s.tag for s in part.sets if s.tag not in was]
            if stale:
                tables = FwTables.from_pins(pin_dir(key) / d, part.words, part.class_cap)
                try:
                    for tag in stale:
                        tables.delete_set(tag)
                finally:
                    tables.close()
    remove_journal(key)


def _forward_programs(j: Journal, old: InterfaceState | None, progress: dict) -> None:
    st = j.state
    final = pin_dir(st.key)
    staging, retired = staging_dirs(st.key)
    src = staging if staging.is_dir() else final
    for d, part in st.parts.items():
        # the journal was written before attaching: how each part is attached is read back
        mine = [lk for lk in (staging / d / link.LINK_PIN, final / d / link.LINK_PIN)
                if (info := link.live_link(lk)) is not None and info.prog_id == part.prog_id]
        if progress[d]:
            part.attach = "link" if mine else "netlink"
            continue
        old_link = final / d / link.LINK_PIN
        was = old.parts.get(d) if old else None
        with kernel().obj_get(src / d / PROG_PIN) as fd:
            if was is not None and was.hook == part.hook and (info := link.live_link(old_link)):
                kernel().update_pinned(old_link, fd, info.prog_id,
                                   also_pin=staging / d / link.LINK_PIN if staging.is_dir()
                                   else None)
                part.attach = "link"
            elif part.hook == "xdp":
                part.mode = _replace_xdp(st, fd, old)
                part.attach = "netlink"
            else:
                kernel().ensure_clsact(st.ifname, netns=st.netns)
                kernel().attach_tc(st.ifname, d, fd, PROGRAMS[(d, "tc")][1], netns=st.netns)
                part.attach = "netlink"
    for d, part in (old.parts.items() if old else ()):
        new = st.parts.get(d)
        if new is not None and new.hook == part.hook:
            continue
        if part.attach == "link":
            kernel().detach_pinned(final / d / link.LINK_PIN)
        elif part.hook == "xdp":
            kernel().detach_xdp(st.ifname, None, prog_id=part.prog_id, netns=st.netns)
        elif (f := tc_filter(st, d)) is not None and f.prog_id == part.prog_id:
            kernel().detach_tc(st.ifname, d, netns=st.netns)
    if staging.is_dir():
        if final.is_dir():
            unpin_tree(retired)
            rename_pins(final, retired)
        rename_pins(staging, final)
    unpin_tree(retired)
    ing = st.parts.get("ingress")
    if ing is not None and ing.hook == "xdp":
        cur = kernel().xdp_state(st.ifname, netns=st.netns)
        if cur is not None:
            ing.mode = cur.mode
    save_state(st)


def _replace_xdp(st: InterfaceState, prog_fd, old: InterfaceState | None) -> str:
    cur = kernel().xdp_state(st.ifname, netns=st.netns)
    if cur is None:
        return kernel().attach_xdp(st.ifname, prog_fd, st.requested_mode, netns=st.netns)
    was = old.parts.get("ingress") if old else None
    if not ((was and cur.prog_id == was.prog_id) or is_netbpf_program(cur.prog_id)):
        raise NetbpfError(f"repair {st.key}: another XDP program (id {cur.prog_id}) is attached, "
                          "not netbpf's; detach it first")
    with kernel().prog_fd_by_id(cur.prog_id) as old_fd:
        return kernel().attach_xdp(st.ifname, prog_fd, cur.mode, replace_prog_fd=old_fd,
                                   netns=st.netns)


def _forward_update(j: Journal, old: InterfaceState | None, progress: dict) -> None:
    st = j.state
    opened = {d: FwTables.from_pins(pin_dir(st.key) / d, p.words, p.class_cap)
              for d, p in st.parts.items()}
    try:
        for d, part in st.parts.items():
            if not progress[d]:
                opened[d].flip(part.gen)
        time.sleep(GRACE_S)
        for d, part in st.parts.items():
            opened[d].clear_generation(1 - part.gen)
            live = {s.tag for s in part.sets}
            for s in (old.parts[d].sets if old and d in old.parts else ()):
                if s.tag not in live:
                    opened[d].delete_set(s.tag)
    finally:
        for t in opened.values():
            t.close()
    if j.reload:
        for part in st.parts.values():
            part.prog_hash = REPAIR_HASH
    save_state(st)
