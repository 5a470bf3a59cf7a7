"""The line diff of a set-file-only apply (netbpf/engine/setfiles.py), without root: against
plain set arithmetic over random edits of random bare-IPv4 files."""
from __future__ import annotations

import random
import socket

import pytest

from netbpf.engine.setfiles import FileChange, _common_head, _common_tail, _diff


def _addrs(blob: bytes) -> set[str]:
    return {socket.inet_ntop(socket.AF_INET, blob[i:i + 4]) for i in range(0, len(blob), 4)}


def _text(lines: list[str], final_newline: bool = True) -> bytes:
    return ("\n".join(lines) + ("\n" if final_newline else "")).encode()


def _host(rng: random.Random) -> str:
    return socket.inet_ntop(socket.AF_INET, rng.getrandbits(32).to_bytes(4, "big"))


@pytest.mark.parametrize("seed", range(300))
def test_diff_matches_set_arithmetic_on_random_edits(seed):
    rng = random.Random(seed)
    old = list(dict.fromkeys(_host(rng) for _ in range(rng.randint(1, 60))))
    new = list(old)
    for _ in range(rng.randint(1, 6)):
        what = rng.choice(["append", "insert", "delete", "replace", "dup", "move", "blank"])
        if what == "append":
            new.append(_host(rng))
        elif what == "insert":
            new.insert(rng.randint(0, len(new)), _host(rng))
        elif new and what == "delete":
            del new[rng.randrange(len(new))]
        elif new and what == "replace":
            new[rng.randrange(len(new))] = _host(rng)
        elif new and what == "dup":
            new.insert(rng.randint(0, len(new)), rng.choice(new))
        elif new and what == "move":
            new.insert(rng.randint(0, len(new)), new.pop(rng.randrange(len(new))))
        elif what == "blank":
            new.insert(rng.randint(0, len(new)), "")
    ch = FileChange("f", _text(new, rng.random() < 0.8), "")
    ok = _diff(_text(old, rng.random() < 0.8), ch)
    # the file's lines as the full path reads them (a last empty line without a newline
    # after it is the final newline)
    raw = ch.raw.decode()
    new = (raw[:-1] if raw.endswith("\n") else raw).split("\n")
    plain_unique = all(new) and len(set(new)) == len(new) and raw
    if not ok:
        # refused: something the full path must read (a blank line, a repeat, an empty file)
        assert not plain_unique or not new
        return
    added, removed = _addrs(ch.added), _addrs(ch.removed)
    assert removed == set(old) - set(new)
    if added & set(old):
        return      # a gained line repeating a shared one: the kernel check refuses it
    assert plain_unique
    assert added == set(new) - set(old)


@pytest.mark.parametrize("a, b", [(b"", b""), (b"abc", b"abd"), (b"abc", b"abc"),
                                  (b"x" * 200_000, b"x" * 200_000 + b"y"),
                                  (b"y" + b"x" * 200_000, b"x" * 200_000)])
def test_common_head_and_tail(a, b):
    limit = min(len(a), len(b))
    h = _common_head(a, b, limit)
    assert a[:h] == b[:h] and (h == limit or a[h] != b[h])
    t = _common_tail(a, b, limit)
    assert a[len(a) - t:] == b[len(b) - t:] and (t == limit or a[-t - 1] != b[-t - 1])


def test_an_append_to_a_large_file_reads_only_the_new_lines():
    old = _text([f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)])
    ch = FileChange("f", old + b"192.0.2.1\n192.0.2.2\n", "")
    assert _diff(old, ch) and _addrs(ch.added) == {"192.0.2.1", "192.0.2.2"} and not ch.removed


@pytest.mark.parametrize("line", ["192.0.2.1 ", "192.0.2.0/24", "# c", "::1", "010.0.0.1",
                                  "192.0.2.1\r", "x"])
def test_a_gained_line_that_is_not_a_bare_address_takes_the_full_path(line):
    old = b"10.0.0.1\n10.0.0.2\n"
    assert not _diff(old, FileChange("f", old + line.encode() + b"\n", ""))
