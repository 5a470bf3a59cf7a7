"""The load balancer's maps: VIPs, backends, Maglev rings; allocation that keeps backend ids
and VIP indexes stable across applies (so flow affinity and counters survive), and a per-VIP
double-buffered ring so each VIP switches to its new table in one map write.

Pure planning (plan_lb) is separate from the writes (LbTables), so unit tests can check the
allocation without a kernel. Not the data path (bpf/include/lb.h), not Maglev (maglev.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netbpf import abi
from netbpf.errors import NetbpfError
from netbpf.policy.ir import LoadBalancerIR, addr_text
from netbpf.kernel import bpfsys
from netbpf.lb.maglev import NO_BACKEND, maglev_table

TOUCH_NS = 1_000_000_000      # a flow's last-seen time is rewritten at most once a second
MIN_RING_CAP = abi.NB_LB_RING_CAP
LB_MAPS = abi.LB_MAPS
PROTO_NAMES = {6: "tcp", 17: "udp"}

_U32 = abi.U32


def backend_identity(lb: str, family: int, addr: int, port: int) -> str:
    return f"{lb}|{addr_text(family, addr)}|{port}"


@dataclass
class VipState:
    name: str
    index: int
    base: int                 # first of 2 * size ring slots
    size: int
    half: int                 # which half is live (0 or 1)
    mode: str
    family: int
    addr: int
    port: int
    proto: int
    digest: str               # backends, weights, health: unchanged digest = nothing to write
    backends: list[str] = field(default_factory=list)   # identities, in policy order


@dataclass
class LbState:
    ring_cap: int = 0
    vips: dict[str, VipState] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)     # identity -> id

    @classmethod
    def from_json(cls, data: dict | None) -> "LbState":
        if not data:
            return cls()
        return cls(data["ring_cap"], {k: VipState(**v) for k, v in data["vips"].items()},
                   dict(data["backends"]))

    def to_json(self) -> dict:
        return asdict(self)


def ring_cap_for(lbs: list[LoadBalancerIR]) -> int:
    """Ring slots a program needs: both halves of every table, with room to grow."""
    need = sum(2 * lb.table_size for lb in lbs)
    cap = MIN_RING_CAP
    while cap < 2 * need:
        cap <<= 1
    return cap


def _digest(lb: LoadBalancerIR, down: set[str]) -> str:
    items = [(backend_identity(lb.name, b.family, b.addr, b.port), b.weight,
              backend_identity(lb.name, b.family, b.addr, b.port) in down) for b in lb.backends]
    raw = json.dumps([lb.mode, lb.family, lb.vip, lb.port, lb.proto, lb.table_size, items,
                      lb.idle_s])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def plan_lb(lbs: list[LoadBalancerIR], old: LbState | None, ring_cap: int,
            down: set[str] = frozenset()) -> tuple[LbState, list[str]]:
    """The new LbState and the names of VIPs whose tables must be written. Raises
    NetbpfError('ring') when the tables do not fit ring_cap (a bigger program is needed)."""
    old = old or LbState()
    new = LbState(ring_cap=ring_cap)
    # Backend ids: kept by identity; new ones avoid every id the running tables may use.
    used_ids = set(old.backends.values())
    free_ids = (i for i in range(abi.NB_LB_MAX_BACKENDS) if i not in used_ids)
    for lb in lbs:
        for b in lb.backends:
            ident = backend_identity(lb.name, b.family, b.addr, b.port)
            if ident in new.backends:
                continue
            bid = old.backends.get(ident)
            if bid is None:
                bid = next(free_ids, None)
                if bid is None:
                    raise NetbpfError(f"more than {abi.NB_LB_MAX_BACKENDS} backends")
            new.backends[ident] = bid
    # VIP indexes and ring regions: kept by name while the table size stays.
    used_idx = {v.index for v in old.vips.values()}
    free_idx = (i for i in range(abi.NB_LB_MAX_VIPS) if i not in used_idx)
    regions: list[tuple[int, int]] = []
    changed = []
    for lb in lbs:
        prev = old.vips.get(lb.name) if ring_cap == old.ring_cap else None
        digest = _digest(lb, down)
        idents = [backend_identity(lb.name, b.family, b.addr, b.port) for b in lb.backends]
        if prev is not None and prev.size == lb.table_size:
            v = VipState(lb.name, prev.index, prev.base, prev.size, prev.half, lb.mode,
                         lb.family, lb.vip, lb.port, lb.proto, digest, idents)
            if prev.digest != digest or (prev.family, prev.addr, prev.port, prev.proto,
                                         prev.mode) != (v.family, v.addr, v.port, v.proto, v.mode):
                v.half = 1 - prev.half
                changed.append(lb.name)
        else:
            index = old.vips[lb.name].index if lb.name in old.vips else next(free_idx, None)
            if index is None:
                raise NetbpfError(f"more than {abi.NB_LB_MAX_VIPS} load balancers")
            v = VipState(lb.name, index, -1, lb.table_size, 0, lb.mode, lb.family, lb.vip,
                         lb.port, lb.proto, digest, idents)
            changed.append(lb.name)
        new.vips[lb.name] = v
        if v.base >= 0:
            regions.append((v.base, v.base + 2 * v.size))
    # Regions of the running tables stay reserved until the switch is done.
    if ring_cap == old.ring_cap:
        regions += [(v.base, v.base + 2 * v.size) for v in old.vips.values()]
    for v in new.vips.values():
        if v.base < 0:
            v.base = _first_fit(regions, 2 * v.size, ring_cap)
            regions.append((v.base, v.base + 2 * v.size))
    return new, changed


def _first_fit(regions: list[tuple[int, int]], n: int, cap: int) -> int:
    at = 0
    for lo, hi in sorted(regions):
        if lo - at >= n:
            return at
        at = max(at, hi)
    if cap - at >= n:
        return at
    raise NetbpfError("ring")


def _addr16(family: int, addr: int) -> bytes:
    return addr.to_bytes(4 if family == 4 else 16, "big").ljust(16, b"\0")


def _vip_key(v: VipState) -> bytes:
    k = abi.NbVipKey(family=v.family, proto=v.proto, port=v.port)
    k.addr[:] = _addr16(v.family, v.addr)
    return bytes(k)


def vip_value(v: VipState, lb: LoadBalancerIR, first: int) -> bytes:
    """The VIP entry: its live table half and its flows' idle timeout. The last-seen time is
    refreshed every TOUCH_NS (a quarter of shorter timeouts), so a flow is forgotten between
    idle_timeout - TOUCH_NS and idle_timeout after its last packet."""
    idle = int(lb.idle_s * 1e9)
    return bytes(abi.NbVip(index=v.index, mode=abi.NB_LB_NAT if v.mode == "nat" else abi.NB_LB_DSR,
                           ring_off=first, ring_size=v.size, idle_ns=idle,
                           touch_ns=min(TOUCH_NS, idle // 4)))


def backend_value(family: int, addr: int, port: int, flags: int) -> bytes:
    b = abi.NbBackend(family=family, port=port, flags=flags)
    b.addr[:] = _addr16(family, addr)
    return bytes(b)


# The maps shared through pins across program changes, and the shapes this netbpf needs.
SHARED_SHAPES = {abi.NB_MAP_LB_FLOWS: (abi.NbFlowKey, abi.NbFlow),
                 abi.NB_MAP_LB_NAT: (abi.NbNatKey, abi.NbNatVal),
                 abi.NB_MAP_LB_CNT: (ctypes.c_uint32, abi.NbLbCounter)}


def stale_shared_maps(directory: Path) -> list[str]:
    """Shared LB maps pinned in directory with another key or value size than this netbpf's
    (pinned by an older version): a program cannot use them, the verifier would refuse it."""
    stale = []
    for name, (key, value) in SHARED_SHAPES.items():
        if not (directory / name).exists():
            continue
        fd = bpfsys.obj_get(directory / name)
        try:
            info = bpfsys.map_info(fd)
        finally:
            fd.close()
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
            stale.append(name)
    return stale


class LbTables:
    def __init__(self, fds: dict[str, object], owned: bool):
        missing = [n for n in LB_MAPS if n not in fds]
        if missing:
            raise NetbpfError(f"load balancer maps missing: {', '.join(missing)}")
        self.fds = fds
        self.owned = owned

    @classmethod
    def from_loaded(cls, loaded) -> "LbTables":
        return cls({n: loaded.maps[n].fd for n in LB_MAPS if n in loaded.maps}, owned=False)

    @classmethod
    def from_pins(cls, directory: Path) -> "LbTables":
        return cls({n: bpfsys.obj_get(directory / n) for n in LB_MAPS}, owned=True)

    def close(self) -> None:
        if self.owned:
            for fd in self.fds.values():
                fd.close()

    def write(self, lbs: list[LoadBalancerIR], new: LbState, changed: list[str],
              old: LbState | None, down: set[str]) -> None:
        """Backends first, then each changed VIP's idle ring half, then the VIP entry (the
        switch), then what the old state had and the new does not."""
        by_name = {lb.name: lb for lb in lbs}
        for lb in lbs:
            for b in lb.backends:
                ident = backend_identity(lb.name, b.family, b.addr, b.port)
                # a backend found down is inactive: its flows are dead, balance them again
                flags = 0 if ident in down else abi.NB_BE_ACTIVE
                val = backend_value(b.family, b.addr, b.port, flags)
                bpfsys.map_update(self.fds[abi.NB_MAP_LB_BACKENDS], _U32.pack(new.backends[ident]), val)
        for name in changed:
            v, lb = new.vips[name], by_name[name]
            weights = [0 if backend_identity(name, b.family, b.addr, b.port) in down else b.weight
                       for b in lb.backends]
            table = maglev_table([(b.family, b.addr, b.port) for b in lb.backends], weights,
                                 lb.table_size)
            ids = [new.backends[backend_identity(name, b.family, b.addr, b.port)]
                   for b in lb.backends]
            ring = array("I", (NO_BACKEND if i == NO_BACKEND else ids[i] for i in table))
            first = v.base + v.half * v.size
            keys = array("I", range(first, first + v.size)).tobytes()
            bpfsys.map_update_batch(self.fds[abi.NB_MAP_LB_RING], keys, ring.tobytes(), v.size)
            bpfsys.map_update(self.fds[abi.NB_MAP_LB_VIPS], _vip_key(v), vip_value(v, lb, first))
        old = old or LbState()
        live_keys = {_vip_key(v) for v in new.vips.values()}
        for v in old.vips.values():
            if _vip_key(v) not in live_keys:
                bpfsys.map_delete(self.fds[abi.NB_MAP_LB_VIPS], _vip_key(v))
        # Removed backends: inactive, so their flows are balanced again (see docs/lb.md).
        gone = set(old.backends.values()) - set(new.backends.values())
        for bid in gone:
            bpfsys.map_update(self.fds[abi.NB_MAP_LB_BACKENDS], _U32.pack(bid),
                              bytes(ctypes.sizeof(abi.NbBackend)))

    def counters(self) -> dict[int, tuple[int, int, int]]:
        out = {}
        size = ctypes.sizeof(abi.NbLbCounter)
        for k, per_cpu in bpfsys.map_lookup_batch(self.fds[abi.NB_MAP_LB_CNT], 4, size, percpu=True):
            tot = [0, 0, 0]
            for v in per_cpu:
                c = abi.NbLbCounter.from_buffer_copy(v[:size])
                for i, x in enumerate((c.packets, c.bytes, c.conns)):
                    tot[i] += x
            if any(tot):
                out[_U32.unpack(k)[0]] = tuple(tot)
        return out

    def flows(self):
        """(key, value) of every remembered flow, as abi.NbFlowKey / abi.NbFlow."""
        for k, v in bpfsys.map_lookup_batch(self.fds[abi.NB_MAP_LB_FLOWS],
                                            ctypes.sizeof(abi.NbFlowKey),
                                            ctypes.sizeof(abi.NbFlow)):
            yield abi.NbFlowKey.from_buffer_copy(k), abi.NbFlow.from_buffer_copy(v)
