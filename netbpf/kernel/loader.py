"""Compile BPF C with bcc and load its programs: fds by function, maps by name, pins.

Not attach (attach.py) and not map contents (bpfsys.py). Compiler and verifier output go to
fd 2 from inside libbcc, so it is captured there and turned into errors people can act on.

Over 400 lines because most of it is turning compiler and verifier output into messages that
name the file, line and reason; the object cache itself is kernel/objcache.py.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from netbpf.abi import BPF_DIR
from netbpf.errors import NetbpfError
from netbpf.kernel import bpfsys, objcache
from netbpf.kernel.bpfsys import Fd, KernelError

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
PROG_TYPE_NAMES = {"xdp": BPF_PROG_TYPE_XDP, "sched_cls": BPF_PROG_TYPE_SCHED_CLS,
                   "tc": BPF_PROG_TYPE_SCHED_CLS}

MAX_OBJ_NAME = 15           # BPF_OBJ_NAME_LEN - 1: longer names are cut in bpftool listings
def verifier_log(source: Path, func: str) -> Path:
    """Where a rejected program's verifier log goes: one file per program, in a directory
    only root can read (a predictable /tmp name could be a planted symlink)."""
    from netbpf.store.state import STATE_ROOT
    d = STATE_ROOT / "verifier"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d / f"{source.name.split('.')[0]}-{func}.log"
REPO_DIR = BPF_DIR.parent

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STRERRORS = {os.strerror(e): e for e in errno.errorcode}


@dataclass
class LoadedMap:
    name: str
    fd: Fd                  # owned by the bcc module: closes with Loaded.close()
    type: int
    key_size: int
    value_size: int         # one CPU's value for per-CPU maps
    max_entries: int

    @property
    def type_name(self) -> str:
        return bpfsys.MAP_TYPES.get(self.type, f"type {self.type}")

    @property
    def percpu(self) -> bool:
        return self.type in bpfsys.PERCPU_MAP_TYPES


@dataclass
class Loaded:
    """A compiled and loaded BPF source: programs (not attached) and the maps it created."""

    source: Path
    bpf: object                                   # bcc.BPF
    progs: dict[str, Fd] = field(default_factory=dict)
    maps: dict[str, LoadedMap] = field(default_factory=dict)
    warnings: str = ""                            # compiler warnings, if any
    cache_key: tuple | None = None

    def prog_fd(self, name: str) -> int:
        return int(self._prog(name))

    def prog_id(self, name: str) -> int:
        return bpfsys.prog_info(self._prog(name)).id

    def map_fd(self, name: str) -> int:
        return int(self._map(name).fd)

    def table(self, name: str):
        """bcc's Table for a map (ctypes .Key/.Leaf types and dict-like access)."""
        self._map(name)
        return self.bpf[name.encode()]

    def pin_maps(self, directory: str | os.PathLike, names: list[str] | None = None,
                 replace: bool = False) -> dict[str, Path]:
        """Pin maps as <directory>/<map name> (directory created); returns the paths.
        replace=True unpins what is there first; otherwise an existing pin is an error."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            bpfsys.raise_errno(f"create pin directory {directory}", e.errno or errno.EIO)
        pinned = {}
        for name in names if names is not None else list(self.maps):
            path = directory / name
            if replace and path.exists():
                path.unlink()
            bpfsys.obj_pin(self._map(name).fd, path)
            pinned[name] = path
        return pinned

    def close(self) -> None:
        """Close every fd; attached programs and pinned maps stay in the kernel."""
        if self.cache_key is not None:
            _cache.pop(self.cache_key, None)
        for fd in self.progs.values():
            fd.close()
        for m in self.maps.values():
            m.fd.close()
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prog(self, name: str) -> Fd:
        try:
            return self.progs[name]
        except KeyError:
            raise NetbpfError(f"{_display(self.source)}: no program '{name}' loaded "
                              f"(have {', '.join(self.progs) or 'none'})") from None

    def _map(self, name: str) -> LoadedMap:
        try:
            return self.maps[name]
        except KeyError:
            raise NetbpfError(f"{_display(self.source)}: no map '{name}' "
                              f"(have {', '.join(self.maps) or 'none'})") from None


_cache: dict[tuple, Loaded] = {}
_cache_lock = threading.Lock()


def load_program(source: str | os.PathLike, cflags: dict[str, int | str] | None = None,
                 functions: dict[str, int | str] | None = None, *, cache: bool = False,
                 device: str | None = None, stored: bool = False) -> Loaded:
    """Compile source with bcc (-DNAME=VALUE per cflag, -I bpf/include) and load functions
    ({name: 'xdp' | 'sched_cls' | prog type number}).

    cache=True returns the same Loaded (same programs, same maps) for the same source bytes,
    headers, cflags and functions: tests use it to compile once per session. It is off by
    default because two users of one Loaded share its maps.
    device binds the load to an interface (XDP offload); bcc takes the name.
    stored=True loads a program compiled before from the object cache (objcache.py) without
    the compiler, and stores what it compiles; the result has fds only (Loaded.bpf is None).
    """
    source = Path(source)
    cflags = dict(cflags or {})
    functions = {n: _prog_type(n, t) for n, t in (functions or {}).items()}
    try:
        text = source.read_bytes()
    except OSError as e:
        bpfsys.raise_errno(f"load {_display(source)}", e.errno or errno.EIO)
    key = None
    if cache:
        key = (str(source.resolve()), hashlib.sha256(text).hexdigest(), _headers_digest(),
               tuple(sorted((k, str(v)) for k, v in cflags.items())),
               tuple(sorted(functions.items())), device)
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None:
                return hit
    loaded = _compile_and_load(source, text, cflags, functions, device,
                               stored=stored and device is None)
    if key is not None:
        loaded.cache_key = key
        with _cache_lock:
            _cache[key] = loaded
    return loaded


def clear_cache() -> None:
    """Close every cached Loaded (session teardown)."""
    with _cache_lock:
        items = list(_cache.values())
    for loaded in items:
        loaded.close()


def _compile_and_load(source: Path, text: bytes, cflags: dict, functions: dict,
                      device: str | None, stored: bool = False) -> Loaded:
    for name in functions:
        _check_name(source, "program", name)
    args = [f"-I{BPF_DIR / 'include'}"] + [_define(source, k, v) for k, v in cflags.items()]
    text = _inline_includes(source, text)
    shared_pin = str(cflags.get("NB_SHARED_PIN", "")).strip('"') or None
    store_key = objcache.key(text, args, functions) if stored else None
    if store_key is not None:
        hit = objcache.load(store_key, shared_pin)
        if hit is not None:
            progs, maps, warnings = hit
            return Loaded(source=source, bpf=None, progs=progs, warnings=warnings, maps={
                name: LoadedMap(name=name, fd=fd, type=t, key_size=ks, value_size=vs,
                                max_entries=n) for name, fd, t, ks, vs, n in maps})
    import bcc

    with _captured_stderr() as err:
        try:
            bpf = bcc.BPF(text=text, cflags=args, device=device.encode() if device else None)
        except Exception:
            bpf = None
    if bpf is None:
        raise NetbpfError(f"compile {_display(source)}: {_compile_errors(source, err.text)}")
    loaded = Loaded(source=source, bpf=bpf, warnings=_relabel(source, err.text).strip())
    try:
        for name, prog_type in functions.items():
            loaded.progs[name] = _load_function(source, bpf, name, prog_type, device)
        loaded.maps = _maps_of(source, bpf)
    except BaseException:
        loaded.close()
        raise
    if store_key is not None:
        _store(store_key, loaded, functions, shared_pin)
    return loaded


def _store(store_key: str, loaded: Loaded, functions: dict, shared_pin: str | None) -> None:
    """Keep the instructions bcc just loaded and the attributes of its maps (objcache.py)."""
    lib, module = _libbcc(), loaded.bpf.module
    progs = {}
    for name, prog_type in functions.items():
        start = lib.bpf_function_start(module, name.encode())
        size = lib.bpf_function_size(module, name.encode())
        if not start or not size:
            return
        progs[name] = (prog_type, ctypes.string_at(start, size))
    maps = []
    for i in range(lib.bpf_num_tables(module)):
        m = loaded.maps[lib.bpf_table_name(module, i).decode()]
        maps.append({"name": m.name, "old_fd": int(m.fd), "type": m.type,
                     "key_size": m.key_size, "value_size": m.value_size,
                     "max_entries": m.max_entries, "flags": int(lib.bpf_table_flags_id(module, i)),
                     "pinned": objcache.pinned(m.name, m.fd, shared_pin)})
    objcache.store(store_key, progs, maps, lib.bpf_module_license(module).decode(),
                   loaded.warnings)


def _load_function(source: Path, bpf, name: str, prog_type: int, device: str | None) -> Fd:
    with _captured_stderr() as err:
        try:
            fn = bpf.load_func(name.encode(), prog_type,
                               device=device.encode() if device else None)
        except Exception as e:
            fn, exc = None, e
    if fn is not None:
        return Fd(fn.fd, name, owned=False)
    message = str(exc)
    if "Unknown program" in message:
        raise NetbpfError(f"load {_display(source)}: no function '{name}' in the source")
    strerr = message.rsplit(": ", 1)[-1]
    code = _STRERRORS.get(strerr, errno.EINVAL)
    log = err.text.strip()
    if code == errno.EACCES or (log and "processed " in log):
        path = verifier_log(source, name)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# {_display(source)}: {name}\n{log}\n")
        raise KernelError(f"load {_display(source)}: the verifier rejected the program "
                          f"{name} ({_verifier_reason(log)}); full log in {path}", code)
    bpfsys.raise_errno(f"load {_display(source)}: program {name}", code,
                       f"; {log.splitlines()[-1]}" if log else "")
    raise AssertionError("unreachable")


def _maps_of(source: Path, bpf) -> dict[str, LoadedMap]:
    lib = _libbcc()
    maps = {}
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i).decode()
        _check_name(source, "map", name)
        fd = lib.bpf_table_fd_id(bpf.module, i)
        maps[name] = LoadedMap(
            name=name, fd=Fd(fd, name, owned=False),
            type=lib.bpf_table_type_id(bpf.module, i),
            key_size=lib.bpf_table_key_size_id(bpf.module, i),
            value_size=lib.bpf_table_leaf_size_id(bpf.module, i),
            max_entries=lib.bpf_table_max_entries_id(bpf.module, i))
    return maps


_bcc_lib: ctypes.CDLL | None = None


def _libbcc() -> ctypes.CDLL:
    """Our own handle on libbcc for the table-enumeration calls bcc's Python does not wrap,
    so declaring their prototypes cannot disturb bcc's."""
    global _bcc_lib
    if _bcc_lib is None:
        lib = ctypes.CDLL("libbcc.so.0")
        vp, u64 = ctypes.c_void_p, ctypes.c_ulonglong
        for fn, res in (("bpf_num_tables", u64), ("bpf_table_name", ctypes.c_char_p),
                        ("bpf_table_fd_id", ctypes.c_int), ("bpf_table_type_id", ctypes.c_int),
                        ("bpf_table_key_size_id", ctypes.c_size_t),
                        ("bpf_table_leaf_size_id", ctypes.c_size_t),
                        ("bpf_table_max_entries_id", u64),
                        ("bpf_table_flags_id", ctypes.c_int)):
            f = getattr(lib, fn)
            f.restype = res
            f.argtypes = [vp] if fn == "bpf_num_tables" else [vp, u64]
        for fn, res in (("bpf_function_start", vp), ("bpf_function_size", ctypes.c_size_t)):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, [vp, ctypes.c_char_p]
        lib.bpf_module_license.restype, lib.bpf_module_license.argtypes = ctypes.c_char_p, [vp]
        _bcc_lib = lib
    return _bcc_lib


def _prog_type(name: str, t: int | str) -> int:
    if isinstance(t, int):
        return t
    try:
        return PROG_TYPE_NAMES[t.lower()]
    except KeyError:
        raise NetbpfError(f"program {name}: unknown program type '{t}' "
                          f"(use one of {', '.join(PROG_TYPE_NAMES)})") from None


def _check_name(source: Path, kind: str, name: str) -> None:
    if len(name) > MAX_OBJ_NAME:
        raise NetbpfError(f"load {_display(source)}: {kind} name '{name}' is longer than "
                          f"{MAX_OBJ_NAME} characters; the kernel would cut it")


def _define(source: Path, name: str, value: int | str) -> str:
    if not _IDENT.match(name):
        raise NetbpfError(f"compile {_display(source)}: bad define name {name!r}")
    if isinstance(value, bool):
        value = int(value)
    return f"-D{name}={value}"


_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)


def _inline_includes(source: Path, text: bytes, seen: set[Path] | None = None) -> bytes:
    """Paste local #include "..." headers into the text. bcc rewrites map calls such as
    nb_fw_cnt.lookup() only in the main file; in a header they compile to a call through a
    struct member ("unknown opcode 8d" at load). #line keeps messages on the header's lines."""
    seen = set() if seen is None else seen
    out, pos = [], 0
    for m in _LOCAL_INCLUDE.finditer(text):
        name = m.group(1).decode()
        path = next((d / name for d in (source.parent, BPF_DIR / "include")
                     if (d / name).is_file()), None)
        if path is None:
            continue  # let clang report it with its own message
        out.append(text[pos:m.start()])
        path = path.resolve()
        if path not in seen:
            seen.add(path)
            line = text.count(b"\n", 0, m.end()) + 2
            out.append(f'#line 1 "{path}"\n'.encode())
            out.append(_inline_includes(path, path.read_bytes(), seen))
            out.append(f'\n#line {line} "{_display(source)}"\n'.encode())
        pos = m.end()
    out.append(text[pos:])
    return b"".join(out)


def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((BPF_DIR / "include").glob("*.h")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _display(source: Path) -> str:
    try:
        return str(source.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(source)


def _relabel(source: Path, text: str) -> str:
    # bcc compiles the text as /virtual/main.c; line numbers are the file's own.
    return text.replace("/virtual/main.c", _display(source))


def _compile_errors(source: Path, text: str) -> str:
    lines = _relabel(source, text).splitlines()
    picked = []
    for i, line in enumerate(lines):
        if ": error:" in line or ": fatal error:" in line:
            picked.extend(lines[i:i + 3] if i + 2 < len(lines) else lines[i:])
            if len(picked) >= 15:
                break
    body = "\n".join(picked) if picked else "\n".join(lines[-15:])
    return "clang failed:\n" + (body or "(no compiler output)")


_INSN = re.compile(r"^\d+: ")
_NOISE = ("processed ", "verification time", "stack depth", "bpf: Failed to load program",
          "HINT:", "Summary of")


def _verifier_reason(log: str) -> str:
    """The verifier's complaint: the first line after the last instruction it printed."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    last_insn = max((i for i, ln in enumerate(lines) if _INSN.match(ln) or ln.startswith(";")),
                    default=-1)
    for ln in lines[last_insn + 1:]:
        if not ln.startswith(_NOISE):
            return ln
    for ln in reversed(lines):
        if not ln.startswith(_NOISE):
            return ln
    return "no log"


class _Captured:
    text = ""


_stderr_lock = threading.Lock()


@contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Point fd 2 at a temp file while libbcc writes clang diagnostics and verifier logs.
    Process-wide (fd 2 is shared by all threads), hence the lock."""
    cap = _Captured()
    with _stderr_lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap.text = tmp.read().decode(errors="replace")
