"""The firewall program's maps, by name: write one generation of compiled tables, flip the
active generation, clear the old one, manage set tries and counter slots, read counters.

Works on freshly loaded maps or on pins alike (both are just fds). Knows the map layout of
bpf/include/classify.h through netbpf/abi.py; knows nothing of policies or of attach.
"""
from __future__ import annotations

import ctypes
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

from netbpf import abi
from netbpf.compile import CompiledDirection
from netbpf.errors import NetbpfError
from netbpf.ir import SetIR
from netbpf.kernel import bpfsys

FW_MAPS = ("nb_fw_gen", "nb_fw_cfg", "nb_fw_rules", "nb_fw_crules", "nb_fw_vecs",
           "nb_fw_lpm4", "nb_fw_lpm6", "nb_fw_ports", "nb_fw_proto", "nb_fw_icmp",
           "nb_fw_flags", "nb_set4", "nb_set6", "nb_fw_cnt", "nb_fw_stats", "nb_fw_rl")

ACTION_CODES = {"allow": abi.NB_ACT_ALLOW, "drop": abi.NB_ACT_DROP}
_U32 = struct.Struct("<I")


@dataclass
class MapRef:
    name: str
    fd: object               # bpfsys.Fd (kept open while the MapRef lives)
    key_size: int
    value_size: int
    percpu: bool


class FwTables:
    def __init__(self, maps: dict[str, MapRef], words: int, class_cap: int):
        missing = [n for n in FW_MAPS if n not in maps]
        if missing:
            raise NetbpfError(f"firewall maps missing: {', '.join(missing)}")
        self.maps = maps
        self.words = words
        self.class_cap = class_cap
        self.rules_cap = words * 64
        vsz = ctypes.sizeof(abi.vec_struct(words))
        if maps["nb_fw_vecs"].value_size != vsz:
            raise NetbpfError(f"nb_fw_vecs holds {maps['nb_fw_vecs'].value_size}-byte vectors, "
                              f"expected {vsz} for {words} words: program and state disagree")

    # ---- construction ----
    @classmethod
    def from_loaded(cls, loaded, words: int, class_cap: int) -> "FwTables":
        maps = {n: MapRef(n, m.fd, m.key_size, m.value_size, m.percpu)
                for n, m in loaded.maps.items()}
        return cls(maps, words, class_cap)

    @classmethod
    def from_pins(cls, directory: Path, words: int, class_cap: int) -> "FwTables":
        maps = {}
        for name in FW_MAPS:
            fd = bpfsys.obj_get(directory / name)
            info = bpfsys.map_info(fd)
            maps[name] = MapRef(name, fd, info.key_size, info.value_size, info.percpu)
        return cls(maps, words, class_cap)

    def close(self) -> None:
        for m in self.maps.values():
            close = getattr(m.fd, "close", None)
            if close and getattr(m.fd, "owned", True):
                close()

    def fd(self, name: str) -> int:
        return int(self.maps[name].fd)

    # ---- generation ----
    def active_gen(self) -> int:
        raw = bpfsys.map_lookup(self.fd("nb_fw_gen"), _U32.pack(0), 4)
        return (_U32.unpack(raw)[0] & 1) if raw else 0

    def flip(self, gen: int) -> None:
        """The one write that switches every later packet to generation gen."""
        bpfsys.map_update(self.fd("nb_fw_gen"), _U32.pack(0), _U32.pack(gen))

    def write_generation(self, gen: int, c: CompiledDirection, rule_slots: list[int],
                         count_slots: list[int], set_tags: dict[str, int],
                         samples: list[int] | None = None, default_sample: int = 0) -> None:
        """Write every table of generation gen (not the active one). Nothing reads it yet."""
        if c.nrules > self.rules_cap:
            raise NetbpfError(f"{c.nrules} rules do not fit a program built for {self.rules_cap}")
        if c.nclasses > self.class_cap:
            raise NetbpfError(f"{c.nclasses} classes do not fit a program built for "
                              f"{self.class_cap}")
        self.clear_generation(gen)
        self._write_vecs(gen, c)
        self._write_lpm(gen, c)
        self._write_arrays(gen, c)
        self._write_rules(gen, c, rule_slots, count_slots, samples or [0] * len(c.rules))
        self._write_cfg(gen, c, set_tags, default_sample)

    def clear_generation(self, gen: int) -> None:
        """Remove generation gen's prefixes (arrays are simply overwritten next time)."""
        for name, ksize in (("nb_fw_lpm4", 12), ("nb_fw_lpm6", 24)):
            fd = self.fd(name)
            stale = [k for k in bpfsys.map_keys(fd, ksize) if (_U32.unpack(k[4:8])[0] & 0xff) == gen]
            for k in stale:
                bpfsys.map_delete(fd, k)

    def _write_vecs(self, gen: int, c: CompiledDirection) -> None:
        ones = (1 << (64 * self.words)) - 1
        items = [(0, ((1 << 64) - 1, ones))] + sorted(c.vecs.items())
        keys = b"".join(_U32.pack(gen * self.class_cap + i) for i, _ in items)
        vals = b"".join(abi.pack_vec(self.words, cnt, bits) for _, (cnt, bits) in items)
        bpfsys.map_update_batch(self.fd("nb_fw_vecs"), keys, vals, len(items))

    def _write_lpm(self, gen: int, c: CompiledDirection) -> None:
        for name, entries, width in (("nb_fw_lpm4", c.lpm4, 4), ("nb_fw_lpm6", c.lpm6, 16)):
            fd = self.fd(name)
            for field, addr, plen, cid in entries:
                key = struct.pack("<II", 32 + plen, abi.nb_tag(gen, field)) + bytes(addr)
                bpfsys.map_update(fd, key, _U32.pack(cid))

    def _write_arrays(self, gen: int, c: CompiledDirection) -> None:
        for which, ids in c.ports.items():
            self._write_range("nb_fw_ports", abi.port_idx(gen, which, 0), ids)
        if c.proto is not None:
            self._write_range("nb_fw_proto", abi.proto_idx(gen, 0), c.proto)
        if c.icmp is not None:
            self._write_range("nb_fw_icmp", abi.icmp_idx(gen, 0), c.icmp)
        if c.flags is not None:
            self._write_range("nb_fw_flags", abi.flags_idx(gen, 0), c.flags)

    def _write_range(self, name: str, first: int, ids) -> None:
        keys = array("I", range(first, first + len(ids))).tobytes()
        vals = array("I", ids).tobytes()
        bpfsys.map_update_batch(self.fd(name), keys, vals, len(ids))

    def _write_rules(self, gen: int, c: CompiledDirection, rule_slots: list[int],
                     count_slots: list[int], samples: list[int]) -> None:
        if c.rules:
            keys = b"".join(_U32.pack(gen * self.rules_cap + t) for t in range(len(c.rules)))
            vals = b"".join(bytes(abi.NbRule(r.action, slot, r.count_mask, r.rl_rate,
                                             r.rl_burst, r.rl_per, sample))
                            for r, slot, sample in zip(c.rules, rule_slots, samples))
            bpfsys.map_update_batch(self.fd("nb_fw_rules"), keys, vals, len(c.rules))
        if c.count_rules:
            keys = b"".join(_U32.pack(gen * abi.NB_MAX_COUNT_RULES + i)
                            for i in range(len(c.count_rules)))
            vals = b"".join(_U32.pack(s) for s in count_slots)
            bpfsys.map_update_batch(self.fd("nb_fw_crules"), keys, vals, len(c.count_rules))

    def _write_cfg(self, gen: int, c: CompiledDirection, set_tags: dict[str, int],
                   default_sample: int) -> None:
        cfg = abi.NbFwCfg()
        cfg.default_sample = default_sample
        cfg.field_mask = c.field_mask
        cfg.wild_id[:] = list(c.wild_id)
        cfg.nsetrefs = len(c.setrefs)
        cfg.nrules = c.nrules
        cfg.ncount = c.ncount
        cfg.default_action = c.default_action
        for k, ref in enumerate(c.setrefs):
            cfg.setref[k] = abi.NbSetref(set_tags[ref.set_name], ref.field, ref.member_id,
                                         ref.nonmember_id)
        bpfsys.map_update(self.fd("nb_fw_cfg"), _U32.pack(gen), bytes(cfg))

    # ---- sets ----
    def write_set(self, tag: int, s: SetIR) -> None:
        """A set's entries under its own tag (LPM tries have no batch update: one call each)."""
        one = _U32.pack(1)
        for name, entries, width in (("nb_set4", s.v4, 4), ("nb_set6", s.v6, 16)):
            fd = self.fd(name)
            head = _U32.pack(tag)
            for addr, plen in entries:
                key = _U32.pack(32 + plen) + head + addr.to_bytes(width, "big")
                bpfsys.map_update(fd, key, one)

    def delete_set(self, tag: int) -> None:
        for name, ksize in (("nb_set4", 12), ("nb_set6", 24)):
            fd = self.fd(name)
            for k in [k for k in bpfsys.map_keys(fd, ksize) if _U32.unpack(k[4:8])[0] == tag]:
                bpfsys.map_delete(fd, k)

    # ---- counters ----
    def _percpu_zero(self, name: str) -> bytes:
        return bytes(bpfsys.percpu_value_size(self.maps[name].value_size))

    def zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        zero = self._percpu_zero("nb_fw_cnt")
        keys = b"".join(_U32.pack(s) for s in slots)
        bpfsys.map_update_batch(self.fd("nb_fw_cnt"), keys, zero * len(slots), len(slots))

    def zero_slots_stats(self) -> None:
        zero = self._percpu_zero("nb_fw_stats")
        keys = b"".join(_U32.pack(s) for s in range(abi.NB_STAT_MAX))
        bpfsys.map_update_batch(self.fd("nb_fw_stats"), keys, zero * abi.NB_STAT_MAX,
                                abi.NB_STAT_MAX)

    def read_counters(self, name: str = "nb_fw_cnt") -> dict[int, tuple[int, int, int]]:
        """Every slot's (packets, bytes, drops) summed over CPUs."""
        m = self.maps[name]
        out = {}
        for k, per_cpu in bpfsys.map_lookup_batch(m.fd, 4, m.value_size, percpu=True):
            p = b = d = 0
            for v in per_cpu:
                cp, cb, cd = struct.unpack_from("<QQQ", v)
                p, b, d = p + cp, b + cb, d + cd
            if p or b or d:
                out[_U32.unpack(k)[0]] = (p, b, d)
        return out

    def read_percpu(self, name: str, keys) -> dict[int, list[tuple[int, int, int]]]:
        """(packets, bytes, drops) per CPU for each key of a per-CPU counter map."""
        m = self.maps[name]
        out = {}
        for k in keys:
            per_cpu = bpfsys.map_lookup_percpu(m.fd, _U32.pack(k), m.value_size)
            if per_cpu:
                out[k] = [struct.unpack_from("<QQQ", v) for v in per_cpu]
        return out

    def write_percpu(self, name: str, values: dict[int, list[tuple[int, int, int]]]) -> None:
        m = self.maps[name]
        stride = (m.value_size + 7) // 8 * 8
        for k, per_cpu in values.items():
            blob = b"".join(struct.pack("<QQQ", *v).ljust(stride, b"\0") for v in per_cpu)
            bpfsys.map_update(m.fd, _U32.pack(k), blob)


COUNTER_MAPS = ("nb_fw_cnt", "nb_fw_stats")


class CounterCarry:
    """Carry counters from a running program to its replacement: copy just before the swap,
    then add what the old program counted between the copy and the swap, so a program change
    loses (almost) nothing."""

    def __init__(self, old: FwTables, new: FwTables, slots: list[tuple[int, int]]):
        """slots: (old slot, new slot) of every rule that stays; totals keep their keys."""
        self.old, self.new = old, new
        self.pairs = {"nb_fw_cnt": dict(slots),
                      "nb_fw_stats": {k: k for k in range(abi.NB_STAT_MAX)}}
        self.snap: dict[str, dict] = {}

    def copy(self) -> None:
        for name, pairs in self.pairs.items():
            self.snap[name] = self.old.read_percpu(name, pairs)
            self.new.write_percpu(name, {pairs[k]: v for k, v in self.snap[name].items()})

    def catch_up(self) -> None:
        for name, pairs in self.pairs.items():
            later = self.old.read_percpu(name, pairs)
            now = self.new.read_percpu(name, pairs.values())
            out = {}
            for k, per_cpu in later.items():
                before = self.snap[name].get(k, [(0, 0, 0)] * len(per_cpu))
                cur = now.get(pairs[k], [(0, 0, 0)] * len(per_cpu))
                out[pairs[k]] = [tuple(c + l - b for c, l, b in zip(cv, lv, bv))
                                 for cv, lv, bv in zip(cur, per_cpu, before)]
            self.new.write_percpu(name, out)
