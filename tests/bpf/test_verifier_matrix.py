"""Every program variant apply can build must pass the verifier.

The shape (rule words), the compiled-in fields and the features (conntrack, load balancer)
each change the code the verifier walks; a combination that only fails at a customer's apply
is the worst kind of bug. The extremes of each axis are loaded here.
"""
from __future__ import annotations

import itertools

import pytest

from netbpf import abi
from netbpf.store.progspec import PROGRAMS
from netbpf.kernel.loader import load_program

ALL_FIELDS = (1 << abi.NB_NFIELDS) - 1
FIELD_SETS = {"none": 0, "dport": 1 << abi.NB_F_DPORT,
              "addresses": (1 << abi.NB_F_SRC) | (1 << abi.NB_F_DST), "all": ALL_FIELDS}
FEATURES = {"plain": {}, "conntrack+lb": {"NB_CONNTRACK": 1, "NB_LB": 1}}
WORDS = (abi.WORD_BUCKETS[0], abi.WORD_BUCKETS[-1])


@pytest.mark.parametrize("program,words,fields,features", [
    (prog, w, f, feat) for prog, w, f, feat in itertools.product(
        sorted(PROGRAMS), WORDS, FIELD_SETS, FEATURES)
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_program_variant_loads(program, words, fields, features):
    source, func, prog_type = PROGRAMS[program]
    defines = {"NB_WORDS": words, "NB_CLASS_CAP": 64, "NB_FIELDS": FIELD_SETS[fields],
               **FEATURES[features]}
    functions = {func: prog_type}
    if "NB_LB" in defines and prog_type == "xdp":
        functions["nb_lb_entry"] = "xdp"       # the balancer, reached by tail call
    loaded = load_program(source, defines, functions)
    try:
        assert loaded.prog_id(func) > 0
    finally:
        loaded.close()


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("chunks", [1, abi.NB_DIR_MAX_CHUNKS])
def test_address_table_extremes_load(program, chunks):
    """The address tables at their smallest and largest (NB_DIR_CHUNKS), with the most rule
    words, every field and every feature: the deepest IPv6 walk is verified at each."""
    source, func, prog_type = PROGRAMS[program]
    defines = {"NB_WORDS": WORDS[-1], "NB_CLASS_CAP": 64, "NB_DIR_CHUNKS": chunks,
               "NB_FIELDS": ALL_FIELDS, **FEATURES["conntrack+lb"]}
    functions = {func: prog_type}
    if prog_type == "xdp":
        functions["nb_lb_entry"] = "xdp"
    loaded = load_program(source, defines, functions)
    try:
        assert loaded.prog_id(func) > 0
        assert loaded.maps["nb_fw_dir"].fd is not None
    finally:
        loaded.close()
