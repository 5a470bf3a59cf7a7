"""Network-namespace primitives for the lab: iproute2 commands, and running Python inside a netns.

Not topology-aware (that is lab.py) and not a general container tool: only the NETWORK namespace
is entered, so the root bpffs and its pins stay visible (see DESIGN.md on 'ip netns exec').
"""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

from netbpf import procs
from netbpf.errors import NetbpfError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

# Write ends of reaper pipes (lab.py): forked children must close them, or a child outliving its
# parent would keep the reaper from noticing that the parent died.
INHERITED_FDS_TO_CLOSE: set[int] = set()


class LabError(NetbpfError):
    """A lab operation failed at run time (exit 1)."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A command run in the lab exited non-zero; catchable as CalledProcessError too."""

    def __init__(self, cmd: list[str], returncode: int, stdout: Any = None, stderr: Any = None, where: str = ""):
        subprocess.CalledProcessError.__init__(self, returncode, cmd, stdout, stderr)
        self.where = where

    def __str__(self) -> str:
        err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else (self.stderr or "")
        where = f" in {self.where}" if self.where else ""
        msg = f"'{' '.join(map(str, self.cmd))}'{where} exited {self.returncode}"
        return f"{msg}: {err.strip()}" if err.strip() else msg


class RemoteTraceback(Exception):
    """The traceback text of an exception raised inside a namespace; chained as __cause__."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n--- traceback inside the namespace ---\n{self.tb}"


# -- iproute2 ------------------------------------------------------------------------------------

def ip(*args: str, netns: str | None = None, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)
    except FileNotFoundError:
        raise LabError("iproute2 'ip' is not installed: run 'make setup'") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"'{' '.join(cmd)}' did not finish within 30 s") from None
    if check and cp.returncode != 0:
        raise LabCommandError(cmd, cp.returncode, cp.stdout, cp.stderr)
    return cp


def ip_batch(netns: str, lines: list[list[str]]) -> None:
    """Run many ip commands in one process; on failure name the exact command that failed."""
    if not lines:
        return
    text = "".join(" ".join(a) + "\n" for a in lines)
    cp = ip("-batch", "-", netns=netns, check=False, input=text)
    if cp.returncode != 0:
        failed = next((lines[int(x.rsplit(":", 1)[1]) - 1] for x in cp.stderr.splitlines()
                       if x.startswith("Command failed -:")), None)
        reason = "\n".join(x for x in cp.stderr.splitlines() if not x.startswith("Command failed")).strip()
        cmd = ["ip", "-n", netns] + (failed or ["-batch", "-"])
        raise LabCommandError(cmd, cp.returncode, cp.stdout, reason)


def list_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if not n.startswith("."))
    except FileNotFoundError:
        return []


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is NAME (what 'ip netns pids' does, without a fork)."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def delete_netns(name: str, kill_pids: bool = True) -> str | None:
    """Delete namespace NAME; returns an error string instead of raising (teardown must go on).

    A process still inside keeps the namespace and its veths alive after 'ip netns del', so the
    lab first ends processes living in its own namespaces (they were started in the lab)."""
    if kill_pids:
        pids = netns_pids(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 1.0
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if pid_alive(p)]
                if pids:
                    time.sleep(0.02)
            if not pids:
                break
    cp = ip("netns", "del", name, check=False)
    if cp.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
        return f"ip netns del {name}: {cp.stderr.strip()}"
    # What netbpf pinned for the namespace's interfaces (they are gone now) goes with it.
    from netbpf.errors import NetbpfError
    from netbpf.store.state import forget_netns
    from netbpf.engine.persist import forget_netns as forget_saved
    try:
        forget_netns(name)
        forget_saved(name)   # and 'netbpf restore' has nothing to bring back there
    except (NetbpfError, OSError) as e:  # the namespace is gone; say what stays, go on
        print(f"netbpf lab: {name} deleted, but its netbpf pins stay: {e}; "
              "'netbpf status' lists them", file=sys.stderr)
    return None


def pid_alive(pid: int | None) -> bool:
    return procs.pid_alive(pid)


# -- entering a network namespace ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def setns_net(name: str) -> None:
    """Move the calling thread into network namespace NAME; mounts (and /sys/fs/bpf) stay as they are."""
    path = name if name.startswith("/") else os.path.join(NETNS_DIR, name)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}, CLONE_NEWNET): {os.strerror(e)}")
    finally:
        os.close(fd)


def _refresh_scapy() -> None:
    """Scapy caches interfaces and routes at import time: if the parent imported it, those belong
    to the root namespace. Reload them for the namespace we just entered."""
    if "scapy.config" not in sys.modules:
        return  # imported later, inside the namespace, it will read the right tables
    from scapy.config import conf
    from scapy.interfaces import get_working_if

    conf.ifaces.reload()
    conf.route.resync()
    if conf.route6 is not None:
        conf.route6.resync()
    conf.netcache.flush()
    conf.iface = get_working_if()


def _child_enter(name: str) -> None:
    # The child must never run the parent's teardown (atexit, signal handlers) or hold its pipes.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    for fd in list(INHERITED_FDS_TO_CLOSE):
        try:
            os.close(fd)
        except OSError:
            pass
    setns_net(name)
    _refresh_scapy()


def _write_msg(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    data = struct.pack("!Q", len(data)) + data
    while data:
        n = os.write(fd, data)
        data = data[n:]


class _Reader:
    """Length-prefixed pickles from a child over a pipe, with a deadline."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""

    def read(self, deadline: float | None) -> Any:
        """Next message, or EOFError if the child closed the pipe, or TimeoutError."""
        while True:
            if len(self.buf) >= 8:
                (n,) = struct.unpack("!Q", self.buf[:8])
                if len(self.buf) >= 8 + n:
                    msg, self.buf = self.buf[8:8 + n], self.buf[8 + n:]
                    return pickle.loads(msg)
            remain = None if deadline is None else deadline - time.monotonic()
            if remain is not None and remain <= 0:
                raise TimeoutError
            r, _, _ = select.select([self.fd], [], [], remain)
            if not r:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError
            self.buf += chunk


def _error_msg(exc: BaseException) -> tuple:
    tb = traceback.format_exc()
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        blob = None
    return ("error", blob, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)


def raise_remote(msg: tuple, where: str) -> None:
    _, blob, typename, text, tb = msg
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if isinstance(exc, BaseException):
        raise exc from RemoteTraceback(tb)
    raise LabError(f"{where}: {typename}: {text}") from RemoteTraceback(tb)


class Child:
    """A forked process living in one network namespace, talking back over a pipe."""

    def __init__(self, netns: str, body: Callable[[int, int], None], label: str):
        self.label = label
        r, w = os.pipe()  # child -> parent messages
        cr, cw = os.pipe()  # parent -> child control (a byte, or EOF, means stop)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(r)
                os.close(cw)
                try:
                    _child_enter(netns)
                    body(w, cr)
                except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                    _write_msg(w, _error_msg(e))
            except BaseException:
                code = 70
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(w)
        os.close(cr)
        self.pid = pid
        self.reader = _Reader(r)
        self.ctrl = cw
        self.rfd = r

    def read(self, deadline: float | None) -> Any:
        try:
            return self.reader.read(deadline)
        except EOFError:
            status = self.wait()
            raise LabError(f"{self.label}: the process in the namespace ended without an answer "
                           f"({_describe_status(status)})") from None

    def signal_stop(self) -> None:
        if self.ctrl is not None:
            try:
                os.write(self.ctrl, b"x")
            except OSError:
                pass

    def wait(self, timeout: float = 5.0) -> int | None:
        """Reap the child; SIGKILL it (it is ours) if it does not end within timeout."""
        if self.pid is None:
            return None
        deadline = time.monotonic() + timeout
        status = None
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
                break
            time.sleep(0.005)
        self.pid = None
        for fd in (self.rfd, self.ctrl):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.ctrl = None
        return status

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(1.0)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def call_in_netns(netns: str, fn: Callable, args: tuple = (), kwargs: dict | None = None,
                  timeout: float | None = 60.0) -> Any:
    """Run fn(*args, **kwargs) in a forked child that entered only the network namespace NETNS.

    The function is not pickled (the child is a fork), so closures work; the result and any
    exception are pickled back. Exceptions are re-raised with the remote traceback as __cause__.
    Inside, /sys still shows the root namespace's sysfs: read interfaces with netlink or /proc/net."""
    kwargs = kwargs or {}
    label = f"{getattr(fn, '__qualname__', fn)!s} in netns {netns}"

    def body(w: int, _ctrl: int) -> None:
        result = fn(*args, **kwargs)
        try:
            payload = pickle.dumps(result)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"the result of {label} cannot be pickled back: {e}") from None
        _write_msg(w, ("ok", payload))

    child = Child(netns, body, label)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            msg = child.read(deadline)
        except TimeoutError:
            child.kill()
            raise LabError(f"{label}: no answer within {timeout:g} s (the child was killed)") from None
        child.wait()
    except BaseException:
        child.kill()
        raise
    if msg[0] == "ok":
        return pickle.loads(msg[1])
    raise_remote(msg, label)


def write_sysctls(values: dict[str, str]) -> None:
    """Set net.* sysctls of the current network namespace (/proc/sys/net follows the caller's netns)."""
    for key, value in values.items():
        path = "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
        except FileNotFoundError:
            raise LabError(f"sysctl {key}: no such setting ({path})") from None
        except OSError as e:
            raise LabError(f"sysctl {key}={value}: {e.strerror}") from None
