"""Address and network parsing for policies and set files: text -> (family, int, prefix length).

Built on socket.inet_pton, not ipaddress: a set file may hold a million lines, and creating a
million ipaddress objects alone takes seconds. Not a general IP library: just what policies need.
"""
from __future__ import annotations

import functools
import itertools
import socket
from array import array

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
WIDTH = {4: 32, 6: 128}


class AddrError(ValueError):
    """Text that is not an address or network; str() is a message for people."""


def _family_of(text: str) -> int:
    return 6 if ":" in text else 4


def _to_int(family: int, text: str) -> int:
    try:
        return int.from_bytes(socket.inet_pton(_AF[family], text), "big")
    except (OSError, ValueError):
        raise AddrError(f"'{text}' is not a valid address or network") from None


def parse_address(text: str) -> tuple[int, int]:
    """'10.0.0.1' or '2001:db8::1' -> (family, address as int). No prefix length allowed."""
    if "/" in text:
        raise AddrError(f"'{text}' must be a single address, not a network")
    family = _family_of(text)
    try:
        return family, _to_int(family, text)
    except AddrError:
        raise AddrError(f"'{text}' is not a valid IPv{family} address") from None


def parse_network(text: str) -> tuple[int, int, int]:
    """'10.0.0.0/24', '10.0.0.1' (a /32) or IPv6 -> (family, network as int, prefix length).

    Host bits set after the prefix length are an error, not silently cleared: '10.0.0.1/24'
    is more often a typo for a host than a request for the whole network.
    """
    if "," in text:
        # the iptables/nft habit: -s 10.0.0.0/8,192.168.0.0/16
        items = ", ".join(t.strip() for t in text.split(",") if t.strip())
        raise AddrError(f"'{text}' is several networks in one string; write them as a list: "
                        f"[{items}]")
    addr, slash, plen_text = text.partition("/")
    family = _family_of(addr)
    value = _to_int(family, addr)
    width = WIDTH[family]
    if not slash:
        return family, value, width
    if not (plen_text.isascii() and plen_text.isdigit()) or int(plen_text) > width:
        raise AddrError(f"'{text}': prefix length must be 0-{width} for IPv{family}")
    plen = int(plen_text)
    if value & ((1 << (width - plen)) - 1):
        network = value & ~((1 << (width - plen)) - 1)
        raise AddrError(f"'{text}' has host bits set (did you mean "
                        f"{format_prefix(family, network, plen)}?)")
    return family, value, plen


def format_address(family: int, value: int) -> str:
    return socket.inet_ntop(_AF[family], value.to_bytes(WIDTH[family] // 8, "big"))


def format_prefix(family: int, value: int, plen: int) -> str:
    text = format_address(family, value)
    return text if plen == WIDTH[family] else f"{text}/{plen}"


def contains(family: int, outer_addr: int, outer_plen: int, addr: int, plen: int) -> bool:
    """True when prefix addr/plen lies inside outer_addr/outer_plen (same family)."""
    if outer_plen > plen:
        return False
    shift = WIDTH[family] - outer_plen
    return (addr >> shift) == (outer_addr >> shift)


def parse_set_text(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]],
                                       list[tuple[int, str]]]:
    """Parse a set file: one address or network a line, '#' comments, blank lines.

    Returns (v4, v6, bad) where v4/v6 are (address, prefix length) in file order with
    duplicates removed, and bad is (line number, message) for every line that did not parse.
    This is the hot loop for million-line files: keep it to string slicing and inet_pton.
    """
    pton = socket.inet_pton
    af4, af6 = socket.AF_INET, socket.AF_INET6
    from_bytes = int.from_bytes
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    bad: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if "#" in line:
            line = line[:line.index("#")]
        line = line.strip()
        if not line:
            continue
        addr, slash, plen_text = line.partition("/")
        try:
            if ":" in addr:
                value, width, out = from_bytes(pton(af6, addr), "big"), 128, v6
            else:
                value, width, out = from_bytes(pton(af4, addr), "big"), 32, v4
        except (OSError, ValueError):
            bad.append((lineno, f"'{line}' is not a valid address or network"))
            continue
        if slash:
            if not (plen_text.isascii() and plen_text.isdigit()) or int(plen_text) > width:
                bad.append((lineno, f"'{line}': prefix length must be 0-{width}"))
                continue
            plen = int(plen_text)
            if value & ((1 << (width - plen)) - 1):
                network = value & ~((1 << (width - plen)) - 1)
                family = 4 if width == 32 else 6
                bad.append((lineno, f"'{line}' has host bits set (did you mean "
                                    f"{format_prefix(family, network, plen)}?)"))
                continue
        else:
            plen = width
        out.append((value, plen))
    if len(v4) > 1:
        v4 = list(dict.fromkeys(v4))
    if len(v6) > 1:
        v6 = list(dict.fromkeys(v6))
    return v4, v6, bad


def parse_hosts_v4(text: str) -> tuple[list, list, list] | None:
    """A file of bare IPv4 addresses, one a line (the common blocklist), parsed by C-level
    loops; None for anything else (comments, prefixes, IPv6, blanks inside, a bad line),
    which parse_set_text reads line by line with messages."""
    if "#" in text or "/" in text or ":" in text or not text:
        return None
    lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    pton = functools.partial(socket.inet_pton, socket.AF_INET)
    try:
        addrs = array("I", b"".join(map(pton, lines)))
    except OSError:
        return None
    del lines                            # a million str objects: gone before the tuples come
    addrs.byteswap()
    return list(zip(dict.fromkeys(addrs), itertools.repeat(32))), [], []
