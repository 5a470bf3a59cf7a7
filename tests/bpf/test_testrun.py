"""BPF_PROG_TEST_RUN through netbpf.kernel.testrun, and the loader that feeds it (compile,
defines, verifier and compiler errors, cache), on the tiny XDP and TC programs in progs/.
"""
from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from netbpf.errors import NetbpfError
from netbpf.kernel import bpfsys, loader, testrun
from netbpf.kernel.testrun import (TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX,
                                   tc_verdict_name, test_run, xdp_verdict_name)

TINY_XDP = Path(__file__).resolve().parent / "progs" / "tiny_xdp.bpf.c"

DST = bytes.fromhex("020000000001")
SRC = bytes.fromhex("020000000002")


def frame(dst: bytes = DST, src: bytes = SRC, size: int = 64) -> bytes:
    head = dst + src + b"\x08\x00"
    return head + bytes(i & 0xff for i in range(size - len(head)))


def verdict_count(loaded, verdict: int) -> int:
    per_cpu = bpfsys.map_lookup_percpu(loaded.maps["nbt_verdicts"].fd,
                                       struct.pack("<I", verdict), 8)
    return sum(struct.unpack("<Q", v)[0] for v in per_cpu)


# ---- XDP ----

def test_xdp_first_byte_ff_drops_and_leaves_packet_alone(tiny_xdp):
    pkt = frame(dst=b"\xff" * 6)
    r = test_run(tiny_xdp.progs["nbt_xdp"], pkt)
    assert r.retval == XDP_DROP
    assert r.data_out == pkt


def test_xdp_marker_fe_swaps_macs_and_transmits(tiny_xdp):
    dst = b"\xfe" + DST[1:]
    r = test_run(tiny_xdp.progs["nbt_xdp"], frame(dst=dst))
    assert r.retval == XDP_TX
    assert r.data_out == frame(dst=SRC, src=dst)


def test_xdp_other_packets_pass_unchanged(tiny_xdp):
    pkt = frame(size=300)
    r = test_run(tiny_xdp.prog_fd("nbt_xdp"), pkt)
    assert (r.retval, r.data_out) == (XDP_PASS, pkt)


def test_repeat_runs_the_program_n_times_and_measures_duration(tiny_xdp):
    before = verdict_count(tiny_xdp, XDP_PASS)
    r = test_run(tiny_xdp.progs["nbt_xdp"], frame(), repeat=20000)
    assert r.retval == XDP_PASS
    assert r.duration_ns > 0
    assert verdict_count(tiny_xdp, XDP_PASS) - before == 20000


def test_verdict_names():
    assert [xdp_verdict_name(v) for v in range(5)] == ["aborted", "drop", "pass", "tx",
                                                      "redirect"]
    assert tc_verdict_name(TC_ACT_SHOT) == "shot"
    assert tc_verdict_name(-1) == "unspec"
    assert xdp_verdict_name(9) == "xdp verdict 9"


def test_output_bigger_than_the_first_buffer_is_retried(tiny_xdp, monkeypatch):
    # Force an out buffer smaller than the packet: the kernel answers ENOSPC with the size.
    monkeypatch.setattr(testrun, "MIN_OUT", 0)
    monkeypatch.setattr(testrun, "OUT_SLACK", -40)
    pkt = frame(size=200)
    r = test_run(tiny_xdp.progs["nbt_xdp"], pkt)
    assert (r.retval, r.data_out) == (XDP_PASS, pkt)


def test_packet_shorter_than_ethernet_header_is_einval_with_hint(tiny_xdp):
    with pytest.raises(bpfsys.KernelError, match=r"nbt_xdp on a 10-byte packet: .*\[EINVAL\]; "
                                                 r"packets need at least an Ethernet header"):
        test_run(tiny_xdp.progs["nbt_xdp"], frame()[:10])


def test_bad_fd_is_ebadf():
    with pytest.raises(NetbpfError, match=r"program fd 987 on a 64-byte packet: Bad file descriptor \[EBADF\]"):
        test_run(987, frame())


def test_map_fd_is_not_a_program(tiny_xdp):
    with pytest.raises(bpfsys.KernelError, match=r"nbt_hash .*\[EINVAL\]") as e:
        test_run(tiny_xdp.maps["nbt_hash"].fd, frame())
    assert e.value.errno == 22


# ---- TC (SCHED_CLS) ----

def test_tc_marker_is_shot(tiny_tc):
    pkt = frame(dst=b"\xff" * 6)
    r = test_run(tiny_tc.progs["nbt_tc"], pkt)
    assert r.retval == TC_ACT_SHOT


def test_tc_ok_rewrites_last_source_mac_byte(tiny_tc):
    r = test_run(tiny_tc.progs["nbt_tc"], frame(size=100), repeat=10)
    assert r.retval == TC_ACT_OK
    assert r.data_out == frame(src=SRC[:5] + b"\xaa", size=100)
    assert r.duration_ns > 0


def test_tc_context_goes_in_and_comes_back(tiny_tc):
    skb = bytearray(192)                # sizeof(struct __sk_buff), kernel 6.x
    struct.pack_into("<I", skb, 8, 0x1234)      # mark
    struct.pack_into("<I", skb, 32, 7)          # priority
    r = test_run(tiny_tc.progs["nbt_tc"], frame(), ctx=bytes(skb))
    assert r.retval == TC_ACT_OK
    assert struct.unpack_from("<I", r.ctx_out, 8)[0] == 0x1234
    assert struct.unpack_from("<I", r.ctx_out, 32)[0] == 7


# ---- loader ----

def test_defines_reach_the_program():
    loaded = loader.load_program(TINY_XDP, {"NBT_DEFAULT": XDP_DROP}, {"nbt_xdp": "xdp"})
    try:
        assert test_run(loaded.progs["nbt_xdp"], frame()).retval == XDP_DROP
    finally:
        loaded.close()


def test_program_is_named_after_its_function(tiny_xdp):
    info = bpfsys.prog_info(tiny_xdp.progs["nbt_xdp"])
    assert (info.name, info.type_name, info.id) == ("nbt_xdp", "xdp",
                                                    tiny_xdp.prog_id("nbt_xdp"))
    assert len(info.tag) == 16


def test_loaded_maps_match_bcc_key_and_leaf_types(tiny_xdp):
    import ctypes

    ncpu = bpfsys.num_possible_cpus()
    assert set(tiny_xdp.maps) == {"nbt_verdicts", "nbt_array", "nbt_hash", "nbt_pcpu_hash",
                                  "nbt_lru", "nbt_lpm"}
    for name, m in tiny_xdp.maps.items():
        table = tiny_xdp.table(name)
        assert m.key_size == ctypes.sizeof(table.Key), name
        # bcc's Leaf for a per-CPU map is an array with one value per possible CPU
        leaf = m.value_size * (ncpu if m.percpu else 1)
        assert leaf == ctypes.sizeof(table.Leaf), name
        info = bpfsys.map_info(m.fd)
        assert (info.name, info.type, info.key_size, info.value_size, info.max_entries) == \
            (name, m.type, m.key_size, m.value_size, m.max_entries)


def test_cache_compiles_once_per_source_and_defines(tiny_xdp):
    again = loader.load_program(TINY_XDP, {}, {"nbt_xdp": "xdp"}, cache=True)
    assert again is tiny_xdp
    other = loader.load_program(TINY_XDP, {"NBT_DEFAULT": 1}, {"nbt_xdp": "xdp"}, cache=True)
    try:
        assert other is not tiny_xdp
    finally:
        other.close()


def _bad_source(tmp_path: Path, body: str) -> Path:
    src = tmp_path / f"nbtbad{uuid.uuid4().hex[:8]}.bpf.c"
    src.write_text(body)
    return src


def test_verifier_rejection_names_the_reason_and_writes_the_log(tmp_path):
    src = _bad_source(tmp_path, """
int nbt_bad(struct xdp_md *ctx)
{
    unsigned char *p = (void *)(long)ctx->data;
    return p[0] == 1 ? XDP_DROP : XDP_PASS;     /* no bounds check: rejected */
}
""")
    log = loader.verifier_log(src, "nbt_bad")
    try:
        with pytest.raises(NetbpfError) as e:
            loader.load_program(src, {}, {"nbt_bad": "xdp"})
        assert str(e.value) == (f"load {src}: the verifier rejected the program nbt_bad "
                                f"(invalid access to packet, off=0 size=1, R1(id=0,off=0,r=0)); "
                                f"full log in {log}")
        assert "processed" in log.read_text()
    finally:
        log.unlink(missing_ok=True)


def test_compile_error_shows_clang_lines_against_the_file(tmp_path):
    src = _bad_source(tmp_path, "int nbt_bad(struct xdp_md *ctx)\n{\n    return nope + 1;\n}\n")
    with pytest.raises(NetbpfError) as e:
        loader.load_program(src, {}, {"nbt_bad": "xdp"})
    msg = str(e.value)
    assert msg.startswith(f"compile {src}: clang failed:\n")
    assert f"{src}:3:12: error: use of undeclared identifier 'nope'" in msg


def test_unknown_function_and_long_names_are_refused():
    with pytest.raises(NetbpfError, match="no function 'nbt_nothere' in the source"):
        loader.load_program(TINY_XDP, {}, {"nbt_nothere": "xdp"})
    with pytest.raises(NetbpfError, match="longer than 15 characters"):
        loader.load_program(TINY_XDP, {}, {"nbt_far_too_long_name": "xdp"})
    with pytest.raises(NetbpfError, match="unknown program type 'kprobe2'"):
        loader.load_program(TINY_XDP, {}, {"nbt_xdp": "kprobe2"})
