"""Detach: remove exactly what netbpf attached and pinned for an interface, finishing or
undoing an interrupted apply first; anything another tool attached is left alone and named.
Not the read path's view of it (netbpf/observe/drift.py).
"""
from __future__ import annotations

from typing import Callable

from netbpf.engine.recover import recover
from netbpf.errors import NetbpfError
from netbpf.kernel import attach, link
from netbpf.kernel.api import kernel
from netbpf.kernel.netns import interface_is, netns_label
from netbpf.observe.drift import is_netbpf_program, netns_gone
from netbpf.store import snapshot
from netbpf.store.progspec import FW_PROG, PROG_PIN, PROGRAMS
from netbpf.store.state import (apply_lock, iface_key, load_journal, load_state, pin_dir,
                                prune_pin_roots, remove_journal, remove_lock, remove_state,
                                split_key, staging_dirs, unpin_tree)

Log = Callable[[str], None]


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
        if not interface_is(ifname, netns):
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
                with kernel().obj_get(pin) as fd:
                    ids.add(kernel().prog_info(fd).id)
            except NetbpfError:
                pass
    return ids


def _detach_programs(key: str, ifname: str, netns: str | None, log: Log) -> None:
    # Links first (pinned beside the maps, or in a staging tree a killed apply left): netlink
    # cannot remove what they hold.
    for root in (pin_dir(key), *staging_dirs(key)):
        for pin in sorted(root.glob(f"*/{link.LINK_PIN}")):
            try:
                info = kernel().detach_pinned(pin)
            except NetbpfError:
                continue
            if info is not None and info.ifindex:
                log(f"{key}: detached program id {info.prog_id} ({info.kind} link {info.id}, "
                    f"{pin.parent.name})")
    st = load_state(key) or getattr(load_journal(key), "state", None)
    ours = _recorded_ids(key)
    cur = kernel().xdp_state(ifname, netns=netns)
    if cur is not None:
        if cur.prog_id in ours or is_netbpf_program(cur.prog_id):
            kernel().detach_xdp(ifname, cur.mode, netns=netns)
            log(f"{key}: detached {FW_PROG} (program id {cur.prog_id}, {cur.mode} mode)")
        else:
            log(f"{key}: XDP program id {cur.prog_id} is not netbpf's; left alone")
    for d in ("ingress", "egress"):
        f = next((f for f in kernel().list_tc_filters(ifname, d, netns=netns)
                  if f.kind == "bpf" and f.prio == attach.NB_TC_PRIO
                  and f.handle == attach.NB_TC_HANDLE), None)
        if f is None:
            continue
        if f.prog_id in ours or is_netbpf_program(f.prog_id):
            kernel().detach_tc(ifname, d, netns=netns)
            log(f"{key}: detached {PROGRAMS[(d, 'tc')][1]} (program id {f.prog_id}, tc {d})")
        else:
            log(f"{key}: tc {d} filter holds program {f.prog_id}, not netbpf's; left alone")
    created = st.created_clsact if st else False
    if created and kernel().remove_clsact_if_unused(ifname, netns=netns):
        log(f"{key}: removed the clsact qdisc netbpf added")


def detach(ifname: str, netns: str | None, log: Log = print) -> None:
    key = iface_key(ifname, netns)
    with apply_lock([key], wait_message=log):
        if not detach_key(key, log):
            raise NetbpfError(f"{ifname}: netbpf manages nothing on it in {netns_label(netns)} "
                              "(see 'netbpf status')")
