"""Can clients reach a VIP through this interface? Checked before a NAT balancer is applied:
the VIP must be an address of this host, or lie off the interface's subnets (a router sends
it here), or a neighbour must answer ARP/ND for it. Otherwise clients on the subnet get no
answer for the VIP and every connection fails, though the data plane is fine.

Not the balancer (netbpf/lb/lbtables.py) and not forwarding (checked by netbpf/engine/plan.py).
"""
from __future__ import annotations

import ipaddress
import socket
import time

from netbpf.kernel.netns import enter_netns

# NUD_* states (linux/neighbour.h) in which a neighbour has answered or needs no answer
NUD_ANSWERED = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80   # reachable stale delay probe noarp perm
NUD_FAILED = 0x20
PROBE_S = 1.0


def vip_problem(ifname: str, vip: str, netns: str | None = None) -> str | None:
    """Why clients on ifname's subnet cannot reach vip, or None when they can (or when it is
    routed here from elsewhere, which this host cannot check)."""
    from pyroute2 import IPRoute

    addr = ipaddress.ip_address(vip)
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with enter_netns(netns):
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return None     # plan_apply reports a missing interface itself
            subnet = None
            for a in ipr.get_addr(family=fam):
                local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                if local and ipaddress.ip_address(local) == addr:
                    return None                  # this host owns the VIP
                net = ipaddress.ip_network(f"{local}/{a['prefixlen']}", strict=False)
                if a["index"] == idx[0] and addr in net and net.prefixlen < addr.max_prefixlen:
                    subnet = net
            if subnet is None:
                return None
            if _answered(ipr, idx[0], vip):
                return None
            _provoke(fam, ifname, vip)
            deadline = time.monotonic() + PROBE_S
            while time.monotonic() < deadline:
                if _answered(ipr, idx[0], vip):
                    return None
                time.sleep(0.1)
    what = "ARP" if addr.version == 4 else "neighbour solicitation"
    return (f"VIP {vip} is on {ifname}'s subnet {subnet}, but no address of this host is the "
            f"VIP and nothing answered {what} for it, so clients there cannot reach it")


def _answered(ipr, index: int, vip: str) -> bool:
    for n in ipr.get_neighbours(ifindex=index):
        if n.get_attr("NDA_DST") == vip and n["state"] & NUD_ANSWERED:
            return True
    return False


def _provoke(fam: int, ifname: str, vip: str) -> None:
    """Make the kernel resolve the VIP (one empty datagram to the discard port)."""
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.sendto(b"", (vip, 9))
    except OSError:
        pass
