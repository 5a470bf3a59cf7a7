"""Every program variant apply can build must pass the verifier.

The shape (rule words), the compiled-in fields and the features (conntrack, load balancer)
each change the code the verifier walks; a combination that only fails at a customer's apply
is the worst kind of bug. The extremes of each axis are loaded here.
"""
from __future__ import annotations

import itertools

import pytest

from netbpf import abi
from netbpf.fw.program import build_program
from netbpf.store.progspec import PROGRAMS, ProgramSpec

ALL_FIELDS = (1 << abi.NB_NFIELDS) - 1
FIELD_SETS = {"none": 0, "dport": 1 << abi.NB_F_DPORT,
              "addresses": (1 << abi.NB_F_SRC) | (1 << abi.NB_F_DST), "all": ALL_FIELDS}
FEATURES = {"plain": {}, "conntrack+lb": {"conntrack": True, "lb_ring_cap": abi.NB_LB_RING_CAP}}
WORDS = (abi.WORD_BUCKETS[0], abi.WORD_BUCKETS[-1])


@pytest.mark.parametrize("program,words,fields,features", [
    (prog, w, f, feat) for prog, w, f, feat in itertools.product(
        sorted(PROGRAMS), WORDS, FIELD_SETS, FEATURES)
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_program_variant_loads(program, words, fields, features):
    spec = ProgramSpec.for_part(*program, words=words, fields=FIELD_SETS[fields],
                                **FEATURES[features])
    # built as apply builds it: the firewall and its tail-call targets (reject, balancer)
    with build_program(spec) as prog:
        for func in spec.functions():
            assert prog.loaded.prog_id(func) > 0


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("chunks", [1, abi.NB_DIR_MAX_CHUNKS])
def test_address_table_extremes_load(program, chunks):
    """The address tables at their smallest and largest (NB_DIR_CHUNKS), with the most rule
    words, every field and every feature: the deepest IPv6 walk is verified at each."""
    spec = ProgramSpec.for_part(*program, words=WORDS[-1], chunks=chunks, fields=ALL_FIELDS,
                                **FEATURES["conntrack+lb"])
    with build_program(spec) as prog:
        for func in spec.functions():
            assert prog.loaded.prog_id(func) > 0
        assert prog.loaded.maps[abi.NB_MAP_FW_DIR].fd is not None


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_smallest_shape_with_pair_tables_loads(program):
    """NB_PAIR_MIN_WORDS is where the pair-table lookups are compiled in (below it they are
    a stub): every field and feature at that shape, beside the largest one above."""
    spec = ProgramSpec.for_part(*program, words=abi.NB_PAIR_MIN_WORDS, fields=ALL_FIELDS,
                                **FEATURES["conntrack+lb"])
    with build_program(spec) as prog:
        for func in spec.functions():
            assert prog.loaded.prog_id(func) > 0
        assert prog.tables.pair_cells == abi.NB_PAIR0_CELLS + abi.NB_PAIR1_CELLS
