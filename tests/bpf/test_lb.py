"""The load balancer path of the XDP program under BPF_PROG_TEST_RUN: exact output packets.

test_run gives the program the loopback device, where forwarding is off, so NAT hands the
rewritten packet to the stack (XDP_PASS) and DSR, which needs a route, drops: the rewrite
itself, the flow affinity and the Maglev spread are what is checked here; forwarding is
checked in tests/netns/test_lb_lab.py.
"""
from __future__ import annotations

import collections
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from cases.firewall import eth
from unit.fw_builders import direction

from netbpf.progspec import FW_PROG, FW_SOURCE
from netbpf.compile import compile_direction
from netbpf.fwtables import FwTables
from netbpf.ir import BackendIR, LoadBalancerIR
from netbpf.kernel.loader import load_program
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.lbtables import LB_ENTRY, LbState, LbTables, link_lb_entry, plan_lb

VIP4, VIP6 = "10.20.0.100", "fd00:20::100"
XDP_DROP, XDP_PASS = 1, 2


def lb_ir(vip: str, weights=(1, 1, 2), proto=6, mode="nat") -> LoadBalancerIR:
    a = ipaddress.ip_address(vip)
    base = ipaddress.ip_address("10.21.0.10" if a.version == 4 else "fd00:21::10")
    backends = tuple(BackendIR(a.version, int(base) + i + 1, 8080, w)
                     for i, w in enumerate(weights))
    return LoadBalancerIR("web", "lb0", a.version, int(a), 80, proto, mode, backends, 65537)


@pytest.fixture(scope="module")
def prog():
    loaded = load_program(FW_SOURCE, {"NB_WORDS": 1, "NB_CLASS_CAP": 64, "NB_LB": 1},
                          {FW_PROG: "xdp", LB_ENTRY: "xdp"}, cache=True)
    link_lb_entry(loaded)
    fw = FwTables.from_loaded(loaded, 1, 64)
    fw.write_generation(0, compile_direction(direction()), [], [], {})
    fw.flip(0)
    state = {"lb": LbState()}

    def install(*lbs: LoadBalancerIR, down=frozenset()):
        new, changed = plan_lb(list(lbs), state["lb"], 1 << 19, set(down))
        LbTables.from_loaded(loaded).write(list(lbs), new, changed, state["lb"], set(down))
        state["lb"] = new

    def run(frame: bytes):
        r = run_prog(loaded.prog_fd(FW_PROG), frame)
        return r.retval, Ether(r.data_out)

    return install, run


def valid_checksums(pkt) -> bool:
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    again = ip.__class__(bytes(ip))
    redo = again.copy()
    if IP in redo:
        del redo[IP].chksum
    del redo[l4.__class__].chksum
    redo = ip.__class__(bytes(redo))
    ok = redo[l4.__class__].chksum == again[l4.__class__].chksum
    return ok and (IP not in redo or redo[IP].chksum == again[IP].chksum)


def syn(vip: str, sport: int) -> bytes:
    l3 = IP(src="10.20.0.2", dst=vip) if ":" not in vip else IPv6(src="fd00:20::2", dst=vip)
    return eth(l3 / TCP(sport=sport, dport=80, flags="S") / b"payload")


def test_nat_rewrites_destination_with_valid_checksums(prog):
    install, run = prog
    install(lb_ir(VIP4))
    verdict, out = run(syn(VIP4, 40000))
    assert verdict == XDP_PASS
    assert out[IP].dst in ("10.21.0.11", "10.21.0.12", "10.21.0.13")
    assert out[TCP].dport == 8080 and out[TCP].sport == 40000 and out[IP].src == "10.20.0.2"
    assert valid_checksums(out)


def test_nat_ipv6_rewrite_has_valid_checksum(prog):
    install, run = prog
    install(lb_ir(VIP6))
    verdict, out = run(syn(VIP6, 40001))
    assert verdict == XDP_PASS
    assert out[IPv6].dst.startswith("fd00:21::1") and out[TCP].dport == 8080
    assert valid_checksums(out)


def test_udp_without_checksum_keeps_zero(prog):
    install, run = prog
    install(lb_ir(VIP4, proto=17))
    frame = bytearray(eth(IP(src="10.20.0.2", dst=VIP4) / UDP(sport=5000, dport=80) / b"x"))
    frame[14 + 20 + 6:14 + 20 + 8] = b"\0\0"          # IPv4 UDP: checksum 0 = none
    verdict, out = run(bytes(frame))
    assert verdict == XDP_PASS and out[UDP].chksum == 0 and out[UDP].dport == 8080


def test_same_flow_same_backend_and_spread_follows_weights(prog):
    install, run = prog
    install(lb_ir(VIP4))
    first = {sp: run(syn(VIP4, sp))[1][IP].dst for sp in range(20000, 22000)}
    again = {sp: run(syn(VIP4, sp))[1][IP].dst for sp in range(20000, 20200)}
    assert all(first[sp] == dst for sp, dst in again.items())
    counts = collections.Counter(first.values())
    assert abs(counts["10.21.0.13"] / 2000 - 0.5) < 0.05
    assert abs(counts["10.21.0.11"] / 2000 - 0.25) < 0.05


def test_all_backends_draining_drops_new_flows(prog):
    install, run = prog
    install(lb_ir(VIP4, weights=(0, 0, 0)))
    assert run(syn(VIP4, 50000))[0] == XDP_DROP


def test_non_vip_traffic_is_untouched(prog):
    install, run = prog
    install(lb_ir(VIP4))
    frame = syn("10.20.0.1", 40000)
    verdict, out = run(frame)
    assert verdict == XDP_PASS and bytes(out) == frame
