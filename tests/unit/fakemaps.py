"""The maps of the fake kernel (tests/unit/fakekernel.py): what bpf/ declares for a build,
and bpf(2)'s map calls as bpfsys makes them (lookup, update, delete, batches, iteration), with
the kernel's refusals (key and value sizes, indexes past an array's end, a full hash).

Arrays hold every value in one zeroed bytearray, as the kernel does; hash-like maps a dict.
Not the objects, pins or attachments (fakekernel.py).
"""
from __future__ import annotations

import ctypes
import errno
from array import array
from dataclasses import dataclass, field

from netbpf import abi
from netbpf.fw import dirtable
from netbpf.kernel.bpfsys import KernelError

HASH, ARRAY, PROG_ARRAY, PERCPU_ARRAY, LRU_HASH, LPM_TRIE = 1, 2, 3, 6, 9, 11
ARRAYS = (ARRAY, PROG_ARRAY, PERCPU_ARRAY)
U32 = ctypes.c_uint32


def _size(t) -> int:
    return ctypes.sizeof(t)


def program_maps(defines: dict, hook: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (type, key size, value size, max entries) of what bpf/ builds with defines
    (mirrors the BPF_* declarations in bpf/include/*.h and the two firewall sources)."""
    words, classes = defines["NB_WORDS"], defines["NB_CLASS_CAP"]
    rules_cap = words * 64
    dir_gen = 4 * dirtable.ROOT + dirtable.CHUNK * defines["NB_DIR_CHUNKS"]
    m = {
        "nb_fw_gen": (ARRAY, 4, _size(abi.NbGen), 1),
        "nb_fw_cfg": (ARRAY, 4, _size(abi.NbFwCfg), 2),
        "nb_fw_rules": (ARRAY, 4, _size(abi.NbRule), 2 * rules_cap),
        "nb_fw_crules": (ARRAY, 4, 4, 2 * abi.NB_MAX_COUNT_RULES),
        "nb_fw_vecs": (ARRAY, 4, _size(abi.vec_struct(words)), 2 * classes),
        "nb_fw_dir": (ARRAY, 4, 4, 2 * dir_gen),
        "nb_fw_pair": (ARRAY, 4, 8 * abi.nb_sum(words), 2 * abi.pair_cells(words)),
        "nb_fw_ports": (ARRAY, 4, 4, 4 * 65536),
        "nb_fw_proto": (ARRAY, 4, 4, 2 * 256),
        "nb_fw_icmp": (ARRAY, 4, 4, 2 * 65536),
        "nb_fw_flags": (ARRAY, 4, 4, 2 * 256),
        "nb_set4": (LPM_TRIE, _size(abi.NbLpm4Key), 4, 2 * abi.NB_SET_CAP),
        "nb_set6": (LPM_TRIE, _size(abi.NbLpm6Key), 4, 2 * abi.NB_SET_CAP),
        "nb_seth4": (HASH, _size(abi.NbSeth4Key), 4, 2 * abi.NB_SET_CAP),
        "nb_seth6": (HASH, _size(abi.NbSeth6Key), 4, 2 * abi.NB_SET_CAP),
        "nb_fw_cnt": (PERCPU_ARRAY, 4, _size(abi.NbCounter), abi.slot_cap(words)),
        "nb_fw_stats": (PERCPU_ARRAY, 4, _size(abi.NbCounter), abi.NB_STAT_MAX),
        "nb_fw_rl": (LRU_HASH, _size(abi.NbRlKey), _size(abi.NbRlState), abi.NB_RL_ENTRIES),
        "nb_rej_jump": (PROG_ARRAY, 4, 4, 1),
        "nb_rej_scratch": (PERCPU_ARRAY, 4, 68, 1),     # struct nb_rej_handoff (firewall.h)
        "nb_reject_rl": (ARRAY, 4, 16, 1),
    }
    if defines.get("NB_CONNTRACK"):
        m["nb_ct"] = (LRU_HASH, _size(abi.NbCtKey), _size(abi.NbCtVal), abi.NB_CT_ENTRIES)
        m["nb_ct_cfg"] = (ARRAY, 4, _size(abi.NbCtCfg), 1)
    if defines.get("NB_LB"):
        if hook == "xdp":       # the TC programs build with NB_LB_REVERSE_ONLY (lb.h)
            m["nb_lb_vips"] = (HASH, _size(abi.NbVipKey), _size(abi.NbVip),
                               abi.NB_LB_MAX_VIPS * 2)
            m["nb_lb_ring"] = (ARRAY, 4, 4, defines["NB_LB_RING_CAP"])
            m["nb_lb_backends"] = (ARRAY, 4, _size(abi.NbBackend), abi.NB_LB_MAX_BACKENDS)
            m["nb_lb_vlive"] = (ARRAY, 4, _size(abi.NbVipLive), abi.NB_LB_MAX_VIPS)
            m["nb_lb_ports"] = (ARRAY, 4, 8, abi.NB_LB_PORT_WORDS)
            m["nb_lb_nh"] = (PERCPU_ARRAY, 4, _size(abi.NbLbNh), abi.NB_LB_MAX_BACKENDS)
        m["nb_lb_flows"] = (LRU_HASH, _size(abi.NbFlowKey), _size(abi.NbFlow), abi.NB_LB_FLOWS)
        m["nb_lb_nat"] = (LRU_HASH, _size(abi.NbNatKey), _size(abi.NbNatVal), abi.NB_LB_FLOWS)
        m["nb_lb_cnt"] = (PERCPU_ARRAY, 4, _size(abi.NbLbCounter),
                          abi.NB_LB_MAX_VIPS + abi.NB_LB_MAX_BACKENDS)
        if hook == "xdp":
            m["nb_lb_jump"] = (PROG_ARRAY, 4, 4, 1)
    return m


@dataclass
class Map:
    id: int
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    stride: int = 0          # bytes per value as bpf(2) passes it (per-CPU: all CPUs)
    data: dict = field(default_factory=dict)      # hash-like maps: key bytes -> value
    buf: bytearray | None = None                  # arrays: every value, zeroed at create

    def get(self, key: bytes) -> bytes | None:
        if self.buf is None:
            return self.data.get(bytes(key))
        i = int.from_bytes(key, "little") * self.stride
        return bytes(self.buf[i:i + self.stride])

    def set(self, key: bytes, value: bytes) -> None:
        if self.buf is None:
            self.data[bytes(key)] = bytes(value)
        else:
            i = int.from_bytes(key, "little") * self.stride
            self.buf[i:i + self.stride] = value


class MapCalls:
    """bpf(2)'s map calls; the kernel using it gives _call (counts, injects failures), _obj
    (fd -> object) and cpus."""

    def _check_key(self, m: Map, key: bytes) -> None:
        if len(key) != m.key_size:
            raise KernelError(f"map {m.name}: key of {len(key)} bytes [EINVAL]", errno.EINVAL)
        if m.type in ARRAYS and int.from_bytes(key, "little") >= m.max_entries:
            raise KernelError(f"map {m.name}: index past the end [E2BIG]", errno.E2BIG)

    def map_lookup(self, fd, key: bytes, value_size: int) -> bytes | None:
        self._call("map_lookup")
        m = self._obj(fd, Map)
        self._check_key(m, key)
        v = m.get(key)
        return None if v is None else v[:value_size]

    def map_lookup_percpu(self, fd, key: bytes, value_size: int):
        raw = self.map_lookup(fd, key, (value_size + 7) // 8 * 8 * self.cpus)
        if raw is None:
            return None
        stride = (value_size + 7) // 8 * 8
        return [raw[i:i + value_size] for i in range(0, len(raw), stride)]

    def map_update(self, fd, key: bytes, value: bytes, flags: int = 0) -> None:
        self._call("map_update")
        m = self._obj(fd, Map)
        self._check_key(m, key)
        if len(value) != m.stride:
            raise KernelError(f"map {m.name}: value of {len(value)} bytes, expected "
                              f"{m.stride} [EINVAL]", errno.EINVAL)
        if m.type not in ARRAYS and bytes(key) not in m.data and len(m.data) >= m.max_entries:
            raise KernelError(f"map {m.name}: full [E2BIG]", errno.E2BIG)
        m.set(key, value)

    def map_delete(self, fd, key: bytes) -> bool:
        self._call("map_delete")
        m = self._obj(fd, Map)
        if m.type in ARRAYS:
            raise KernelError(f"map {m.name}: arrays do not delete [EINVAL]", errno.EINVAL)
        return m.data.pop(bytes(key), None) is not None

    def map_keys(self, fd, key_size: int):
        m = self._obj(fd, Map)
        if m.type in ARRAYS:
            return iter([i.to_bytes(4, "little") for i in range(m.max_entries)])
        return iter(list(m.data))

    def map_update_batch(self, fd, keys: bytes, values: bytes, count: int, flags: int = 0):
        self._call("map_update_batch")
        if count == 0:
            return
        m = self._obj(fd, Map)
        ks, vs = len(keys) // count, len(values) // count
        if ks != m.key_size or vs != m.stride or ks * count != len(keys):
            raise KernelError(f"map {m.name}: batch of {ks}/{vs}-byte items [EINVAL]",
                              errno.EINVAL)
        if m.buf is None:
            for i in range(count):
                self.map_update(fd, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])
            return
        idx = array("I", keys)
        if max(idx) >= m.max_entries:
            raise KernelError(f"map {m.name}: index past the end [E2BIG]", errno.E2BIG)
        if idx == array("I", range(idx[0], idx[0] + count)):      # a range: one copy
            m.buf[idx[0] * vs:(idx[0] + count) * vs] = values
            return
        for n, i in enumerate(idx):
            m.buf[i * vs:(i + 1) * vs] = values[n * vs:(n + 1) * vs]

    def map_delete_batch(self, fd, keys: bytes, count: int) -> int:
        if count == 0:
            return 0
        ks = len(keys) // count
        return sum(self.map_delete(fd, keys[i * ks:(i + 1) * ks]) for i in range(count))

    def map_lookup_batch(self, fd, key_size: int, value_size: int, percpu: bool = False,
                         chunk: int = 4096):
        for k in list(self.map_keys(fd, key_size)):
            v = (self.map_lookup_percpu(fd, k, value_size) if percpu
                 else self.map_lookup(fd, k, value_size))
            if v is not None:
                yield k, v

    def array_lookup_range(self, fd, first: int, n: int, value_size: int, chunk: int = 8192):
        return [self.map_lookup(fd, (first + i).to_bytes(4, "little"), value_size)
                for i in range(n)]
