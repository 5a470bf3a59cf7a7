"""Explain one packet: what the policy model decides (the plain rule loop on the last applied
file) and what a copy of the attached program decides (BPF_PROG_TEST_RUN), with the rule each
one picked, and for a packet to a VIP the backend a new flow gets (Maglev computed here, and
the flow the copy recorded); a disagreement is an error.

PACKET is a 5-tuple ('tcp 10.0.0.2:40000 10.0.0.1:22', '->' optional, 'flags=syn,ack',
'type=8 code=0' for ICMP), a hex Ethernet frame, or a pcap file (its first packet).
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from netbpf.fw.compile import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, Pkt, reference_match
from netbpf.errors import InputError, NetbpfError
from netbpf.kernel import bpfsys
from netbpf.lb import pick
from netbpf.lb.lbtables import LbState
from netbpf.lb.maglev import backend_key
from netbpf.observe.inspect import ProgramCopy, interface_state, same_verdict
from netbpf.policy.ir import DirectionIR
from netbpf.policy import vocab
from netbpf.safety.probe import frame, parse_frame
from netbpf.safety.selftest import applied_policy, pkt_text
from netbpf.store.state import health_down


@dataclass
class Explanation:
    packet: str
    direction: str
    model_verdict: str
    model_rule: str          # rule name or 'default'
    program_verdict: str
    program_rule: str
    counted: list[str]       # count rules the program counted the packet in
    notes: list[str]
    model_backend: str | None = None     # VIP packets: 'ADDR:PORT' a new flow goes to
    program_backend: str | None = None

    @property
    def agree(self) -> bool:
        return (same_verdict(self.model_verdict, self.program_verdict)
                and self.model_rule == self.program_rule
                and self.model_backend == self.program_backend)


def _endpoint(text: str) -> tuple[int, int, int | None]:
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ip = ipaddress.ip_address(host)
    return ip.version, int(ip), port


def parse_packet(words: list[str]) -> tuple[Pkt, bytes]:
    """(classifier view, frame) of PACKET as given on the command line."""
    if len(words) == 1 and os.path.isfile(words[0]):
        from scapy.utils import rdpcap

        pkts = rdpcap(words[0])
        if not pkts:
            raise InputError(f"{words[0]}: the capture holds no packet")
        data = bytes(pkts[0])
        return parse_frame(data), data
    joined = "".join(words)
    if len(words) == 1 and len(joined) >= 28 and all(ch in "0123456789abcdefABCDEF:" for ch in joined):
        data = bytes.fromhex(joined.replace(":", ""))
        return parse_frame(data), data
    toks = [w for w in words if w != "->"]
    try:
        opts = dict(t.split("=", 1) for t in toks if "=" in t)
        pos = [t for t in toks if "=" not in t]
        proto_word, src, dst = pos
        proto = vocab.PROTOCOLS.get(proto_word.lower()) if not proto_word.isdigit() \
            else int(proto_word)
        if proto is None:
            raise ValueError(f"unknown protocol {proto_word!r}")
        f1, a1, p1 = _endpoint(src)
        f2, a2, p2 = _endpoint(dst)
        if f1 != f2:
            raise ValueError("source and destination families differ")
        if proto == PROTO_ICMP and f1 == 6:
            proto = PROTO_ICMPV6
        if proto in (PROTO_TCP, 17):
            flags = None
            if proto == PROTO_TCP:
                flags = 0
                for name in opts.get("flags", "syn").split(","):
                    flags |= vocab.TCP_FLAGS[name.strip().lower()]
            pkt = Pkt(f1, a1, a2, proto, sport=p1 or 40000, dport=p2 or 0, tcp_flags=flags)
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            pkt = Pkt(f1, a1, a2, proto, icmp_type=int(opts.get("type", 8 if f1 == 4 else 128)),
                      icmp_code=int(opts.get("code", 0)))
        else:
            pkt = Pkt(f1, a1, a2, proto)
    except (ValueError, KeyError) as e:
        raise InputError(f"PACKET: {e}; give 'PROTO SRC[:PORT] DST[:PORT]' (e.g. 'tcp "
                         "10.0.0.2:40000 10.0.0.1:22 flags=syn'), a hex frame or a pcap file") \
            from None
    return pkt, frame(pkt)


def explain(key: str, pkt: Pkt, data: bytes, direction: str = "ingress") -> Explanation:
    st = interface_state(key)
    if direction not in st.parts:
        raise InputError(f"{key}: no {direction} program (it has {', '.join(st.parts)})")
    ir = applied_policy(key)
    iface = ir.interfaces.get(st.ifname)
    d = (getattr(iface, direction) if iface else None) or DirectionIR("allow")
    dec = reference_match(d, ir.sets, pkt)
    terminal = [r for r in d.rules if r.action != "count"]
    if dec.terminal is None:
        m_rule, m_verdict = "default", "pass" if d.default == "allow" else "drop"
    else:
        r = terminal[dec.terminal]
        m_rule = r.name
        m_verdict = {"allow": "pass", "drop": "drop"}.get(r.action, r.action)
    notes = []
    if st.conntrack:
        notes.append("connection tracking is not consulted (the copy starts with none)")
    lbs = [lb for lb in ir.load_balancers.values() if lb.interface == st.ifname] \
        if direction == "ingress" else []
    vip = pick.vip_of(lbs, st.ifname, pkt.family, pkt.proto, pkt.dst, pkt.dport)
    m_backend = None
    if vip is not None:
        notes.append(f"to the VIP of load balancer {vip.name} ({vip.mode}): balanced as a new "
                     "connection (the copy has no flow table; an open one keeps its backend)")
        if m_verdict == "pass":
            b = pick.model_backend(vip, health_down(st.key), pkt.family, pkt.src, pkt.sport)
            m_verdict = "balance" if b else "drop"
            m_backend = _backend_text(b) if b else None
            if b is None:
                notes.append("no backend takes new flows (all drained or down)")
    actions = {r.name: r.action for r in st.parts[direction].rules}
    p_backend = None
    with ProgramCopy(st, direction, lb=bool(lbs)) as copy:
        key = pick.flow_key(pkt.family, pkt.proto, pkt.src, pkt.dst, pkt.sport or 0,
                            pkt.dport or 0) if vip is not None else None
        if key is not None:
            bpfsys.map_delete(copy.lb_tables.fds["nb_lb_flows"], key)    # a new flow
        got = copy.verdict(data)
        counted = [copy.slot_names.get(s, f"slot{s}") for s in sorted(copy.counters())]
        bid = pick.flow_backend(copy.lb_tables, key) if key is not None else None
        if bid is not None:
            # balanced: what the copy then did with it (forward, or drop for want of a
            # route from where the test run happens) is not the policy's to say
            got = "balance"
            names = {i: k for k, i in LbState.from_json(st.lb).backends.items()}
            p_backend = names.get(bid, f"backend id {bid}").split("|", 1)[-1]
            p_backend = _key_text(p_backend)
    p_terminal = [n for n in counted if actions.get(n) != "count"]
    if len(p_terminal) > 1:
        raise NetbpfError(f"the program counted the packet in {len(p_terminal)} terminal rules "
                          f"({', '.join(p_terminal)}): its maps are inconsistent")
    return Explanation(pkt_text(pkt), direction, m_verdict, m_rule, got,
                       p_terminal[0] if p_terminal else "default",
                       [n for n in counted if actions.get(n) == "count"], notes,
                       m_backend, p_backend)


def _backend_text(b) -> str:
    return _key_text(backend_key("", b.family, b.addr, b.port)[1:])


def _key_text(addr_port: str) -> str:
    """'10.0.0.1|80' -> '10.0.0.1:80', '2001:db8::1|443' -> '[2001:db8::1]:443'."""
    addr, _, port = addr_port.rpartition("|")
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
