"""The firewall program's maps, by name: write one generation of compiled tables, flip the
active generation, clear the old one, manage set tries and counter slots, read counters; and
the inverse of the writer (read_generation, read_set), so what the kernel holds can be decoded.

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
from netbpf.compile import CompiledDirection, CountEntry, RuleEntry, SetRef
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

    # ---- reading back (the inverse of write_generation / write_set) ----
    def _read_range(self, name: str, first: int, n: int) -> array:
        return array("I", b"".join(bpfsys.array_lookup_range(self.fd(name), first, n, 4)))

    def read_generation(self, gen: int) -> "GenerationImage":
        """Generation gen as the kernel holds it: the CompiledDirection write_generation was
        given (set references name their tag as 'tag<N>'), with slots and sampling."""
        raw = bpfsys.map_lookup(self.fd("nb_fw_cfg"), _U32.pack(gen), ctypes.sizeof(abi.NbFwCfg))
        cfg = abi.NbFwCfg.from_buffer_copy(raw)
        rules, slots, samples = [], [], []
        if cfg.nrules:
            first = gen * self.rules_cap
            size = ctypes.sizeof(abi.NbRule)
            for t in range(cfg.nrules):
                r = abi.NbRule.from_buffer_copy(
                    bpfsys.map_lookup(self.fd("nb_fw_rules"), _U32.pack(first + t), size))
                rules.append(RuleEntry(f"#{t}", r.action, r.count_mask, r.rl_rate, r.rl_burst,
                                       r.rl_per, ""))
                slots.append(r.slot)
                samples.append(r.sample)
        count_slots = list(self._read_range("nb_fw_crules", gen * abi.NB_MAX_COUNT_RULES,
                                            cfg.ncount)) if cfg.ncount else []
        vsz = ctypes.sizeof(abi.vec_struct(self.words))
        nsum = abi.nb_sum(self.words)
        raw = bpfsys.array_lookup_range(self.fd("nb_fw_vecs"), gen * self.class_cap,
                                        self.class_cap, vsz)

        def vec(i: int) -> tuple[int, int]:
            v = raw[i]
            return int.from_bytes(v[:8], "little"), int.from_bytes(v[8 + 8 * nsum:vsz], "little")

        lpm: dict[int, list] = {4: [], 6: []}
        for fam, name, ksize in ((4, "nb_fw_lpm4", 12), (6, "nb_fw_lpm6", 24)):
            fd = self.fd(name)
            for k in bpfsys.map_keys(fd, ksize):
                plen, tag = struct.unpack_from("<II", k)
                if tag & 0xff != gen:
                    continue
                cid = _U32.unpack(bpfsys.map_lookup(fd, k, 4))[0]
                lpm[fam].append((tag >> 8, bytes(k[8:]), plen - 32, cid))
        mask = cfg.field_mask
        ports = {w: self._read_range("nb_fw_ports", abi.port_idx(gen, w, 0), 65536)
                 for w, f in ((0, abi.NB_F_SPORT), (1, abi.NB_F_DPORT)) if mask >> f & 1}
        arr = {f: self._read_range(name, first, n) if mask >> f & 1 else None
               for f, name, first, n in ((abi.NB_F_PROTO, "nb_fw_proto", abi.proto_idx(gen, 0), 256),
                                         (abi.NB_F_ICMP, "nb_fw_icmp", abi.icmp_idx(gen, 0), 65536),
                                         (abi.NB_F_FLAGS, "nb_fw_flags", abi.flags_idx(gen, 0), 256))}
        setrefs = [SetRef(f"tag{cfg.setref[k].tag}", cfg.setref[k].field, cfg.setref[k].member_id,
                          cfg.setref[k].nonmember_id) for k in range(cfg.nsetrefs)]
        # the classes this generation refers to (stale ids of older generations are left out)
        used = {i for f, i in enumerate(cfg.wild_id) if mask >> f & 1}
        used |= {e[3] for fam in (4, 6) for e in lpm[fam]}
        used |= {i for a in (*ports.values(), *arr.values()) if a is not None for i in set(a)}
        used |= {i for r in setrefs for i in (r.member_id, r.nonmember_id)}
        vecs = {i: vec(i) for i in sorted(used) if 0 < i < self.class_cap}
        c = CompiledDirection(
            nrules=cfg.nrules, ncount=cfg.ncount, default_action=cfg.default_action,
            field_mask=mask, wild_id=list(cfg.wild_id), setrefs=setrefs, rules=rules,
            count_rules=[CountEntry(f"c{i}", "") for i in range(cfg.ncount)], vecs=vecs,
            lpm4=sorted(lpm[4]), lpm6=sorted(lpm[6]), ports=ports, proto=arr[abi.NB_F_PROTO],
            icmp=arr[abi.NB_F_ICMP], flags=arr[abi.NB_F_FLAGS], nclasses=max(vecs, default=0) + 1)
        return GenerationImage(c, slots, count_slots, samples, cfg.default_sample)

    def read_set(self, tag: int) -> SetIR:
        """The entries written by write_set(tag, ...), in trie order."""
        out = {}
        for fam, name, ksize in ((4, "nb_set4", 12), (6, "nb_set6", 24)):
            head = _U32.pack(tag)
            out[fam] = tuple(sorted((int.from_bytes(k[8:], "big"), _U32.unpack(k[:4])[0] - 32)
                                    for k in bpfsys.map_keys(self.fd(name), ksize)
                                    if k[4:8] == head))
        return SetIR(f"tag{tag}", v4=out[4], v6=out[6])

    def copy_to(self, other: "FwTables", gen: int, set_tags: list[int]) -> None:
        """Generation gen and the sets it uses into other (a fresh program's maps, same shape),
        made active there: a private copy of the classifier to run test packets through."""
        img = self.read_generation(gen)
        other.write_generation(gen, img.compiled, img.rule_slots, img.count_slots,
                               {f"tag{t}": t for t in set_tags}, img.samples, img.default_sample)
        for tag in set_tags:
            other.delete_set(tag)
            other.write_set(tag, self.read_set(tag))
        other.flip(gen)


@dataclass
class GenerationImage:
    compiled: CompiledDirection
    rule_slots: list[int]
    count_slots: list[int]
    samples: list[int]
    default_sample: int


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
