"""Attach through bpf_link: XDP links (BPF_XDP) and TCX links (BPF_TCX_INGRESS/EGRESS), by
ctypes on libbpf's bpf_link_create/update/detach. A link pinned in bpffs keeps the program
attached after the CLI exits, and nobody can replace or remove it through netlink
(`ip link set dev X xdp off` gets EBUSY); swaps go through bpf_link_update, atomically.

Not netlink XDP or cls_bpf (attach.py, the fallback for kernels without these links) and not
the choice between the two (netbpf/engine/hooks.py). NETBPF_ATTACH=netlink forces the fallback.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from netbpf.errors import NetbpfError, NotSupported
from netbpf.kernel import bpfsys
from netbpf.kernel.bpfsys import Fd, FdLike, KernelError
from netbpf.kernel.netns import enter_netns, netns_label

# enum bpf_attach_type values (linux/bpf.h); Debian 12's libbpf predates the TCX names.
BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
ATTACH_TYPES = {"xdp": BPF_XDP, "ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}
# enum bpf_link_type
LINK_TYPES = {6: "xdp", 11: "tcx"}
BPF_F_REPLACE = 1 << 2
XDP_MODE_FLAGS = {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}
LINK_PIN = "link"
FORCE_ENV = "NETBPF_ATTACH"


class LinkUnsupported(NotSupported):
    """The kernel has no bpf_link for this hook: attach through netlink instead."""


class _CreateOpts(ctypes.Structure):
    # struct bpf_link_create_opts, up to the fields libbpf 1.1 checks; sz tells it where we end
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32),
                ("iter_info", ctypes.c_void_p), ("iter_info_len", ctypes.c_uint32),
                ("target_btf_id", ctypes.c_uint32)]


class _UpdateOpts(ctypes.Structure):
    # struct bpf_link_update_opts (libbpf 1.1)
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


class _LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union 8-aligned whose xdp and tcx
    # members both start with the ifindex (0 once the link is detached or its device gone)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("_rest", ctypes.c_uint8 * 40)]


class _QueryOpts(ctypes.Structure):
    # struct bpf_prog_query_opts (libbpf 1.1)
    _fields_ = [("sz", ctypes.c_size_t), ("query_flags", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_void_p),
                ("prog_cnt", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_void_p)]


@dataclass(frozen=True)
class LinkInfo:
    id: int
    kind: str               # xdp | tcx
    prog_id: int
    ifindex: int            # 0: detached (bpf_link_detach, or the device went away)


def forced_netlink() -> bool:
    """Tests and old-kernel users can ask for the netlink/cls_bpf path explicitly."""
    return os.environ.get(FORCE_ENV, "") == "netlink"


def _lib() -> ctypes.CDLL:
    lib = bpfsys.libbpf()
    if not getattr(lib, "_nb_links", False):
        c_int, vp = ctypes.c_int, ctypes.c_void_p
        for name, args in (("bpf_link_create", [c_int, c_int, ctypes.c_uint32, vp]),
                           ("bpf_prog_query_opts", [c_int, ctypes.c_uint32, vp]),
                           ("bpf_link_update", [c_int, c_int, vp]),
                           ("bpf_link_detach", [c_int])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, c_int
        lib._nb_links = True
    return lib


def _err(ret: int) -> int:
    return -ret if ret < 0 else (ctypes.get_errno() or errno.EIO)


def _ifindex(ifname: str, netns: str | None) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise NetbpfError(f"no interface '{ifname}' in {netns_label(netns)}; "
                          f"see 'ip{' -n ' + netns if netns else ''} link'") from None


def create_link(prog_fd: FdLike, ifname: str, hook: str, mode: str | None = None, *,
                netns: str | None = None) -> tuple[Fd, str]:
    """Attach prog_fd to ifname's hook ('xdp', or TCX 'ingress'/'egress') through a new link.

    Returns (link fd, XDP mode used or 'tcx'). XDP mode auto tries native, then generic.
    A TCX link is appended after the hook's other programs. Raises LinkUnsupported when the
    kernel has no such link (or NETBPF_ATTACH=netlink), KernelError otherwise.
    """
    if forced_netlink():
        raise LinkUnsupported(f"{FORCE_ENV}=netlink: bpf_link not used")
    if hook != "xdp":
        return _create(prog_fd, ifname, hook, 0, netns), "tcx"
    if mode in (None, "auto"):
        try:
            return _create(prog_fd, ifname, hook, XDP_MODE_FLAGS["native"], netns), "native"
        except KernelError as e:
            if e.errno not in (errno.EOPNOTSUPP, bpfsys.ENOTSUPP):
                raise
        mode = "generic"
    return _create(prog_fd, ifname, hook, XDP_MODE_FLAGS[mode], netns), mode


def _create(prog_fd: FdLike, ifname: str, hook: str, flags: int, netns: str | None) -> Fd:
    what = "xdp" if hook == "xdp" else f"tcx {hook}"
    with enter_netns(netns):     # the kernel resolves the ifindex in the caller's namespace
        index = _ifindex(ifname, netns)
        opts = _CreateOpts(sz=ctypes.sizeof(_CreateOpts), flags=flags)
        ret = _lib().bpf_link_create(int(prog_fd), index, ATTACH_TYPES[hook], ctypes.byref(opts))
    if ret >= 0:
        return Fd(ret, f"{what} link on {ifname}")
    err = _err(ret)
    where = f"attach {what} link to {ifname} (ifindex {index})"
    if err == errno.EINVAL and not flags & XDP_MODE_FLAGS["offload"]:
        raise LinkUnsupported(f"{where}: this kernel has no {what} bpf_link [EINVAL]")
    hint = ""
    if err == errno.EBUSY:
        hint = "; another XDP program or link holds the hook — see 'netbpf status'"
    bpfsys.raise_errno(where, err, hint)
    raise AssertionError("unreachable")


def update_link(link_fd: FdLike, new_prog_fd: FdLike, old_prog_fd: FdLike | None = None) -> None:
    """Swap the link's program in one step; with old_prog_fd, only if that one runs (EPERM)."""
    opts = _UpdateOpts(sz=ctypes.sizeof(_UpdateOpts))
    if old_prog_fd is not None:
        opts.flags, opts.old_prog_fd = BPF_F_REPLACE, int(old_prog_fd)
    ret = _lib().bpf_link_update(int(link_fd), int(new_prog_fd), ctypes.byref(opts))
    if ret < 0:
        err = _err(ret)
        bpfsys.raise_errno(f"update {bpfsys._label(link_fd)}", err,
                           "; another program runs on the link — see 'netbpf status'"
                           if err == errno.EPERM else "")


def detach_link(link_fd: FdLike) -> None:
    """Detach the link's program now, even while pins or other fds hold the link."""
    ret = _lib().bpf_link_detach(int(link_fd))
    if ret < 0 and _err(ret) not in (errno.ENOLINK, errno.ENOENT):
        bpfsys.raise_errno(f"detach {bpfsys._label(link_fd)}", _err(ret))


def link_info(link_fd: FdLike) -> LinkInfo:
    i = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(i))
    ret = bpfsys.libbpf().bpf_obj_get_info_by_fd(int(link_fd), ctypes.byref(i),
                                                 ctypes.byref(size))
    if ret < 0:
        bpfsys.raise_errno(f"read link info of {bpfsys._label(link_fd)}", _err(ret))
    return LinkInfo(i.id, LINK_TYPES.get(i.type, f"type {i.type}"), i.prog_id, i.ifindex)


def tcx_prog_ids(ifname: str, direction: str, *, netns: str | None = None) -> list[int]:
    """Ids of the programs on ifname's TCX hook, in the order they run (anyone's)."""
    ids = (ctypes.c_uint32 * 64)()
    with enter_netns(netns):
        index = _ifindex(ifname, netns)
        opts = _QueryOpts(sz=ctypes.sizeof(_QueryOpts), prog_ids=ctypes.addressof(ids),
                          prog_cnt=len(ids))
        ret = _lib().bpf_prog_query_opts(index, ATTACH_TYPES[direction], ctypes.byref(opts))
    if ret < 0:
        bpfsys.raise_errno(f"query tcx {direction} programs of {ifname}", _err(ret))
    return list(ids[:opts.prog_cnt])


def pinned_link_info(path: Path) -> LinkInfo | None:
    """The link pinned at path, or None if nothing is pinned there."""
    if not path.exists():
        return None
    with bpfsys.obj_get(path) as fd:
        return link_info(fd)


def live_link(path: Path) -> LinkInfo | None:
    """The link pinned at path if it still holds a hook (not detached, device not gone).
    Asks the kernel the engine talks to (netbpf/kernel/api.py)."""
    from netbpf.kernel.api import kernel
    try:
        info = kernel().pinned_link_info(path)
    except NetbpfError:
        return None
    return info if info is not None and info.ifindex else None


def detach_pinned(path: Path) -> LinkInfo | None:
    """Detach the link pinned at path (the pin stays until its tree is removed)."""
    if not path.exists():
        return None
    with bpfsys.obj_get(path) as fd:
        info = link_info(fd)
        detach_link(fd)
    return info


def update_pinned(path: Path, new_prog_fd: FdLike, old_prog_id: int | None,
                  also_pin: Path | None = None) -> None:
    """bpf_link_update on the link pinned at path (compare-and-swap against old_prog_id);
    also_pin pins the same link at a second path (a staging tree about to replace path's)."""
    with bpfsys.obj_get(path) as fd:
        if old_prog_id is not None:
            with bpfsys.prog_get_fd_by_id(old_prog_id) as old:
                update_link(fd, new_prog_fd, old)
        else:
            update_link(fd, new_prog_fd)
        if also_pin is not None:
            bpfsys.obj_pin(fd, also_pin)


__all__ = ["BPF_XDP", "BPF_TCX_INGRESS", "BPF_TCX_EGRESS", "LINK_PIN", "FORCE_ENV", "LinkInfo",
           "LinkUnsupported", "create_link", "update_link", "detach_link", "link_info",
           "pinned_link_info", "live_link", "detach_pinned", "tcx_prog_ids", "update_pinned",
           "forced_netlink"]
