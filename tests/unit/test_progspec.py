"""ProgramSpec: what apply, the tests and bench build is decided in one pure place (no root).
Defines, the programs loaded beside the firewall and their tail-call slots, the build hash."""
from __future__ import annotations

from pathlib import Path

import pytest

from netbpf import abi
from netbpf.store.progspec import ProgramSpec


def test_plain_spec_defines_only_the_shape():
    s = ProgramSpec(words=4, class_cap=256)
    assert s.defines() == {"NB_WORDS": 4, "NB_CLASS_CAP": 256, "NB_DIR_CHUNKS": 64}
    assert s.functions() == {abi.NB_PROG_FW_XDP: "xdp", abi.NB_PROG_REJ_XDP: "xdp"}
    assert s.tail_calls() == {abi.NB_MAP_REJ_JUMP: abi.NB_PROG_REJ_XDP}


def test_xdp_with_balancer_and_conntrack_links_both_tail_calls():
    s = ProgramSpec(fields=0x1f, conntrack=True, lb_ring_cap=1 << 20,
                    shared_pin=Path("/sys/fs/bpf/x/ingress"))
    assert s.defines() == {"NB_WORDS": 1, "NB_CLASS_CAP": 64, "NB_DIR_CHUNKS": 64,
                           "NB_FIELDS": 0x1f, "NB_CONNTRACK": 1, "NB_LB": 1,
                           "NB_LB_RING_CAP": 1 << 20,
                           "NB_SHARED_PIN": '"/sys/fs/bpf/x/ingress"'}
    assert s.tail_calls() == {abi.NB_MAP_REJ_JUMP: abi.NB_PROG_REJ_XDP,
                              abi.NB_MAP_LB_JUMP: abi.NB_PROG_LB_ENTRY}
    assert set(s.functions()) == {abi.NB_PROG_FW_XDP, abi.NB_PROG_REJ_XDP,
                                  abi.NB_PROG_LB_ENTRY}


def test_tc_egress_with_balancer_has_no_balancer_entry():
    """The egress program is built with NB_LB (reverse NAT) but balances nothing itself."""
    s = ProgramSpec.for_part("egress", "tc", lb_ring_cap=abi.NB_LB_RING_CAP)
    assert s.defines()["NB_LB"] == 1
    assert s.functions() == {abi.NB_PROG_FW_TC_EG: "sched_cls", abi.NB_PROG_REJ_TC: "sched_cls"}
    assert abi.NB_MAP_LB_JUMP not in s.tail_calls()


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="no xdp program for egress"):
        ProgramSpec.for_part("egress", "xdp")


def test_hash_follows_what_is_built_not_where_maps_are_pinned():
    base = ProgramSpec(words=4, fields=3)
    assert base.hash() == ProgramSpec(words=4, fields=3).hash()
    assert base.hash() == ProgramSpec(words=4, fields=3, shared_pin=Path("/x")).hash()
    for other in (ProgramSpec(words=16, fields=3), ProgramSpec(words=4, fields=7),
                  ProgramSpec(words=4, fields=3, conntrack=True),
                  ProgramSpec(words=4, fields=3, lb_ring_cap=1 << 19),
                  ProgramSpec.for_part("ingress", "tc", words=4, fields=3)):
        assert other.hash() != base.hash(), other
