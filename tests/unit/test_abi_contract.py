"""netbpf/abi.py against bpf/include/netbpf_abi.h, without root: the host compiler builds a
tiny program from the header that prints every name, constant, size and offset, and abi.py
must say the same. The BPF target lays these fixed-width structs out as the host does; the
loaded-map half (bcc's key and value sizes after a real load) is tests/bpf/test_abi.py.

Also: every map and program declared under bpf/ is named in the header, every struct there is
mirrored and size-asserted, and no constant of the header is missing from abi.py.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from netbpf import abi

HEADER = abi.ABI_HEADER.read_text()
# Derived from the program shape (NB_WORDS, NB_CHUNKS): mirrored as functions, checked per shape.
SHAPE_DEFINES = {"NB_WORDS", "NB_CLASS_CAP", "NB_DIR_CHUNKS", "NB_SUM", "NB_RULES_CAP",
                 "NB_SLOT_CAP", "NB_DIR_GEN", "NB_PAIR_CELLS"}
SHAPE_STRUCTS = {"nb_vec", "nb_psum"}     # sized by NB_WORDS: checked per shape
C_STRUCTS = re.findall(r"^struct (nb_\w+) \{", HEADER, re.M)
DEFINES = [n for n in re.findall(r"^#define (NB_\w+)[ \t]", HEADER, re.M)]
INDEX_MACROS = {"NB_PORT_IDX": (abi.port_idx, 3), "NB_PROTO_IDX": (abi.proto_idx, 2),
                "NB_ICMP_IDX": (abi.icmp_idx, 2), "NB_FLAGS_IDX": (abi.flags_idx, 2)}
INDEX_ARGS = [(0, 0, 0), (1, 1, 65535), (1, 0, 255), (0, 1, 8080)]


def c_name(cls: type) -> str:
    """NbLpm4Key -> nb_lpm4_key."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


MIRRORS = {c_name(v): v for v in vars(abi).values()
           if isinstance(v, type) and issubclass(v, ctypes.Structure) and v.__module__ == abi.__name__}


def _run_c(tmp, name: str, body: list[str], defines: str = "") -> dict[str, str]:
    src = tmp / f"{name}.c"
    src.write_text("\n".join(['#include <stdio.h>', '#include <stddef.h>',
                              '#include <linux/types.h>', defines,
                              f'#include "{abi.ABI_HEADER}"', "int main(void) {", *body,
                              "return 0; }"]))
    exe = tmp / name
    subprocess.run([_cc(), "-std=gnu11", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no host C compiler (cc/gcc/clang): install build-essential")
    return cc


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, str]:
    body = []
    for name, mirror in MIRRORS.items():
        body.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for fname, *_ in mirror._fields_:
            body.append(f'printf("{name}.{fname} %zu\\n", offsetof(struct {name}, {fname}));')
    for d in DEFINES:
        if d in SHAPE_DEFINES or d in INDEX_MACROS:
            continue
        if d.startswith(("NB_MAP_", "NB_PROG_")):
            body.append(f'printf("{d} %s\\n", {d});')
        else:
            body.append(f'printf("{d} %lld\\n", (long long)({d}));')
    for m, (_, n) in INDEX_MACROS.items():
        for args in INDEX_ARGS:
            a = ",".join(str(x) for x in args[:n])
            body.append(f'printf("{m}({a}) %u\\n", {m}({a}));')
    return _run_c(tmp_path_factory.mktemp("abi"), "layout", body)


@pytest.fixture(scope="module")
def c_shapes(tmp_path_factory) -> dict[tuple[int, int], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("shapes")
    body = ['printf("nb_vec %zu\\n", sizeof(struct nb_vec));',
            'printf("nb_vec.sum %zu\\n", offsetof(struct nb_vec, sum));',
            'printf("nb_vec.w %zu\\n", offsetof(struct nb_vec, w));',
            'printf("nb_psum %zu\\n", sizeof(struct nb_psum));']
    body += [f'printf("{d} %lld\\n", (long long)({d}));' for d in sorted(SHAPE_DEFINES)]
    return {(w, ch): _run_c(tmp, f"shape{w}_{ch}", body,
                            f"#define NB_WORDS {w}\n#define NB_DIR_CHUNKS {ch}")
            for w, ch in zip(abi.WORD_BUCKETS, (64, 128, 1024, 4096, abi.NB_DIR_MAX_CHUNKS))}


def test_every_header_struct_is_mirrored():
    assert set(C_STRUCTS) - SHAPE_STRUCTS == set(MIRRORS)


@pytest.mark.parametrize("name", C_STRUCTS)
def test_every_header_struct_has_a_static_size_assert(name):
    assert re.search(rf"_Static_assert\(sizeof\(struct {name}\) == ", HEADER), name


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_struct_size_and_offsets_match(c_layout, name):
    mirror = MIRRORS[name]
    assert ctypes.sizeof(mirror) == int(c_layout[name])
    for fname, *_ in mirror._fields_:
        assert getattr(mirror, fname).offset == int(c_layout[f"{name}.{fname}"]), fname


def _flat(mirror) -> bool:
    return not any(issubclass(t, ctypes.Structure) or
                   (issubclass(t, ctypes.Array) and issubclass(t._type_, ctypes.Structure))
                   for _, t in mirror._fields_)


@pytest.mark.parametrize("name", sorted(n for n, m in MIRRORS.items() if _flat(m)))
def test_codec_packs_the_struct_size(name):
    """The struct.Struct twin covers the same bytes (nested structs go through ctypes)."""
    assert abi.codec(MIRRORS[name]).size == ctypes.sizeof(MIRRORS[name])


def test_codec_puts_each_field_at_its_offset():
    ev = abi.NbEvent(ts_ns=1 << 40, slot=7, len=99, action=2, rate_limited=1, family=6,
                     proto=17, sport=5353, dport=53)
    ev.src[:] = bytes(range(16))
    ev.dst[:] = bytes(range(16, 32))
    assert abi.codec(abi.NbEvent).unpack(bytes(ev)) == (
        1 << 40, 7, 99, 2, 1, 6, 17, 5353, 53, bytes(range(16)), bytes(range(16, 32)))
    assert abi.LPM_KEY[4].pack(40, 3, b"\x0a\0\0\x01") == bytes(
        abi.NbLpm4Key(prefixlen=40, tag=3, addr=(ctypes.c_uint8 * 4)(10, 0, 0, 1)))


@pytest.mark.parametrize("name", [d for d in DEFINES if d not in SHAPE_DEFINES
                                  and d not in INDEX_MACROS])
def test_constant_matches(c_layout, name):
    assert hasattr(abi, name), f"{name} is in netbpf_abi.h but not mirrored in abi.py"
    want = getattr(abi, name)
    got = c_layout[name]
    assert (got if isinstance(want, str) else int(got)) == want


@pytest.mark.parametrize("macro", sorted(INDEX_MACROS))
def test_index_helpers_match(c_layout, macro):
    fn, n = INDEX_MACROS[macro]
    for args in INDEX_ARGS:
        a = ",".join(str(x) for x in args[:n])
        assert fn(*args[:n]) == int(c_layout[f"{macro}({a})"]), a


@pytest.mark.parametrize("words", abi.WORD_BUCKETS)
def test_shape_dependent_sizes_match(c_shapes, words):
    (_, chunks), c = next(((k, v) for k, v in c_shapes.items() if k[0] == words))
    vec = abi.vec_struct(words)
    assert ctypes.sizeof(vec) == int(c["nb_vec"]) == len(abi.pack_vec(words, 1, 1))
    assert vec.sum.offset == int(c["nb_vec.sum"]) and vec.w.offset == int(c["nb_vec.w"])
    assert abi.nb_sum(words) == int(c["NB_SUM"])
    assert abi.slot_cap(words) == int(c["NB_SLOT_CAP"])
    assert words * 64 == int(c["NB_RULES_CAP"])
    assert abi.dir_gen(chunks) == int(c["NB_DIR_GEN"])
    assert abi.pair_cells(words) == int(c["NB_PAIR_CELLS"])
    assert 8 * abi.nb_sum(words) == int(c["nb_psum"])


def test_names_fit_the_kernel_and_are_unique():
    names = abi.MAP_NAMES + abi.PROG_NAMES
    assert len(set(names)) == len(names)
    assert all(len(n) <= 15 for n in names)


def _declared() -> tuple[set[str], set[str]]:
    maps, progs = set(), set()
    for path in abi.BPF_DIR.rglob("*"):
        if path.suffix not in (".c", ".h") or path.name == abi.ABI_HEADER.name:
            continue
        text = path.read_text()
        maps.update(re.findall(r"\bBPF_(?:ARRAY|HASH|PERCPU_ARRAY|LPM_TRIE|PROG_ARRAY|"
                               r"RINGBUF_OUTPUT)\((\w+)", text))
        maps.update(re.findall(r"\bBPF_(?:F_)?TABLE(?:_PINNED)?\(\"\w+\",[^,]+,[^,]+,\s*(\w+)",
                               text))
        progs.update(re.findall(r"^int (\w+)\(struct (?:xdp_md|__sk_buff) \*", text, re.M))
    return maps, progs


def test_every_declared_map_and_program_is_named_in_the_contract():
    maps, progs = _declared()
    assert maps == set(abi.MAP_NAMES)
    assert progs == set(abi.PROG_NAMES)
