"""Normalised policy: what the compiler and the data plane need, stripped of YAML syntax.

The Pydantic models (netbpf/policy) validate the file and convert to these plain, frozen
dataclasses with policy_to_ir(). The compiler (netbpf/fw/compile.py) only ever sees this.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


def addr_text(family: int, addr: int) -> str:
    """The usual text of an IR address ('10.0.0.1', '2001:db8::1'); family decides, not size."""
    return str(ipaddress.IPv4Address(addr) if family == 4 else ipaddress.IPv6Address(addr))


@dataclass(frozen=True)
class Prefix:
    family: int          # 4 or 6
    addr: int            # network address as an integer (host bits zero)
    plen: int            # prefix length: 0-32 (IPv4), 0-128 (IPv6)


@dataclass(frozen=True)
class AddrMatch:
    """Exactly one of prefixes (non-empty) or set_name is given.

    negated: the match is everything else (of the families the prefixes name; of both for a
    set). Only the policy models produce it: policy_to_ir() expands it to complement prefixes,
    so the compiler never sees it.
    """
    prefixes: tuple[Prefix, ...] = ()
    set_name: str | None = None
    negated: bool = False


@dataclass(frozen=True)
class RuleIR:
    name: str
    action: str                                   # allow | drop | count | rate_limit
    src: AddrMatch | None = None                  # None = any
    dst: AddrMatch | None = None
    proto: int | None = None                      # IP protocol number; None = any
    sport: tuple[tuple[int, int], ...] | None = None   # inclusive ranges; None = any
    dport: tuple[tuple[int, int], ...] | None = None
    icmp_type: int | None = None                  # ICMP (v4, proto 1) or ICMPv6 (proto 58)
    icmp_code: int | None = None
    tcp_flags: tuple[int, int] | None = None      # (mask, value): flags & mask == value
    rate_pps: int = 0                             # rate_limit only
    rate_burst: int = 0
    rate_per: str = "src"                         # src | rule
    sample: int = 0                               # 1 in N decided packets -> event; 0: inherit
    line: int = 0                                 # line in the policy file (for messages)
    source_index: int | None = None               # its rule's index in the file, when known:
                                                  # one file rule may lower to several (ct)


@dataclass(frozen=True)
class DirectionIR:
    default: str                                  # allow | drop
    rules: tuple[RuleIR, ...] = ()
    sample: int = 0                               # events: 1 in N for every rule and default
    hook: str = "xdp"                             # ingress: xdp | tc; egress is always tc


@dataclass(frozen=True)
class InterfaceIR:
    name: str
    xdp_mode: str = "auto"                        # auto | native | generic | offload
    conntrack: bool = False
    ct_timeouts: tuple[tuple[str, float], ...] = ()   # overrides of abi.CT_DEFAULT_TIMEOUTS (s)
    ingress: DirectionIR | None = None
    egress: DirectionIR | None = None


@dataclass(frozen=True)
class SetIR:
    """A named address set. Lists, not Prefix objects: a set may hold a million entries."""
    name: str
    v4: tuple[tuple[int, int], ...] = ()          # (addr, plen)
    v6: tuple[tuple[int, int], ...] = ()
    source: str = ""                              # 'inline' or the set file's path
    file_sha: str = ""                            # a set file's sha256: its digest


@dataclass(frozen=True)
class BackendIR:
    family: int
    addr: int
    port: int
    weight: int


@dataclass(frozen=True)
class LoadBalancerIR:
    name: str
    interface: str
    family: int
    vip: int
    port: int
    proto: int
    mode: str                                     # nat | dsr
    backends: tuple[BackendIR, ...] = ()
    table_size: int = 65537
    idle_timeout: float | None = None             # seconds; None: LB_IDLE_DEFAULTS[proto]

    @property
    def idle_s(self) -> float:
        return self.idle_timeout if self.idle_timeout is not None else LB_IDLE_DEFAULTS[self.proto]


# A balanced flow idle this long is forgotten and its next packet picks through Maglev again:
# UDP like Katran (30 s), TCP like IPVS's established timeout (15 min). docs/lb.md.
LB_IDLE_DEFAULTS = {6: 900.0, 17: 30.0}


@dataclass(frozen=True)
class PolicyIR:
    interfaces: dict[str, InterfaceIR] = field(default_factory=dict)
    sets: dict[str, SetIR] = field(default_factory=dict)
    load_balancers: dict[str, LoadBalancerIR] = field(default_factory=dict)
