"""Which backend a new flow gets, computed as the data plane computes it: the flow hash of
bpf/include/lb.h (nb_flow_hash) over struct nb_flow_key and the VIP's Maglev table. This is
the model `netbpf explain` checks the attached program against; and a copy of the live
balancer maps into a test-run program. Not the tables' writer (lbtables.py).
"""
from __future__ import annotations

import ctypes
import struct
from array import array

from netbpf import abi
from netbpf.kernel import bpfsys
from netbpf.lb.maglev import NO_BACKEND, backend_key, maglev_table
from netbpf.policy.ir import BackendIR, LoadBalancerIR

_M32 = 0xFFFFFFFF
_WORDS = struct.Struct(f"<{ctypes.sizeof(abi.NbFlowKey) // 4}I")


def ring_of(lb: LoadBalancerIR, down: set[str]) -> list[int]:
    """The VIP's Maglev table: per slot, the index of a backend in lb.backends (or
    NO_BACKEND). Backends found down weigh 0, as LbTables writes them."""
    weights = [0 if backend_key(lb.name, b.family, b.addr, b.port) in down else b.weight
               for b in lb.backends]
    return maglev_table([(b.family, b.addr, b.port) for b in lb.backends], weights,
                        lb.table_size)


def flow_key(family: int, proto: int, src: int, dst: int, sport: int, dport: int) -> bytes:
    n = 4 if family == 4 else 16
    k = abi.NbFlowKey(family=family, proto=proto, sport=sport, dport=dport)
    k.saddr[:] = src.to_bytes(n, "big").ljust(16, b"\0")
    k.daddr[:] = dst.to_bytes(n, "big").ljust(16, b"\0")
    return bytes(k)


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def flow_hash(key: bytes) -> int:
    """nb_flow_hash: murmur3's finaliser over each 32-bit word of the key."""
    h = 0x9747B28C
    for w in _WORDS.unpack(key):
        h = _mix32(h ^ w)
    return h


def vip_of(lbs, ifname: str, family: int, proto: int, dst: int,
           dport: int | None) -> LoadBalancerIR | None:
    for lb in lbs:
        if (lb.interface, lb.family, lb.proto, lb.vip, lb.port) == \
                (ifname, family, proto, dst, dport):
            return lb
    return None


def model_backend(lb: LoadBalancerIR, down: set[str], family: int, src: int, sport: int,
                  ) -> BackendIR | None:
    """The backend a new flow from src:sport to the VIP gets, or None (every backend
    drained or down: the data plane drops it)."""
    slot = ring_of(lb, down)[flow_hash(flow_key(family, lb.proto, src, lb.vip, sport,
                                                lb.port)) % lb.table_size]
    return None if slot == NO_BACKEND else lb.backends[slot]


_U32 = struct.Struct("<I")
COPIED = ("nb_lb_vips", "nb_lb_backends", "nb_lb_vlive", "nb_lb_ports")


def copy_maps(live, copy) -> None:
    """The live balancer's VIPs, backends, VIP signatures, port filter and each VIP's live
    Maglev half into copy (both LbTables); the copy's flow, NAT and counter maps stay its own
    and empty, so a test run there balances as a new flow and touches nothing live."""
    vsize = ctypes.sizeof(abi.NbVip)
    for name in COPIED:
        size = {"nb_lb_vips": vsize, "nb_lb_backends": ctypes.sizeof(abi.NbBackend),
                "nb_lb_vlive": ctypes.sizeof(abi.NbVipLive), "nb_lb_ports": 8}[name]
        key_size = ctypes.sizeof(abi.NbVipKey) if name == "nb_lb_vips" else 4
        for k, v in bpfsys.map_lookup_batch(live.fds[name], key_size, size):
            bpfsys.map_update(copy.fds[name], k, v)
            if name == "nb_lb_vips":
                vip = abi.NbVip.from_buffer_copy(v)
                ring = bpfsys.array_lookup_range(live.fds["nb_lb_ring"], vip.ring_off,
                                                 vip.ring_size, 4)
                keys = array("I", range(vip.ring_off, vip.ring_off + vip.ring_size))
                bpfsys.map_update_batch(copy.fds["nb_lb_ring"], keys.tobytes(), b"".join(ring),
                                        vip.ring_size)


def flow_backend(tables, key: bytes) -> int | None:
    """The backend id the program recorded for this flow key, if it recorded one."""
    raw = bpfsys.map_lookup(tables.fds["nb_lb_flows"], key, ctypes.sizeof(abi.NbFlow))
    return None if raw is None else abi.NbFlow.from_buffer_copy(raw).backend
