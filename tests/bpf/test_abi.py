"""netbpf/abi.py against bpf/include/netbpf_abi.h: sizes and offsets of every shared struct.

The header is compiled by the host compiler into a program printing sizeof/offsetof (the
BPF target lays out these fixed-width structs the same way), and a real bcc load is checked
for the key and value sizes the maps end up with. If either drifts, this fails.
"""
from __future__ import annotations

import ctypes
import subprocess

import pytest

from netbpf import abi
from netbpf.lb.lbtables import LB_MAPS

STRUCTS = {  # C struct -> ctypes mirror (None: shape-dependent, checked through vec_struct)
    "nb_gen": abi.NbGen, "nb_setref": abi.NbSetref, "nb_fw_cfg": abi.NbFwCfg,
    "nb_rule": abi.NbRule, "nb_lpm4_key": abi.NbLpm4Key, "nb_lpm6_key": abi.NbLpm6Key,
    "nb_counter": abi.NbCounter, "nb_rl_key": abi.NbRlKey, "nb_rl_state": abi.NbRlState,
    "nb_ct_key": abi.NbCtKey, "nb_ct_val": abi.NbCtVal, "nb_ct_cfg": abi.NbCtCfg,
    "nb_seth4_key": abi.NbSeth4Key, "nb_seth6_key": abi.NbSeth6Key,
    "nb_vip_key": abi.NbVipKey, "nb_vip": abi.NbVip, "nb_backend": abi.NbBackend,
    "nb_flow_key": abi.NbFlowKey, "nb_flow": abi.NbFlow, "nb_nat_key": abi.NbNatKey,
    "nb_nat_val": abi.NbNatVal, "nb_lb_counter": abi.NbLbCounter,
    "nb_vip_live": abi.NbVipLive, "nb_lb_nh": abi.NbLbNh,
}
CONSTANTS = ["NB_MAX_COUNT_RULES", "NB_MAX_SETREFS", "NB_PREFIX_CAP", "NB_SET_CAP",
             "NB_RL_ENTRIES", "NB_ACT_ALLOW", "NB_ACT_DROP", "NB_ACT_RATE", "NB_ACT_REJECT", "NB_REJECT_PPS", "NB_REJECT_BURST", "NB_REJECT_QUOTE", "NB_STAT_REJECT", "NB_F_SRC",
             "NB_F_DST", "NB_F_PROTO", "NB_F_SPORT", "NB_F_DPORT", "NB_F_ICMP", "NB_F_FLAGS",
             "NB_F_SET0", "NB_NFIELDS", "NB_STAT_MAX", "NB_STAT_CT_REPLY", "NB_STAT_LB_DROP",
             "NB_CT_ENTRIES", "NB_CT_NTIMEOUTS", "NB_SETREF_HASH4", "NB_SETREF_HASH6",
             "NB_DIR_MAX_CHUNKS", "NB_DIR_ROOT", "NB_DIR_PTR", "NB_LB_MAX_VIPS",
             "NB_LB_MAX_BACKENDS", "NB_LB_FLOWS", "NB_LB_NO_BACKEND", "NB_LB_NAT", "NB_LB_DSR",
             "NB_BE_ACTIVE", "NB_LB_PORT_WORDS", "NB_LB_NH_TTL_NS", "NB_LB_NH_STACK",
             "NB_LB_NH_TX", "NB_LB_NH_REDIRECT"]


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    d = tmp_path_factory.mktemp("abi")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>',
             f'#include "{abi.ABI_HEADER}"', "int main(void) {"]
    for name, mirror in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for fname, *_ in mirror._fields_:
            lines.append(f'printf("{name}.{fname} %zu\\n", offsetof(struct {name}, {fname}));')
    for c in CONSTANTS:
        lines.append(f'printf("{c} %lld\\n", (long long)({c}));')
    lines.append("return 0; }")
    src = d / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(d / "layout"), str(src)], check=True)
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    vals = dict(line.split() for line in out.splitlines())
    for words in abi.WORD_BUCKETS:
        vec = d / f"vec{words}.c"
        vec.write_text(f'#include <stdio.h>\n#include <linux/types.h>\n#define NB_WORDS {words}\n'
                       f'#include "{abi.ABI_HEADER}"\nint main(void) '
                       f'{{ printf("%zu\\n", sizeof(struct nb_vec)); return 0; }}\n')
        subprocess.run(["cc", "-o", str(d / f"vec{words}"), str(vec)], check=True)
        vals[f"nb_vec{words}"] = subprocess.run([str(d / f"vec{words}")], capture_output=True,
                                                text=True, check=True).stdout.strip()
    return {k: int(v) for k, v in vals.items()}


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_size_and_offsets_match(c_layout, name):
    mirror = STRUCTS[name]
    assert ctypes.sizeof(mirror) == c_layout[name]
    for fname, *_ in mirror._fields_:
        assert getattr(mirror, fname).offset == c_layout[f"{name}.{fname}"], fname


@pytest.mark.parametrize("words", abi.WORD_BUCKETS)
def test_vector_size_matches_each_shape(c_layout, words):
    assert ctypes.sizeof(abi.vec_struct(words)) == c_layout[f"nb_vec{words}"]
    assert len(abi.pack_vec(words, 1, 1)) == c_layout[f"nb_vec{words}"]


@pytest.mark.parametrize("const", CONSTANTS)
def test_constants_match(c_layout, const):
    assert getattr(abi, const) == c_layout[const]


def test_loaded_maps_have_the_mirrored_sizes():
    from netbpf.store.progspec import FW_PROG, FW_SOURCE
    from netbpf.kernel.loader import load_program

    loaded = load_program(FW_SOURCE, {"NB_WORDS": 4, "NB_CLASS_CAP": 64, "NB_CONNTRACK": 1,
                                      "NB_LB": 1}, {FW_PROG: "xdp", "nb_lb_entry": "xdp"},
                          cache=True)
    m = loaded.maps
    expect = {
        "nb_fw_cfg": (4, ctypes.sizeof(abi.NbFwCfg)), "nb_fw_rules": (4, ctypes.sizeof(abi.NbRule)),
        "nb_fw_vecs": (4, ctypes.sizeof(abi.vec_struct(4))),
        "nb_fw_dir": (4, 4),
        "nb_seth4": (ctypes.sizeof(abi.NbSeth4Key), 4),
        "nb_seth6": (ctypes.sizeof(abi.NbSeth6Key), 4),
        "nb_fw_cnt": (4, ctypes.sizeof(abi.NbCounter)), "nb_fw_rl": (ctypes.sizeof(abi.NbRlKey),
                                                                     ctypes.sizeof(abi.NbRlState)),
        "nb_ct": (ctypes.sizeof(abi.NbCtKey), ctypes.sizeof(abi.NbCtVal)),
        "nb_ct_cfg": (4, ctypes.sizeof(abi.NbCtCfg)),
        "nb_lb_vips": (ctypes.sizeof(abi.NbVipKey), ctypes.sizeof(abi.NbVip)),
        "nb_lb_backends": (4, ctypes.sizeof(abi.NbBackend)),
        "nb_lb_flows": (ctypes.sizeof(abi.NbFlowKey), ctypes.sizeof(abi.NbFlow)),
        "nb_lb_nat": (ctypes.sizeof(abi.NbNatKey), ctypes.sizeof(abi.NbNatVal)),
        "nb_lb_cnt": (4, ctypes.sizeof(abi.NbLbCounter)),
        "nb_lb_vlive": (4, ctypes.sizeof(abi.NbVipLive)),
        "nb_lb_ports": (4, 8),
        "nb_lb_nh": (4, ctypes.sizeof(abi.NbLbNh)),
    }
    for name, sizes in expect.items():
        assert (m[name].key_size, m[name].value_size) == sizes, name
    assert set(LB_MAPS) <= set(m)
