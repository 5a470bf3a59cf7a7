"""The kernel as the apply engine sees it: one small protocol (load a program, pin and open
objects, attach, replace and detach XDP and TC through a link or netlink, ask what is
attached, name an interface's ifindex in a namespace) and the real implementation.

The engine (netbpf/engine/) and drift (netbpf/observe/drift.py) call kernel(), never bcc,
pyroute2 or bpfsys directly, so tests/unit/fakekernel.py can stand in for the kernel. Map
contents are written by the table codecs (netbpf/fw/fwtables.py, netbpf/lb/lbtables.py)
through bpfsys' map calls; a fake serves those too. Not the implementation of any call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from netbpf.kernel.bpfsys import FdLike


class Kernel(Protocol):
    # ---- programs and pinned objects ----
    def load_program(self, source: Path, defines: dict, functions: dict,
                     device: str | None = None, netns: str | None = None,
                     stored: bool = False): ...
    def obj_get(self, path: Path): ...
    def obj_pin(self, fd: FdLike, path: Path) -> None: ...
    def prog_fd_by_id(self, prog_id: int): ...
    def prog_info(self, fd: FdLike): ...
    def map_lookup(self, fd: FdLike, key: bytes, value_size: int) -> bytes | None: ...
    def map_update(self, fd: FdLike, key: bytes, value: bytes) -> None: ...

    # ---- XDP and TC through netlink ----
    def xdp_state(self, ifname: str, netns: str | None = None): ...
    def attach_xdp(self, ifname: str, prog_fd: FdLike, mode: str = "auto",
                   replace_prog_fd: FdLike | None = None, netns: str | None = None) -> str: ...
    def detach_xdp(self, ifname: str, mode: str | None = None, prog_id: int | None = None,
                   netns: str | None = None) -> bool: ...
    def check_offload(self, ifname: str, netns: str | None = None) -> None: ...
    def list_tc_filters(self, ifname: str, direction: str, netns: str | None = None) -> list: ...
    def ensure_clsact(self, ifname: str, netns: str | None = None) -> bool: ...
    def attach_tc(self, ifname: str, direction: str, prog_fd: FdLike, name: str,
                  netns: str | None = None) -> None: ...
    def detach_tc(self, ifname: str, direction: str, netns: str | None = None) -> bool: ...
    def remove_clsact_if_unused(self, ifname: str, netns: str | None = None) -> bool: ...

    # ---- bpf_links (XDP, TCX), pinned beside the maps ----
    def create_link(self, prog_fd: FdLike, ifname: str, hook: str, mode: str | None = None,
                    netns: str | None = None): ...
    def update_pinned(self, path: Path, new_prog_fd: FdLike, old_prog_id: int | None,
                      also_pin: Path | None = None) -> None: ...
    def detach_pinned(self, path: Path): ...
    def pinned_link_info(self, path: Path): ...
    def tcx_prog_ids(self, ifname: str, direction: str, netns: str | None = None) -> list: ...

    # ---- interfaces and namespaces ----
    def ifindex(self, ifname: str, netns: str | None = None) -> int | None:
        """None: no such interface; NetbpfError: no such namespace."""
    def netns_exists(self, netns: str) -> bool: ...
    def forwarding(self, ifname: str, family: int, netns: str | None = None) -> bool | None: ...
    def vip_problem(self, ifname: str, vip: str, netns: str | None = None) -> str | None: ...


class RealKernel:
    """bcc (loading only), libbpf through ctypes, pyroute2: imported on first use."""

    def load_program(self, source, defines, functions, device=None, netns=None, stored=False):
        from netbpf.kernel.loader import load_program
        from netbpf.kernel.netns import enter_netns
        if device is None:
            return load_program(source, defines, functions, stored=stored)
        with enter_netns(netns):     # bcc resolves the device name in this namespace
            return load_program(source, defines, functions, device=device, stored=stored)

    def obj_get(self, path):
        from netbpf.kernel import bpfsys
        return bpfsys.obj_get(path)

    def obj_pin(self, fd, path):
        from netbpf.kernel import bpfsys
        bpfsys.obj_pin(fd, path)

    def prog_fd_by_id(self, prog_id):
        from netbpf.kernel import bpfsys
        return bpfsys.prog_get_fd_by_id(prog_id)

    def prog_info(self, fd):
        from netbpf.kernel import bpfsys
        return bpfsys.prog_info(fd)

    def map_lookup(self, fd, key, value_size):
        from netbpf.kernel import bpfsys
        return bpfsys.map_lookup(fd, key, value_size)

    def map_update(self, fd, key, value):
        from netbpf.kernel import bpfsys
        bpfsys.map_update(fd, key, value)

    def xdp_state(self, ifname, netns=None):
        from netbpf.kernel import attach
        return attach.xdp_state(ifname, netns=netns)

    def attach_xdp(self, ifname, prog_fd, mode="auto", replace_prog_fd=None, netns=None):
        from netbpf.kernel import attach
        return attach.attach_xdp(ifname, prog_fd, mode, replace_prog_fd=replace_prog_fd,
                                 netns=netns)

    def detach_xdp(self, ifname, mode=None, prog_id=None, netns=None):
        from netbpf.kernel import attach
        return attach.detach_xdp(ifname, mode, prog_id=prog_id, netns=netns)

    def check_offload(self, ifname, netns=None):
        from netbpf.kernel import attach
        attach.check_offload(ifname, netns=netns)

    def list_tc_filters(self, ifname, direction, netns=None):
        from netbpf.kernel import attach
        return attach.list_tc_filters(ifname, direction, netns=netns)

    def ensure_clsact(self, ifname, netns=None):
        from netbpf.kernel import attach
        return attach.ensure_clsact(ifname, netns=netns)

    def attach_tc(self, ifname, direction, prog_fd, name, netns=None):
        from netbpf.kernel import attach
        attach.attach_tc(ifname, direction, prog_fd, name, netns=netns)

    def detach_tc(self, ifname, direction, netns=None):
        from netbpf.kernel import attach
        return attach.detach_tc(ifname, direction, netns=netns)

    def remove_clsact_if_unused(self, ifname, netns=None):
        from netbpf.kernel import attach
        return attach.remove_clsact_if_unused(ifname, netns=netns)

    def create_link(self, prog_fd, ifname, hook, mode=None, netns=None):
        from netbpf.kernel import link
        return link.create_link(prog_fd, ifname, hook, mode, netns=netns)

    def update_pinned(self, path, new_prog_fd, old_prog_id, also_pin=None):
        from netbpf.kernel import link
        link.update_pinned(path, new_prog_fd, old_prog_id, also_pin=also_pin)

    def detach_pinned(self, path):
        from netbpf.kernel import link
        return link.detach_pinned(path)

    def pinned_link_info(self, path):
        from netbpf.kernel import link
        return link.pinned_link_info(path)

    def tcx_prog_ids(self, ifname, direction, netns=None):
        from netbpf.kernel import link
        return link.tcx_prog_ids(ifname, direction, netns=netns)

    def ifindex(self, ifname, netns=None):
        from netbpf.kernel.netns import ifindex
        return ifindex(ifname, netns)

    def netns_exists(self, netns):
        from netbpf.kernel.netns import netns_path
        return os.path.exists(netns_path(netns))

    def forwarding(self, ifname, family, netns=None):
        from netbpf.kernel.netns import enter_netns
        conf = "ipv4" if family == 4 else "ipv6"
        with enter_netns(netns):
            try:
                return Path(f"/proc/sys/net/{conf}/conf/{ifname}/forwarding").read_text() \
                    .strip() == "1"
            except OSError:
                return None

    def vip_problem(self, ifname, vip, netns=None):
        from netbpf.kernel.reach import vip_problem
        return vip_problem(ifname, vip, netns)


# The kernel the engine talks to; unit tests put a fake here (tests/unit/engine_world.py).
_current: Kernel = RealKernel()


def kernel() -> Kernel:
    return _current
