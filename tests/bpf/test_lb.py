"""The load balancer path of the XDP program under BPF_PROG_TEST_RUN: exact output packets.

test_run gives the program the loopback device, where forwarding is off, so NAT hands the
rewritten packet to the stack (XDP_PASS) and DSR, which needs a route, drops: the rewrite
itself, the flow affinity and the Maglev spread are what is checked here; forwarding is
checked in tests/netns/test_lb_lab.py.
"""
from __future__ import annotations

import collections
import ctypes
import ipaddress
import os
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from cases.firewall import eth
from unit.fw_builders import direction

from netbpf import abi
from netbpf.fw.program import build_program
from netbpf.policy.ir import BackendIR, LoadBalancerIR
from netbpf.kernel import bpfsys
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.lb.lbtables import LbState, LbTables, plan_lb, stale_shared_maps
from netbpf.store.progspec import ProgramSpec

VIP4, VIP6 = "10.20.0.100", "fd00:20::100"
XDP_DROP, XDP_PASS = 1, 2


def lb_ir(vip: str, weights=(1, 1, 2), proto=6, mode="nat", idle=None,
          keep=(0, 1, 2)) -> LoadBalancerIR:
    """Backends .11, .12, .13 (those of keep) with these weights."""
    a = ipaddress.ip_address(vip)
    base = ipaddress.ip_address("10.21.0.10" if a.version == 4 else "fd00:21::10")
    backends = tuple(BackendIR(a.version, int(base) + i + 1, 8080, w)
                     for i, w in enumerate(weights) if i in keep)
    return LoadBalancerIR("web", "lb0", a.version, int(a), 80, proto, mode, backends, 65537,
                          idle_timeout=idle)


@pytest.fixture(scope="module")
def prog():
    fw = build_program(ProgramSpec(lb_ring_cap=abi.NB_LB_RING_CAP), cache=True)
    fw.install(direction())
    state = {"lb": LbState()}

    def install(*lbs: LoadBalancerIR, down=frozenset()):
        new, changed = plan_lb(list(lbs), state["lb"], abi.NB_LB_RING_CAP, set(down))
        LbTables.from_loaded(fw.loaded).write(list(lbs), new, changed, state["lb"], set(down))
        state["lb"] = new

    def run(frame: bytes):
        r = run_prog(fw.fd, frame)
        return r.retval, Ether(r.data_out)

    return install, run, LbTables.from_loaded(fw.loaded), state


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


def syn(vip: str, sport: int, flags="S") -> bytes:
    l3 = IP(src="10.20.0.2", dst=vip) if ":" not in vip else IPv6(src="fd00:20::2", dst=vip)
    return eth(l3 / TCP(sport=sport, dport=80, flags=flags) / b"payload")


def ack(vip: str, sport: int) -> bytes:
    return syn(vip, sport, flags="A")


def udp(vip: str, sport: int) -> bytes:
    return eth(IP(src="10.20.0.2", dst=vip) / UDP(sport=sport, dport=80) / b"x")


def backend_of(run, frame: bytes) -> str:
    verdict, out = run(frame)
    assert verdict == XDP_PASS, verdict
    return out[IP].dst


def now_ns() -> int:
    # the data plane reads CLOCK_MONOTONIC at tick resolution (bpf_ktime_get_coarse_ns);
    # the full-resolution clock is at most a tick ahead, far inside these tests' margins
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def flow_of(tables: LbTables, sport: int) -> tuple[abi.NbFlowKey, abi.NbFlow]:
    found = [(k, v) for k, v in tables.flows() if k.sport == sport]
    assert len(found) == 1, found
    return found[0]


def age_flow(tables: LbTables, sport: int, seconds: float) -> None:
    """Make the flow from sport look idle for that long (as if its last packet were then)."""
    k, v = flow_of(tables, sport)
    v.last_ns = now_ns() - int(seconds * 1e9)
    bpfsys.map_update(tables.fds[abi.NB_MAP_LB_FLOWS], bytes(k), bytes(v))


def aged(tables: LbTables, run, sport: int, seconds: float, pkt) -> str:
    """The backend pkt goes to when its flow has just been made `seconds` idle."""
    age_flow(tables, sport, seconds)
    return backend_of(run, pkt)


def test_nat_rewrites_destination_with_valid_checksums(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4))
    verdict, out = run(syn(VIP4, 40000))
    assert verdict == XDP_PASS
    assert out[IP].dst in ("10.21.0.11", "10.21.0.12", "10.21.0.13")
    assert out[TCP].dport == 8080 and out[TCP].sport == 40000 and out[IP].src == "10.20.0.2"
    assert valid_checksums(out)


def test_nat_ipv6_rewrite_has_valid_checksum(prog):
    install, run, *_ = prog
    install(lb_ir(VIP6))
    verdict, out = run(syn(VIP6, 40001))
    assert verdict == XDP_PASS
    assert out[IPv6].dst.startswith("fd00:21::1") and out[TCP].dport == 8080
    assert valid_checksums(out)


def test_udp_without_checksum_keeps_zero(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4, proto=17))
    frame = bytearray(eth(IP(src="10.20.0.2", dst=VIP4) / UDP(sport=5000, dport=80) / b"x"))
    frame[14 + 20 + 6:14 + 20 + 8] = b"\0\0"          # IPv4 UDP: checksum 0 = none
    verdict, out = run(bytes(frame))
    assert verdict == XDP_PASS and out[UDP].chksum == 0 and out[UDP].dport == 8080


def test_same_flow_same_backend_and_spread_follows_weights(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4))
    first = {sp: run(syn(VIP4, sp))[1][IP].dst for sp in range(20000, 22000)}
    again = {sp: run(syn(VIP4, sp))[1][IP].dst for sp in range(20000, 20200)}
    assert all(first[sp] == dst for sp, dst in again.items())
    counts = collections.Counter(first.values())
    assert abs(counts["10.21.0.13"] / 2000 - 0.5) < 0.05
    assert abs(counts["10.21.0.11"] / 2000 - 0.25) < 0.05


def test_all_backends_draining_drops_new_flows(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4, weights=(0, 0, 0)))
    assert run(syn(VIP4, 50000))[0] == XDP_DROP


def test_non_vip_traffic_is_untouched(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4))
    frame = syn("10.20.0.1", 40000)
    verdict, out = run(frame)
    assert verdict == XDP_PASS and bytes(out) == frame


# ---- new connections always pick through Maglev; idle flows expire ----

B3 = "10.21.0.13"


def test_syn_reusing_a_five_tuple_never_reaches_a_drained_backend(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4))
    sports = range(30000, 30120)
    first = {sp: backend_of(run, syn(VIP4, sp)) for sp in sports}
    on_b3 = [sp for sp, b in first.items() if b == B3]
    assert on_b3                                    # the reuse case is exercised, not hoped for
    install(lb_ir(VIP4, weights=(1, 1, 0)))        # b3 drains
    # open connections keep their backend
    assert all(backend_of(run, ack(VIP4, sp)) == first[sp] for sp in sports)
    # the client closes and reconnects from the same ports: every SYN goes through Maglev
    again = {sp: backend_of(run, syn(VIP4, sp)) for sp in sports}
    assert B3 not in again.values()
    assert all(again[sp] == first[sp] for sp in sports if sp not in on_b3)
    # and the new connection's later packets follow the new choice, not the old entry
    assert all(backend_of(run, ack(VIP4, sp)) == again[sp] for sp in on_b3)


def test_syn_reusing_a_five_tuple_never_reaches_a_removed_backend(prog):
    install, run, *_ = prog
    install(lb_ir(VIP4))
    sports = range(31000, 31120)
    first = {sp: backend_of(run, syn(VIP4, sp)) for sp in sports}
    assert B3 in first.values()
    install(lb_ir(VIP4, keep=(0, 1)))              # b3 leaves the policy
    assert B3 not in {backend_of(run, syn(VIP4, sp)) for sp in sports}
    assert B3 not in {backend_of(run, ack(VIP4, sp)) for sp in sports}


def test_syn_ack_and_later_packets_use_the_flow_entry(prog):
    """Only a SYN without ACK opens a connection; anything else with an entry follows it."""
    install, run, tables, state = prog
    install(lb_ir(VIP4))
    b = backend_of(run, syn(VIP4, 32000))
    k, v = flow_of(tables, 32000)
    ids = {bid: ident for ident, bid in state["lb"].backends.items()}
    other = next(bid for bid in ids if bid != v.backend)
    v.backend = other                               # an entry naming another backend
    bpfsys.map_update(tables.fds[abi.NB_MAP_LB_FLOWS], bytes(k), bytes(v))
    moved = backend_of(run, ack(VIP4, 32000))
    assert moved != b and moved == ids[other].split("|")[1]
    assert backend_of(run, syn(VIP4, 32000, flags="SA")) == moved
    assert backend_of(run, syn(VIP4, 32000)) == b   # the SYN overwrote the entry
    assert flow_of(tables, 32000)[1].backend != other



def test_idle_udp_flow_expires_and_is_balanced_again(prog):
    """UDP has no SYN: a drained backend keeps a flow until it has been idle for the VIP's
    timeout (30 s by default); then the next datagram picks through Maglev."""
    install, run, tables, _ = prog
    install(lb_ir(VIP4, proto=17))
    sports = range(33000, 33060)
    first = {sp: backend_of(run, udp(VIP4, sp)) for sp in sports}
    on_b3 = [sp for sp, b in first.items() if b == B3]
    assert on_b3
    install(lb_ir(VIP4, weights=(1, 1, 0), proto=17))
    # idle, but not for 30 s yet (aged right before its packet, with room for a slow machine)
    assert all(aged(tables, run, sp, 25, udp(VIP4, sp)) == B3 for sp in on_b3)
    for sp in on_b3:
        age_flow(tables, sp, 31)
    assert B3 not in {backend_of(run, udp(VIP4, sp)) for sp in on_b3}
    assert all(now_ns() - flow_of(tables, sp)[1].last_ns < 5e9 for sp in on_b3)


def test_idle_tcp_flow_expires_after_the_policy_timeout(prog):
    install, run, tables, _ = prog
    install(lb_ir(VIP4, idle=20))
    sports = range(34000, 34060)
    first = {sp: backend_of(run, syn(VIP4, sp)) for sp in sports}
    on_b3 = [sp for sp, b in first.items() if b == B3]
    install(lb_ir(VIP4, weights=(1, 1, 0), idle=20))
    assert all(aged(tables, run, sp, 15, ack(VIP4, sp)) == B3 for sp in on_b3)
    for sp in on_b3:
        age_flow(tables, sp, 21)
    assert B3 not in {backend_of(run, ack(VIP4, sp)) for sp in on_b3}


def test_default_tcp_timeout_keeps_a_flow_idle_for_minutes(prog):
    install, run, tables, _ = prog
    install(lb_ir(VIP4))
    first = {sp: backend_of(run, syn(VIP4, sp)) for sp in range(35000, 35060)}
    on_b3 = [sp for sp, b in first.items() if b == B3]
    install(lb_ir(VIP4, weights=(1, 1, 0)))
    assert all(aged(tables, run, sp, 880, ack(VIP4, sp)) == B3 for sp in on_b3)
    for sp in on_b3:
        age_flow(tables, sp, 910)
    assert B3 not in {backend_of(run, ack(VIP4, sp)) for sp in on_b3}


def test_last_seen_is_refreshed_at_most_once_a_second(prog):
    """Coarse updates: a packet rewrites the flow's last-seen time only when it is older than
    a second, so a busy flow does not dirty its cache line on every packet."""
    install, run, tables, _ = prog
    install(lb_ir(VIP4, proto=17))
    backend_of(run, udp(VIP4, 36000))
    age_flow(tables, 36000, 0.3)
    before = flow_of(tables, 36000)[1].last_ns
    backend_of(run, udp(VIP4, 36000))
    assert flow_of(tables, 36000)[1].last_ns == before
    age_flow(tables, 36000, 3)
    backend_of(run, udp(VIP4, 36000))
    assert now_ns() - flow_of(tables, 36000)[1].last_ns < 2e9


def test_vip_entry_carries_the_idle_timeout(prog):
    install, _, tables, _ = prog
    install(lb_ir(VIP4, proto=17, idle=2))
    (k, v), = [(k, abi.NbVip.from_buffer_copy(v)) for k, v in
               bpfsys.map_lookup_batch(tables.fds[abi.NB_MAP_LB_VIPS], ctypes.sizeof(abi.NbVipKey),
                                       ctypes.sizeof(abi.NbVip))]
    assert (v.idle_ns, v.touch_ns) == (2_000_000_000, 500_000_000)


def _pin_map(path, map_type: int, key_size: int, value_size: int) -> None:
    lib = bpfsys.libbpf()
    lib.bpf_map_create.restype = ctypes.c_int
    fd = lib.bpf_map_create(map_type, path.name.encode(), key_size, value_size, 1024, None)
    assert fd >= 0, fd
    try:
        bpfsys.obj_pin(fd, path)
    finally:
        os.close(fd)


def test_flow_table_pinned_by_an_older_layout_is_found_stale(pin_dir):
    """An apply over pins an older netbpf made must not hand them to the new program (the
    verifier refuses 8-byte flow values now that they carry a last-seen time)."""
    lru_hash, percpu_array = 9, 6
    pin_dir.mkdir()
    _pin_map(pin_dir / abi.NB_MAP_LB_FLOWS, lru_hash, ctypes.sizeof(abi.NbFlowKey), 8)
    _pin_map(pin_dir / abi.NB_MAP_LB_NAT, lru_hash, ctypes.sizeof(abi.NbNatKey),
             ctypes.sizeof(abi.NbNatVal))
    assert stale_shared_maps(pin_dir) == [abi.NB_MAP_LB_FLOWS]
    (pin_dir / abi.NB_MAP_LB_FLOWS).unlink()
    _pin_map(pin_dir / abi.NB_MAP_LB_FLOWS, lru_hash, ctypes.sizeof(abi.NbFlowKey),
             ctypes.sizeof(abi.NbFlow))
    _pin_map(pin_dir / abi.NB_MAP_LB_CNT, percpu_array, 4, ctypes.sizeof(abi.NbLbCounter))
    assert stale_shared_maps(pin_dir) == []
