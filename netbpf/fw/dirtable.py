"""Address fields as direct-indexed tables (DIR-16-8-8..., as DPDK's rte_lpm/rte_lpm6 do):
a 65,536-entry root indexed by the first 16 address bits, then 256-entry chunks indexed by one
byte each, every entry either a class id or a pointer to the next chunk.

Pure: builds and walks the arrays the data plane reads (bpf/include/classify.h,
nb_dir_class); knows nothing of maps or generations. An IPv4 lookup is at most 3 array
reads, an IPv6 one at most 15, whatever the number of prefixes.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from netbpf import abi

ROOT_BITS = 16
ROOT = 1 << ROOT_BITS
CHUNK = 256
PTR = abi.NB_DIR_PTR


def root_index(f: int, family: int) -> int:
    """Which of the four roots of a generation: (field, family)."""
    return f * 2 + (family == 6)


@dataclass
class DirTables:
    roots: dict[int, array] = field(default_factory=dict)   # root_index -> ROOT class ids
    chunks: list[array] = field(default_factory=list)       # shared by all roots

    def add_root(self, ridx: int, width: int, wild: int,
                 prefixes: list[tuple[int, int, int]]) -> None:
        """Fill root ridx with (addr, plen, class id) prefixes of a width-bit family; every
        id must already hold the bits of the prefixes containing it (leaf pushing is then
        a plain paint, shortest prefixes first)."""
        root = array("I", [wild]) * ROOT
        self.roots[ridx] = root
        for addr, plen, cid in sorted(prefixes, key=lambda e: e[1]):
            if plen <= ROOT_BITS:
                lo = addr >> (width - ROOT_BITS)
                span = 1 << (ROOT_BITS - plen)
                root[lo:lo + span] = array("I", [cid]) * span
                continue
            tbl, idx, depth = root, addr >> (width - ROOT_BITS), ROOT_BITS
            while True:
                tbl = self._descend(tbl, idx)
                idx = (addr >> (width - depth - 8)) & 0xff
                depth += 8
                if plen <= depth:
                    span = 1 << (depth - plen)
                    tbl[idx:idx + span] = array("I", [cid]) * span
                    break

    def _descend(self, tbl: array, idx: int) -> array:
        v = tbl[idx]
        if v & PTR:
            return self.chunks[v & ~PTR]
        chunk = array("I", [v]) * CHUNK       # inherits the covering class
        tbl[idx] = PTR | len(self.chunks)
        self.chunks.append(chunk)
        return chunk

    def lookup(self, ridx: int, addr: int, width: int) -> int:
        """What nb_dir_class() returns: the class id of the longest prefix holding addr."""
        v = self.roots[ridx][addr >> (width - ROOT_BITS)]
        depth = ROOT_BITS
        while v & PTR and depth < width:
            depth += 8
            v = self.chunks[v & ~PTR][(addr >> (width - depth)) & 0xff]
        return v


def chunk_cap(needed: int, current: int | None = None) -> int:
    """Chunks a program is built for: the current cap while it fits, else the need plus a
    quarter (later edits fit without a new program), in steps of 64, at least 64."""
    if needed > abi.NB_DIR_MAX_CHUNKS:
        from netbpf.errors import InputError
        raise InputError(f"address prefixes need {needed} table chunks: at most "
                         f"{abi.NB_DIR_MAX_CHUNKS} (NB_DIR_MAX_CHUNKS) per direction; put "
                         f"large address lists in a set of full-length addresses")
    if current is not None and needed <= current:
        return current
    return min(abi.NB_DIR_MAX_CHUNKS, max(64, -(-(needed + needed // 4) // 64) * 64))


def map_bytes(chunks: int) -> int:
    """Kernel memory of nb_fw_dir for a chunk cap: two generations of 4 roots and the chunks."""
    return 2 * (4 * ROOT + CHUNK * chunks) * 4
