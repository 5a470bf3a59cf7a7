"""The firewall program on ClassBench-like 10k-rule sets (bench/classbench.py) under
BPF_PROG_TEST_RUN: every header of a trace gets the verdict of the reference matcher (the
plain rule loop), and every rule's counter ends at the reference count. IPv4 and IPv6.

One program, loaded once for the module, at the largest shape the two sets need.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import dataclasses
import random

import pytest
from netbpf.fw.compile import choose_shape, compile_direction, reference_match, simulate
from netbpf.fw.fwtables import table_bytes

from fwprog import FwProg

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import classbench  # noqa: E402

RULES = 10_000
HEADERS = 2000
SETS = {4: ("acl", 4), 6: ("fw", 6)}      # family -> (kind, family)


@pytest.fixture(scope="module")
def sets():
    out = {}
    for fam, (kind, family) in SETS.items():
        d = classbench.ruleset(kind, RULES, family, seed=7, count_rules=4)
        out[fam] = (d, compile_direction(d))
    return out


@pytest.fixture(scope="module")
def fw(sets):
    shapes = [choose_shape(c.nrules, c.nclasses, None, len(c.dir.chunks))
              for _, c in sets.values()]
    return FwProg(words=max(s.words for s in shapes), class_cap=max(s.class_cap for s in shapes),
                  chunks=max(s.chunks for s in shapes))


@pytest.mark.parametrize("family", sorted(SETS))
def test_10k_classbench_set_gives_reference_verdicts_and_counters(fw, sets, family):
    d, _ = sets[family]
    fw.install(d)
    pkts = classbench.trace(d, HEADERS, family, seed=11) + [classbench.miss(family)]
    terminal = [r for r in d.rules if r.action != "count"]
    counting = [r for r in d.rules if r.action == "count"]
    want: Counter[str] = Counter()
    wrong = []
    misses = 0
    for p in pkts:
        ref = reference_match(d, None, p)
        misses += ref.terminal is None
        expected = "pass" if ref.terminal is None else (
            "drop" if terminal[ref.terminal].action == "drop" else "pass")
        if ref.terminal is not None:
            want[terminal[ref.terminal].name] += 1
        for ci in ref.counted:
            want[counting[ci].name] += 1
        got = fw.run(classbench.frame(p))
        if got != expected:
            wrong.append((p, got, expected))
    assert wrong == [], f"{len(wrong)} of {len(pkts)} wrong, first: {wrong[:3]}"
    raw = fw.tables.read_counters()
    got_counts = {name: raw.get(slot, (0, 0, 0))[0] for name, slot in fw.slots.items()}
    assert {n: c for n, c in got_counts.items() if c} == dict(want)
    assert len(want) > 200                  # the trace reaches many rules, not a few
    assert fw.totals()["default"] == misses >= 1     # the miss header at least
    live = fw.tables.read_generation(fw.tables.active_gen()).compiled.pairs
    assert [p.sums for p in live] == [p.sums for p in fw.compiled.pairs]   # both pairs ran


@pytest.mark.parametrize("cells", [(64, 16), (4096, 1024), (4096, 1)])
def test_the_program_reads_the_pair_cells_the_model_names(fw, sets, cells):
    """Verdicts cannot show a correct pair table at work (it only skips words that cannot
    match), so this one lies: summary bits cleared at random in a coarse table. The program
    must then decide exactly as the model (simulate) does with the same lie, header by header,
    and the lie must change some verdicts: the cell indexes, their grouping and the AND with
    the summaries are the model's (both tables; the second alone when the first is off)."""
    d, _ = sets[4]
    c = compile_direction(d, pair_cells=cells)
    rng = random.Random(str(cells))
    lies = tuple(p and dataclasses.replace(p, sums=bytes(b & rng.randrange(256) for b in p.sums))
                 for p in c.pairs)
    c = dataclasses.replace(c, pairs=lies)
    assert [p is not None for p in c.pairs] == [cells[0] > 1, cells[1] > 1]
    fw.prog.install(c)
    terminal = [r for r in d.rules if r.action != "count"]
    changed = wrong = 0
    for p in classbench.trace(d, 600, 4, seed=cells[0] + cells[1]):
        sim, ref = simulate(c, None, p), reference_match(d, None, p)
        want = "pass" if sim.terminal is None or terminal[sim.terminal].action != "drop" else "drop"
        changed += sim.terminal != ref.terminal
        wrong += fw.run(classbench.frame(p)) != want
    assert wrong == 0 and changed > 20


def test_kernel_memory_read_from_maps_is_the_shape_formula(fw):
    """stats reads the maps, status computes from the shape: the two must agree."""
    t = fw.tables
    assert t.memory_bytes() == table_bytes(t.words, t.class_cap, t.chunk_cap)
