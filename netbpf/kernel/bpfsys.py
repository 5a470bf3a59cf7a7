"""Thin ctypes binding of libbpf.so.1's low-level bpf(2) wrappers: pins, map I/O, object info.

No bcc and no policy here: bytes in, bytes out. Every failure raises KernelError naming the
object (pin path or map name) and the errno. Descriptors come wrapped in Fd so they close.

Batch operations, by map type (kernel 6.18, checked by tests/bpf/test_bpfsys.py):
  hash, percpu_hash, lru_hash, lpm_trie: update, delete and lookup batches;
  array, percpu_array: update and lookup batches (arrays cannot delete: ENOTSUPP, 524).
  lpm_trie batches are recent (older kernels answer ENOTSUPP): on ENOTSUPP/EOPNOTSUPP/EINVAL
  before any element is written, map_*_batch fall back to one bpf(2) call per element.

Over 400 lines because every bpf(2) call netbpf makes is declared here once (ctypes
prototypes, errno translation, batch fallbacks); nothing else talks to libbpf directly.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
from dataclasses import dataclass
from typing import Iterator

from netbpf.errors import NetbpfError

# The kernel's internal "operation not supported" leaks to user space for missing map ops.
ENOTSUPP = 524

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

MAP_TYPES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 8: "cgroup_array", 9: "lru_hash",
    10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    14: "devmap", 15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash",
    19: "cgroup_storage", 20: "reuseport_sockarray", 21: "percpu_cgroup_storage",
    22: "queue", 23: "stack", 24: "sk_storage", 25: "devmap_hash", 26: "struct_ops",
    27: "ringbuf", 28: "inode_storage", 29: "task_storage", 30: "bloom_filter",
}
PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})

PROG_TYPES = {
    1: "socket_filter", 2: "kprobe", 3: "sched_cls", 4: "sched_act", 5: "tracepoint",
    6: "xdp", 7: "perf_event", 8: "cgroup_skb",
}


class KernelError(NetbpfError):
    """A bpf(2) or netlink call failed; .errno holds the error number."""

    def __init__(self, message: str, err: int | None = None):
        super().__init__(message)
        self.errno = err


def errno_name(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP"
    if err == _errno.EOPNOTSUPP:    # errorcode says ENOTSUP, an alias; the kernel says this
        return "EOPNOTSUPP"
    return _errno.errorcode.get(err, f"errno {err}")


def strerror(err: int) -> str:
    if err == ENOTSUPP:
        return "Operation not supported by this object"
    return os.strerror(err)


def raise_errno(what: str, err: int, hint: str = "") -> None:
    """Raise KernelError as '<what>: <strerror> [<ENAME>]<hint>'."""
    raise KernelError(f"{what}: {strerror(err)} [{errno_name(err)}]{hint}", err)


class Fd:
    """A descriptor that closes once: explicitly, on leaving a with-block, or when collected.

    label names the object in error messages (a pin path, a map or program name).
    owned=False wraps a descriptor someone else closes (bcc's program and map fds).
    """

    __slots__ = ("fd", "label", "owned")

    def __init__(self, fd: int, label: str = "", owned: bool = True):
        self.fd = fd
        self.label = label or f"fd {fd}"
        self.owned = owned

    def __int__(self) -> int:
        if self.fd < 0:
            raise KernelError(f"{self.label}: descriptor already closed", _errno.EBADF)
        return self.fd

    __index__ = __int__

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0 and self.owned:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fd({self.fd}, {self.label!r})"


FdLike = int | Fd


def close(fd: FdLike) -> None:
    if isinstance(fd, Fd):
        fd.close()
    else:
        os.close(fd)


def _label(fd: FdLike) -> str:
    return fd.label if isinstance(fd, Fd) else f"fd {fd}"


# ---- libbpf ----

class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (linux/bpf.h); the kernel fills what it knows and zeroes the rest."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (linux/bpf.h), as of kernel 6.x."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32), ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
    ]


_lib: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with prototypes declared; loaded on first use."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise NetbpfError(f"cannot load libbpf.so.1 ({e}): install Debian's libbpf1") from None
    c_int, c_u32, vp, cp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p
    pu32 = ctypes.POINTER(ctypes.c_uint32)
    opts = ctypes.POINTER(BpfMapBatchOpts)
    protos = {
        "bpf_obj_get": ([cp], c_int),
        "bpf_obj_pin": ([c_int, cp], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, vp, pu32], c_int),
        "bpf_map_lookup_elem": ([c_int, vp, vp], c_int),
        "bpf_map_update_elem": ([c_int, vp, vp, ctypes.c_uint64], c_int),
        "bpf_map_delete_elem": ([c_int, vp], c_int),
        "bpf_map_get_next_key": ([c_int, vp, vp], c_int),
        "bpf_map_update_batch": ([c_int, vp, vp, pu32, opts], c_int),
        "bpf_map_delete_batch": ([c_int, vp, pu32, opts], c_int),
        "bpf_map_lookup_batch": ([c_int, vp, vp, vp, vp, pu32, opts], c_int),
        "bpf_prog_get_fd_by_id": ([c_u32], c_int),
        "bpf_map_get_fd_by_id": ([c_u32], c_int),
        "libbpf_num_possible_cpus": ([], c_int),
    }
    for name, (argtypes, restype) in protos.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _lib = lib
    return lib


def _err(ret: int) -> int:
    # libbpf 1.x returns -errno and also sets errno; prefer the return value.
    return -ret if ret < 0 else (ctypes.get_errno() or _errno.EIO)


# ---- objects ----

def obj_get(path: str | os.PathLike) -> Fd:
    """Open a pinned map or program."""
    path = os.fspath(path)
    ret = libbpf().bpf_obj_get(path.encode())
    if ret < 0:
        raise_errno(f"open pin {path}", _err(ret))
    return Fd(ret, path)


def obj_pin(fd: FdLike, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    ret = libbpf().bpf_obj_pin(int(fd), path.encode())
    if ret < 0:
        raise_errno(f"pin {_label(fd)} at {path}", _err(ret))


def prog_get_fd_by_id(prog_id: int) -> Fd:
    ret = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if ret < 0:
        raise_errno(f"open program id {prog_id}", _err(ret))
    return Fd(ret, f"program id {prog_id}")


def map_get_fd_by_id(map_id: int) -> Fd:
    ret = libbpf().bpf_map_get_fd_by_id(map_id)
    if ret < 0:
        raise_errno(f"open map id {map_id}", _err(ret))
    return Fd(ret, f"map id {map_id}")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPES.get(self.type, f"type {self.type}")

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: str                 # hex, as bpftool prints it
    run_time_ns: int         # only counted while kernel.bpf_stats_enabled=1
    run_cnt: int

    @property
    def type_name(self) -> str:
        return PROG_TYPES.get(self.type, f"type {self.type}")


def _info(fd: FdLike, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = libbpf().bpf_obj_get_info_by_fd(int(fd), ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        raise_errno(f"{what} {_label(fd)}", _err(ret))


def map_info(fd: FdLike) -> MapInfo:
    i = BpfMapInfo()
    _info(fd, i, "read map info of")
    return MapInfo(i.type, i.id, i.key_size, i.value_size, i.max_entries, i.map_flags,
                   i.name.decode(errors="replace"))


def prog_info(fd: FdLike) -> ProgInfo:
    i = BpfProgInfo()
    _info(fd, i, "read program info of")
    return ProgInfo(i.type, i.id, i.name.decode(errors="replace"), bytes(i.tag).hex(),
                    i.run_time_ns, i.run_cnt)


# ---- maps ----

def num_possible_cpus() -> int:
    n = libbpf().libbpf_num_possible_cpus()
    if n < 0:
        raise_errno("count possible CPUs", -n)
    return n


def percpu_value_size(value_size: int) -> int:
    """Bytes one per-CPU lookup returns: each CPU's value is padded to 8 bytes."""
    return ((value_size + 7) // 8 * 8) * num_possible_cpus()


def _buf(data: bytes) -> ctypes.Array:
    return ctypes.create_string_buffer(bytes(data), len(data) or 1)


def map_lookup(fd: FdLike, key: bytes, value_size: int) -> bytes | None:
    """The value for key, or None when there is none. Per-CPU maps: use map_lookup_percpu."""
    out = ctypes.create_string_buffer(value_size or 1)
    ret = libbpf().bpf_map_lookup_elem(int(fd), _buf(key), out)
    if ret < 0:
        err = _err(ret)
        if err == _errno.ENOENT:
            return None
        raise_errno(f"look up in map {_label(fd)}", err)
    return out.raw[:value_size]


def map_lookup_percpu(fd: FdLike, key: bytes, value_size: int) -> list[bytes] | None:
    """One value per possible CPU (padding stripped), or None when the key is absent."""
    stride = (value_size + 7) // 8 * 8
    raw = map_lookup(fd, key, stride * num_possible_cpus())
    if raw is None:
        return None
    return [raw[i:i + value_size] for i in range(0, len(raw), stride)]


def map_update(fd: FdLike, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Per-CPU maps take one padded value per possible CPU (see percpu_value_size)."""
    ret = libbpf().bpf_map_update_elem(int(fd), _buf(key), _buf(value), flags)
    if ret < 0:
        raise_errno(f"update map {_label(fd)}", _err(ret))


def map_delete(fd: FdLike, key: bytes) -> bool:
    """Delete key; False if it was not there."""
    ret = libbpf().bpf_map_delete_elem(int(fd), _buf(key))
    if ret < 0:
        err = _err(ret)
        if err == _errno.ENOENT:
            return False
        raise_errno(f"delete from map {_label(fd)}", err)
    return True


def map_keys(fd: FdLike, key_size: int) -> Iterator[bytes]:
    """Every key, via get_next_key. Deleting the key just yielded is safe for hash maps;
    other concurrent deletions may make a hash map restart from its first key."""
    lib = libbpf()
    cur = None
    nxt = ctypes.create_string_buffer(key_size or 1)
    while True:
        ret = lib.bpf_map_get_next_key(int(fd), cur, nxt)
        if ret < 0:
            err = _err(ret)
            if err == _errno.ENOENT:
                return
            raise_errno(f"iterate map {_label(fd)}", err)
        key = nxt.raw[:key_size]
        yield key
        cur = _buf(key)


_NO_BATCH = (ENOTSUPP, _errno.EOPNOTSUPP, _errno.EINVAL)


def _batch_opts(flags: int = 0) -> BpfMapBatchOpts:
    return BpfMapBatchOpts(ctypes.sizeof(BpfMapBatchOpts), flags, 0)


def _split(blob: bytes, count: int, what: str) -> int:
    if count and len(blob) % count:
        raise ValueError(f"{what}: {len(blob)} bytes is not {count} equal items")
    return len(blob) // count if count else 0


def map_update_batch(fd: FdLike, keys: bytes, values: bytes, count: int,
                     flags: int = BPF_ANY) -> None:
    """Write count elements (keys and values concatenated). One syscall where the kernel
    batches the map type (6.18 does lpm_trie too), one per element otherwise. Not atomic."""
    if count == 0:
        return
    ksz, vsz = _split(keys, count, "keys"), _split(values, count, "values")
    n = ctypes.c_uint32(count)
    ret = libbpf().bpf_map_update_batch(int(fd), _buf(keys), _buf(values), ctypes.byref(n),
                                        ctypes.byref(_batch_opts(flags)))
    if ret >= 0:
        return
    err = _err(ret)
    if err in _NO_BATCH and n.value in (0, count):
        for i in range(count):
            map_update(fd, keys[i * ksz:(i + 1) * ksz], values[i * vsz:(i + 1) * vsz], flags)
        return
    raise_errno(f"update map {_label(fd)} in a batch of {count} ({n.value} written)", err)


def map_delete_batch(fd: FdLike, keys: bytes, count: int) -> int:
    """Delete count keys; returns how many existed. A batch stops at the first absent key
    (ENOENT), so the remainder is deleted one by one."""
    if count == 0:
        return 0
    ksz = _split(keys, count, "keys")
    n = ctypes.c_uint32(count)
    ret = libbpf().bpf_map_delete_batch(int(fd), _buf(keys), ctypes.byref(n),
                                        ctypes.byref(_batch_opts()))
    if ret >= 0:
        return count
    err = _err(ret)
    if err in _NO_BATCH + (_errno.ENOENT,):
        done = n.value if err == _errno.ENOENT else 0
        if err != _errno.ENOENT and done not in (0, count):
            raise_errno(f"delete from map {_label(fd)} in a batch", err)
        return done + sum(map_delete(fd, keys[i * ksz:(i + 1) * ksz])
                          for i in range(done, count))
    raise_errno(f"delete from map {_label(fd)} in a batch of {count}", err)
    return 0


def _batches(fd: FdLike, key_size: int, vsz: int, chunk: int):
    """The raw (keys, values) of each BPF_MAP_LOOKUP_BATCH call over the whole map; one None
    and nothing else when the map type has no batch lookup."""
    lib = libbpf()
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(vsz * chunk)
    # The batch cursor is opaque: a bucket index (u32) for hashes, a key for arrays.
    token_size = max(key_size, 8)
    in_batch, out_batch = None, ctypes.create_string_buffer(token_size)
    while True:
        n = ctypes.c_uint32(chunk)
        ret = lib.bpf_map_lookup_batch(int(fd), in_batch, out_batch, keys, values,
                                       ctypes.byref(n), ctypes.byref(_batch_opts()))
        err = _err(ret) if ret < 0 else 0
        if err in _NO_BATCH and in_batch is None and n.value == 0:
            yield None
            return
        if err and err != _errno.ENOENT:
            raise_errno(f"read map {_label(fd)} in batches", err)
        yield keys.raw[:n.value * key_size], values.raw[:n.value * vsz]
        if err == _errno.ENOENT:
            return
        in_batch = ctypes.create_string_buffer(out_batch.raw, token_size)


def map_lookup_batch(fd: FdLike, key_size: int, value_size: int, percpu: bool = False,
                     chunk: int = 4096) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
    """Every (key, value) in few syscalls: the fast way to read big (per-CPU) counter maps.
    value_size is one CPU's value; per-CPU maps yield a list with one value per CPU.
    Map types without batch lookup fall back to get_next_key + lookup."""
    stride = (value_size + 7) // 8 * 8
    ncpu = num_possible_cpus() if percpu else 1
    vsz = stride * ncpu if percpu else value_size
    for batch in _batches(fd, key_size, vsz, chunk):
        if batch is None:
            yield from _lookup_each(fd, key_size, value_size, percpu)
            return
        kraw, vraw = batch
        for i in range(len(kraw) // key_size if key_size else 0):
            k = kraw[i * key_size:(i + 1) * key_size]
            v = vraw[i * vsz:(i + 1) * vsz]
            if percpu:
                yield k, [v[c * stride:c * stride + value_size] for c in range(ncpu)]
            else:
                yield k, v


def map_dump_keys(fd: FdLike, key_size: int, value_size: int, chunk: int = 65536) -> bytes:
    """Every key of a (non-per-CPU) map, concatenated: a 1M-entry hash map in a few batch
    syscalls. Map types without batch lookup (lpm_trie) are walked with get_next_key."""
    parts: list[bytes] = []
    for batch in _batches(fd, key_size, value_size, chunk):
        if batch is None:
            return b"".join(map_keys(fd, key_size))
        parts.append(batch[0])
    return b"".join(parts)


def _lookup_each(fd: FdLike, key_size: int, value_size: int, percpu: bool):
    for k in list(map_keys(fd, key_size)):
        v = (map_lookup_percpu(fd, k, value_size) if percpu
             else map_lookup(fd, k, value_size))
        if v is not None:
            yield k, v


def array_lookup_range(fd: FdLike, first: int, n: int, value_size: int,
                       chunk: int = 8192) -> list[bytes]:
    """Values of array indexes first..first+n-1 in batches (reading back one generation of
    a big table without the other). The batch cursor is the key before the next one read."""
    lib = libbpf()
    out: list[bytes] = []
    keys = ctypes.create_string_buffer(4 * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token = ctypes.create_string_buffer(8)
    while len(out) < n:
        start = first + len(out)
        want = min(chunk, n - len(out))
        in_batch = None
        if start:
            in_batch = ctypes.create_string_buffer((start - 1).to_bytes(4, "little") + bytes(4), 8)
        cnt = ctypes.c_uint32(want)
        ret = lib.bpf_map_lookup_batch(int(fd), in_batch, token, keys, values,
                                       ctypes.byref(cnt), ctypes.byref(_batch_opts()))
        err = _err(ret) if ret < 0 else 0
        if err in _NO_BATCH and cnt.value == 0:
            for i in range(start, first + n):
                out.append(map_lookup(fd, i.to_bytes(4, "little"), value_size) or
                           bytes(value_size))
            return out
        if err and err != _errno.ENOENT:
            raise_errno(f"read map {_label(fd)} in batches", err)
        raw = values.raw
        out += [raw[i * value_size:(i + 1) * value_size] for i in range(cnt.value)]
        if err == _errno.ENOENT or cnt.value == 0:
            break
    if len(out) < n:
        raise_errno(f"read {n} entries from index {first} of map {_label(fd)}", _errno.ERANGE)
    return out[:n]
