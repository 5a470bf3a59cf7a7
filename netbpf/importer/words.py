"""Values as iptables and nft spell them -> as netbpf spells them (protocols, ports, ICMP...).

Each helper raises ImportInputError naming the source line for a value it cannot read.
Not a parser of whole rules.
"""
from __future__ import annotations

import ipaddress
import re

from netbpf.importer.model import ImportInputError, Note
from netbpf.policy import vocab

# Matches whose options iptables.py reads; any other '-m' is reported.
IPT_MATCHES = {"tcp", "udp", "icmp", "icmp6", "icmpv6", "ipv6-icmp", "multiport", "state",
               "conntrack", "set", "limit", "comment", "iprange", "sctp"}
# Targets of nat/mangle/raw tables and others with no netbpf counterpart.
IPT_TARGETS = {"MASQUERADE", "SNAT", "DNAT", "REDIRECT", "MARK", "CONNMARK", "CT", "NOTRACK",
               "TCPMSS", "TOS", "DSCP", "TTL", "HL", "TPROXY", "NETMAP", "CLASSIFY", "SECMARK",
               "CONNSECMARK", "NFQUEUE", "QUEUE", "AUDIT", "CHECKSUM", "TEE", "SET", "TRACE",
               "ECN", "IDLETIMER", "LED", "SYNPROXY", "CLUSTERIP", "HMARK", "RATEEST"}
PROTO_ALIASES = {"ipv6-icmp": "icmpv6", "icmp6": "icmpv6", "ipv6icmp": "icmpv6"}
ICMP_EXTRA = {   # names with a code, and other spellings, as (type name, code)
    "icmp": {"ping": ("echo-request", None), "pong": ("echo-reply", None),
             "network-unreachable": ("dest-unreachable", 0),
             "host-unreachable": ("dest-unreachable", 1),
             "protocol-unreachable": ("dest-unreachable", 2),
             "port-unreachable": ("dest-unreachable", 3),
             "fragmentation-needed": ("dest-unreachable", 4),
             "ttl-zero-during-transit": ("time-exceeded", 0),
             "ttl-exceeded": ("time-exceeded", None),
             "timestamp-request": ("timestamp-request", None)},
    "icmpv6": {"no-route": ("dest-unreachable", 0),
               "communication-prohibited": ("dest-unreachable", 1),
               "address-unreachable": ("dest-unreachable", 3),
               "port-unreachable": ("dest-unreachable", 4),
               "ttl-zero-during-transit": ("time-exceeded", 0),
               "neighbour-solicitation": ("neighbor-solicitation", None),
               "neighbour-advertisement": ("neighbor-advertisement", None),
               "nd-neighbor-solicit": ("neighbor-solicitation", None),
               "nd-neighbor-advert": ("neighbor-advertisement", None),
               "nd-router-solicit": ("router-solicitation", None),
               "nd-router-advert": ("router-advertisement", None),
               "nd-redirect": ("redirect", None),
               "mld-listener-query": ("mld-query", None),
               "mld-listener-report": ("mld-report", None),
               "mld-listener-done": ("mld-done", None),
               "mld-listener-reduction": ("mld-done", None),
               "mld2-listener-report": ("mldv2-report", None)},
}
FLAG_NAMES = {"FIN": "fin", "SYN": "syn", "RST": "rst", "PSH": "psh", "ACK": "ack",
              "URG": "urg", "ECE": "ece", "CWR": "cwr"}
NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def note(where: str, message: str) -> Note:
    return Note(where, message)


def proto(text: str, where: str) -> str | int | None:
    t = PROTO_ALIASES.get(text.lower(), text.lower())
    if t in ("all", "any", "0", "ip"):
        return None
    if t in vocab.PROTOCOLS:
        return t
    if t.isdigit() and int(t) <= 255:
        return vocab.PROTO_NAMES.get(int(t), int(t))
    raise ImportInputError(f"{where}: unknown protocol {text!r}")


def cidrs(items: list[str], where: str) -> list[str]:
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise ImportInputError(f"{where}: {item!r} is not an address or network") from None
    return out


def ip_range(text: str, where: str) -> list[str]:
    lo, _, hi = text.partition("-")
    try:
        first, last = ipaddress.ip_address(lo.strip()), ipaddress.ip_address((hi or lo).strip())
        return [str(n) for n in ipaddress.summarize_address_range(first, last)]
    except (ValueError, TypeError):
        raise ImportInputError(f"{where}: {text!r} is not an address range") from None


def ports(text: str, where: str) -> list[int | str]:
    out: list[int | str] = []
    for item in text.split(","):
        lo, sep, hi = item.strip().replace("-", ":").partition(":")
        lo = lo or "0"
        hi = (hi or "65535") if sep else lo
        if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) <= 65535):
            raise ImportInputError(f"{where}: {item!r} is not a port or port range")
        out.append(int(lo) if lo == hi else f"{int(lo)}-{int(hi)}")
    return out


def icmp(text: str, proto: str, where: str) -> tuple[str | int, int | None]:
    t = text.lower()
    if "/" in t:
        a, _, b = t.partition("/")
        if a.isdigit() and b.isdigit() and int(a) < 256 and int(b) < 256:
            return int(a), int(b)
        raise ImportInputError(f"{where}: {text!r} is not an ICMP type/code")
    if t.isdigit() and int(t) < 256:
        return int(t), None
    if t in ICMP_EXTRA[proto]:
        return ICMP_EXTRA[proto][t]
    t = vocab.ICMP_ALIASES.get(t, t)
    table = vocab.ICMP_TYPES if proto == "icmp" else vocab.ICMPV6_TYPES
    if t in table:
        return t, None
    raise ImportInputError(f"{where}: unknown {proto} type {text!r}")


def tcp_flags(mask: str, comp: str, where: str) -> str:
    def names(text: str) -> list[str]:
        if text.upper() == "ALL":
            return list(FLAG_NAMES.values())
        if text.upper() == "NONE":
            return []
        out = []
        for f in text.split(","):
            if f.strip().upper() not in FLAG_NAMES:
                raise ImportInputError(f"{where}: unknown TCP flag {f!r}")
            out.append(FLAG_NAMES[f.strip().upper()])
        return out
    m, c = names(mask), set(names(comp))
    if not m:
        raise ImportInputError(f"{where}: --tcp-flags with an empty mask matches every packet")
    return ",".join(f if f in c else "!" + f for f in m)


def set_name(text: str) -> str:
    if NAME_OK.match(text):
        return text
    return (re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("_.-") or "set")[:63]


RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
              "hour": 3600, "d": 86400, "day": 86400, "week": 604800}


def rate(text: str, where: str) -> float:
    n, _, unit = text.partition("/")
    unit = unit.lower() or "second"
    if not n.isdigit() or unit not in RATE_UNITS:
        raise ImportInputError(f"{where}: {text!r} is not a rate like 5/second")
    return int(n) / RATE_UNITS[unit]


def integer(text: str, where: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise ImportInputError(f"{where}: {text!r} is not a count")
    return int(text)
