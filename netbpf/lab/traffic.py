"""Scapy traffic inside the lab: send packets from one node, capture what arrives on another.

Both sides run in forked children that entered only the node's network namespace (netns.Child),
so callables (filters) need not be picklable; packets come back as bytes and are rebuilt here.
Not a traffic generator for benchmarks (use trafgen for rates).
"""
from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

from netbpf.lab.iproute import Child, LabError, _write_msg, raise_remote

if TYPE_CHECKING:
    from netbpf.lab.lab import Lab

DIRECTIONS = ("in", "out", "both")


def _scapy() -> None:
    # Import once in the parent: every fork then inherits it (a fresh import costs ~1 s per child),
    # and netns._refresh_scapy() re-reads interfaces and routes inside the namespace.
    import scapy.all  # noqa: F401


def _packets(packets: Any) -> list:
    from scapy.layers.l2 import Ether
    from scapy.packet import Packet

    items = list(packets) if isinstance(packets, (list, tuple)) else [packets]
    out = []
    for p in items:
        if isinstance(p, (bytes, bytearray)):
            p = Ether(bytes(p))  # raw bytes are whole Ethernet frames
        if not isinstance(p, Packet):
            raise TypeError(f"cannot send {type(p).__name__}: give scapy packets or Ethernet frame bytes")
        out.append(p)
    return out


def _is_l2(p: Any) -> bool:
    from scapy.layers.l2 import CookedLinux, Dot3, Ether

    return isinstance(p, (Ether, Dot3, CookedLinux))


def _default_iface(lab: "Lab", node: str) -> str:
    ifaces = [i.name for i in lab.topology.nodes[node].interfaces.values() if not i.master]
    if len(ifaces) != 1:
        raise LabError(f"node {node!r} has interfaces {', '.join(ifaces)}: say which with iface=")
    return ifaces[0]


def send(lab: "Lab", node: str, packets: Any, iface: str | None = None, inter: float = 0.0) -> int:
    """Send scapy packets from NODE: Ethernet frames with sendp (on IFACE, or the node's only
    interface), IP/IPv6 packets with send (routed by NODE's table, or out of IFACE). Returns the count."""
    _scapy()
    pkts = _packets(packets)
    l2_iface = iface if iface or not any(_is_l2(p) for p in pkts) else _default_iface(lab, node)

    def body() -> int:
        from scapy.sendrecv import send as send_l3
        from scapy.sendrecv import sendp

        if all(_is_l2(p) for p in pkts):
            sendp(pkts, iface=l2_iface, inter=inter, verbose=False)
        else:
            for p in pkts:
                if _is_l2(p):
                    sendp(p, iface=l2_iface, verbose=False)
                elif iface:
                    send_l3(p, iface=iface, verbose=False)
                else:
                    send_l3(p, verbose=False)
                if inter:
                    time.sleep(inter)
        return len(pkts)

    return lab.call(node, body)


def _listen_socket(direction: str):
    """scapy's L2ListenSocket sees both directions and does not say which; keep only DIRECTION."""
    from scapy.arch.linux import L2ListenSocket, get_last_packet_timestamp
    from scapy.data import MTU

    class DirectionalListenSocket(L2ListenSocket):
        def recv_raw(self, x=MTU):
            pkt, sa_ll, ts = self._recv_raw(self.ins, x)
            outgoing = sa_ll[2] == socket.PACKET_OUTGOING
            if (direction == "in" and outgoing) or (direction == "out" and not outgoing):
                return None, None, None
            if ts is None:
                ts = get_last_packet_timestamp(self.ins)
            return self.LL, pkt, ts

    return DirectionalListenSocket


class Capture:
    """Packets seen on NODE's IFACE, from start() until stop(), COUNT matches, or TIMEOUT seconds.

    filter: a BPF string ('udp port 9', compiled by scapy/tcpdump) or a callable(packet) -> bool.
    direction: 'in' (what arrives), 'out' (what the node sends) or 'both'.

        with lab.capture("gw", "gw0", "udp", count=1) as cap:
            lab.send("client", IP(dst=...)/UDP()/b"x")
        cap.packets    # scapy Ether packets; cap.raw: bytes
    """

    def __init__(self, lab: "Lab", node: str, iface: str, filter: str | Callable | None = None,
                 count: int = 0, timeout: float = 5.0, direction: str = "both"):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)} (got {direction!r})")
        lab.iface(node, iface)  # KeyError naming the valid interfaces
        self.lab, self.node, self.iface = lab, node, iface
        self.filter, self.count, self.timeout, self.direction = filter, count, timeout, direction
        self.raw: list[bytes] = []
        self.times: list[float] = []
        self._packets: list = []
        self._child: Child | None = None
        self._done = False

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._abort()
        elif self.count:
            self.wait()
        else:
            self.stop()

    def start(self) -> "Capture":
        """Fork the sniffer and return once its socket is open: anything sent afterwards is seen."""
        if self._child is not None or self._done:
            raise LabError("a Capture starts once; make a new one")
        _scapy()
        self.lab._require_up()
        iface, bpf = self.iface, self.filter if isinstance(self.filter, str) else None
        lfilter = self.filter if callable(self.filter) else None
        count, timeout, sock = self.count, self.timeout, _listen_socket(self.direction)

        def body(w: int, ctrl: int) -> None:
            import threading

            from scapy.error import Scapy_Exception
            from scapy.sendrecv import AsyncSniffer

            started = threading.Event()

            def ready() -> None:
                _write_msg(w, ("ready",))
                started.set()

            sniffer = AsyncSniffer(iface=iface, filter=bpf, lfilter=lfilter, count=count, store=True,
                                   L2socket=sock, started_callback=ready)
            sniffer.start()
            while sniffer.thread.is_alive() and not started.wait(0.01):
                pass
            # the timeout counts from the moment the socket is open, not from the fork
            deadline = time.monotonic() + timeout
            while started.is_set() and sniffer.thread.is_alive() and time.monotonic() < deadline:
                if select.select([ctrl], [], [], 0.01)[0]:
                    break
            if sniffer.thread.is_alive():
                try:
                    sniffer.stop()
                except Scapy_Exception:  # it finished (count reached) between our check and stop()
                    pass
            sniffer.join()  # re-raises what failed in the sniffer thread (e.g. no such interface)
            _write_msg(w, ("done", [(bytes(p), float(p.time)) for p in sniffer.results or []]))

        label = f"capture on {self.lab.ns(self.node)}/{iface}"
        self._child = self.lab._track(Child(self.lab.ns(self.node), body, label))
        try:
            msg = self._child.read(time.monotonic() + 15)
        except TimeoutError:
            self._abort()
            raise LabError(f"{label}: the sniffer did not start within 15 s") from None
        except BaseException:
            self._abort()
            raise
        if msg[0] == "error":
            self._abort()
            raise_remote(msg, label)
        if msg[0] == "done":  # count reached or timeout before we even looked: keep the result
            self._finish(msg)
        return self

    def wait(self, timeout: float | None = None) -> list:
        """Wait until COUNT packets matched or the capture's own timeout passed, or at most TIMEOUT
        seconds (then stop it and keep what it has); return the packets."""
        if not self._done:
            self._collect(signal=False, timeout=self.timeout + 5 if timeout is None else timeout)
        return self.packets

    def stop(self, grace: float = 0.05) -> list:
        """Stop now (after GRACE seconds for packets still in flight); return the packets."""
        if not self._done:
            if grace:
                time.sleep(grace)
            self._collect(signal=True, timeout=10)
        return self.packets

    @property
    def packets(self) -> list:
        """What was captured, as scapy Ether packets (with .time); raw bytes are in .raw."""
        return list(self._packets)

    def _collect(self, signal: bool, timeout: float) -> None:
        if self._child is None:
            raise LabError("capture was not started")
        if signal:
            self._child.signal_stop()
        try:
            msg = self._child.read(time.monotonic() + timeout)
        except TimeoutError:
            if signal:
                self._abort()
                raise LabError(f"capture on {self.node}/{self.iface}: no result {timeout:g} s after stop") from None
            self._child.signal_stop()  # our wait ran out first: stop it and take what it has
            msg = self._child.read(time.monotonic() + 10)
        if msg[0] == "error":
            self._abort()
            raise_remote(msg, f"capture on {self.node}/{self.iface}")
        self._finish(msg)

    def _finish(self, msg: tuple) -> None:
        from scapy.layers.l2 import Ether

        self.raw = [d for d, _ in msg[1]]
        self.times = [t for _, t in msg[1]]
        self._packets = []
        for data, t in msg[1]:
            p = Ether(data)
            p.time = t
            self._packets.append(p)
        self._done = True
        if self._child is not None:
            self._child.wait()

    def _abort(self) -> None:
        self._done = True
        if self._child is not None:
            self._child.kill()


def mark(packets: Any, marker: bytes | None = None) -> tuple[list, bytes]:
    """Copies of PACKETS with MARKER (default: a fresh random one) appended to their payload."""
    from scapy.packet import Raw

    marker = marker or b"NBMK" + os.urandom(6).hex().encode()
    out = []
    for p in _packets(packets):
        p = p.copy()
        p.lastlayer().add_payload(Raw(marker))
        out.append(p)
    return out, marker


def send_and_capture(lab: "Lab", src_node: str, packets: Any, dst_node: str, dst_iface: str,
                     timeout: float = 2.0, *, iface: str | None = None, marker: bytes | None = None,
                     direction: str = "in", settle: float = 0.5) -> list:
    """Send PACKETS from SRC_NODE; return what arrives on DST_NODE's DST_IFACE.

    Matching is by a payload marker: with marker=None a random one is appended to each packet's
    payload (captured payload = original + marker); with marker=b'...' packets go out unchanged
    and are matched on those bytes. Returns as soon as every packet arrived, else SETTLE seconds
    after the last one was sent (veth delivery takes microseconds, so 'nothing arrived' is known
    quickly), and never later than TIMEOUT seconds after the capture started."""
    if marker is None:
        pkts, marker = mark(packets)
    else:
        pkts = _packets(packets)
    cap = Capture(lab, dst_node, dst_iface, filter=lambda p, m=marker: m in bytes(p),
                  count=len(pkts), timeout=timeout, direction=direction).start()
    try:
        send(lab, src_node, pkts, iface=iface)
        cap.wait(timeout=settle)
    except BaseException:
        cap._abort()
        raise
    return cap.packets
