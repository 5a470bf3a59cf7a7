"""Mirror of bpf/include/netbpf_abi.h, and nothing else: names, constants, ctypes structs
and the struct codecs derived from them. Every map reader and writer packs through here.

tests/unit/test_abi_contract.py compiles the header with the host compiler and compares every
name, constant, size and offset (no root); tests/bpf/test_abi.py checks a real load's maps.
Shape-dependent structs (nb_vec) are built per program shape by vec_struct().
"""
from __future__ import annotations

import ctypes
import functools
import struct
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
ABI_HEADER = BPF_DIR / "include" / "netbpf_abi.h"

# ---- kernel object names (the header's NB_MAP_* / NB_PROG_*) ----
NB_MAP_FW_GEN = "nb_fw_gen"
NB_MAP_FW_CFG = "nb_fw_cfg"
NB_MAP_FW_RULES = "nb_fw_rules"
NB_MAP_FW_CRULES = "nb_fw_crules"
NB_MAP_FW_VECS = "nb_fw_vecs"
NB_MAP_FW_DIR = "nb_fw_dir"
NB_MAP_FW_PAIR = "nb_fw_pair"
NB_MAP_FW_PORTS = "nb_fw_ports"
NB_MAP_FW_PROTO = "nb_fw_proto"
NB_MAP_FW_ICMP = "nb_fw_icmp"
NB_MAP_FW_FLAGS = "nb_fw_flags"
NB_MAP_SET4 = "nb_set4"
NB_MAP_SET6 = "nb_set6"
NB_MAP_SETH4 = "nb_seth4"
NB_MAP_SETH6 = "nb_seth6"
NB_MAP_FW_CNT = "nb_fw_cnt"
NB_MAP_FW_STATS = "nb_fw_stats"
NB_MAP_FW_RL = "nb_fw_rl"
NB_MAP_FW_EVENTS = "nb_fw_events"
NB_MAP_CT = "nb_ct"
NB_MAP_CT_CFG = "nb_ct_cfg"
NB_MAP_LB_VIPS = "nb_lb_vips"
NB_MAP_LB_RING = "nb_lb_ring"
NB_MAP_LB_BACKENDS = "nb_lb_backends"
NB_MAP_LB_FLOWS = "nb_lb_flows"
NB_MAP_LB_NAT = "nb_lb_nat"
NB_MAP_LB_CNT = "nb_lb_cnt"
NB_MAP_LB_JUMP = "nb_lb_jump"
NB_MAP_LB_VLIVE = "nb_lb_vlive"
NB_MAP_LB_PORTS = "nb_lb_ports"
NB_MAP_LB_NH = "nb_lb_nh"
NB_MAP_REJ_JUMP = "nb_rej_jump"
NB_MAP_REJ_SCRATCH = "nb_rej_scratch"
NB_MAP_REJECT_RL = "nb_reject_rl"

NB_PROG_FW_XDP = "nb_fw_xdp"
NB_PROG_FW_TC_EG = "nb_fw_tc_eg"
NB_PROG_FW_TC_IN = "nb_fw_tc_in"
NB_PROG_LB_ENTRY = "nb_lb_entry"
NB_PROG_REJ_XDP = "nb_rej_xdp"
NB_PROG_REJ_TC = "nb_rej_tc"

MAP_NAMES = tuple(v for k, v in dict(globals()).items() if k.startswith("NB_MAP_"))
PROG_NAMES = tuple(v for k, v in dict(globals()).items() if k.startswith("NB_PROG_"))
# The classifier's maps (every firewall program has them) and the balancer's (built with NB_LB).
FW_MAPS = (NB_MAP_FW_GEN, NB_MAP_FW_CFG, NB_MAP_FW_RULES, NB_MAP_FW_CRULES, NB_MAP_FW_VECS,
           NB_MAP_FW_DIR, NB_MAP_FW_PAIR, NB_MAP_FW_PORTS, NB_MAP_FW_PROTO, NB_MAP_FW_ICMP,
           NB_MAP_FW_FLAGS, NB_MAP_SET4, NB_MAP_SET6, NB_MAP_SETH4, NB_MAP_SETH6, NB_MAP_FW_CNT,
           NB_MAP_FW_STATS, NB_MAP_FW_RL)
LB_MAPS = (NB_MAP_LB_VIPS, NB_MAP_LB_RING, NB_MAP_LB_BACKENDS, NB_MAP_LB_FLOWS, NB_MAP_LB_NAT,
           NB_MAP_LB_CNT, NB_MAP_LB_VLIVE, NB_MAP_LB_PORTS)

# Program shapes: rule bit-vector words a program can be compiled with (64 terminal rules each).
# Powers of two, so the data plane can bound a word index with a mask the verifier believes.
WORD_BUCKETS = (1, 4, 16, 64, 256)

NB_MAX_COUNT_RULES = 64
NB_MAX_SETREFS = 4
NB_PREFIX_CAP = 65536
NB_SET_CAP = 1 << 20
NB_DIR_MAX_CHUNKS = 32768
NB_PAIRS = 2
NB_PAIR_MIN_WORDS = 16
NB_PAIR0_CELLS = 1 << 18          # source x destination
NB_PAIR1_CELLS = 1 << 16          # an address field x destination port
PAIR_TABLES = ((0, NB_PAIR0_CELLS), (NB_PAIR0_CELLS, NB_PAIR1_CELLS))   # (first cell, cells)
NB_DIR_ROOT = 65536
NB_DIR_PTR = 0x80000000
NB_RL_ENTRIES = 65536
NB_MAX_VLANS = 2
NB_MAX_EXTHDRS = 6
NB_MAX_RULES = WORD_BUCKETS[-1] * 64  # terminal rules per direction (16384)

NB_ACT_ALLOW = 1
NB_ACT_DROP = 2
NB_ACT_RATE = 3
NB_ACT_REJECT = 4

NB_REJECT_PPS = 1000
NB_REJECT_BURST = 100
NB_REJECT_QUOTE = 64

NB_RL_PER_SRC = 0
NB_RL_PER_RULE = 1

NB_F_SRC = 0
NB_F_DST = 1
NB_F_PROTO = 2
NB_F_SPORT = 3
NB_F_DPORT = 4
NB_F_ICMP = 5
NB_F_FLAGS = 6
NB_F_SET0 = 7
NB_NFIELDS_BASE = 7
NB_NFIELDS = NB_NFIELDS_BASE + NB_MAX_SETREFS
NB_CLASS_ALL = 0
NB_SETREF_HASH4 = 0x100
NB_SETREF_HASH6 = 0x200

NB_STAT_PASS = 0
NB_STAT_DROP = 1
NB_STAT_DEFAULT = 2
NB_STAT_NONIP = 3
NB_STAT_MALFORMED = 4
NB_STAT_FRAGMENT = 5
NB_STAT_RATE_DROP = 6
NB_STAT_CT_REPLY = 7
NB_STAT_LB_TX = 8
NB_STAT_LB_REDIRECT = 9
NB_STAT_LB_STACK = 10
NB_STAT_LB_DROP = 11
NB_STAT_REJECT = 12
NB_STAT_MAX = 13
STAT_NAMES = {
    NB_STAT_PASS: "pass", NB_STAT_DROP: "drop", NB_STAT_DEFAULT: "default",
    NB_STAT_NONIP: "non_ip", NB_STAT_MALFORMED: "malformed", NB_STAT_FRAGMENT: "fragment",
    NB_STAT_RATE_DROP: "rate_limited", NB_STAT_CT_REPLY: "conntrack_reply",
    NB_STAT_LB_TX: "lb_tx", NB_STAT_LB_REDIRECT: "lb_redirect", NB_STAT_LB_STACK: "lb_stack",
    NB_STAT_LB_DROP: "lb_drop", NB_STAT_REJECT: "reject_sent",
}

NB_CT_ENTRIES = 65536
NB_CT_SYN_SENT = 1
NB_CT_ESTABLISHED = 2
NB_CT_CLOSING = 3
CT_STATE_NAMES = {NB_CT_SYN_SENT: "syn_sent", NB_CT_ESTABLISHED: "established",
                  NB_CT_CLOSING: "closing"}
NB_CT_T_TCP_SYN = 0
NB_CT_T_TCP_EST = 1
NB_CT_T_TCP_CLOSE = 2
NB_CT_T_UDP = 3
NB_CT_T_ICMP = 4
NB_CT_NTIMEOUTS = 5
# Seconds, per nb_ct_cfg.timeout_ns index (the policy may override each).
CT_DEFAULT_TIMEOUTS = {"tcp_syn": 30.0, "tcp_established": 3600.0, "tcp_close": 10.0,
                       "udp": 30.0, "icmp": 30.0}
CT_TIMEOUT_INDEX = {"tcp_syn": NB_CT_T_TCP_SYN, "tcp_established": NB_CT_T_TCP_EST,
                    "tcp_close": NB_CT_T_TCP_CLOSE, "udp": NB_CT_T_UDP, "icmp": NB_CT_T_ICMP}


def nb_tag(gen: int, field: int) -> int:
    return (field << 8) | gen


def port_idx(gen: int, which: int, port: int) -> int:
    return (gen << 17) | (which << 16) | port


def proto_idx(gen: int, proto: int) -> int:
    return (gen << 8) | proto


def icmp_idx(gen: int, type_code: int) -> int:
    return (gen << 16) | type_code


def flags_idx(gen: int, flags: int) -> int:
    return (gen << 8) | flags


def slot_cap(words: int) -> int:
    return 2 * words * 64 + 2 * NB_MAX_COUNT_RULES


class NbGen(ctypes.Structure):
    _fields_ = [("gen", ctypes.c_uint32)]


class NbSetref(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_uint32), ("field", ctypes.c_uint32),
                ("member_id", ctypes.c_uint32), ("nonmember_id", ctypes.c_uint32)]


class NbPairCfg(ctypes.Structure):
    _fields_ = [("on", ctypes.c_uint32), ("cols", ctypes.c_uint32),
                ("field", ctypes.c_uint32 * 2), ("base", ctypes.c_uint32 * 2),
                ("n", ctypes.c_uint32 * 2), ("shift", ctypes.c_uint32 * 2)]


class NbFwCfg(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint32),
                ("wild_id", ctypes.c_uint32 * NB_NFIELDS_BASE),
                ("nsetrefs", ctypes.c_uint32),
                ("nrules", ctypes.c_uint32),
                ("ncount", ctypes.c_uint32),
                ("default_action", ctypes.c_uint32),
                ("setref", NbSetref * NB_MAX_SETREFS),
                ("default_sample", ctypes.c_uint32),
                ("pad", ctypes.c_uint32),
                ("pair", NbPairCfg * NB_PAIRS)]


class NbRule(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32), ("slot", ctypes.c_uint32),
                ("count_mask", ctypes.c_uint64), ("rl_rate", ctypes.c_uint64),
                ("rl_burst", ctypes.c_uint64), ("rl_per", ctypes.c_uint32),
                ("sample", ctypes.c_uint32)]


NB_EVENTS_PAGES = 64
NB_EVENT_DEFAULT = 0xFFFFFFFF


class NbEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("slot", ctypes.c_uint32), ("len", ctypes.c_uint32),
                ("action", ctypes.c_uint8), ("rate_limited", ctypes.c_uint8),
                ("family", ctypes.c_uint8), ("proto", ctypes.c_uint8),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("src", ctypes.c_uint8 * 16), ("dst", ctypes.c_uint8 * 16)]


class NbLpm4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("tag", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 4)]


class NbLpm6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("tag", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 16)]


class NbSeth4Key(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class NbSeth6Key(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class NbCounter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("drops", ctypes.c_uint64)]


class NbRlKey(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("family", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 16)]


class NbCtKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16)]


class NbCtVal(ctypes.Structure):
    _fields_ = [("last_ns", ctypes.c_uint64), ("packets", ctypes.c_uint64),
                ("state", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class NbCtCfg(ctypes.Structure):
    _fields_ = [("timeout_ns", ctypes.c_uint64 * NB_CT_NTIMEOUTS)]


class NbRlState(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


# ---- load balancer (bpf/include/lb.h; written by netbpf/lb/lbtables.py) ----
NB_LB_MAX_VIPS = 256
NB_LB_MAX_BACKENDS = 4096
NB_LB_FLOWS = 262144
NB_LB_RING_CAP = 1 << 19       # the default; a program may be built with a bigger one
NB_LB_NO_BACKEND = 0xffffffff
NB_LB_NAT, NB_LB_DSR = 1, 2
NB_BE_ACTIVE = 1
NB_LB_PORT_WORDS = 1024
NB_LB_NH_TTL_NS = 1_000_000_000
NB_LB_NH_STACK, NB_LB_NH_TX, NB_LB_NH_REDIRECT = 1, 2, 3


class NbVipKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16)]


class NbVip(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("ring_off", ctypes.c_uint32), ("ring_size", ctypes.c_uint32),
                ("idle_ns", ctypes.c_uint64), ("touch_ns", ctypes.c_uint64),
                ("sig", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class NbVipLive(ctypes.Structure):
    _fields_ = [("sig", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("idle_ns", ctypes.c_uint64), ("touch_ns", ctypes.c_uint64)]


class NbBackend(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("port", ctypes.c_uint16),
                ("flags", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


class NbFlowKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16)]


class NbFlow(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_uint32), ("vip_index", ctypes.c_uint32),
                ("last_ns", ctypes.c_uint64), ("vip_sig", ctypes.c_uint32),
                ("mode", ctypes.c_uint32)]


class NbLbNh(ctypes.Structure):
    _fields_ = [("stamp_ns", ctypes.c_uint64), ("kind", ctypes.c_uint32),
                ("in_ifindex", ctypes.c_uint32), ("out_ifindex", ctypes.c_uint32),
                ("mtu", ctypes.c_uint16), ("smac", ctypes.c_uint8 * 6),
                ("dmac", ctypes.c_uint8 * 6), ("dsr", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 5),
                ("dst", ctypes.c_uint8 * 16)]


class NbNatKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8),
                ("bport", ctypes.c_uint16), ("cport", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("baddr", ctypes.c_uint8 * 16), ("caddr", ctypes.c_uint8 * 16)]


class NbNatVal(ctypes.Structure):
    _fields_ = [("vport", ctypes.c_uint16), ("pad", ctypes.c_uint16 * 3),
                ("vaddr", ctypes.c_uint8 * 16)]


class NbLbCounter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("conns", ctypes.c_uint64)]


def nb_sum(words: int) -> int:
    return (words + 63) // 64


@functools.cache
def pair_cells(words: int) -> int:
    """NB_PAIR_CELLS of a program compiled with NB_WORDS=words."""
    return NB_PAIR0_CELLS + NB_PAIR1_CELLS if words >= NB_PAIR_MIN_WORDS else 1


def vec_struct(words: int) -> type[ctypes.Structure]:
    """struct nb_vec for a program compiled with NB_WORDS=words."""
    return type(f"NbVec{words}", (ctypes.Structure,), {"_fields_": [
        ("count", ctypes.c_uint64),
        ("sum", ctypes.c_uint64 * nb_sum(words)),
        ("w", ctypes.c_uint64 * words)]})


def pack_vec(words: int, count_bits: int, rule_bits: int) -> bytes:
    """Bytes of one nb_vec: count bitmap, summary words, rule words (bit t = terminal rule t).
    Built with int.to_bytes (little-endian u64 words): apply packs thousands of these."""
    body = rule_bits.to_bytes(8 * words, "little")
    sums = 0
    for i, x in enumerate(memoryview(body).cast("Q")):
        if x:
            sums |= 1 << i
    return ((count_bits & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
            + sums.to_bytes(8 * nb_sum(words), "little") + body)


# ---- codecs: struct.Struct twins of the ctypes mirrors, for packing many entries at once ----
_CODE = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def codec(ctype: type[ctypes.Structure]) -> struct.Struct:
    """The little-endian struct.Struct of a mirrored structure, derived from its ctypes fields
    and offsets (so it cannot disagree with them): u8 arrays are bytes, padding is skipped."""
    fmt, at = "<", 0
    for name, t in ctype._fields_:
        f = getattr(ctype, name)
        if f.offset > at:
            fmt += f"{f.offset - at}x"
        if issubclass(t, ctypes.Array) and t._type_ is ctypes.c_uint8:
            fmt += f"{t._length_}s"
        elif issubclass(t, ctypes.Array):
            fmt += f"{t._length_}{_CODE[t._type_]}"
        else:
            fmt += _CODE[t]
        at = f.offset + f.size
    if ctypes.sizeof(ctype) > at:
        fmt += f"{ctypes.sizeof(ctype) - at}x"
    return struct.Struct(fmt)


U32 = struct.Struct("<I")                 # array keys, class ids, tail-call slots, generation
COUNTER = codec(NbCounter)                # packets, bytes, drops
LB_COUNTER = codec(NbLbCounter)           # packets, bytes, conns
LPM_KEY = {4: codec(NbLpm4Key), 6: codec(NbLpm6Key)}     # prefixlen, tag, address
SETH_KEY = {4: codec(NbSeth4Key), 6: codec(NbSeth6Key)}  # tag, address
CT_VAL = codec(NbCtVal)                   # last_ns, packets, state


def dir_gen(chunks: int) -> int:
    """Entries of nb_fw_dir per generation for a program built with NB_DIR_CHUNKS=chunks."""
    return 4 * NB_DIR_ROOT + 256 * chunks
