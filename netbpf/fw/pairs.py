"""Pair summaries: which rule words can match a pair of two fields' classes (table 0: source x
destination; table 1: an address x destination port).

Why: on dense rule sets (ClassBench's acl/fw/ipc shapes) many rules take any one address
(wildcards, nested prefixes), so every field's own summary has a bit in nearly every 64-rule
word and the scan ANDs words whose result is zero. A pair's summary is exact about its two
fields together: a word is scanned only if one of its rules takes both values.

Layout (bpf/include/netbpf_abi.h, struct nb_pair_cfg): the compiler numbers the classes of
each address field and of the destination port in one contiguous id range, in value order,
so rank = id - base. Ranks are grouped by a shift (neighbouring prefixes or ports share a row)
until rows x cols fit the table's cells; a cell holds the summary of (OR of its rows' vectors)
AND (OR of its columns' vectors). A superset of each member pair's summary: grouping costs
scan words, never a rule. Pure; numpy does the cross product (imported only here).
"""
from __future__ import annotations

from dataclasses import dataclass

from netbpf import abi

_BLOCK = 1 << 22          # bools per step of the cross product (bounds its memory)


@dataclass(frozen=True)
class PairTable:
    fields: tuple[int, int]       # NB_F_* of the rows / columns
    base: tuple[int, int]         # first class id of each range
    n: tuple[int, int]            # ids in each range
    shift: tuple[int, int]        # rank >> shift = row / column
    cols: int
    rows: int
    cell_bytes: int               # summary bytes per cell (8 x NB_SUM of the shape compiled for)
    sums: bytes                   # rows x cols cells, row-major

    def cell(self, a: int, b: int) -> int | None:
        """The cell of a packet's classes in the two fields; None outside the ranges."""
        rs, rd = a - self.base[0], b - self.base[1]
        if not (0 <= rs < self.n[0] and 0 <= rd < self.n[1]):
            return None
        return (rs >> self.shift[0]) * self.cols + (rd >> self.shift[1])

    def summary(self, cell: int) -> int:
        """Bit i set: rule word i may hold a rule taking both values of the cell."""
        at = cell * self.cell_bytes
        return int.from_bytes(self.sums[at:at + self.cell_bytes], "little")

    def cell_values(self, value_size: int) -> bytes:
        """The cells as a program with value_size-byte summaries holds them (zero-padded)."""
        if value_size == self.cell_bytes:
            return self.sums
        if value_size < self.cell_bytes:
            raise ValueError(f"{self.cell_bytes}-byte pair summaries do not fit {value_size}")
        pad = bytes(value_size - self.cell_bytes)
        return b"".join(self.sums[i:i + self.cell_bytes] + pad
                        for i in range(0, len(self.sums), self.cell_bytes))


def density(vecs: dict[int, int], first: int, n: int, nrules: int, sample: int = 256) -> float:
    """Mean non-zero rule words of a field's class vectors (an even sample of the range). A
    pair table can only drop words both fields' own summaries name: over a field whose
    classes name one or two words each (disjoint /32 rules, say) it saves nothing."""
    w = max(1, (nrules + 63) // 64)
    step = max(1, n // sample)
    picked = range(first, first + n, step)
    total = 0
    for i in picked:
        total += sum(1 for x in memoryview(vecs[i].to_bytes(8 * w, "little")).cast("Q") if x)
    return total / max(1, len(picked))


def groups(n: int, shift: int) -> int:
    """Rows (or columns) that n ranks make, grouped by rank >> shift."""
    return ((n - 1) >> shift) + 1


def shifts(n: tuple[int, int], cap: int) -> tuple[int, int]:
    """Smallest groupings with rows x cols <= cap: the larger side is halved first."""
    ks = kd = 0
    while groups(n[0], ks) * groups(n[1], kd) > cap:
        if groups(n[0], ks) >= groups(n[1], kd):
            ks += 1
        else:
            kd += 1
    return ks, kd


def build(vecs: dict[int, int], fields: tuple[int, int], base: tuple[int, int],
          n: tuple[int, int], nrules: int, words: int, cap: int) -> PairTable:
    """The pair table of two fields' id ranges. vecs: id -> terminal-rule bits (bit t = rule
    t); words: rule words of the program shape (the summary has one bit per word); cap: the
    cells the table may take."""
    import numpy as np

    w = max(1, (nrules + 63) // 64)               # words that hold rules; the rest are zero
    ks, kd = shifts(n, cap)

    def grouped(b: int, count: int, k: int):
        raw = b"".join(vecs[b + r].to_bytes(8 * w, "little") for r in range(count))
        m = np.frombuffer(raw, dtype=np.uint64).reshape(count, w)
        return np.bitwise_or.reduceat(m, np.arange(0, count, 1 << k), axis=0)

    gs, gd = grouped(base[0], n[0], ks), grouped(base[1], n[1], kd)
    rows, cols = len(gs), len(gd)
    cell_bytes = 8 * abi.nb_sum(words)
    out = np.zeros((rows, cols, cell_bytes), dtype=np.uint8)
    step = max(1, _BLOCK // max(1, cols * w))
    for i in range(0, rows, step):
        hit = (gs[i:i + step, None, :] & gd[None, :, :]) != 0
        packed = np.packbits(hit, axis=2, bitorder="little")
        out[i:i + step, :, :packed.shape[2]] = packed
    return PairTable(fields, base, n, (ks, kd), cols, rows, cell_bytes, out.tobytes())
