"""The firewall program's maps, by name: write one generation of compiled tables, flip the
active generation, clear the old one, manage set tries and counter slots, read counters; and
the inverse of the writer (read_generation, read_set), so what the kernel holds can be decoded.

Works on freshly loaded maps or on pins alike (both are just fds). Knows the map layout of
bpf/include/classify.h through netbpf/abi.py; knows nothing of policies or of attach.

Over 400 lines because each table's writer and its reader sit side by side (show, drift and
explain read back what apply wrote), so the two halves of one layout cannot drift apart.
"""
from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from netbpf import abi

from netbpf.fw import dirtable, pairs
from netbpf.fw.compile import CompiledDirection, CountEntry, RuleEntry, SetRef, set_hash_flags
from netbpf.fw.pairs import PairTable
from netbpf.errors import NetbpfError
from netbpf.policy.ir import SetIR
from netbpf.kernel import bpfsys

FW_MAPS = abi.FW_MAPS

# Maps a program built before the address tables and hash sets lacks: its pins are still read
# (counters carried over, stats) until the next apply replaces it.
NEWER_MAPS = (abi.NB_MAP_FW_DIR, abi.NB_MAP_SETH4, abi.NB_MAP_SETH6, abi.NB_MAP_FW_PAIR)

_U32 = abi.U32
_ARRAY, _PERCPU_ARRAY = 2, 6     # BPF_MAP_TYPE_*
_BATCH = 65536                  # entries per batch update: bounds one syscall's buffer


@dataclass
class MapRef:
    name: str
    fd: object               # bpfsys.Fd (kept open while the MapRef lives)
    key_size: int
    value_size: int
    percpu: bool
    max_entries: int = 0


class FwTables:
    def __init__(self, maps: dict[str, MapRef], words: int, class_cap: int):
        missing = [n for n in FW_MAPS if n not in maps and n not in NEWER_MAPS]
        if missing:
            raise NetbpfError(f"firewall maps missing: {', '.join(missing)}")
        self.maps = maps
        self.words = words
        self.class_cap = class_cap
        self.rules_cap = words * 64
        # NB_DIR_CHUNKS of the program, read back from the map (2 generations of 4 roots + chunks)
        self.dir_gen = maps[abi.NB_MAP_FW_DIR].max_entries // 2 if abi.NB_MAP_FW_DIR in maps else 0
        self.chunk_cap = max(0, (self.dir_gen - 4 * dirtable.ROOT) // dirtable.CHUNK)
        vsz = ctypes.sizeof(abi.vec_struct(words))
        if maps[abi.NB_MAP_FW_VECS].value_size != vsz:
            raise NetbpfError(f"nb_fw_vecs holds {maps['nb_fw_vecs'].value_size}-byte vectors, "
                              f"expected {vsz} for {words} words: program and state disagree")

    # ---- construction ----
    @classmethod
    def from_loaded(cls, loaded, words: int, class_cap: int) -> "FwTables":
        maps = {n: MapRef(n, m.fd, m.key_size, m.value_size, m.percpu)
                for n, m in loaded.maps.items()}
        for name in (abi.NB_MAP_FW_DIR, abi.NB_MAP_FW_PAIR):
            if name in maps:
                maps[name].max_entries = bpfsys.map_info(maps[name].fd).max_entries
        return cls(maps, words, class_cap)

    @classmethod
    def from_pins(cls, directory: Path, words: int, class_cap: int) -> "FwTables":
        maps = {}
        for name in FW_MAPS:
            if name in NEWER_MAPS and not (directory / name).exists():
                continue
            fd = bpfsys.obj_get(directory / name)
            info = bpfsys.map_info(fd)
            maps[name] = MapRef(name, fd, info.key_size, info.value_size, info.percpu,
                                info.max_entries)
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
        raw = bpfsys.map_lookup(self.fd(abi.NB_MAP_FW_GEN), _U32.pack(0), 4)
        return (_U32.unpack(raw)[0] & 1) if raw else 0

    def flip(self, gen: int) -> None:
        """The one write that switches every later packet to generation gen."""
        bpfsys.map_update(self.fd(abi.NB_MAP_FW_GEN), _U32.pack(0), _U32.pack(gen))

    def write_generation(self, gen: int, c: CompiledDirection, rule_slots: list[int],
                         count_slots: list[int], set_tags: dict[str, int],
                         samples: list[int] | None = None, default_sample: int = 0) -> None:
        """Write every table of generation gen (not the active one). Nothing reads it yet."""
        if c.nrules > self.rules_cap:
            raise NetbpfError(f"{c.nrules} rules do not fit a program built for {self.rules_cap}")
        if c.nclasses > self.class_cap:
            raise NetbpfError(f"{c.nclasses} classes do not fit a program built for "
                              f"{self.class_cap}")
        if len(c.dir.chunks) > self.chunk_cap:
            raise NetbpfError(f"{len(c.dir.chunks)} address table chunks do not fit a program "
                              f"built for {self.chunk_cap}")
        self.clear_generation(gen)
        self._write_vecs(gen, c)
        self._write_dir(gen, c)
        self._write_arrays(gen, c)
        self._write_rules(gen, c, rule_slots, count_slots, samples or [0] * len(c.rules))
        written = self._write_pairs(gen, c)
        self._write_cfg(gen, c, set_tags, default_sample, written)

    def clear_generation(self, gen: int) -> None:
        """Nothing to remove: every table of a generation is an array, overwritten whole by
        the next write of that generation (kept as the engine's hook after a flip)."""

    def _write_vecs(self, gen: int, c: CompiledDirection) -> None:
        ones = (1 << (64 * self.words)) - 1
        items = [(0, ((1 << 64) - 1, ones))] + sorted(c.vecs.items())
        keys = b"".join(_U32.pack(gen * self.class_cap + i) for i, _ in items)
        vals = b"".join(abi.pack_vec(self.words, cnt, bits) for _, (cnt, bits) in items)
        bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_VECS), keys, vals, len(items))

    def _write_dir(self, gen: int, c: CompiledDirection) -> None:
        """Roots of the looked-up address fields, then the chunks, in batches."""
        base = gen * self.dir_gen
        parts = [(base + r * dirtable.ROOT, root) for r, root in sorted(c.dir.roots.items())]
        first = base + 4 * dirtable.ROOT
        parts += [(first + i * dirtable.CHUNK, ch) for i, ch in enumerate(c.dir.chunks)]
        for i in range(0, len(parts), _BATCH // dirtable.CHUNK):
            group = parts[i:i + _BATCH // dirtable.CHUNK]
            keys = array("I")
            vals = array("I")
            for start, ids in group:
                keys.extend(range(start, start + len(ids)))
                vals.extend(ids)
            bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_DIR), keys.tobytes(), vals.tobytes(),
                                    len(keys))

    @property
    def pair_cells(self) -> int:
        m = self.maps.get(abi.NB_MAP_FW_PAIR)
        return m.max_entries // 2 if m is not None and m.max_entries else 0

    def _write_pairs(self, gen: int, c: CompiledDirection) -> list[bool]:
        """The pair summaries, each where the policy has it and the program room for it
        (else the generation runs without it: same verdicts, a longer scan)."""
        written = []
        cells = self.pair_cells
        for p, (first, cap) in zip(c.pairs, abi.PAIR_TABLES):
            if p is None or cells <= 1 or p.rows * p.cols > cap:
                written.append(False)
                continue
            vsz = self.maps[abi.NB_MAP_FW_PAIR].value_size
            vals = p.cell_values(vsz)
            n = p.rows * p.cols
            fd = self.fd(abi.NB_MAP_FW_PAIR)
            at = gen * cells + first
            for i in range(0, n, _BATCH):
                k = min(_BATCH, n - i)
                keys = array("I", range(at + i, at + i + k)).tobytes()
                bpfsys.map_update_batch(fd, keys, vals[i * vsz:(i + k) * vsz], k)
            written.append(True)
        return written

    def memory_bytes(self) -> int:
        """Kernel memory the classifier's arrays pin, as created (max_entries x value size, x
        CPUs for per-CPU ones): the bounded part. Tries and hashes grow with their entries."""
        total = 0
        for name in FW_MAPS:
            if name not in self.maps:
                continue
            info = bpfsys.map_info(self.maps[name].fd)
            if info.type == _ARRAY:
                total += info.max_entries * info.value_size
            elif info.type == _PERCPU_ARRAY:
                total += info.max_entries * bpfsys.percpu_value_size(info.value_size)
        return total

    def _write_arrays(self, gen: int, c: CompiledDirection) -> None:
        for which, ids in c.ports.items():
            self._write_range(abi.NB_MAP_FW_PORTS, abi.port_idx(gen, which, 0), ids)
        if c.proto is not None:
            self._write_range(abi.NB_MAP_FW_PROTO, abi.proto_idx(gen, 0), c.proto)
        if c.icmp is not None:
            self._write_range(abi.NB_MAP_FW_ICMP, abi.icmp_idx(gen, 0), c.icmp)
        if c.flags is not None:
            self._write_range(abi.NB_MAP_FW_FLAGS, abi.flags_idx(gen, 0), c.flags)

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
            bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_RULES), keys, vals, len(c.rules))
        if c.count_rules:
            keys = b"".join(_U32.pack(gen * abi.NB_MAX_COUNT_RULES + i)
                            for i in range(len(c.count_rules)))
            vals = b"".join(_U32.pack(s) for s in count_slots)
            bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_CRULES), keys, vals, len(c.count_rules))

    def _write_cfg(self, gen: int, c: CompiledDirection, set_tags: dict[str, int],
                   default_sample: int, pairs_written: list[bool] | None = None) -> None:
        cfg = abi.NbFwCfg()
        u2 = ctypes.c_uint32 * 2
        for k, (p, on) in enumerate(zip(c.pairs, pairs_written or [])):
            if on:
                cfg.pair[k] = abi.NbPairCfg(1, p.cols, u2(*p.fields), u2(*p.base), u2(*p.n),
                                            u2(*p.shift))
        cfg.default_sample = default_sample
        cfg.field_mask = c.field_mask
        cfg.wild_id[:] = list(c.wild_id)
        cfg.nsetrefs = len(c.setrefs)
        cfg.nrules = c.nrules
        cfg.ncount = c.ncount
        cfg.default_action = c.default_action
        for k, ref in enumerate(c.setrefs):
            cfg.setref[k] = abi.NbSetref(set_tags[ref.set_name], ref.field | ref.hashed,
                                         ref.member_id, ref.nonmember_id)
        raw = bytes(cfg)[:self.maps[abi.NB_MAP_FW_CFG].value_size]   # older programs: no pair
        bpfsys.map_update(self.fd(abi.NB_MAP_FW_CFG), _U32.pack(gen), raw)

    # ---- sets ----
    # A set's entries live under its tag: a family of full-length addresses in the hash map
    # (set_hash_flags, which the compiled setref agrees with), any other in the prefix trie.
    # (map, key size, offset of the tag in the key)
    _SET_MAPS = ((abi.NB_MAP_SET4, abi.LPM_KEY[4].size, 4),
                 (abi.NB_MAP_SET6, abi.LPM_KEY[6].size, 4),
                 (abi.NB_MAP_SETH4, abi.SETH_KEY[4].size, 0),
                 (abi.NB_MAP_SETH6, abi.SETH_KEY[6].size, 0))

    def _set_keys(self, tag: int, s: SetIR) -> dict[str, bytes]:
        """The keys write_set writes for s, concatenated per map."""
        hashed = set_hash_flags(s)
        head = _U32.pack(tag)
        out = {}
        for fam, entries, width, flag in ((4, s.v4, 4, abi.NB_SETREF_HASH4),
                                          (6, s.v6, 16, abi.NB_SETREF_HASH6)):
            if hashed & flag and fam == 4:
                addrs = array("I", map(itemgetter(0), entries))
                addrs.byteswap()                 # network order, as the program looks up
                keys = array("I", bytes(8 * len(entries)))
                keys[0::2] = array("I", [tag]) * len(entries)
                keys[1::2] = addrs
                out[abi.NB_MAP_SETH4] = keys.tobytes()
            elif hashed & flag:
                out[abi.NB_MAP_SETH6] = b"".join(head + a.to_bytes(16, "big") for a, _ in entries)
            else:
                trie = abi.NB_MAP_SET4 if fam == 4 else abi.NB_MAP_SET6
                out[trie] = b"".join(_U32.pack(32 + plen) + head + a.to_bytes(width, "big")
                                     for a, plen in entries)
        return {n: k for n, k in out.items() if k}

    def _kernel_set_keys(self, tag: int, raw: str = "") -> dict:
        """The keys tag holds in the kernel now, per map (batch reads of the hash maps); map
        raw's keys come as read, every tag's, concatenated."""
        head = _U32.pack(tag)
        out = {}
        for name, ksize, at in self._SET_MAPS:
            if name not in self.maps:
                continue
            blob = bpfsys.map_dump_keys(self.fd(name), ksize, 4)
            out[name] = {k for k in (blob[i:i + ksize] for i in range(0, len(blob), ksize))
                         if k[at:at + 4] == head} if raw != name else blob
        return out

    def _write_keys(self, name: str, keys: bytes) -> None:
        """Batches of _BATCH keys (kernel 6.18 batch-updates lpm_trie too; older kernels get
        one call per key from bpfsys)."""
        ksize = dict((n, k) for n, k, _ in self._SET_MAPS)[name]
        fd = self.fd(name)
        step = _BATCH * ksize
        for i in range(0, len(keys), step):
            part = keys[i:i + step]
            n = len(part) // ksize
            bpfsys.map_update_batch(fd, part, _U32.pack(1) * n, n)

    def _delete_keys(self, name: str, keys: list[bytes]) -> None:
        fd = self.fd(name)
        for i in range(0, len(keys), _BATCH):
            part = keys[i:i + _BATCH]
            bpfsys.map_delete_batch(fd, b"".join(part), len(part))

    def write_set(self, tag: int, s: SetIR) -> None:
        """A set's entries under its own tag, in batches."""
        for name, keys in self._set_keys(tag, s).items():
            self._write_keys(name, keys)

    def delete_set(self, tag: int) -> None:
        for name, keys in self._kernel_set_keys(tag).items():
            self._delete_keys(name, sorted(keys))

    def set_delta(self, tag: int, new: SetIR) -> "SetDelta | None":
        """What turns the entries tag holds in the kernel into new: O(changes) writes. None
        when a family would move between hash map and trie (the running generation's setref
        says where to look, so that takes a new generation)."""
        have = self._kernel_set_keys(tag, raw=abi.NB_MAP_SETH4)
        want = self._set_keys(tag, new)
        hashed = set_hash_flags(new)
        for hname, flag in ((abi.NB_MAP_SETH4, abi.NB_SETREF_HASH4),
                            (abi.NB_MAP_SETH6, abi.NB_SETREF_HASH6)):
            if hname not in have:
                return None
            held = have[hname] if hname != abi.NB_MAP_SETH4 else \
                any(t == tag for t in array("I", have[hname])[0::2])
            if bool(held) != bool(hashed & flag):
                return None
        delta = SetDelta(tag)
        for name, ksize, _ in self._SET_MAPS:
            if name == abi.NB_MAP_SETH4:   # the big case (host blocklists): as u32 sets
                self._delta_hosts4(tag, have[name], want.get(name, b""), delta)
                continue
            blob = want.get(name, b"")
            wanted = {blob[i:i + ksize] for i in range(0, len(blob), ksize)}
            if wanted - have[name]:
                delta.add[name] = sorted(wanted - have[name])
            if have[name] - wanted:
                delta.remove[name] = sorted(have[name] - wanted)
        return delta

    @staticmethod
    def _delta_hosts4(tag: int, have: bytes, want: bytes, delta: "SetDelta") -> None:
        """Set difference of (tag, address) keys compared as the address's u32 alone."""
        def addrs(blob: bytes) -> set[int]:
            words = array("I", blob)
            tags, out = words[0::2], words[1::2]
            if tags.count(tag) == len(tags):
                return set(out)
            return {a for t, a in zip(tags, out) if t == tag}

        was, now = addrs(have), addrs(want)
        for name, only in (("add", now - was), ("remove", was - now)):
            if only:
                getattr(delta, name)[abi.NB_MAP_SETH4] = hosts4_keys(
                    tag, array("I", sorted(only)).tobytes())

    def add_entries(self, delta: "SetDelta") -> None:
        for name, keys in delta.add.items():
            self._write_keys(name, b"".join(keys))

    def remove_entries(self, delta: "SetDelta") -> None:
        for name, keys in delta.remove.items():
            self._delete_keys(name, keys)

    # ---- counters ----
    def _percpu_zero(self, name: str) -> bytes:
        return bytes(bpfsys.percpu_value_size(self.maps[name].value_size))

    def zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        zero = self._percpu_zero(abi.NB_MAP_FW_CNT)
        keys = b"".join(_U32.pack(s) for s in slots)
        bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_CNT), keys, zero * len(slots), len(slots))

    def zero_slots_stats(self) -> None:
        zero = self._percpu_zero(abi.NB_MAP_FW_STATS)
        keys = b"".join(_U32.pack(s) for s in range(abi.NB_STAT_MAX))
        bpfsys.map_update_batch(self.fd(abi.NB_MAP_FW_STATS), keys, zero * abi.NB_STAT_MAX,
                                abi.NB_STAT_MAX)

    def read_counters(self, name: str = abi.NB_MAP_FW_CNT) -> dict[int, tuple[int, int, int]]:
        """Every slot's (packets, bytes, drops) summed over CPUs."""
        m = self.maps[name]
        out = {}
        for k, per_cpu in bpfsys.map_lookup_batch(m.fd, 4, m.value_size, percpu=True):
            p = b = d = 0
            for v in per_cpu:
                cp, cb, cd = abi.COUNTER.unpack_from(v)
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
                out[k] = [abi.COUNTER.unpack_from(v) for v in per_cpu]
        return out

    def write_percpu(self, name: str, values: dict[int, list[tuple[int, int, int]]]) -> None:
        m = self.maps[name]
        stride = (m.value_size + 7) // 8 * 8
        for k, per_cpu in values.items():
            blob = b"".join(abi.COUNTER.pack(*v).ljust(stride, b"\0") for v in per_cpu)
            bpfsys.map_update(m.fd, _U32.pack(k), blob)

    # ---- reading back (the inverse of write_generation / write_set) ----
    def _read_range(self, name: str, first: int, n: int) -> array:
        return array("I", b"".join(bpfsys.array_lookup_range(self.fd(name), first, n, 4)))

    def read_generation(self, gen: int) -> "GenerationImage":
        """Generation gen as the kernel holds it: the CompiledDirection write_generation was
        given (set references name their tag as 'tag<N>'), with slots and sampling."""
        cfg = self._read_cfg(gen)
        rules, slots, samples = [], [], []
        if cfg.nrules:
            first = gen * self.rules_cap
            size = ctypes.sizeof(abi.NbRule)
            for t in range(cfg.nrules):
                r = abi.NbRule.from_buffer_copy(
                    bpfsys.map_lookup(self.fd(abi.NB_MAP_FW_RULES), _U32.pack(first + t), size))
                rules.append(RuleEntry(f"#{t}", r.action, r.count_mask, r.rl_rate, r.rl_burst,
                                       r.rl_per, ""))
                slots.append(r.slot)
                samples.append(r.sample)
        count_slots = list(self._read_range(abi.NB_MAP_FW_CRULES, gen * abi.NB_MAX_COUNT_RULES,
                                            cfg.ncount)) if cfg.ncount else []
        vsz = ctypes.sizeof(abi.vec_struct(self.words))
        nsum = abi.nb_sum(self.words)
        raw = bpfsys.array_lookup_range(self.fd(abi.NB_MAP_FW_VECS), gen * self.class_cap,
                                        self.class_cap, vsz)

        def vec(i: int) -> tuple[int, int]:
            v = raw[i]
            return int.from_bytes(v[:8], "little"), int.from_bytes(v[8 + 8 * nsum:vsz], "little")

        mask = cfg.field_mask
        dirt, lpm = self._read_dir(gen, mask, list(cfg.wild_id))
        ports = {w: self._read_range(abi.NB_MAP_FW_PORTS, abi.port_idx(gen, w, 0), 65536)
                 for w, f in ((0, abi.NB_F_SPORT), (1, abi.NB_F_DPORT)) if mask >> f & 1}
        arr = {f: self._read_range(name, first, n) if mask >> f & 1 else None
               for f, name, first, n in ((abi.NB_F_PROTO, abi.NB_MAP_FW_PROTO, abi.proto_idx(gen, 0), 256),
                                         (abi.NB_F_ICMP, abi.NB_MAP_FW_ICMP, abi.icmp_idx(gen, 0), 65536),
                                         (abi.NB_F_FLAGS, abi.NB_MAP_FW_FLAGS, abi.flags_idx(gen, 0), 256))}
        hash_bits = abi.NB_SETREF_HASH4 | abi.NB_SETREF_HASH6
        setrefs = [SetRef(f"tag{r.tag}", r.field & ~hash_bits, r.member_id, r.nonmember_id,
                          r.field & hash_bits)
                   for r in (cfg.setref[k] for k in range(cfg.nsetrefs))]
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
            icmp=arr[abi.NB_F_ICMP], flags=arr[abi.NB_F_FLAGS], nclasses=max(vecs, default=0) + 1,
            dir=dirt, pairs=tuple(self._read_pair(gen, cfg.pair[k], k)
                                  for k in range(abi.NB_PAIRS)))
        return GenerationImage(c, slots, count_slots, samples, cfg.default_sample)

    def _read_cfg(self, gen: int) -> abi.NbFwCfg:
        """nb_fw_cfg[gen]; a program built before the pair tables holds a shorter one (the
        fields it lacks read as zero: no pair table)."""
        size = self.maps[abi.NB_MAP_FW_CFG].value_size
        raw = bpfsys.map_lookup(self.fd(abi.NB_MAP_FW_CFG), _U32.pack(gen), size) or b""
        return abi.NbFwCfg.from_buffer_copy(raw.ljust(ctypes.sizeof(abi.NbFwCfg), b"\0"))

    def pair_grids(self, gen: int) -> list[dict]:
        """Generation gen's pair tables in use: fields, rows and cols of each."""
        cfg = self._read_cfg(gen)
        names = {abi.NB_F_SRC: "src", abi.NB_F_DST: "dst", abi.NB_F_DPORT: "dport"}
        return [{"fields": [names.get(pc.field[0], "?"), names.get(pc.field[1], "?")],
                 "rows": pairs.groups(pc.n[0], pc.shift[0]), "cols": pc.cols}
                for pc in cfg.pair if pc.on and pc.n[0]]

    def _read_pair(self, gen: int, pc, k: int) -> PairTable | None:
        cells = self.pair_cells
        first, cap = abi.PAIR_TABLES[k]
        if not pc.on or cells <= 1 or not pc.n[0]:
            return None
        n, shift = (pc.n[0], pc.n[1]), (pc.shift[0], pc.shift[1])
        rows = pairs.groups(n[0], shift[0])
        if rows * pc.cols > cap:
            return None
        vsz = self.maps[abi.NB_MAP_FW_PAIR].value_size
        raw = bpfsys.array_lookup_range(self.fd(abi.NB_MAP_FW_PAIR), gen * cells + first,
                                        rows * pc.cols, vsz)
        return PairTable((pc.field[0], pc.field[1]), (pc.base[0], pc.base[1]), n, shift,
                         pc.cols, rows, vsz, b"".join(raw))

    def _read_dir(self, gen: int, mask: int, wild: list[int]):
        """Generation gen's address tables as written (DirTables) and as disjoint
        (field, address bytes, plen, class id) prefixes of every non-wildcard class."""
        base = gen * self.dir_gen
        dirt = dirtable.DirTables()
        lpm: dict[int, list] = {4: [], 6: []}
        chunk_of: dict[int, int] = {}           # kernel chunk index -> index in dirt.chunks

        def read(first: int, n: int) -> array:
            return array("I", b"".join(bpfsys.array_lookup_range(self.fd(abi.NB_MAP_FW_DIR), first,
                                                                 n, 4)))

        def walk(tbl: array, prefix: int, depth: int, f: int, fam: int, width: int) -> None:
            step = dirtable.ROOT_BITS if depth == 0 else 8
            for i, v in enumerate(tbl):
                addr = (prefix << step) | i
                if v & dirtable.PTR:
                    k = v & ~dirtable.PTR
                    if k not in chunk_of:
                        chunk_of[k] = len(dirt.chunks)
                        dirt.chunks.append(read(base + 4 * dirtable.ROOT + k * dirtable.CHUNK,
                                                dirtable.CHUNK))
                    tbl[i] = dirtable.PTR | chunk_of[k]
                    walk(dirt.chunks[chunk_of[k]], addr, depth + step, f, fam, width)
                elif v != wild[f]:
                    plen = depth + step
                    lpm[fam].append((f, (addr << (width - plen)).to_bytes(width // 8, "big"),
                                     plen, v))

        for f in (abi.NB_F_SRC, abi.NB_F_DST):
            if not mask >> f & 1:
                continue
            for fam, width in ((4, 32), (6, 128)):
                ridx = dirtable.root_index(f, fam)
                root = read(base + ridx * dirtable.ROOT, dirtable.ROOT)
                walk(root, 0, 0, f, fam, width)
                dirt.roots[ridx] = root
        return dirt, lpm

    def read_set(self, tag: int) -> SetIR:
        """The entries written by write_set(tag, ...): the prefix trie's and the hash map's."""
        out = {}
        held = self._kernel_set_keys(tag)
        for fam, name, hname, width in ((4, abi.NB_MAP_SET4, abi.NB_MAP_SETH4, 4),
                                        (6, abi.NB_MAP_SET6, abi.NB_MAP_SETH6, 16)):
            entries = [(int.from_bytes(k[8:], "big"), _U32.unpack(k[:4])[0] - 32)
                       for k in held[name]]
            entries += [(int.from_bytes(k[4:], "big"), width * 8) for k in held.get(hname, ())]
            out[fam] = tuple(sorted(entries))
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


def hosts4_keys(tag: int, addrs: bytes) -> list[bytes]:
    """The hash-map keys of tag's IPv4 hosts, given as concatenated 4-byte network-order
    addresses (what inet_pton returns)."""
    n = len(addrs) // 4
    keys = array("I", bytes(8 * n))
    keys[0::2] = array("I", [tag]) * n
    keys[1::2] = array("I", addrs)
    blob = keys.tobytes()
    return [blob[i:i + 8] for i in range(0, len(blob), 8)]


@dataclass
class SetDelta:
    """Keys to add to and remove from each set map so that a tag holds a set's new entries."""
    tag: int
    add: dict[str, list[bytes]] = field(default_factory=dict)
    remove: dict[str, list[bytes]] = field(default_factory=dict)

    def counts(self) -> tuple[int, int]:
        return (sum(map(len, self.add.values())), sum(map(len, self.remove.values())))


@dataclass
class GenerationImage:
    compiled: CompiledDirection
    rule_slots: list[int]
    count_slots: list[int]
    samples: list[int]
    default_sample: int


def table_bytes(words: int, class_cap: int, chunks: int) -> int:
    """What memory_bytes() reads from a loaded program, from its shape alone (status uses it
    without opening maps): the classifier's arrays as bpf/include/classify.h declares them."""
    percpu = bpfsys.percpu_value_size(ctypes.sizeof(abi.NbCounter))
    return (4 + 2 * ctypes.sizeof(abi.NbFwCfg) + 2 * words * 64 * ctypes.sizeof(abi.NbRule)
            + 2 * abi.NB_MAX_COUNT_RULES * 4
            + 2 * class_cap * ctypes.sizeof(abi.vec_struct(words))
            + dirtable.map_bytes(chunks)
            + 2 * abi.pair_cells(words) * 8 * abi.nb_sum(words)
            + 4 * 65536 * 4 + 2 * 256 * 4 + 2 * 65536 * 4 + 2 * 256 * 4
            + abi.slot_cap(words) * percpu + abi.NB_STAT_MAX * percpu)



class CounterCarry:
    """Carry counters from a running program to its replacement: copy just before the swap
    (the new program is not running yet, so the copy is exact), then measure what the old
    program counted between the copy and the swap. That remainder is returned, not written:
    a user-space write of a per-CPU value would replace whatever the now live program counted
    between our read and our write. The caller keeps it in the state (PartState.carried)."""

    def __init__(self, old: FwTables, new: FwTables, slots: list[tuple[int, int]],
                 carried: dict[str, dict[int, tuple[int, int, int]]] | None = None):
        """slots: (old slot, new slot) of every rule that stays; totals keep their keys.
        carried: the old program's own remainder (its PartState.carried), folded into the copy."""
        self.old, self.new = old, new
        self.pairs = {abi.NB_MAP_FW_CNT: dict(slots),
                      abi.NB_MAP_FW_STATS: {k: k for k in range(abi.NB_STAT_MAX)}}
        self.carried = carried or {}
        self.snap: dict[str, dict] = {}

    def copy(self) -> None:
        for name, pairs in self.pairs.items():
            self.snap[name] = self.old.read_percpu(name, pairs)
            extra = self.carried.get(name, {})
            out = {}
            for k, per_cpu in self.snap[name].items():
                per_cpu = list(per_cpu)
                if k in extra:      # the remainder goes on CPU 0: only sums are ever read
                    per_cpu[0] = tuple(a + b for a, b in zip(per_cpu[0], extra[k]))
                out[pairs[k]] = per_cpu
            self.new.write_percpu(name, out)

    def catch_up(self) -> dict[str, dict[str, list[int]]]:
        """What the old program counted after the copy, summed over CPUs, by new key: the
        value for PartState.carried."""
        out: dict[str, dict[str, list[int]]] = {}
        for name, pairs in self.pairs.items():
            later = self.old.read_percpu(name, pairs)
            for k, per_cpu in later.items():
                before = self.snap[name].get(k, [(0, 0, 0)] * len(per_cpu))
                delta = [sum(lv[i] - bv[i] for lv, bv in zip(per_cpu, before)) for i in range(3)]
                if any(delta):
                    out.setdefault(name, {})[str(pairs[k])] = delta
        return out
