"""netbpf.kernel.bpfsys on real maps: pins, single and batch updates, per-CPU values, ids.

The maps come from tiny_xdp.bpf.c loaded for this module alone (tiny_xdp_fresh: writes here
cannot disturb other tests); pins go under a unique /sys/fs/bpf directory.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from netbpf.errors import NetbpfError
from netbpf.kernel import bpfsys
from netbpf.kernel.bpfsys import KernelError

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


@pytest.fixture
def maps(tiny_xdp_fresh):
    return tiny_xdp_fresh


def lpm_key(prefixlen: int, addr: str) -> bytes:
    import socket

    return U32.pack(prefixlen) + socket.inet_aton(addr)


def fd(maps, name: str):
    return maps.maps[name].fd


# ---- pins and ids ----

def test_pinned_map_reopens_as_the_same_map(maps, pin_dir):
    paths = maps.pin_maps(pin_dir)
    assert set(paths) == set(maps.maps)
    with bpfsys.obj_get(paths["nbt_hash"]) as pinned:
        assert bpfsys.map_info(pinned).id == bpfsys.map_info(fd(maps, "nbt_hash")).id
        bpfsys.map_update(pinned, U32.pack(77), U64.pack(770))
    assert bpfsys.map_lookup(fd(maps, "nbt_hash"), U32.pack(77), 8) == U64.pack(770)
    assert bpfsys.map_delete(fd(maps, "nbt_hash"), U32.pack(77))


def test_missing_pin_error_names_path_and_errno(pin_dir):
    path = pin_dir / "nb_fw_rules"
    with pytest.raises(NetbpfError) as e:
        bpfsys.obj_get(path)
    assert str(e.value) == f"open pin {path}: No such file or directory [ENOENT]"
    assert e.value.errno == errno.ENOENT


def test_pinning_over_an_existing_pin_is_eexist(maps, pin_dir):
    maps.pin_maps(pin_dir, ["nbt_array"])
    with pytest.raises(KernelError, match=rf"pin nbt_array at {pin_dir}/nbt_array: "
                                          r"File exists \[EEXIST\]"):
        maps.pin_maps(pin_dir, ["nbt_array"])
    maps.pin_maps(pin_dir, ["nbt_array"], replace=True)


def test_program_pin_and_id_round_trip(maps, pin_dir):
    prog = maps.progs["nbt_xdp"]
    pin_dir.mkdir()
    bpfsys.obj_pin(prog, pin_dir / "prog")
    with bpfsys.obj_get(pin_dir / "prog") as p, \
            bpfsys.prog_get_fd_by_id(maps.prog_id("nbt_xdp")) as q:
        assert bpfsys.prog_info(p) == bpfsys.prog_info(q)
        assert bpfsys.prog_info(p).name == "nbt_xdp"


def test_map_get_fd_by_id_opens_the_same_map(maps):
    info = bpfsys.map_info(fd(maps, "nbt_lpm"))
    with bpfsys.map_get_fd_by_id(info.id) as m:
        assert bpfsys.map_info(m) == info
        assert (info.type_name, info.key_size, info.value_size) == ("lpm_trie", 8, 4)


def test_unknown_ids_are_enoent():
    with pytest.raises(KernelError, match=r"open program id 4000000000: .*\[ENOENT\]"):
        bpfsys.prog_get_fd_by_id(4_000_000_000)
    with pytest.raises(KernelError, match=r"open map id 4000000000: .*\[ENOENT\]"):
        bpfsys.map_get_fd_by_id(4_000_000_000)


def test_fd_closes_once_and_refuses_use_after_close(maps):
    f = bpfsys.map_get_fd_by_id(bpfsys.map_info(fd(maps, "nbt_hash")).id)
    raw = int(f)
    f.close()
    f.close()
    with pytest.raises(KernelError, match="already closed"):
        int(f)
    with pytest.raises(OSError):
        os.fstat(raw)


# ---- single elements ----

def test_hash_update_lookup_delete(maps):
    m = fd(maps, "nbt_hash")
    assert bpfsys.map_lookup(m, U32.pack(5), 8) is None
    bpfsys.map_update(m, U32.pack(5), U64.pack(50))
    assert bpfsys.map_lookup(m, U32.pack(5), 8) == U64.pack(50)
    assert bpfsys.map_delete(m, U32.pack(5)) is True
    assert bpfsys.map_delete(m, U32.pack(5)) is False
    assert bpfsys.map_lookup(m, U32.pack(5), 8) is None


def test_update_flags_errors_name_the_map(maps):
    m = fd(maps, "nbt_hash")
    bpfsys.map_update(m, U32.pack(6), U64.pack(1), bpfsys.BPF_NOEXIST)
    with pytest.raises(KernelError, match=r"update map nbt_hash: File exists \[EEXIST\]"):
        bpfsys.map_update(m, U32.pack(6), U64.pack(2), bpfsys.BPF_NOEXIST)
    with pytest.raises(KernelError, match=r"update map nbt_hash: .*\[ENOENT\]"):
        bpfsys.map_update(m, U32.pack(7), U64.pack(2), bpfsys.BPF_EXIST)
    bpfsys.map_delete(m, U32.pack(6))


def test_full_hash_is_e2big(maps):
    m = fd(maps, "nbt_pcpu_hash")      # 64 entries
    vsz = bpfsys.percpu_value_size(8)
    keys = b"".join(U32.pack(i) for i in range(64))
    bpfsys.map_update_batch(m, keys, bytes(vsz * 64), 64)
    try:
        with pytest.raises(KernelError, match=r"nbt_pcpu_hash: .*\[E2BIG\]"):
            bpfsys.map_update(m, U32.pack(1000), bytes(vsz))
    finally:
        assert bpfsys.map_delete_batch(m, keys, 64) == 64


def test_map_keys_walks_every_key(maps):
    m = fd(maps, "nbt_lpm")
    keys = [lpm_key(24, "10.0.1.0"), lpm_key(16, "10.1.0.0"), lpm_key(32, "192.0.2.7")]
    for i, k in enumerate(keys):
        bpfsys.map_update(m, k, U32.pack(i))
    try:
        assert sorted(bpfsys.map_keys(m, 8)) == sorted(keys)
        # longest prefix wins on lookup: a /32 key finds its /24
        assert bpfsys.map_lookup(m, lpm_key(32, "10.0.1.9"), 4) == U32.pack(0)
    finally:
        for k in keys:
            bpfsys.map_delete(m, k)
    assert list(bpfsys.map_keys(m, 8)) == []


def test_percpu_values_are_one_per_possible_cpu(maps):
    m = fd(maps, "nbt_verdicts")
    ncpu = bpfsys.num_possible_cpus()
    assert bpfsys.percpu_value_size(8) == 8 * ncpu
    assert bpfsys.percpu_value_size(4) == 8 * ncpu      # each CPU's value is 8-byte aligned
    blob = b"".join(U64.pack(100 + c) for c in range(ncpu))
    bpfsys.map_update(m, U32.pack(7), blob)
    assert bpfsys.map_lookup_percpu(m, U32.pack(7), 8) == [U64.pack(100 + c)
                                                           for c in range(ncpu)]
    assert bpfsys.map_lookup_percpu(fd(maps, "nbt_pcpu_hash"), U32.pack(999), 8) is None


# ---- batches ----

BATCH_MAPS = ["nbt_hash", "nbt_lru", "nbt_pcpu_hash", "nbt_lpm", "nbt_array", "nbt_verdicts"]


def _batch(maps, name: str, n: int):
    m = maps.maps[name]
    if name == "nbt_lpm":
        keys = [lpm_key(32, f"10.9.{i // 256}.{i % 256}") for i in range(n)]
    else:
        keys = [U32.pack(i) for i in range(n)]
    vsz = bpfsys.percpu_value_size(m.value_size) if m.percpu else m.value_size
    values = [bytes([i + 1]) * vsz for i in range(n)]
    return m, keys, values


@pytest.mark.parametrize("name", BATCH_MAPS)
def test_update_batch_writes_every_element(maps, name):
    m, keys, values = _batch(maps, name, 8)
    bpfsys.map_update_batch(m.fd, b"".join(keys), b"".join(values), len(keys))
    for k, v in zip(keys, values):
        if m.percpu:
            assert b"".join(bpfsys.map_lookup_percpu(m.fd, k, m.value_size)) == v
        else:
            assert bpfsys.map_lookup(m.fd, k, m.value_size) == v
    if m.type_name.endswith("array"):
        with pytest.raises(KernelError, match=rf"delete from map {name}: .*\[EINVAL\]"):
            bpfsys.map_delete_batch(m.fd, b"".join(keys), len(keys))
    else:
        assert bpfsys.map_delete_batch(m.fd, b"".join(keys), len(keys)) == len(keys)
        assert all(bpfsys.map_lookup(m.fd, k, 8 * 64) is None for k in keys)


def test_batch_support_by_map_type_matches_the_docs(maps):
    """What bpfsys's docstring says each map type supports, asked of the kernel directly."""
    lib = bpfsys.libbpf()
    got = {}
    for name in BATCH_MAPS:
        m, keys, values = _batch(maps, name, 2)
        opts = ctypes.byref(bpfsys._batch_opts())
        n = ctypes.c_uint32(2)
        upd = lib.bpf_map_update_batch(int(m.fd), b"".join(keys), b"".join(values),
                                       ctypes.byref(n), opts)
        n = ctypes.c_uint32(2)
        dele = lib.bpf_map_delete_batch(int(m.fd), b"".join(keys), ctypes.byref(n), opts)
        got[m.type_name] = (upd, dele)
    assert got["hash"] == got["lru_hash"] == got["percpu_hash"] == (0, 0)
    assert got["array"] == got["percpu_array"] == (0, -bpfsys.ENOTSUPP)
    # lpm_trie batches exist on recent kernels (6.18 here); older ones say ENOTSUPP
    assert got["lpm_trie"] in ((0, 0), (-bpfsys.ENOTSUPP, -bpfsys.ENOTSUPP))


def test_update_batch_falls_back_to_single_updates_on_enotsupp(maps, monkeypatch):
    def unsupported(*args):
        return -bpfsys.ENOTSUPP

    monkeypatch.setattr(bpfsys.libbpf(), "bpf_map_update_batch", unsupported)
    monkeypatch.setattr(bpfsys.libbpf(), "bpf_map_delete_batch", unsupported)
    m, keys, values = _batch(maps, "nbt_lpm", 5)
    bpfsys.map_update_batch(m.fd, b"".join(keys), b"".join(values), 5)
    assert [bpfsys.map_lookup(m.fd, k, 4) for k in keys] == values
    assert bpfsys.map_delete_batch(m.fd, b"".join(keys), 5) == 5
    assert list(bpfsys.map_keys(m.fd, 8)) == []


def test_delete_batch_counts_only_keys_that_existed(maps):
    m, keys, values = _batch(maps, "nbt_hash", 6)
    bpfsys.map_update_batch(m.fd, b"".join(keys[:3]), b"".join(values[:3]), 3)
    # the kernel stops a delete batch at the first absent key; the rest go one by one
    assert bpfsys.map_delete_batch(m.fd, b"".join(keys[2:] + keys[:2]), 6) == 3
    assert list(bpfsys.map_keys(m.fd, 4)) == []


def test_batch_with_ragged_buffers_is_refused(maps):
    with pytest.raises(ValueError, match="not 3 equal items"):
        bpfsys.map_update_batch(fd(maps, "nbt_hash"), bytes(10), bytes(24), 3)


def test_lookup_batch_reads_a_hash_in_several_chunks(maps):
    m, keys, values = _batch(maps, "nbt_hash", 50)
    bpfsys.map_update_batch(m.fd, b"".join(keys), b"".join(values), 50)
    try:
        got = dict(bpfsys.map_lookup_batch(m.fd, 4, 8, chunk=7))
        assert got == dict(zip(keys, values))
    finally:
        bpfsys.map_delete_batch(m.fd, b"".join(keys), 50)


def test_lookup_batch_reads_a_percpu_array_per_cpu(maps):
    m = maps.maps["nbt_verdicts"]
    ncpu = bpfsys.num_possible_cpus()
    blob = b"".join(U64.pack(1000 + c) for c in range(ncpu))
    bpfsys.map_update(m.fd, U32.pack(5), blob)
    got = dict(bpfsys.map_lookup_batch(m.fd, 4, 8, percpu=True, chunk=3))
    assert len(got) == m.max_entries
    assert got[U32.pack(5)] == [U64.pack(1000 + c) for c in range(ncpu)]
