"""The load balancer path of the XDP program under BPF_PROG_TEST_RUN: exact output packets.

test_run gives the program the loopback device, where forwarding is off, so NAT hands the
rewritten packet to the stack (XDP_PASS) and DSR, which needs a route, drops: the rewrite
itself, the flow affinity and the Maglev spread are what is checked here. The cached next hop
is checked with packets arriving on a veth of a private namespace (an xdp_md context), where
the FIB answers; forwarding end to end is checked in tests/netns/test_lb_lab.py.
Over 400 lines: one program fixture (compiled once) serves every case; split, each file would
compile it again.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
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
from netbpf.kernel.netns import enter_netns
from netbpf.kernel.testrun import test_run as run_prog, xdp_ctx
from netbpf.lb import pick
from netbpf.lb.maglev import backend_key
from netbpf.lb.lbtables import LbState, LbTables, plan_lb, stale_shared_maps
from netbpf.store.progspec import ProgramSpec

VIP4, VIP6 = "10.20.0.100", "fd00:20::100"
XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3


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

    def run(frame: bytes, ctx: bytes | None = None):
        r = run_prog(fw.fd, frame, ctx=ctx)
        return r.retval, Ether(r.data_out)

    return install, run, LbTables.from_loaded(fw.loaded), state, fw.loaded


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
    install, run, tables, state, _ = prog
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
    install, run, tables, *_ = prog
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
    install, run, tables, *_ = prog
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
    install, run, tables, *_ = prog
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
    install, run, tables, *_ = prog
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
    install, _, tables, *_ = prog
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


# ---- the established-flow fast path: VIP signature, port filter, cached next hop ----

def test_removed_vip_stops_its_established_flows(prog):
    """Established flows check the VIP by its index (no VIP hash lookup): a VIP that leaves
    the policy must stop balancing them at once, its entries still in the flow table."""
    install, run, tables, *_ = prog
    install(lb_ir(VIP4, proto=17))
    backend_of(run, udp(VIP4, 37000))
    install()
    assert flow_of(tables, 37000)                   # the entry is still there
    frame = udp(VIP4, 37000)
    verdict, out = run(frame)
    assert verdict == XDP_PASS and bytes(out) == frame
    install(lb_ir(VIP4, proto=17))
    assert backend_of(run, udp(VIP4, 37000)).startswith("10.21.0.1")


def test_mode_change_balances_established_flows_again(prog):
    install, run, tables, *_ = prog
    install(lb_ir(VIP4, proto=17))
    backend_of(run, udp(VIP4, 37100))
    assert flow_of(tables, 37100)[1].mode == abi.NB_LB_NAT
    install(lb_ir(VIP4, proto=17, mode="dsr"))
    # DSR on test_run's loopback has no route: dropped, but through the new mode's path
    assert run(udp(VIP4, 37100))[0] == XDP_DROP
    assert flow_of(tables, 37100)[1].mode == abi.NB_LB_DSR


def test_port_filter_holds_exactly_the_vip_ports(prog):
    install, run, tables, *_ = prog

    def ports():
        return {w * 64 + b for w, bits in ((int.from_bytes(k, "little"),
                                             int.from_bytes(v, "little")) for k, v in
                                            bpfsys.map_lookup_batch(tables.fds["nb_lb_ports"],
                                                                    4, 8))
                for b in range(64) if bits >> b & 1}
    install(lb_ir(VIP4))
    assert ports() == {80}
    other = eth(IP(src="10.20.0.2", dst=VIP4) / TCP(sport=40000, dport=81, flags="S"))
    verdict, out = run(other)
    assert verdict == XDP_PASS and bytes(out) == other
    install()
    assert ports() == set()


NS = f"nblbt{os.getpid()}"
NEIGH = {"10.21.0.11": "02:00:00:00:21:11", "10.21.0.12": "02:00:00:00:21:12",
         "10.21.0.13": "02:00:00:00:21:13"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def lb_netns():
    """
        namespace nblbt<pid>:  v0 10.21.0.1/24 (forwarding on) == v1
                               backends 10.21.0.11-13: permanent neighbours on v0
    The program runs under test_run as if the packet came in on v0.
    """
    _ip("netns", "add", NS)
    try:
        _ip("-n", NS, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", NS, "addr", "add", "10.21.0.1/24", "dev", "v0")
        for dev in ("v0", "v1", "lo"):
            _ip("-n", NS, "link", "set", dev, "up")
        subprocess.run(["ip", "netns", "exec", NS, "sysctl", "-qw",
                        "net.ipv4.conf.v0.forwarding=1"], check=True, capture_output=True)
        for addr, mac in NEIGH.items():
            _ip("-n", NS, "neigh", "replace", addr, "lladdr", mac, "dev", "v0", "nud",
                "permanent")
        with enter_netns(NS):
            ifindex = socket.if_nametoindex("v0")
        yield ifindex
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@contextlib.contextmanager
def one_cpu():
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def _forget_next_hops(loaded) -> None:
    fd = loaded.maps["nb_lb_nh"].fd
    zero = bytes(bpfsys.percpu_value_size(ctypes.sizeof(abi.NbLbNh)))
    for bid in range(8):
        bpfsys.map_update(fd, struct.pack("<I", bid), zero)


def test_nat_established_flow_leaves_by_xdp_tx_with_the_neighbours_mac(prog, lb_netns):
    install, run, tables, _, loaded = prog
    install(lb_ir(VIP4))
    _forget_next_hops(loaded)
    with enter_netns(NS):
        first = syn(VIP4, 38000)
        verdict, out = run(first, xdp_ctx(first, lb_netns))
        assert verdict == XDP_TX
        b = out[IP].dst
        assert out[Ether].dst == NEIGH[b] and out[TCP].dport == 8080 and valid_checksums(out)
        later = ack(VIP4, 38000)
        verdict, out = run(later, xdp_ctx(later, lb_netns))
    assert verdict == XDP_TX and out[IP].dst == b and out[Ether].dst == NEIGH[b]


def test_next_hop_is_cached_and_looked_up_again_when_stale(prog, lb_netns):
    """A neighbour change is seen when the cached next hop is a second old, not per packet."""
    install, run, tables, _, loaded = prog
    install(lb_ir(VIP4, proto=17))
    _forget_next_hops(loaded)
    frame = udp(VIP4, 38100)
    # the cache is per CPU: every run on one CPU, or a run elsewhere would look up afresh
    with one_cpu(), enter_netns(NS):
        verdict, out = run(frame, xdp_ctx(frame, lb_netns))
        assert verdict == XDP_TX
        b = out[IP].dst
        _ip("-n", NS, "neigh", "replace", b, "lladdr", "02:00:00:00:99:99", "dev", "v0",
            "nud", "permanent")
        try:
            assert run(frame, xdp_ctx(frame, lb_netns))[1][Ether].dst == NEIGH[b]   # cached
            k = struct.pack("<I", flow_of(tables, 38100)[1].backend)
            fd = loaded.maps["nb_lb_nh"].fd
            stale = []
            for v in bpfsys.map_lookup_percpu(fd, k, ctypes.sizeof(abi.NbLbNh)):
                nh = abi.NbLbNh.from_buffer_copy(v[:ctypes.sizeof(abi.NbLbNh)])
                if nh.stamp_ns:
                    nh.stamp_ns -= 2_000_000_000            # as if looked up 2 s ago
                stale.append(bytes(nh).ljust(len(v), b"\0"))
            bpfsys.map_update(fd, k, b"".join(stale))
            verdict, out = run(frame, xdp_ctx(frame, lb_netns))
            assert verdict == XDP_TX and out[Ether].dst == "02:00:00:00:99:99"
        finally:
            _ip("-n", NS, "neigh", "replace", b, "lladdr", NEIGH[b], "dev", "v0", "nud",
                "permanent")


def test_dsr_without_a_neighbour_drops_and_caches_nothing(prog, lb_netns):
    install, run, tables, _, loaded = prog
    lb = lb_ir(VIP4, proto=17, mode="dsr")
    install(lb)
    _forget_next_hops(loaded)
    frame = udp(VIP4, 38200)
    with enter_netns(NS):
        verdict, out = run(frame, xdp_ctx(frame, lb_netns))
        assert verdict == XDP_TX                    # DSR: the MAC changes, the address not
        assert out[IP].dst == VIP4 and out[Ether].dst in NEIGH.values()
        b = next(a for a, m in NEIGH.items() if m == out[Ether].dst)
        _ip("-n", NS, "neigh", "del", b, "dev", "v0")
        try:
            _forget_next_hops(loaded)
            assert run(frame, xdp_ctx(frame, lb_netns))[0] == XDP_DROP
            k = struct.pack("<I", flow_of(tables, 38200)[1].backend)
            assert all(abi.NbLbNh.from_buffer_copy(v[:ctypes.sizeof(abi.NbLbNh)]).stamp_ns == 0
                       for v in bpfsys.map_lookup_percpu(loaded.maps["nb_lb_nh"].fd, k,
                                                         ctypes.sizeof(abi.NbLbNh)))
        finally:
            _ip("-n", NS, "neigh", "replace", b, "lladdr", NEIGH[b], "dev", "v0", "nud",
                "permanent")


def test_python_model_picks_the_backend_the_program_picks(prog):
    """The flow hash and Maglev slot explain computes in Python (netbpf/lb/pick.py) are the
    data plane's, for TCP and UDP, IPv4 and IPv6, with a drained backend."""
    install, run, tables, state, _ = prog
    for vip, proto, weights in ((VIP4, 6, (1, 1, 2)), (VIP4, 17, (1, 0, 2)), (VIP6, 6, (3, 1, 1))):
        lb = lb_ir(vip, proto=proto, weights=weights)
        install(lb)
        ids = {bid: key for key, bid in state["lb"].backends.items()}
        a = ipaddress.ip_address(vip)
        src = ipaddress.ip_address("10.20.0.2" if a.version == 4 else "fd00:20::2")
        for sp in range(39000, 39150):
            frame = syn(vip, sp) if proto == 6 else udp(vip, sp)
            run(frame)
            key = pick.flow_key(a.version, proto, int(src), int(a), sp, 80)
            b = pick.model_backend(lb, set(), a.version, int(src), sp)
            assert ids[pick.flow_backend(tables, key)] == \
                backend_key("web", b.family, b.addr, b.port)
