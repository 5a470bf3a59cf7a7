"""Address-pair summaries (netbpf/fw/pairs.py), pure: every cell covers the exact summary of
each (source, destination) class pair in it (a word with a rule taking both addresses is never
skipped), is exact when the table is not grouped, and the grouping always fits the cells."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from netbpf import abi
from netbpf.fw import pairs
from netbpf.fw.compile import words_for

pytestmark = pytest.mark.unit


def _exact(a: int, b: int, words: int) -> int:
    both = a & b
    return sum(1 << w for w in range(words) if both >> (64 * w) & ((1 << 64) - 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 700), st.integers(1, 2000),
       st.integers(0, 1 << 30), st.integers(0, 3))
def test_every_cell_covers_its_pairs_and_is_exact_when_not_grouped(ns, nd, nrules, cap, seed,
                                                                   density):
    rng = random.Random(seed)
    words = words_for(nrules)
    dense = [0.002, 0.02, 0.2, 0.6][density]

    def vec() -> int:
        return sum(1 << t for t in range(nrules) if rng.random() < dense)

    base = (1 + rng.randrange(50), 100 + rng.randrange(50))
    vecs = {base[0] + i: vec() for i in range(ns)} | {base[1] + i: vec() for i in range(nd)}
    p = pairs.build(vecs, (abi.NB_F_SRC, abi.NB_F_DPORT), base, (ns, nd), nrules, words, cap)
    assert p.rows * p.cols <= max(cap, 1) or (p.rows, p.cols) == (1, 1)
    assert len(p.sums) == p.rows * p.cols * 8 * abi.nb_sum(words)
    grouped = p.shift != (0, 0)
    for s in range(ns):
        for d in range(nd):
            want = _exact(vecs[base[0] + s], vecs[base[1] + d], words)
            got = p.summary(p.cell(base[0] + s, base[1] + d))
            assert got & want == want
            if not grouped:
                assert got == want
    assert p.cell(base[0] - 1, base[1]) is None and p.cell(base[0], base[1] + nd) is None


def test_shifts_halve_the_larger_side_until_the_cells_fit():
    assert pairs.shifts((3006, 4682), 1 << 18) == (3, 3)
    assert pairs.shifts((3668, 121), 1 << 18) == (1, 0)
    assert pairs.shifts((100, 100), 1 << 18) == (0, 0)
    for n in [(1, 1), (1, 10 ** 6), (70000, 3), (5000, 5000)]:
        ks, kd = pairs.shifts(n, 1 << 18)
        assert (((n[0] - 1) >> ks) + 1) * (((n[1] - 1) >> kd) + 1) <= 1 << 18


def test_cells_pad_to_a_wider_program():
    vecs = {1: 0b1011, 2: 0b0110}
    p = pairs.build(vecs, (abi.NB_F_SRC, abi.NB_F_DST), (1, 2), (1, 1), 4, 16, 8)
    assert p.cell_bytes == 8 and p.summary(0) == 1
    wide = p.cell_values(32)
    assert len(wide) == 32 and int.from_bytes(wide, "little") == 1
    with pytest.raises(ValueError):
        p.cell_values(4)
