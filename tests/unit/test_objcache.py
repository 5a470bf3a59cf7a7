"""The object cache's pure parts (netbpf/kernel/objcache.py): what a key depends on, the map
fds put into instructions, what is never stored, and a directory it refuses to trust."""
from __future__ import annotations

import struct

import pytest

from netbpf.kernel import objcache

INSN = struct.Struct("<BBhi")


def ld_map(fd: int, src: int = 1) -> bytes:       # ld_imm64 r1, map fd (two instructions)
    return INSN.pack(0x18, (src << 4) | 1, 0, fd) + INSN.pack(0, 0, 0, 0)


EXIT = INSN.pack(0x95, 0, 0, 0)


class FakeFd:
    def __init__(self, n):
        self.n = n

    def __int__(self):
        return self.n


def test_map_fds_are_replaced_and_nothing_else():
    const = INSN.pack(0x18, 1, 0, 7) + INSN.pack(0, 0, 0, 0)        # plain 64-bit constant
    insns = ld_map(5) + const + ld_map(9, src=2) + EXIT
    out = objcache._patched(insns, {5: FakeFd(40), 9: FakeFd(41)})
    got = [INSN.unpack_from(out, i) for i in range(0, len(out), 8)]
    assert got[0][3] == 40 and got[4][3] == 41
    assert got[2][3] == 7                                          # the constant is kept
    assert out[8:16] == insns[8:16] and out[-8:] == EXIT


def test_an_unknown_map_fd_is_a_miss_not_a_guess():
    with pytest.raises(KeyError):
        objcache._patched(ld_map(5) + EXIT, {6: FakeFd(40)})


def test_the_key_changes_with_text_defines_and_functions():
    base = objcache.key(b"int x;", ["-DA=1"], {"f": 6})
    assert base == objcache.key(b"int x;", ["-DA=1"], {"f": 6})
    assert len({base, objcache.key(b"int y;", ["-DA=1"], {"f": 6}),
                objcache.key(b"int x;", ["-DA=2"], {"f": 6}),
                objcache.key(b"int x;", ["-DA=1"], {"f": 3}),
                objcache.key(b"int x;", ["-DA=1"], {"g": 6})}) == 5


def test_callbacks_by_address_are_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv(objcache.ENV, str(tmp_path / "c"))
    callback = INSN.pack(0x18, (4 << 4) | 2, 0, 3) + INSN.pack(0, 0, 0, 0)
    objcache.store("k1", {"f": (6, callback + EXIT)}, [], "GPL", "")
    objcache.store("k2", {"f": (6, ld_map(3) + EXIT)}, [], "GPL", "")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k2.json"]


def test_off_and_untrusted_directories_are_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv(objcache.ENV, "off")
    assert objcache.cache_dir() is None
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv(objcache.ENV, str(d))
    assert objcache.cache_dir() is None
    d.chmod(0o700)
    assert objcache.cache_dir() == d


def test_a_bad_entry_is_a_miss_and_goes(tmp_path, monkeypatch):
    monkeypatch.setenv(objcache.ENV, str(tmp_path))
    (tmp_path / "k.json").write_text('{"format": 1, "maps": [{"name": "m"}], "progs": {}}')
    assert objcache.load("k", None) is None
    assert not (tmp_path / "k.json").exists()
    assert objcache.load("absent", None) is None


def test_old_entries_beyond_the_limit_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv(objcache.ENV, str(tmp_path))
    monkeypatch.setattr(objcache, "KEEP", 3)
    import os
    for i in range(5):
        objcache.store(f"k{i}", {"f": (6, EXIT)}, [], "GPL", "")
        os.utime(tmp_path / f"k{i}.json", (i, i))
    objcache.store("k5", {"f": (6, EXIT)}, [], "GPL", "")
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["k3", "k4", "k5"]
