"""The rule sets every section measures, in each tool's own language: netbpf IR and YAML,
iptables-restore input, nft -f input. One definition, so all tools filter the same traffic.
Not a measurement: pure text and data.

Rule i (0-based) drops UDP to port 9 from one source address 172.16.0.0 + i + 1 (/32):
a deny list of single hosts, the commonest large firewall. The "hit" packet comes from
the LAST rule's address, the "miss" packet from 192.0.2.1, which no rule names.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR, SetIR

BASE = int(ipaddress.IPv4Address("172.16.0.0"))
MISS_SRC = "192.0.2.1"
DPORT = 9
SET_BASE = int(ipaddress.IPv4Address("100.0.0.0"))   # 1M-entry set: 100.0.0.0 .. 100.15.255.255
SET_MISS_SRC = "198.51.100.1"


def rules_label(n: int) -> str:
    return "1 rule" if n == 1 else f"{n:,} rules"


def rule_src(i: int) -> str:
    return str(ipaddress.IPv4Address(BASE + i + 1))


def hit_src(n: int) -> str:
    return rule_src(n - 1)


def set_src(i: int) -> str:
    return str(ipaddress.IPv4Address(SET_BASE + i))


# ---------------------------------------------------------------- netbpf

def direction(n: int) -> DirectionIR:
    rules = tuple(RuleIR(f"r{i}", "drop",
                         src=AddrMatch(prefixes=(Prefix(4, BASE + i + 1, 32),)),
                         proto=17, dport=((DPORT, DPORT),))
                  for i in range(n))
    return DirectionIR(default="allow", rules=rules)


def set_direction() -> DirectionIR:
    return DirectionIR(default="allow", rules=(
        RuleIR("blocked", "drop", src=AddrMatch(set_name="big")),))


def big_set(entries: int) -> SetIR:
    return SetIR("big", v4=tuple((SET_BASE + i, 32) for i in range(entries)), source="bench")


def policy_yaml(ifname: str, n: int, mode: str = "native", changed: int | None = None) -> str:
    """N rules as a netbpf policy; changed=k gives rule k dport 10 instead (a one-rule edit)."""
    lines = ["version: 1", "interfaces:", f"  {ifname}:", f"    xdp: {{mode: {mode}}}",
             "    ingress:", "      default: allow", "      rules:"]
    for i in range(n):
        port = DPORT + 1 if i == changed else DPORT
        lines.append(f"        - {{name: r{i}, src: {rule_src(i)}/32, proto: udp, "
                     f"dport: {port}, action: drop}}")
    return "\n".join(lines) + "\n"


def set_policy_yaml(ifname: str, set_file: Path, mode: str = "native") -> str:
    return (f"version: 1\nsets:\n  big: {{file: {set_file}}}\ninterfaces:\n  {ifname}:\n"
            f"    xdp: {{mode: {mode}}}\n    ingress:\n      default: allow\n      rules:\n"
            f"        - {{name: blocked, src: \"@big\", action: drop}}\n")


def set_file_text(entries: int) -> str:
    return "\n".join(set_src(i) for i in range(entries)) + "\n"


# ---------------------------------------------------------------- peers

def iptables_restore(n: int) -> str:
    """raw PREROUTING: the earliest, cheapest place iptables can drop (before conntrack)."""
    rules = [f"-A PREROUTING -s {rule_src(i)}/32 -p udp -m udp --dport {DPORT} -j DROP"
             for i in range(n)]
    return "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" + "\n".join(rules) + \
        "\nCOMMIT\n"


NFT_TABLE = "nbbench"


def nft_rules(n: int) -> str:
    """N rules in a prerouting chain at raw priority; counters as iptables always has them
    (a counter only runs once its rule matched, so it costs the non-matching rules nothing)."""
    rules = "\n".join(f"    ip saddr {rule_src(i)} udp dport {DPORT} counter drop"
                      for i in range(n))
    return (f"table ip {NFT_TABLE} {{\n  chain pre {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n{rules}\n  }}\n}}\n")


def nft_set(n: int) -> str:
    """The same N sources as one hashed set behind a single rule: how nft is meant to scale."""
    elems = ", ".join(rule_src(i) for i in range(n))
    return (f"table ip {NFT_TABLE} {{\n  set deny {{\n    type ipv4_addr\n"
            f"    elements = {{ {elems} }}\n  }}\n  chain pre {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n"
            f"    ip saddr @deny udp dport {DPORT} counter drop\n  }}\n}}\n")
