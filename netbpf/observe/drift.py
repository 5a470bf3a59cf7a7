"""What the kernel runs for an interface netbpf manages, compared with what netbpf recorded (drift).

Read-only: state files, pins, netlink. Used by status, stats, the exporter and by the apply
engine before it plans. Repairs nothing (netbpf/engine/recover.py and a re-apply do).
"""
from __future__ import annotations

import time

from netbpf import abi
from netbpf.errors import NetbpfError
from netbpf.kernel import link
from netbpf.kernel.api import kernel
from netbpf.store.progspec import PROG_PIN, PROGRAM_NAMES
from netbpf.store.state import InterfaceState, Journal, PartState, load_journal, pin_dir


def netns_gone(netns: str | None) -> bool:
    return bool(netns) and not kernel().netns_exists(netns)


def tc_filter(st: InterfaceState, direction: str):
    """netbpf's filter (our prio/handle) on the interface's clsact hook, or None."""
    from netbpf.kernel import attach     # netlink: not for an interface that runs links only
    for f in kernel().list_tc_filters(st.ifname, direction, netns=st.netns):
        if f.kind == "bpf" and f.prio == attach.NB_TC_PRIO and f.handle == attach.NB_TC_HANDLE:
            return f
    return None


def is_netbpf_program(prog_id: int) -> bool:
    """A program is netbpf's by what it is (its name), whatever id a state file recorded."""
    try:
        fd = kernel().prog_fd_by_id(prog_id)
    except NetbpfError:
        return False
    try:
        return kernel().prog_info(fd).name in PROGRAM_NAMES
    finally:
        fd.close()


def attached_prog_id(st: InterfaceState, direction: str, part: PartState) -> int | None:
    """The id of the program on the hook this part uses (None: nothing there)."""
    if part.hook == "xdp":
        cur = kernel().xdp_state(st.ifname, netns=st.netns)
        return cur.prog_id if cur else None
    f = tc_filter(st, direction)
    if f is not None:
        return f.prog_id
    # a TCX link: netbpf's program is the one the part names, if the hook runs it
    ids = kernel().tcx_prog_ids(st.ifname, direction, netns=st.netns)
    return part.prog_id if part.prog_id in ids else (ids[-1] if ids else None)


def active_gen(key: str, direction: str) -> int | None:
    try:
        with kernel().obj_get(pin_dir(key) / direction / abi.NB_MAP_FW_GEN) as fd:
            raw = kernel().map_lookup(fd, abi.U32.pack(0), abi.U32.size)
    except NetbpfError:
        return None
    return abi.U32.unpack(raw)[0] & 1 if raw is not None else 0


def journal_progress(j: Journal) -> dict[str, bool]:
    """Per part of an interrupted apply: has the kernel switched to it (program attached, or
    generation flipped)?"""
    st = j.state
    done = {}
    for d, part in st.parts.items():
        try:
            if j.kind == "programs":
                done[d] = attached_prog_id(st, d, part) == part.prog_id
            else:
                done[d] = active_gen(st.key, d) == part.gen
        except NetbpfError:
            done[d] = False
    return done


def interrupted(j: Journal) -> str:
    """How status names an interrupted apply: what it applied, when, what is in force."""
    progress = journal_progress(j)
    when = time.strftime("%H:%M:%S", time.localtime(j.started_at))
    what = "a program change" if j.kind == "programs" else "a rule update"
    if j.kind == "sets":
        what = "a set update in place"
        force = "the rules in force are unchanged, some set entries are old and some new"
    elif all(progress.values()):
        force = "its new policy is in force"
    elif any(progress.values()):
        force = ("in force: the new policy on " +
                 ", ".join(d for d, v in progress.items() if v) + ", the previous on " +
                 ", ".join(d for d, v in progress.items() if not v))
    else:
        force = "the previous policy is still in force"
    return (f"an apply of {j.state.policy_path} ({what}, started {when}, pid {j.pid}) was "
            f"interrupted; {force}; the next apply or detach repairs it")


def drift(st: InterfaceState) -> str | None:
    """Why the interface no longer runs what the state says, or None if it does."""
    if netns_gone(st.netns):
        return f"namespace gone ({st.netns} was deleted; 'netbpf -n {st.netns} detach " \
               f"{st.ifname}' forgets it)"
    j = load_journal(st.key)
    if j is not None:
        return interrupted(j)
    for d in st.parts:
        if not (pin_dir(st.key) / d / PROG_PIN).exists():
            return "pins are missing"
    if _links_intact(st):
        return None
    try:
        cur = kernel().xdp_state(st.ifname, netns=st.netns)
        ifindex = kernel().ifindex(st.ifname, st.netns)
    except NetbpfError:
        return "the interface is gone"
    if ifindex is None:
        return "the interface is gone"
    if ifindex != st.ifindex:
        return f"the interface was re-created (ifindex {st.ifindex} -> {ifindex})"
    for d, part in st.parts.items():
        gen = active_gen(st.key, d)
        if gen is None:
            return "pins are missing"
        if gen != part.gen:
            return f"the {d} rules are half-applied (an apply was interrupted)"
    for d, part in st.parts.items():
        if part.attach == "link":
            why = _link_drift(st, d, part)
            if why:
                return why
            continue
        if part.hook == "xdp":
            if cur is None:
                return "the XDP program was detached by someone else"
            if cur.prog_id != part.prog_id:
                return _replaced(f"XDP program (id {cur.prog_id})", cur.prog_id)
            continue
        f = tc_filter(st, d)
        if f is None:
            return f"the TC {d} filter was removed by someone else"
        if f.prog_id != part.prog_id:
            return _replaced(f"program (id {f.prog_id}) on our TC {d} filter", f.prog_id)
    return None


def _links_intact(st: InterfaceState) -> bool:
    """Every part runs through its pinned bpf_link, each still on the recorded interface with
    the recorded program, and each generation is the recorded one: nothing drifted, known
    from bpf() calls alone (no netlink, no namespace switch). A link lives as long as its
    device: a deleted or re-created interface leaves it detached (ifindex 0). Anything else
    goes through drift()'s full checks, which name it."""
    for d, part in st.parts.items():
        if part.attach != "link" or active_gen(st.key, d) != part.gen:
            return False
        try:
            info = kernel().pinned_link_info(pin_dir(st.key) / d / link.LINK_PIN)
        except NetbpfError:
            return False
        if info is None or info.ifindex != st.ifindex or info.prog_id != part.prog_id:
            return False
    try:        # the name still means that device (not moved to another namespace)
        return bool(st.parts) and kernel().ifindex(st.ifname, st.netns) == st.ifindex
    except NetbpfError:
        return False


def _link_drift(st: InterfaceState, d: str, part: PartState) -> str | None:
    try:
        info = kernel().pinned_link_info(pin_dir(st.key) / d / link.LINK_PIN)
    except NetbpfError:
        info = None
    if info is None:
        return "pins are missing"
    if info.ifindex == 0:
        return f"the {d} link was detached by someone else"
    if info.prog_id != part.prog_id:
        return _replaced(f"program (id {info.prog_id}) on our {d} link", info.prog_id)
    return None


def _replaced(what: str, prog_id: int) -> str:
    if is_netbpf_program(prog_id):
        return f"a netbpf {what} the state does not record runs (left by an interrupted " \
               "apply); re-apply to repair"
    return f"another {what} replaced ours"
