"""The loaded-map half of the contract: after a real bcc load, every map has the name, key
size and value size netbpf/abi.py packs for. The header half (sizes, offsets, constants,
names against the host compiler, no root) is tests/unit/test_abi_contract.py.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest

from netbpf import abi
from netbpf.store.progspec import ProgramSpec

U32 = 4


def expected(words: int) -> dict[str, tuple[int, int]]:
    size = ctypes.sizeof
    return {
        abi.NB_MAP_FW_GEN: (U32, size(abi.NbGen)),
        abi.NB_MAP_FW_CFG: (U32, size(abi.NbFwCfg)),
        abi.NB_MAP_FW_RULES: (U32, size(abi.NbRule)),
        abi.NB_MAP_FW_CRULES: (U32, U32),
        abi.NB_MAP_FW_VECS: (U32, size(abi.vec_struct(words))),
        abi.NB_MAP_FW_DIR: (U32, U32),
        abi.NB_MAP_FW_PAIR: (U32, 8 * abi.nb_sum(words)),
        abi.NB_MAP_FW_PORTS: (U32, U32),
        abi.NB_MAP_FW_PROTO: (U32, U32),
        abi.NB_MAP_FW_ICMP: (U32, U32),
        abi.NB_MAP_FW_FLAGS: (U32, U32),
        abi.NB_MAP_SET4: (size(abi.NbLpm4Key), U32),
        abi.NB_MAP_SET6: (size(abi.NbLpm6Key), U32),
        abi.NB_MAP_SETH4: (size(abi.NbSeth4Key), U32),
        abi.NB_MAP_SETH6: (size(abi.NbSeth6Key), U32),
        abi.NB_MAP_FW_CNT: (U32, size(abi.NbCounter)),
        abi.NB_MAP_FW_STATS: (U32, size(abi.NbCounter)),
        abi.NB_MAP_FW_RL: (size(abi.NbRlKey), size(abi.NbRlState)),
        abi.NB_MAP_FW_EVENTS: (0, 0),                   # ring buffer: records of nb_event
        abi.NB_MAP_CT: (size(abi.NbCtKey), size(abi.NbCtVal)),
        abi.NB_MAP_CT_CFG: (U32, size(abi.NbCtCfg)),
        abi.NB_MAP_LB_VIPS: (size(abi.NbVipKey), size(abi.NbVip)),
        abi.NB_MAP_LB_RING: (U32, U32),
        abi.NB_MAP_LB_BACKENDS: (U32, size(abi.NbBackend)),
        abi.NB_MAP_LB_FLOWS: (size(abi.NbFlowKey), size(abi.NbFlow)),
        abi.NB_MAP_LB_NAT: (size(abi.NbNatKey), size(abi.NbNatVal)),
        abi.NB_MAP_LB_CNT: (U32, size(abi.NbLbCounter)),
        abi.NB_MAP_LB_JUMP: (U32, U32),
        abi.NB_MAP_LB_VLIVE: (U32, size(abi.NbVipLive)),
        abi.NB_MAP_LB_PORTS: (U32, 8),
        abi.NB_MAP_LB_NH: (U32, size(abi.NbLbNh)),
        abi.NB_MAP_REJ_JUMP: (U32, U32),
    }


@pytest.fixture(scope="module")
def full_xdp():
    """The XDP program with every feature compiled in, as the balancer + conntrack apply
    builds it (cached: the other bpf tests share the compile)."""
    from netbpf.kernel.loader import load_program
    spec = ProgramSpec.for_part("ingress", "xdp", words=4, class_cap=64, conntrack=True,
                                lb_ring_cap=abi.NB_LB_RING_CAP)
    return load_program(spec.source, spec.defines(), spec.functions(), cache=True)


def test_loaded_maps_have_the_mirrored_sizes(full_xdp):
    m = full_xdp.maps
    for name, sizes in expected(4).items():
        assert (m[name].key_size, m[name].value_size) == sizes, name


def test_full_program_creates_exactly_the_contract_maps(full_xdp):
    assert set(full_xdp.maps) == set(abi.MAP_NAMES)


@pytest.mark.parametrize("words", [4, abi.NB_PAIR_MIN_WORDS])
def test_the_fake_kernel_declares_the_maps_bpf_builds(full_xdp, words):
    """tests/unit's fake kernel stands in for these maps in the engine's unit tests: its
    declarations (type, key and value size, entries) must be what a real load makes."""
    from netbpf.kernel import bpfsys
    from netbpf.kernel.loader import load_program
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from fakemaps import program_maps
    spec = ProgramSpec.for_part("ingress", "xdp", words=words, class_cap=64, conntrack=True,
                                lb_ring_cap=abi.NB_LB_RING_CAP)
    loaded = full_xdp if words == 4 else load_program(spec.source, spec.defines(),
                                                      spec.functions(), cache=True)
    for name, (kind, ks, vs, n) in program_maps(spec.defines(), "xdp").items():
        m = loaded.maps[name]
        info = bpfsys.map_info(m.fd)
        assert (info.type, m.key_size, m.value_size, info.max_entries) == (kind, ks, vs, n), name
