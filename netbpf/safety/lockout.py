"""Lockout guard: would this policy drop the ssh session apply runs from, or a `protect:` flow?

Evaluates the flows through the policy model (compile.reference_match, the plain rule loop),
both the packets received and the replies sent; no kernel writes. Not an apply step itself:
the CLI refuses with exit 2 before anything changes, unless --force.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from netbpf.fw.compile import PROTO_TCP, Pkt, reference_match
from netbpf.policy.ir import DirectionIR, addr_text
from netbpf.policy import vocab


@dataclass(frozen=True)
class Flow:
    label: str               # "the ssh session you are connected through" / "protected flow x"
    family: int
    src: int
    dst: int
    proto: int
    sports: tuple[int, ...]  # ports tried (an unspecified port: the edges of 1024-65535)
    dport: int | None
    interface: str | None    # None: every interface of the policy
    local_only: bool = False  # only reaches this namespace when dst is one of its addresses

    def text(self) -> str:
        sp = self.sports[0] if len(self.sports) == 1 else "*"
        ports = f":{sp}" if self.dport is not None else ""
        dp = f":{self.dport}" if self.dport is not None else ""
        return (f"{addr_text(self.family, self.src)}{ports} -> "
                f"{addr_text(self.family, self.dst)}{dp} {vocab.proto_name(self.proto)}")


@dataclass(frozen=True)
class Lockout:
    flow: Flow
    interface: str
    direction: str
    rule: str | None         # None: the direction's default drop
    line: int

    def message(self) -> str:
        by = (f"rule '{self.rule}' (line {self.line})" if self.rule
              else "the default action (drop)")
        return (f"{self.interface} {self.direction}: {by} would drop {self.flow.label} "
                f"({self.flow.text()})")


def ssh_session_from_env(environ: dict[str, str]) -> Flow | None:
    """SSH_CONNECTION='client cport server sport', as sshd sets it."""
    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4:
        return None
    try:
        client, server = (ipaddress.ip_address(parts[0].split("%")[0]),
                          ipaddress.ip_address(parts[2].split("%")[0]))
        cport, sport = int(parts[1]), int(parts[3])
    except ValueError:
        return None
    if client.version != server.version:
        return None
    return Flow("the ssh session you are connected through", client.version, int(client),
                int(server), PROTO_TCP, (cport,), sport, None, local_only=True)


def current_ssh_session(pid: int | None = None) -> Flow | None:
    """From our environment, else from an ancestor's (sudo drops SSH_CONNECTION)."""
    flow = ssh_session_from_env(dict(os.environ))
    pid = os.getppid() if pid is None else pid
    for _ in range(32):
        if flow is not None or pid <= 1:
            return flow
        try:
            raw = open(f"/proc/{pid}/environ", "rb").read()
            env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0")
                       if "=" in kv)
            flow = ssh_session_from_env(env)
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return flow
    return flow


def protected_flows(model) -> list[Flow]:
    out = []
    for p in model.protect:
        proto = p.proto if isinstance(p.proto, int) else vocab.PROTOCOLS.get(p.proto, PROTO_TCP)
        ports = proto in (6, 17)
        sports = (p.sport,) if p.sport is not None else (1024, 65535)
        out.append(Flow(f"protected flow '{p.name}'", p.src[0], p.src[1], p.dst[1], proto,
                        sports if ports else (0,), p.dport if ports else None, p.interface))
    return out


def _packets(flow: Flow, reply: bool):
    for sp in flow.sports:
        if flow.dport is None:
            yield Pkt(flow.family, flow.dst if reply else flow.src,
                      flow.src if reply else flow.dst, flow.proto)
        elif reply:
            yield Pkt(flow.family, flow.dst, flow.src, flow.proto, sport=flow.dport, dport=sp,
                      tcp_flags=0x10 if flow.proto == PROTO_TCP else None)
        else:
            yield Pkt(flow.family, flow.src, flow.dst, flow.proto, sport=sp, dport=flow.dport,
                      tcp_flags=0x10 if flow.proto == PROTO_TCP else None)


def _drops(d: DirectionIR, sets, pkt: Pkt) -> tuple[str | None, int] | None:
    """(rule name or None for the default, line) when d drops pkt; None when it passes."""
    decision = reference_match(d, sets, pkt)
    if decision.terminal is None:
        return (None, 0) if d.default == "drop" else None
    rule = [r for r in d.rules if r.action != "count"][decision.terminal]
    return (rule.name, rule.line) if rule.action == "drop" else None


def find_lockouts(ir, flows: list[Flow], owner: dict[tuple[int, int], str] | None = None
                  ) -> list[Lockout]:
    """Every (flow, interface, direction) the policy drops. owner maps (family, address) to
    the interface holding it: a flow to a local address is only checked there."""
    found = []
    for flow in flows:
        names = [flow.interface] if flow.interface else list(ir.interfaces)
        local = (owner or {}).get((flow.family, flow.dst))
        if flow.local_only and local is None:
            continue                   # the session does not end in this namespace
        if flow.interface is None and local in ir.interfaces:
            names = [local]
        for name in names:
            iface = ir.interfaces.get(name)
            if iface is None:
                continue
            for direction, reply in (("ingress", False), ("egress", True)):
                d = getattr(iface, direction)
                if d is None:
                    continue
                for pkt in _packets(flow, reply):
                    hit = _drops(d, ir.sets, pkt)
                    if hit is not None:
                        found.append(Lockout(flow, name, direction, hit[0], hit[1]))
                        break
    return found


def local_addresses(netns: str | None) -> dict[tuple[int, int], str]:
    """(family, address) -> interface name, for the addresses of netns."""
    from pyroute2 import IPRoute

    from netbpf.kernel.netns import enter_netns

    out = {}
    with enter_netns(netns), IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            addr = a.get_attr("IFA_ADDRESS")
            if addr and a["index"] in names:
                ip = ipaddress.ip_address(addr.split("%")[0])
                out[(ip.version, int(ip))] = names[a["index"]]
    return out
