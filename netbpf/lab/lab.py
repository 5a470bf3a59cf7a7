"""The netns lab: build a topology (namespaces, veths, bridges, addresses, routes, sysctls) under a
per-run name prefix, run things inside it, and always tear it down.

Not the file format (topology.py), not traffic generation (traffic.py), not the CLI (netbpf/cli/lab.py).
Teardown layers: __exit__ / down(); an atexit hook and SIGTERM/SIGHUP handlers for this process;
a reaper process for SIGKILL; cleanup() / 'netbpf lab down --all' for anything else.

Over 400 lines because the Lab API (up, run, popen, send, capture) and its four teardown
layers must be read together: a resource each layer misses is a leaked namespace.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from netbpf.lab import registry as state
from netbpf.lab.iproute import (
    INHERITED_FDS_TO_CLOSE,
    Child,
    LabCommandError,
    LabError,
    call_in_netns,
    delete_netns,
    ip,
    ip_batch,
    list_netns,
    setns_net,
    write_sysctls,
)
from netbpf.lab.topology import Interface, Topology, load_topology

# The lab owns every address it configures, so Duplicate Address Detection would only hold fresh
# IPv6 addresses 'tentative' for a second or two. Set before any interface exists ('default'),
# and on 'all' because the kernel ORs the two.
BASE_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}

_LIVE: dict[int, "Lab"] = {}  # id(lab) -> lab, for the atexit/signal fallback
_RUN_PREFIXES: list[str] = []  # every prefix this process created, for leak checks
_HOOKS_INSTALLED = False


def run_prefixes() -> list[str]:
    """Prefixes of every lab this process brought up (whether or not it is still up)."""
    return list(_RUN_PREFIXES)


def random_prefix() -> str:
    return f"nb{secrets.token_hex(3)}p{os.getpid()}-"


class Lab:
    """A topology brought up in network namespaces named PREFIX+node (e.g. 'nb3f2a1c-gw').

    Inside each namespace interfaces keep their plain names from the file ('gw0').

        with Lab.from_file("netns-lab/two-hosts.yaml") as lab:
            assert lab.ping("client", lab.addr("gw", "gw0"))
    """

    def __init__(self, topology: Topology, prefix: str | None = None, *, reaper: bool = True,
                 call_timeout: float = 60.0):
        self.topology = topology
        self._random = prefix is None
        self.prefix = prefix if prefix is not None else random_prefix()
        self.reaper = reaper
        self.call_timeout = call_timeout
        self._phase = "new"  # new -> up -> down
        self._owner: int | None = None
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._children: list[Child] = []
        self._reaper: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self.timings: dict[str, float] = {}

    @classmethod
    def from_file(cls, path: str | Path, prefix: str | None = None, **kw: Any) -> "Lab":
        return cls(load_topology(path), prefix, **kw)

    def __repr__(self) -> str:
        return f"<Lab {self.topology.name} prefix={self.prefix!r} {self._phase}>"

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.down()
        except LabError as e:
            if exc is None:
                raise
            # do not hide the error that ended the block; still say what is left behind
            print(f"netbpf lab: teardown after {exc_type.__name__}: {e}", file=sys.stderr)

    @property
    def is_up(self) -> bool:
        return self._phase == "up"

    def up(self) -> "Lab":
        if self._phase != "new":
            raise LabError(f"{self!r}: up() works once per Lab object; make a new Lab")
        t0 = time.monotonic()
        self._claim()
        self._owner = os.getpid()
        self._phase = "up"
        _LIVE[id(self)] = self
        _RUN_PREFIXES.append(self.prefix)
        _install_hooks()
        try:
            if self.reaper:
                self._start_reaper()
            self._build()
        except BaseException:  # also KeyboardInterrupt: nothing half-built stays behind
            self.down(quiet=True)
            raise
        self.timings["up"] = time.monotonic() - t0
        return self

    def down(self, quiet: bool = False) -> None:
        """Remove everything this lab created. Idempotent; only the creating process acts."""
        with self._lock:
            if self._phase != "up" or self._owner != os.getpid():
                return
            t0 = time.monotonic()
            errors: list[str] = []
            for child in self._children:
                child.kill()
            self._children.clear()
            for p in self._procs:
                _end_process(p)
            self._procs.clear()
            for name in list(self._created):
                err = delete_netns(name)
                if err:
                    errors.append(err)
                else:
                    self._created.remove(name)
            if not errors:
                state.forget(self.prefix)
            self._stop_reaper(done=not errors)
            _LIVE.pop(id(self), None)
            self._phase = "down"
            self.timings["down"] = time.monotonic() - t0
            if errors and not quiet:
                raise LabError(f"lab {self.prefix}: teardown left namespaces behind "
                               f"('netbpf lab down --all' retries):\n  " + "\n  ".join(errors))

    def hand_over(self) -> None:
        """Leave the lab running after this process exits ('netbpf lab up'): no reaper, no atexit."""
        with self._lock:
            if self._phase != "up":
                raise LabError(f"{self!r} is not up")
            rec = self._record()
            rec.pid = None
            state.save(rec)
            self._stop_reaper(done=True)
            _LIVE.pop(id(self), None)
            self._phase = "handed-over"

    # -- building --------------------------------------------------------------------------------
    def _record(self) -> state.LabRecord:
        return state.LabRecord(prefix=self.prefix, topology=self.topology.name, path=str(self.topology.path),
                               namespaces=[self.ns(n) for n in self.topology.nodes], pid=os.getpid(),
                               interfaces=self.interface_rows())

    def _claim(self) -> None:
        for _ in range(8):
            rec = self._record()
            if state.claim(rec):
                clash = sorted(set(rec.namespaces) & set(list_netns()))
                if not clash:
                    return
                state.forget(self.prefix)
                if not self._random:
                    raise LabError(f"namespace {', '.join(clash)} already exists, not made by a lab with "
                                   f"prefix {self.prefix!r}; remove it ('ip netns del NAME') or pick another --prefix")
            elif not self._random:
                rec = state.load(self.prefix)
                if rec is not None and rec.orphaned:  # its owner was killed half-way: take its place
                    state.remove_lab(self.prefix)
                    continue
                owner = "netbpf lab up" if rec and rec.persistent else f"process {rec.pid if rec else '?'}"
                raise LabError(f"a lab with prefix {self.prefix!r} is already up ({rec.topology if rec else '?'}, "
                               f"made by {owner}); 'netbpf lab down --prefix {self.prefix}' removes it")
            self.prefix = random_prefix()
        raise LabError("could not find a free lab prefix in 8 tries; run 'netbpf lab list'")

    def _start_reaper(self) -> None:
        # -P and cwd='/': a stray module in the caller's directory must not shadow the stdlib
        self._reaper = subprocess.Popen([sys.executable, "-P", "-m", "netbpf.lab.reaper", self.prefix],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd="/",
                                        start_new_session=True)
        INHERITED_FDS_TO_CLOSE.add(self._reaper.stdin.fileno())

    def _stop_reaper(self, done: bool) -> None:
        p, self._reaper = self._reaper, None
        if p is None:
            return
        INHERITED_FDS_TO_CLOSE.discard(p.stdin.fileno())
        try:
            if done:
                p.stdin.write(b"done")
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def _build(self) -> None:
        topo = self.topology
        for node in topo.nodes:
            name = self.ns(node)
            ip("netns", "add", name)
            self._created.append(name)
        self._sysctls({self.ns(n): BASE_SYSCTLS for n in topo.nodes})

        for node in topo.nodes.values():
            ip_batch(self.ns(node.name), [
                ["link", "add", i.name, *_link_opts(i), "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]
                for i in node.interfaces.values() if i.kind == "bridge"])
        for link in topo.links:
            a, b = link.a, link.b
            ip("link", "add", a.name, *_link_opts(a), "type", "veth",
               "peer", "name", b.name, *_link_opts(b), "netns", self.ns(b.node), netns=self.ns(a.node))

        self._sysctls({self.ns(n.name): n.sysctls for n in topo.nodes.values() if n.sysctls})

        for node in topo.nodes.values():
            cmds = [["link", "set", "lo", "up"]]
            for i in node.interfaces.values():
                if i.master:
                    cmds.append(["link", "set", i.name, "master", i.master])
                cmds.append(["link", "set", i.name, "up"])
                for a in i.addresses:
                    cmds.append(["addr", "add", str(a), "dev", i.name] + (["nodad"] if a.version == 6 else []))
            ip_batch(self.ns(node.name), cmds)
        # routes last: every gateway's subnet exists and every veth end is up by now
        for node in topo.nodes.values():
            ip_batch(self.ns(node.name), [r.ip_args() for r in node.routes])

    def _sysctls(self, plan: dict[str, dict[str, str]]) -> None:
        if not plan:
            return
        items = list(plan.items())

        def apply_all() -> None:
            # one fork for the whole lab: a single-threaded child may setns from one netns to the next
            for name, values in items:
                setns_net(name)
                try:
                    write_sysctls(values)
                except LabError as e:
                    raise LabError(f"netns {name}: {e}") from None

        call_in_netns(items[0][0], apply_all, timeout=30)

    # -- names and addresses ---------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return list(self.topology.nodes)

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(n) for n in self.topology.nodes]

    def ns(self, node: str) -> str:
        """Full namespace name of NODE, e.g. 'nb3f2a1c-gw'."""
        if node not in self.topology.nodes:
            raise KeyError(f"topology {self.topology.name!r} has no node {node!r} "
                           f"(nodes: {', '.join(self.topology.nodes)})")
        return f"{self.prefix}{node}"

    def iface(self, node: str, ifname: str) -> Interface:
        return self.topology.interface(node, ifname)

    def addr(self, node: str, ifname: str, family: int = 4) -> str:
        """First IPv4 (family=4) or IPv6 (family=6) address of NODE's IFNAME, without prefix length."""
        return str(self._addr(node, ifname, family).ip)

    def network(self, node: str, ifname: str, family: int = 4) -> str:
        """The subnet of that address, e.g. '10.10.0.0/24'."""
        return str(self._addr(node, ifname, family).network)

    def _addr(self, node: str, ifname: str, family: int):
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6 (got {family!r})")
        addrs = self.iface(node, ifname).addrs(family)
        if not addrs:
            raise KeyError(f"{node}/{ifname} has no IPv{family} address in topology {self.topology.name!r}")
        return addrs[0]

    def mac(self, node: str, ifname: str) -> str:
        """MAC of NODE's IFNAME: the fixed one from the file, else what the kernel chose."""
        iface = self.iface(node, ifname)
        if iface.mac:
            return iface.mac
        return self._link_info(node, ifname)["address"]

    def ifindex(self, node: str, ifname: str) -> int:
        return int(self._link_info(node, ifname)["ifindex"])

    def _link_info(self, node: str, ifname: str) -> dict:
        self.iface(node, ifname)  # a clear KeyError for names not in the topology
        cp = ip("-j", "link", "show", "dev", ifname, netns=self.ns(node))
        return json.loads(cp.stdout)[0]

    def interface_rows(self) -> list[dict]:
        """One row per interface: node, namespace, name, kind, mac, addresses, peer/master."""
        rows = []
        for node in self.topology.nodes.values():
            for i in node.interfaces.values():
                rows.append({
                    "node": node.name, "netns": f"{self.prefix}{node.name}", "name": i.name, "kind": i.kind,
                    "mac": i.mac or "", "addresses": [str(a) for a in i.addresses],
                    "peer": f"{i.peer[0]}/{i.peer[1]}" if i.peer else "", "master": i.master or "",
                })
        return rows

    # -- running things inside -------------------------------------------------------------------
    def run(self, node: str, cmd: list[str], check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run CMD in NODE with 'ip netns exec' (text output captured).

        'ip netns exec' remounts /sys: /sys/fs/bpf is not the root bpffs inside. To reach pins, use call()."""
        full = ["ip", "netns", "exec", self.ns(node), *cmd]
        try:
            cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise LabError(f"'{' '.join(cmd)}' in {self.ns(node)} did not finish within {timeout:g} s") from None
        if check and cp.returncode != 0:
            raise LabCommandError(list(cmd), cp.returncode, cp.stdout, cp.stderr, where=f"netns {self.ns(node)}")
        return cp

    def popen(self, node: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a long-running CMD (a server) in NODE; the lab ends it on teardown."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        # own process group, so teardown can end the command and anything it started, and only that
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *cmd], start_new_session=True, **kwargs)
        self._procs.append(p)
        return p

    def call(self, node: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a forked child inside NODE's network namespace only; returns its result.

        Mounts stay the root's, so /sys/fs/bpf pins are visible (unlike run()); /sys/class/net is
        still the root namespace's, so list interfaces with netlink (pyroute2, ip) or /proc/net."""
        self._require_up()
        return call_in_netns(self.ns(node), fn, args, kwargs, timeout=self.call_timeout)

    def _require_up(self) -> None:
        if self._phase not in ("up", "handed-over"):
            raise LabError(f"{self!r} is not up")

    def _track(self, child: Child) -> Child:
        self._children = [c for c in self._children if c.pid is not None]
        self._children.append(child)
        return child

    # -- traffic (see traffic.py) ----------------------------------------------------------------
    def ping(self, node: str, addr: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True if NODE gets at least one echo reply from ADDR (IPv4 or IPv6)."""
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}", "-i", "0.2", addr]
        return self.run(node, cmd, check=False, timeout=timeout * count + 5).returncode == 0

    def send(self, node: str, packets: Any, iface: str | None = None, inter: float = 0.0) -> int:
        from netbpf.lab.traffic import send

        return send(self, node, packets, iface=iface, inter=inter)

    def capture(self, node: str, iface: str, filter: str | Callable | None = None, count: int = 0,
                timeout: float = 5.0, direction: str = "both") -> "Capture":
        from netbpf.lab.traffic import Capture

        return Capture(self, node, iface, filter=filter, count=count, timeout=timeout, direction=direction)

    def send_and_capture(self, src_node: str, packets: Any, dst_node: str, dst_iface: str,
                         timeout: float = 2.0, *, iface: str | None = None, marker: bytes | None = None,
                         direction: str = "in", settle: float = 0.5) -> list:
        """Send from SRC_NODE, return the packets that arrived on DST_NODE/DST_IFACE (see traffic.py)."""
        from netbpf.lab.traffic import send_and_capture

        return send_and_capture(self, src_node, packets, dst_node, dst_iface, timeout=timeout,
                                iface=iface, marker=marker, direction=direction, settle=settle)


def _link_opts(i: Interface) -> list[str]:
    opts = []
    if i.mac:
        opts += ["address", i.mac]
    if i.mtu:
        opts += ["mtu", str(i.mtu)]
    return opts


def _end_process(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(p.pid, sig)  # the group popen() created for this process
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- fallbacks when 'with' is not enough ----------------------------------------------------------

def _teardown_all() -> None:
    for lab in list(_LIVE.values()):
        try:
            lab.down(quiet=True)
        except Exception as e:  # noqa: BLE001 - keep going: every other lab still needs removing
            print(f"netbpf lab: teardown of {lab.prefix}: {e}", file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    _teardown_all()
    # then die of the same signal, as the process would have without us
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # only where nobody else handles the signal: a program's own handler stays in charge
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
