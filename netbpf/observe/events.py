"""Sampled packet events: read the pinned nb_fw_events ring buffers of an interface's programs
with libbpf's ring_buffer API and turn each record into a readable dict (rule name, action,
5-tuple). Not the sampling (classify.h decides 1 in N) and not the CLI formatting.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator

from netbpf import abi
from netbpf.errors import NetbpfError
from netbpf.kernel import bpfsys
from netbpf.kernel.netns import netns_label
from netbpf.store.state import STATE_ROOT, iface_key, load_state, pin_dir

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
ACTION_NAMES = {abi.NB_ACT_ALLOW: "allow", abi.NB_ACT_DROP: "drop", abi.NB_ACT_REJECT: "reject"}

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@dataclass
class _Source:
    direction: str
    fd: object
    names: dict[int, str]          # counter slot -> rule name


def _addr(family: int, raw) -> str:
    b = bytes(raw)
    return str(ipaddress.IPv4Address(b[:4]) if family == 4 else ipaddress.IPv6Address(b))


def decode(ev: abi.NbEvent, direction: str, names: dict[int, str], boot_offset: float) -> dict:
    rule = "(default)" if ev.slot == abi.NB_EVENT_DEFAULT else names.get(ev.slot, f"slot {ev.slot}")
    action = ACTION_NAMES.get(ev.action, str(ev.action))
    if ev.rate_limited:
        action = "drop (rate limited)"
    return {"time": boot_offset + ev.ts_ns / 1e9, "direction": direction, "rule": rule,
            "action": action, "proto": PROTO_NAMES.get(ev.proto, str(ev.proto)),
            "src": _addr(ev.family, ev.src), "sport": ev.sport,
            "dst": _addr(ev.family, ev.dst), "dport": ev.dport, "len": ev.len}


def _boot_offset() -> float:
    """Wall-clock time of bpf_ktime_get_ns() == 0 (CLOCK_MONOTONIC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def follow(ifname: str, netns: str | None, directions=("ingress", "egress"),
           stop: Callable[[], bool] = lambda: False, poll_ms: int = 200) -> Iterator[dict]:
    """Yield events as they arrive until stop() says so (checked every poll_ms)."""
    key = iface_key(ifname, netns)
    st = load_state(key)
    if st is None:
        raise NetbpfError(f"{ifname}: not managed by netbpf in {netns_label(netns)} "
                          "(see 'netbpf status')")
    lib = bpfsys.libbpf()
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__add.argtypes = [ctypes.c_void_p, ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p]
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]

    parts = [st.parts[d] for d in directions if d in st.parts]
    if parts and not any(p.sampled or p.sample for p in parts):
        raise NetbpfError(f"{ifname}: sampling is off for this interface ({'/'.join(directions)});"
                          f" add 'sample: N' to a rule or to the direction in "
                          f"{st.policy_path} and apply it to see 1 in N packets")
    sources = []
    lock = _reader_lock(key, ifname)
    for d in directions:
        part = st.parts.get(d)
        if part is None:
            continue
        fd = bpfsys.obj_get(pin_dir(key) / d / abi.NB_MAP_FW_EVENTS)
        sources.append(_Source(d, fd, {r.slot: r.name for r in part.rules}))
    if not sources:
        raise NetbpfError(f"{ifname}: no {'/'.join(directions)} program to read events from")

    pending: list[dict] = []
    offset = _boot_offset()
    size = ctypes.sizeof(abi.NbEvent)

    def make_cb(src: _Source):
        def cb(_ctx, data, length):
            if length >= size:
                ev = abi.NbEvent.from_buffer_copy(ctypes.string_at(data, size))
                pending.append(decode(ev, src.direction, src.names, offset))
            return 0
        return _SAMPLE_FN(cb)

    callbacks = [make_cb(s) for s in sources]      # kept alive while libbpf holds them
    rb = lib.ring_buffer__new(int(sources[0].fd), callbacks[0], None, None)
    if not rb:
        raise NetbpfError(f"{ifname}: cannot open the event ring buffer (libbpf ring_buffer__new)")
    try:
        for s, cb in zip(sources[1:], callbacks[1:]):
            if lib.ring_buffer__add(rb, int(s.fd), cb, None) < 0:
                raise NetbpfError(f"{ifname}: cannot read {s.direction} events")
        while not stop():
            n = lib.ring_buffer__poll(rb, poll_ms)
            if n < 0 and -n != 4:    # EINTR: Ctrl-C arrives as KeyboardInterrupt next
                raise NetbpfError(f"{ifname}: reading events failed "
                                  f"[{bpfsys.errno_name(-n)}]")
            while pending:
                yield pending.pop(0)
    finally:
        lib.ring_buffer__free(rb)
        for s in sources:
            s.fd.close()
        os.close(lock)


def _reader_lock(key: str, ifname: str) -> int:
    """One reader per interface: a BPF ring buffer hands each event to whoever consumes it
    first, so two readers would each see some. The second is refused, naming the first."""
    path = STATE_ROOT / "events" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = (os.pread(fd, 32, 0).decode(errors="replace").splitlines() or ["?"])[0] \
            .strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise NetbpfError(f"{ifname}: events are already being read by pid {holder} "
                          f"({_cmdline(holder)}); each event goes to one reader, so read that "
                          f"one's output (e.g. 'netbpf events {ifname} --json | tee FILE') or "
                          f"stop it first") from None
    # pid first, then cut what is left of an older one: a reader never sees an empty file
    data = f"{os.getpid()}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    return fd


def _cmdline(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "netbpf events"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)[:80]
