"""Programs bcc compiled before, loaded again without the compiler.

After bcc compiles and the kernel accepts a program, its instructions (bcc's own bytes, with
the map fds of that load in them) and the attributes of every map it created are written to
one file under NETBPF_OBJ_CACHE (default /var/cache/netbpf; "off" disables). The key is the
source with its headers pasted in, the defines, the functions and their types, the kernel
release and the libbcc build: anything that could change the bytes. The next load of the
same key creates the maps (or opens a BPF_TABLE_PINNED pin, creating it as bcc would), puts
their fds into the map-load instructions, and loads the programs through libbpf: no LLVM, no
bcc import, a fraction of the time and memory. The kernel still verifies every load.

Anything unexpected (unreadable entry, a map the kernel refuses, a verifier rejection after a
kernel change) is a miss: the caller compiles as before and the entry is replaced. Programs
whose instructions reference functions by address (bpf_loop callbacks need BTF func_info,
which bcc does not give us) are never stored.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from netbpf.kernel import bpfsys
from netbpf.kernel.bpfsys import Fd

ENV = "NETBPF_OBJ_CACHE"
DEFAULT_DIR = "/var/cache/netbpf"
FORMAT = 1
KEEP = 64                      # newest entries kept; older ones are removed on store

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE, _PSEUDO_FUNC = 1, 2, 4
_INSN = struct.Struct("<BBhi")
_LIBBCC = "/usr/lib/x86_64-linux-gnu/libbcc.so.0"


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32),
                ("map_ifindex", ctypes.c_uint32)]


def cache_dir() -> Path | None:
    """The cache directory, or None when off or not safe to use (not root's, or writable by
    others: its entries become programs in the kernel)."""
    value = os.environ.get(ENV, DEFAULT_DIR)
    if value.lower() in ("", "off", "0", "no"):
        return None
    d = Path(value)
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = d.stat()
    except OSError:
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return d


def key(text: bytes, args: list[str], functions: dict[str, int]) -> str:
    h = hashlib.sha256()
    try:
        path = os.path.realpath(_LIBBCC)
        lib = os.stat(path)
        build = f"{path}:{lib.st_size}:{lib.st_mtime_ns}"
    except OSError:
        build = "no-libbcc"
    for part in (str(FORMAT), os.uname().release, build, json.dumps(args),
                 json.dumps(sorted(functions.items()))):
        h.update(part.encode() + b"\0")
    h.update(text)
    return h.hexdigest()


def load(k: str, shared_pin: str | None):
    """(progs {name: Fd}, maps [(name, Fd, type, key_size, value_size, max_entries)],
    warnings) for a stored key, or None (a miss)."""
    d = cache_dir()
    if d is None:
        return None
    path = d / f"{k}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != FORMAT:
            return None
    except (OSError, ValueError):
        return None
    made: list[Fd] = []
    try:
        by_old, maps = {}, []
        for m in entry["maps"]:
            fd = _open_or_create(m, shared_pin)
            made.append(fd)
            by_old[m["old_fd"]] = fd
            maps.append((m["name"], fd, m["type"], m["key_size"], m["value_size"],
                         m["max_entries"]))
        progs = {}
        for name, p in entry["progs"].items():
            insns = _patched(base64.b64decode(p["insns"]), by_old)
            fd = _prog_load(p["type"], name, entry["license"], insns)
            made.append(fd)
            progs[name] = fd
    except (OSError, KeyError, ValueError, bpfsys.KernelError):
        for fd in made:
            fd.close()
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)
    except OSError:
        pass
    return progs, maps, entry.get("warnings", "")


def store(k: str, progs: dict[str, tuple[int, bytes]], maps: list[dict], license: str,
          warnings: str) -> None:
    """Keep what bcc just loaded. progs: {name: (prog type, instruction bytes)}; maps: name,
    old_fd, type, key_size, value_size, max_entries, flags, pinned. Never raises."""
    d = cache_dir()
    if d is None:
        return
    for _, insns in progs.values():
        if any(code == _LD_IMM64 and regs >> 4 == _PSEUDO_FUNC
               for code, regs, _, _ in _INSN.iter_unpack(insns)):
            return
    entry = {"format": FORMAT, "license": license, "warnings": warnings, "maps": maps,
             "progs": {n: {"type": t, "insns": base64.b64encode(b).decode()}
                       for n, (t, b) in progs.items()}}
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".new-")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, d / f"{k}.json")
        entries = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def pinned(name: str, fd: int, shared_pin: str | None) -> bool:
    """Did bcc open or create this map at the shared pin (BPF_TABLE_PINNED)?"""
    if not shared_pin:
        return False
    path = Path(shared_pin) / name
    try:
        with bpfsys.obj_get(path) as pin:
            return bpfsys.map_info(pin).id == bpfsys.map_info(fd).id
    except (bpfsys.KernelError, OSError):
        return False


def _open_or_create(m: dict, shared_pin: str | None) -> Fd:
    if m["pinned"]:
        if not shared_pin:
            raise KeyError("pinned map without a pin directory")
        path = Path(shared_pin) / m["name"]
        if path.exists():
            fd = bpfsys.obj_get(path)
            info = bpfsys.map_info(fd)
            if (info.type, info.key_size, info.value_size, info.max_entries) != \
                    (m["type"], m["key_size"], m["value_size"], m["max_entries"]):
                fd.close()
                raise KeyError(f"pinned map {path} has other attributes")
            return fd
        fd = _map_create(m)
        bpfsys.obj_pin(fd, path)
        return fd
    return _map_create(m)


def _map_create(m: dict) -> Fd:
    lib = _lib()
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=m["flags"])
    ret = lib.bpf_map_create(m["type"], m["name"][:15].encode(), m["key_size"],
                             m["value_size"], m["max_entries"], ctypes.byref(opts))
    if ret < 0:
        bpfsys.raise_errno(f"create map {m['name']}", -ret)
    return Fd(ret, m["name"])


def _prog_load(prog_type: int, name: str, license: str, insns: bytes) -> Fd:
    lib = _lib()
    buf = ctypes.create_string_buffer(insns, len(insns))
    ret = lib.bpf_prog_load(prog_type, name[:15].encode(), license.encode(), buf,
                            len(insns) // 8, None)
    if ret < 0:
        bpfsys.raise_errno(f"load program {name}", -ret)
    return Fd(ret, name)


def _patched(insns: bytes, by_old: dict[int, Fd]) -> bytes:
    out = bytearray(insns)
    for i in range(0, len(out) - 8, 8):
        code, regs, off, imm = _INSN.unpack_from(out, i)
        if code == _LD_IMM64 and regs >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
            if imm not in by_old:
                raise KeyError(f"instruction {i // 8} names an unknown map fd {imm}")
            _INSN.pack_into(out, i, code, regs, off, int(by_old[imm]))
    return bytes(out)


_libbpf = None


def _lib():
    global _libbpf
    if _libbpf is None:
        lib = bpfsys.libbpf()
        c_int, c_u32, cp, vp = ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_void_p
        lib.bpf_map_create.argtypes = [c_int, cp, c_u32, c_u32, c_u32, vp]
        lib.bpf_map_create.restype = c_int
        lib.bpf_prog_load.argtypes = [c_int, cp, cp, vp, ctypes.c_size_t, vp]
        lib.bpf_prog_load.restype = c_int
        _libbpf = lib
    return _libbpf

