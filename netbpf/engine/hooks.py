"""Put a part's program on its hook, replacing netbpf's running one in one kernel call (a
bpf_link update, or netlink's replace), and put the old ones back when an apply fails.
Everything goes through netbpf/kernel/api.py. Not loading (programs.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from netbpf.engine.plan import IfacePlan
from netbpf.errors import NetbpfError
from netbpf.kernel import attach, link
from netbpf.kernel.api import kernel
from netbpf.observe.drift import is_netbpf_program, tc_filter
from netbpf.store.state import pin_dir

Log = Callable[[str], None]


def clsact_only_ours(p: IfacePlan) -> bool:
    """No state to say who added the clsact qdisc (first apply, or the state file was lost):
    it is ours when nothing but netbpf's filters hang on it."""
    try:
        filters = [f for d in ("ingress", "egress")
                   for f in kernel().list_tc_filters(p.ifname, d, netns=p.netns)]
    except NetbpfError:
        return False
    return bool(filters) and all(f.prio == attach.NB_TC_PRIO and f.handle == attach.NB_TC_HANDLE
                                 for f in filters)


def roll_back(p: IfacePlan, attached: list[str], before_xdp, before_tc: dict,
              loaded, hows: dict, staging: Path) -> None:
    """Put back what ran before a failed apply: the old programs, or none."""
    for d in attached:
        pp = p.parts[d]
        try:
            new_id = loaded[d].prog_id(pp.func)
            how, before_id = hows.get(d, ("netlink", 0))
            if how == "link-new":
                kernel().detach_pinned(staging / d / link.LINK_PIN)
            elif how == "link-update":
                with kernel().prog_fd_by_id(before_id) as old_fd:
                    kernel().update_pinned(pin_dir(p.key) / d / link.LINK_PIN, old_fd, new_id)
            elif pp.hook == "xdp":
                if before_xdp is None:
                    kernel().detach_xdp(p.ifname, None, prog_id=new_id, netns=p.netns)
                    continue
                with kernel().prog_fd_by_id(before_xdp.prog_id) as old_fd, \
                        kernel().prog_fd_by_id(new_id) as new_fd:
                    kernel().attach_xdp(p.ifname, old_fd, before_xdp.mode,
                                        replace_prog_fd=new_fd, netns=p.netns)
            elif before_tc.get(d) is None:
                kernel().detach_tc(p.ifname, d, netns=p.netns)
            else:
                with kernel().prog_fd_by_id(before_tc[d].prog_id) as old_fd:
                    kernel().attach_tc(p.ifname, d, old_fd, before_tc[d].name or pp.func,
                                       netns=p.netns)
        except NetbpfError:
            pass  # the original error matters more; 'netbpf status' shows what is left


def our_link(p: IfacePlan, d: str, hook: str) -> link.LinkInfo | None:
    """netbpf's live link for direction d: the state says so, or (state lost) one is pinned
    where netbpf pins it."""
    if p.stale:
        return None
    old = p.old.parts.get(d) if p.old else None
    if old is not None and (old.hook != hook or old.attach != "link"):
        return None
    return link.live_link(pin_dir(p.key) / d / link.LINK_PIN)


def swap_xdp(p: IfacePlan, prog_fd: int, log: Log, pin: Path, hows: dict) -> str:
    """Attach or swap the XDP program; returns the mode. hows["ingress"] = (how, program id
    before), set before the call that may take effect (roll_back reads it even when that
    call fails): how is link-update or link-new (a bpf_link pinned at pin) or netlink. An
    interface keeps the way it is attached: moving from netlink to a link is not one step."""
    old = p.old.parts.get("ingress") if p.old and not p.stale else None
    old_pin = pin_dir(p.key) / "ingress" / link.LINK_PIN
    ours_linked = our_link(p, "ingress", "xdp")
    if ours_linked is not None:
        was = old.mode if old else kernel().xdp_state(p.ifname, netns=p.netns).mode
        if p.mode in ("auto", was):
            hows["ingress"] = ("link-update", ours_linked.prog_id)
            kernel().update_pinned(old_pin, prog_fd, ours_linked.prog_id, also_pin=pin)
            return was
        log(f"{p.key}: switching xdp mode {was} -> {p.mode} (brief detach)")
        kernel().detach_pinned(old_pin)
    cur = kernel().xdp_state(p.ifname, netns=p.netns)
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
        hows["ingress"] = ("netlink", cur.prog_id)
        with kernel().prog_fd_by_id(cur.prog_id) as old_fd:
            return kernel().attach_xdp(p.ifname, prog_fd, cur.mode, replace_prog_fd=old_fd,
                                       netns=p.netns)
    if ours:
        # A mode change cannot be one call: the kernel keeps one program per mode.
        log(f"{p.key}: switching xdp mode {cur.mode} -> {p.mode} (brief detach)")
        kernel().detach_xdp(p.ifname, cur.mode, netns=p.netns)
    try:
        hows["ingress"] = ("link-new", 0)
        fd, mode = kernel().create_link(prog_fd, p.ifname, "xdp", p.mode, netns=p.netns)
        with fd:        # a link neither pinned nor open is released: no half state
            kernel().obj_pin(fd, pin)
    except link.LinkUnsupported as e:
        log(f"{p.key}: {e}; attaching through netlink")
        hows["ingress"] = ("netlink", 0)
        mode = kernel().attach_xdp(p.ifname, prog_fd, p.mode, netns=p.netns)
    if p.mode == "auto":
        log(f"{p.key}: xdp mode auto chose {mode}")
    return mode


def swap_tc(p: IfacePlan, d: str, prog_fd: int, name: str, pin: Path, log: Log,
            hows: dict) -> bool:
    """Attach or swap the TC program of direction d: a TCX link where the kernel has them
    (appended after other TCX programs), else our cls_bpf filter on clsact. Sets hows[d] as
    swap_xdp does; returns whether a clsact qdisc was added."""
    old = p.old.parts.get(d) if p.old and not p.stale else None
    old_pin = pin_dir(p.key) / d / link.LINK_PIN
    ours_linked = our_link(p, d, "tc")
    if ours_linked is not None:
        hows[d] = ("link-update", ours_linked.prog_id)
        kernel().update_pinned(old_pin, prog_fd, ours_linked.prog_id, also_pin=pin)
        return False
    keep_filter = old is not None and old.hook == "tc" and old.attach == "netlink" and \
        tc_filter(p.old, d) is not None
    if not keep_filter:
        try:
            hows[d] = ("link-new", 0)
            fd, _ = kernel().create_link(prog_fd, p.ifname, d, netns=p.netns)
            with fd:
                kernel().obj_pin(fd, pin)
            return False
        except link.LinkUnsupported as e:
            log(f"{p.key}: {e}; attaching through clsact")
    hows[d] = ("netlink", 0)
    created = kernel().ensure_clsact(p.ifname, netns=p.netns)
    kernel().attach_tc(p.ifname, d, prog_fd, name, netns=p.netns)
    return created
