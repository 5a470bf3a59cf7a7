"""Enter a named network namespace (like `ip -n NAME`) and come back: the network only.

Not `ip netns exec`: that also makes a mount namespace and remounts /sys, so /sys/fs/bpf there
is not bpffs and pins vanish. Here only CLONE_NEWNET changes; pins stay in the root bpffs.
setns(2) moves the calling thread only: other threads keep their namespace, so open netlink
sockets (pyroute2 IPRoute) and ioctl sockets after entering, on the same thread.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from netbpf.errors import NetbpfError
from netbpf.kernel.bpfsys import raise_errno

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int, what: str) -> None:
    # os.setns arrived in Python 3.12; this package supports 3.11.
    if hasattr(os, "setns"):
        try:
            os.setns(fd, CLONE_NEWNET)
        except OSError as e:
            raise_errno(what, e.errno or errno.EINVAL)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise_errno(what, ctypes.get_errno())


def netns_path(name: str) -> str:
    """A name like `ip netns add` makes lives in /run/netns; a name with a slash is a path."""
    return name if "/" in name else os.path.join(NETNS_RUN_DIR, name)


def current_netns() -> tuple[int, int]:
    """(st_dev, st_ino) of this thread's network namespace, to compare namespaces."""
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def netns_name() -> str | None:
    """The /run/netns name of this thread's network namespace; None for the root namespace
    (that of PID 1) or an unnamed one."""
    here = current_netns()
    try:
        root = os.stat("/proc/1/ns/net")
        if (root.st_dev, root.st_ino) == here:
            return None
    except OSError:
        pass
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(NETNS_RUN_DIR, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == here:
            return name
    return None


def netns_label(name: str | None = None) -> str:
    """How messages name a namespace: 'namespace NAME' or 'the root namespace'."""
    name = name or netns_name()
    return f"namespace {name}" if name else "the root namespace"


@contextmanager
def enter_netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace `name` (a name under /run/netns or a path);
    None or "" means stay where we are. Restores this thread's namespace on exit."""
    if not name:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise_errno(f"enter network namespace {name} ({path})", e.errno or errno.ENOENT,
                    "; see 'ip netns list'" if e.errno == errno.ENOENT else "")
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target, f"enter network namespace {name}")
        try:
            yield
        finally:
            _setns(home, "return to the original network namespace")
    finally:
        os.close(target)
        os.close(home)


def ifindex(ifname: str, netns: str | None = None) -> int | None:
    """The interface's index in namespace netns, None if it has no such interface (a missing
    namespace raises, naming it)."""
    with enter_netns(netns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None


def interface_is(ifname: str, netns: str | None, index: int | None = None) -> bool:
    """The interface exists (with this index, if one is given: not re-created since). Asks
    the kernel the engine talks to (netbpf/kernel/api.py)."""
    from netbpf.kernel.api import kernel
    try:
        now = kernel().ifindex(ifname, netns)
    except NetbpfError:
        return False
    return now is not None and (index is None or now == index)
