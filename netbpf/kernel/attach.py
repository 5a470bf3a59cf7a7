"""Attach loaded programs to interfaces with pyroute2: XDP (generic/native/offload/auto) and
TC clsact (ingress/egress, direct action, our own prio/handle so other filters survive).

Not loading (loader.py) and not pins. Works in this thread's network namespace, or in the one
named by netns= (entered for the call only, see netns.py).

XDP flags: pyroute2 0.9's `xdp_fd=` shortcut sends IFLA_XDP_FD alone, but link('set') takes the
whole nest as xdp={'attrs': [...]}, so IFLA_XDP_FLAGS and IFLA_XDP_EXPECTED_FD go in the same
single RTM_SETLINK; bcc's attach_xdp is not needed.
Replacing: the kernel swaps programs in one step whenever XDP_FLAGS_UPDATE_IF_NOEXIST is absent
(no instant without a program). We add XDP_FLAGS_REPLACE + IFLA_XDP_EXPECTED_FD so the swap is
also a compare-and-swap: if someone changed the program meanwhile, EEXIST and nothing changes.
A fresh attach uses UPDATE_IF_NOEXIST so we never silently replace someone else's program.

Over 400 lines because XDP (every mode) and clsact/cls_bpf share one netlink handle, one
namespace switch and one error translation; a file each would repeat those.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from netbpf.errors import NetbpfError, NotSupported
from netbpf.kernel import bpfsys
from netbpf.kernel.bpfsys import FdLike, KernelError
from netbpf.kernel.netns import enter_netns, netns_label

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

XDP_MODES = ("generic", "native", "offload", "auto")
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE,
              "offload": XDP_FLAGS_HW_MODE}
# IFLA_XDP_ATTACHED values (XDP_ATTACHED_DRV/SKB/HW/MULTI) and the id attribute of each mode.
_ATTACHED = {1: "native", 2: "generic", 3: "offload"}
_ATTACHED_NAMES = {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}
_MODE_ID_ATTR = {"native": "IFLA_XDP_DRV_PROG_ID", "generic": "IFLA_XDP_SKB_PROG_ID",
                 "offload": "IFLA_XDP_HW_PROG_ID"}

# Drivers whose NICs can run XDP programs (loaded device-bound for that interface).
OFFLOAD_DRIVERS = frozenset({"nfp", "netdevsim"})

TC_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
# Our filter's prio and handle: 'nb' in ASCII. Not 49152 (0xc000): the kernel gives that prio,
# and the ones counting down from it, to filters added without one, so it would collide.
NB_TC_PRIO = 0x6E62
NB_TC_HANDLE = 0x6E62
ETH_P_ALL = 0x0003
# cls_bpf attributes pyroute2 0.9 does not decode (linux/pkt_cls.h).
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_ID = 11
TCA_BPF_FLAG_ACT_DIRECT = 1


class XdpState(NamedTuple):
    mode: str               # native | generic | offload
    prog_id: int


@dataclass(frozen=True)
class TcFilter:
    direction: str
    prio: int
    handle: int
    kind: str               # bpf, u32, ...
    protocol: int           # host order (ETH_P_ALL = 3)
    name: str = ""          # bpf only: the program's section/name as given on attach
    prog_id: int = 0        # bpf only
    direct_action: bool = False


# ---- shared plumbing ----

@contextmanager
def _iproute(netns: str | None) -> Iterator:
    from pyroute2 import IPRoute

    with enter_netns(netns):
        # Opened after entering: a netlink socket belongs to the namespace it was made in.
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()


def _ifindex(ipr, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetbpfError(f"no interface '{ifname}' in {netns_label(netns)}; "
                          f"see 'ip{' -n ' + netns if netns else ''} link'")
    return found[0]


def _netlink_errno(e: Exception) -> int | None:
    from pyroute2.netlink.exceptions import NetlinkError

    return e.code if isinstance(e, NetlinkError) else None


def _fail(what: str, err: int, hint: str = "") -> None:
    text = {errno.EBUSY: "device busy"}.get(err, bpfsys.strerror(err))
    raise KernelError(f"{what}: {text} [{bpfsys.errno_name(err)}]{hint}", err)


# ---- driver ----

def driver_name(ifname: str, netns: str | None = None) -> str:
    """The interface's driver as ethtool reports it (e.g. 'veth'), else its link kind.
    /sys/class/net is not used: sysfs shows the namespace it was mounted in, not ours."""
    with enter_netns(netns):
        name = _ethtool_driver(ifname)
        if name:
            return name
        with _iproute(None) as ipr:
            idx = _ifindex(ipr, ifname, netns)
            link = ipr.get_links(idx)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            return kind or "unknown"


def _ethtool_driver(ifname: str) -> str | None:
    SIOCETHTOOL, ETHTOOL_GDRVINFO = 0x8946, 0x00000003
    drvinfo = ctypes.create_string_buffer(struct.pack("I", ETHTOOL_GDRVINFO), 196)
    ifreq = struct.pack("16sP", ifname.encode()[:15], ctypes.addressof(drvinfo))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
    except OSError:
        return None
    return drvinfo.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


# ---- XDP ----

def xdp_state(ifname: str, netns: str | None = None) -> XdpState | None:
    """(mode, prog id) of the XDP program on ifname, or None."""
    with _iproute(netns) as ipr:
        return _xdp_state(ipr, _ifindex(ipr, ifname, netns))


def _xdp_state(ipr, index: int) -> XdpState | None:
    xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
    if not xdp:
        return None
    # pyroute2 decodes IFLA_XDP_ATTACHED to a name; accept the raw number as well.
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    code = _ATTACHED_NAMES.get(attached, attached)
    if not code:
        return None
    if code in _ATTACHED:
        mode = _ATTACHED[code]
        return XdpState(mode, xdp.get_attr(_MODE_ID_ATTR[mode]) or
                        xdp.get_attr("IFLA_XDP_PROG_ID") or 0)
    for mode in ("native", "generic", "offload"):     # XDP_ATTACHED_MULTI: native + offload
        pid = xdp.get_attr(_MODE_ID_ATTR[mode])
        if pid:
            return XdpState(mode, pid)
    return None


def _set_xdp(ipr, index: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=index, xdp={"attrs": attrs})


def attach_xdp(ifname: str, prog_fd: FdLike, mode: str = "auto",
               replace_prog_fd: FdLike | None = None, *, netns: str | None = None) -> str:
    """Attach an XDP program; returns the mode used (auto: native, else generic).

    With replace_prog_fd, swap it for prog_fd in one netlink call, only if it is the program
    attached (auto then means the mode it is attached in). Without, fail with EBUSY if any
    program is attached.
    """
    if mode not in XDP_MODES:
        raise NetbpfError(f"attach xdp to {ifname}: unknown mode '{mode}' "
                          f"(use {', '.join(XDP_MODES)})")
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        where = f"{ifname} (ifindex {index})"
        current = _xdp_state(ipr, index)
        if mode == "offload":
            _check_offload(ifname, netns)
        if replace_prog_fd is not None and mode == "auto":
            mode = current.mode if current else "native"
        if mode == "auto":
            try:
                return _attach_mode(ipr, index, where, prog_fd, "native", None, current)
            except KernelError as e:
                if e.errno not in (errno.EOPNOTSUPP, bpfsys.ENOTSUPP):
                    raise
            return _attach_mode(ipr, index, where, prog_fd, "generic", None, current)
        return _attach_mode(ipr, index, where, prog_fd, mode, replace_prog_fd, current)


def _attach_mode(ipr, index: int, where: str, prog_fd: FdLike, mode: str,
                 replace_prog_fd: FdLike | None, current: XdpState | None) -> str:
    flags = MODE_FLAGS[mode]
    if replace_prog_fd is None:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
        expected = None
    else:
        flags |= XDP_FLAGS_REPLACE
        expected = int(replace_prog_fd)
    try:
        _set_xdp(ipr, index, int(prog_fd), flags, expected)
    except Exception as e:
        err = _netlink_errno(e)
        if err is None:
            raise
        _fail(f"attach xdp to {where} in {mode} mode", err,
              _xdp_hint(err, mode, current, replace_prog_fd is not None))
    return mode


def _xdp_hint(err: int, mode: str, current: XdpState | None, replacing: bool) -> str:
    if err == errno.EBUSY:
        return "; another XDP program is attached — see 'netbpf status'"
    if err == errno.EEXIST and current and current.mode != mode:
        return (f"; a program (id {current.prog_id}) is attached in {current.mode} mode, "
                f"and one interface runs one mode at a time — detach it or use that mode")
    if err == errno.EEXIST and replacing:
        found = f"program id {current.prog_id}" if current else "no program"
        return (f"; expected to replace our program but found {found} — another apply may "
                f"have raced, see 'netbpf status'")
    if err in (errno.EOPNOTSUPP, bpfsys.ENOTSUPP) and mode == "native":
        return "; the driver has no native XDP: use mode generic or auto"
    if err == errno.EINVAL and mode == "offload":
        return "; offload needs a program loaded for this device (load_program(device=...))"
    return ""


def check_offload(ifname: str, *, netns: str | None = None) -> None:
    """Raise NotSupported unless ifname's driver can run offloaded XDP programs."""
    _check_offload(ifname, netns)


def _check_offload(ifname: str, netns: str | None) -> None:
    driver = driver_name(ifname, netns)
    if driver not in OFFLOAD_DRIVERS:
        raise NotSupported(f"offload xdp to {ifname}: driver '{driver}' cannot offload XDP "
                           f"programs; use mode native or generic")


def detach_xdp(ifname: str, mode: str | None = None, prog_id: int | None = None, *,
               netns: str | None = None) -> bool:
    """Remove the XDP program from ifname; returns False if none was attached.

    mode None/'auto' means the mode it is attached in (detaching needs the attach flags:
    a generic program survives a native-mode detach). With prog_id, detach only if that
    program is the one attached (compare-and-swap to nothing), else raise.
    """
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        where = f"{ifname} (ifindex {index})"
        current = _xdp_state(ipr, index)
        if current is None:
            return False
        if mode in (None, "auto"):
            mode = current.mode
        if mode not in MODE_FLAGS:
            raise NetbpfError(f"detach xdp from {where}: unknown mode '{mode}'")
        if mode != current.mode:
            return False
        if prog_id is not None and current.prog_id != prog_id:
            raise KernelError(f"detach xdp from {where}: program id {current.prog_id} is "
                              f"attached, not ours ({prog_id}); leaving it",
                              errno.EEXIST)
        expected = bpfsys.prog_get_fd_by_id(prog_id) if prog_id is not None else None
        flags = MODE_FLAGS[mode] | (XDP_FLAGS_REPLACE if expected is not None else 0)
        try:
            _set_xdp(ipr, index, -1, flags, int(expected) if expected is not None else None)
        except Exception as e:
            err = _netlink_errno(e)
            if err is None:
                raise
            _fail(f"detach xdp from {where} ({mode} mode)", err)
        finally:
            if expected is not None:
                expected.close()
        return True


# ---- TC clsact ----

def _parent(direction: str) -> int:
    try:
        return TC_PARENTS[direction]
    except KeyError:
        raise NetbpfError(f"tc direction must be ingress or egress, not '{direction}'") from None


def _has_clsact(ipr, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index))


def ensure_clsact(ifname: str, *, netns: str | None = None) -> bool:
    """Add a clsact qdisc unless there is one; returns True if we created it."""
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        if _has_clsact(ipr, index):
            return False
        try:
            ipr.tc("add", "clsact", index)
        except Exception as e:
            err = _netlink_errno(e)
            if err is None:
                raise
            if err == errno.EEXIST and _has_clsact(ipr, index):
                return False
            _fail(f"add clsact qdisc to {ifname} (ifindex {index})", err,
                  "; an 'ingress' qdisc may be in the way (tc qdisc show)"
                  if err == errno.EEXIST else "")
        return True


def attach_tc(ifname: str, direction: str, prog_fd: FdLike, name: str,
              prio: int = NB_TC_PRIO, handle: int = NB_TC_HANDLE, *,
              netns: str | None = None) -> None:
    """Attach (or atomically replace) our direct-action bpf filter at (prio, handle) on
    the clsact ingress or egress hook; a clsact qdisc is added if missing."""
    parent = _parent(direction)
    ensure_clsact(ifname, netns=netns)
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        try:
            # replace-filter = NLM_F_CREATE|NLM_F_REPLACE: one message, no gap when swapping.
            ipr.tc("replace-filter", "bpf", index, handle, fd=int(prog_fd), name=name,
                   parent=parent, direct_action=True, prio=prio, protocol=ETH_P_ALL)
        except Exception as e:
            err = _netlink_errno(e)
            if err is None:
                raise
            _fail(f"attach tc {direction} program {name} to {ifname} (ifindex {index})", err,
                  f"; prio {prio} holds another kind of filter" if err == errno.EINVAL else "")


def list_tc_filters(ifname: str, direction: str, *, netns: str | None = None) -> list[TcFilter]:
    """Every filter on the clsact hook (ours and others'); empty without clsact."""
    parent = _parent(direction)
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        if not _has_clsact(ipr, index):
            return []
        return _filters(ipr, index, direction, parent)


def _filters(ipr, index: int, direction: str, parent: int) -> list[TcFilter]:
    out = []
    for msg in ipr.get_filters(index=index, parent=parent):
        if msg["handle"] == 0:      # per-prio head entry, not a filter
            continue
        kind = msg.get_attr("TCA_KIND") or ""
        info = msg["info"]
        f = TcFilter(direction=direction, prio=info >> 16, handle=msg["handle"], kind=kind,
                     protocol=socket.ntohs(info & 0xFFFF))
        if kind == "bpf":
            opts = _bpf_options(msg.get_attr("TCA_OPTIONS"))
            f = TcFilter(direction, f.prio, f.handle, kind, f.protocol,
                         name=opts.get(TCA_BPF_NAME, b"").rstrip(b"\0").decode(errors="replace"),
                         prog_id=int.from_bytes(opts.get(TCA_BPF_ID, b"\0" * 4)[:4], "little"),
                         direct_action=bool(int.from_bytes(
                             opts.get(TCA_BPF_FLAGS, b"\0" * 4)[:4], "little")
                             & TCA_BPF_FLAG_ACT_DIRECT))
        out.append(f)
    return out


def _bpf_options(opts) -> dict[int, bytes]:
    """TCA_OPTIONS of a cls_bpf filter as {attr type: raw value}, from the message bytes,
    since pyroute2 0.9 leaves TCA_BPF_ID/TAG undecoded."""
    if opts is None or not hasattr(opts, "data"):
        return {}
    out = {}
    off, end = opts.offset + 4, opts.offset + opts.length
    while off + 4 <= end:
        length, typ = struct.unpack_from("HH", opts.data, off)
        if length < 4:
            break
        out[typ & 0x3FFF] = bytes(opts.data[off + 4:off + length])
        off += (length + 3) & ~3
    return out


def detach_tc(ifname: str, direction: str, prio: int = NB_TC_PRIO, handle: int = NB_TC_HANDLE,
              *, netns: str | None = None) -> bool:
    """Remove our bpf filter at (prio, handle); anything else stays. False if absent."""
    parent = _parent(direction)
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        if not _has_clsact(ipr, index):
            return False
        ours = [f for f in _filters(ipr, index, direction, parent)
                if f.kind == "bpf" and f.prio == prio and f.handle == handle]
        if not ours:
            return False
        try:
            ipr.tc("del-filter", "bpf", index, handle, parent=parent, prio=prio,
                   protocol=ours[0].protocol)
        except Exception as e:
            err = _netlink_errno(e)
            if err is None:
                raise
            if err == errno.ENOENT:
                return False
            _fail(f"detach tc {direction} filter prio {prio} handle {handle:#x} from "
                  f"{ifname} (ifindex {index})", err)
        return True


def remove_clsact_if_unused(ifname: str, *, netns: str | None = None) -> bool:
    """Delete the clsact qdisc when no filter is left on either hook; True if deleted."""
    with _iproute(netns) as ipr:
        index = _ifindex(ipr, ifname, netns)
        if not _has_clsact(ipr, index):
            return False
        for direction, parent in TC_PARENTS.items():
            if _filters(ipr, index, direction, parent):
                return False
        try:
            ipr.tc("del", "clsact", index)
        except Exception as e:
            err = _netlink_errno(e)
            if err is None:
                raise
            if err in (errno.ENOENT, errno.EINVAL):
                return False
            _fail(f"remove clsact qdisc from {ifname} (ifindex {index})", err)
        return True
