r"""The L4 load balancer with real TCP servers in three backend namespaces.

                     10.20.0.0/24                              10.21.0.0/24
    [client] client0 -------------- lb0 [lb] br-be ----- eth0 [b1] .11  TCP+UDP :8080 "b1"
             .2                     .1  VIP 10.20.0.100    \--- eth0 [b2] .12  TCP+UDP :8080 "b2"
                                        (on lo), :80       \-- eth0 [b3] .13  TCP+UDP :8080 "b3"
                                    XDP: Maglev + NAT; TC egress: replies -> VIP:80

Each server answers every line (TCP) or datagram (UDP) with its name, so a client sees where
it landed. Tests that reuse a 5-tuple do it on purpose, from fixed source ports below the
ephemeral range, each test its own range; the others use ephemeral ports.
"""
from __future__ import annotations

import collections
import json
import math
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netbpf_cli import netbpf as run_netbpf

VIP4, VIP6 = "10.20.0.100", "fd00:20::100"
BACKENDS = {"b1": ("10.21.0.11", "fd00:21::11"), "b2": ("10.21.0.12", "fd00:21::12"),
            "b3": ("10.21.0.13", "fd00:21::13")}

SERVER = textwrap.dedent("""
    import socket, sys, threading
    name = sys.argv[1]
    def serve(family, addr):
        s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 8080)); s.listen(512)
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    def handle(c):
        with c, c.makefile("rb") as f:
            for line in f:
                c.sendall(name.encode() + b"\\n")
    def serve_udp():
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::", 8080))
        while True:
            _, peer = u.recvfrom(2048)
            u.sendto(name.encode(), peer)
    threading.Thread(target=serve, args=(socket.AF_INET6, "::"), daemon=True).start()
    threading.Thread(target=serve_udp, daemon=True).start()
    import time; time.sleep(0.2); print("ready", flush=True); time.sleep(3600)
""")


def policy(weights=(1, 1, 2), backends=("b1", "b2", "b3"), family=4, mode="nat",
           health=False, proto="tcp", idle=None) -> str:
    vip = VIP4 if family == 4 else VIP6
    lines = [f"      - {{address: \"{BACKENDS[b][family == 6]}\", port: 8080, weight: {w}}}"
             for b, w in zip(backends, weights)]
    extra = "    health: {tcp: {interval: 2s, timeout: 1500ms}}\n" if health else ""
    extra += f"    idle_timeout: {idle}\n" if idle else ""
    return (f"version: 1\nload_balancers:\n  web:\n    interface: lb0\n    vip: \"{vip}\"\n"
            f"    port: 80\n    proto: {proto}\n    mode: {mode}\n    backends:\n"
            + "\n".join(lines) + "\n" + extra)


def netbpf(lab, *args: str, check: bool = True):
    return run_netbpf(lab, *args, node="lb", check=check)


def apply(lab, tmp: Path, text: str) -> subprocess.CompletedProcess:
    f = tmp / "lb.yaml"
    f.write_text(text)
    return netbpf(lab, "apply", str(f))


def start_server(lab, node):
    p = lab.popen(node, [sys.executable, "-c", SERVER, node], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture(scope="module")
def lb(lb_lab, tmp_path_factory):
    lab = lb_lab
    servers = {b: start_server(lab, b) for b in BACKENDS}
    lab.run("lb", ["ip", "addr", "add", f"{VIP4}/32", "dev", "lo"])
    lab.run("lb", ["ip", "addr", "add", f"{VIP6}/128", "dev", "lo"])
    # Linux answers neighbour solicitations only for addresses of the asking interface: route
    # the IPv6 VIP to the load balancer, as an upstream router would
    lab.run("client", ["ip", "-6", "route", "add", f"{VIP6}/128", "via", "fd00:20::1"])
    tmp = tmp_path_factory.mktemp("lb")
    try:
        apply(lab, tmp, policy())
        lab.tmp, lab.servers = tmp, servers
        yield lab
    finally:
        netbpf(lab, "detach", "lb0", check=False)
        for p in servers.values():
            p.kill()
            p.wait()
        lab.run("lb", ["ip", "addr", "del", f"{VIP4}/32", "dev", "lo"], check=False)
        lab.run("lb", ["ip", "addr", "del", f"{VIP6}/128", "dev", "lo"], check=False)


@pytest.fixture
def reset(lb):
    yield lb
    apply(lb, lb.tmp, policy())


def connect(vip: str, n: int, sports=None, keep=False):
    """n connections to vip:80 (from fixed source ports if given); the backend of each.
    Closed with RST (linger 0), so a source port can be used again at once."""
    out, fails = [], []
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    for i in range(n):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.settimeout(3)
        try:
            if sports:
                s.bind(("", sports[i]))
            s.connect((vip, 80))
            s.sendall(b"hi\n")
            out.append(s.recv(64).decode().strip())
        except OSError as e:
            fails.append(repr(e))
        finally:
            s.close()
    return out, fails


def exchange_udp(vip: str, sports) -> tuple[list[str], list[str]]:
    """One datagram from each source port to vip:80; the backend that answered each (the
    answer must come back from vip:80, translated by the TC egress program)."""
    out, fails = [], []
    for sp in sports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(3)
        try:
            s.bind(("", sp))
            s.sendto(b"hi", (vip, 80))
            data, peer = s.recvfrom(64)
            if peer != (vip, 80):
                fails.append(f"answer from {peer}")
            out.append(data.decode().strip())
        except OSError as e:
            fails.append(repr(e))
        finally:
            s.close()
    return out, fails


def lb_stats(lab) -> dict:
    return json.loads(netbpf(lab, "stats", "lb0", "--json").stdout)["load_balancers"][0]


def test_300_nat_connections_complete_and_split_by_weight(lb):
    got, fails = lb.call("client", connect, VIP4, 300)
    assert fails == []
    counts = collections.Counter(got)
    assert set(counts) == {"b1", "b2", "b3"}
    for name, share in (("b1", 0.25), ("b2", 0.25), ("b3", 0.5)):
        sd = math.sqrt(300 * share * (1 - share))
        assert abs(counts[name] - 300 * share) <= 4 * sd, counts
    s = lb_stats(lb)
    per = {b["address"]: b["connections"] for b in s["backends"]}
    assert sum(per.values()) >= 300 and s["connections"] >= 300


def test_captured_packets_have_valid_checksums(lb):
    """With checksum offload off at the senders, packets carry full checksums, so the ones the
    load balancer rewrote (both ways) must be right to the bit."""
    from scapy.layers.inet import IP, TCP

    for node, dev in (("client", "client0"), ("b1", "eth0"), ("b2", "eth0"), ("b3", "eth0")):
        lb.run(node, ["ethtool", "-K", dev, "tx", "off"])

    def valid(p) -> bool:
        """Checksums as sent equal the ones Scapy computes afresh."""
        raw = IP(bytes(p[IP]))
        redo = raw.copy()
        del redo.chksum
        del redo[TCP].chksum
        redo = IP(bytes(redo))
        return (redo.chksum, redo[TCP].chksum) == (raw.chksum, raw[TCP].chksum)

    with lb.capture("b1", "eth0", filter="tcp port 8080", timeout=5, direction="in") as to_b1, \
            lb.capture("client", "client0", filter="tcp port 80", timeout=5,
                       direction="in") as to_client:
        got, fails = lb.call("client", connect, VIP4, 20)
        to_b1.wait(timeout=1)
        to_client.wait(timeout=1)
    assert fails == [] and "b1" in got
    assert to_b1.packets and all(p[IP].dst == BACKENDS["b1"][0] for p in to_b1.packets)
    assert all(valid(p) for p in to_b1.packets)
    assert to_client.packets and all(p[IP].src == VIP4 and p[TCP].sport == 80
                                     for p in to_client.packets)
    assert all(valid(p) for p in to_client.packets)


def test_same_five_tuple_keeps_its_backend(lb):
    sports = list(range(21000, 21040))   # below the ephemeral range
    first, f1 = lb.call("client", connect, VIP4, 40, sports)
    again, f2 = lb.call("client", connect, VIP4, 40, sports)
    assert f1 == f2 == [] and first == again


def test_draining_backend_keeps_open_connections_and_gets_no_new_ones(reset):
    lab = reset
    # earlier connections from these ports, closed: their flow entries stay behind, and the
    # new connections below reuse the very same 5-tuples (on purpose, not by chance)
    history = list(range(24000, 24120))
    # a persistent client inside the namespace: keeps 30 connections open across the re-apply
    code = textwrap.dedent(f"""
        import socket, sys
        conns = []
        for port in range(24200, 24230):
            s = socket.socket(); s.bind(("", port)); s.settimeout(3)
            s.connect(("{VIP4}", 80)); s.sendall(b"hi\\n")
            conns.append((s, s.recv(64).decode().strip()))
        print(" ".join(n for _, n in conns), flush=True)
        sys.stdin.readline()
        out = []
        for s, _ in conns:
            s.sendall(b"again\\n"); out.append(s.recv(64).decode().strip())
        print(" ".join(out), flush=True)
    """)
    first, fails = lab.call("client", connect, VIP4, len(history), history)
    assert fails == [] and "b3" in first                    # the reuse case is exercised
    p = lab.popen("client", [sys.executable, "-c", code], stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, text=True)
    before = p.stdout.readline().split()
    assert "b3" in before
    apply(lab, lab.tmp, policy(weights=(1, 1, 0)))          # b3 drains
    p.stdin.write("go\n")
    p.stdin.flush()
    after = p.stdout.readline().split()
    p.wait(10)
    assert after == before                                  # open connections kept their backend
    again, fails = lab.call("client", connect, VIP4, len(history), history)
    assert fails == [] and "b3" not in again                # reused 5-tuples: no SYN to b3
    new, fails = lab.call("client", connect, VIP4, 60)
    assert fails == [] and "b3" not in new


@pytest.mark.parametrize("how", ["drained", "removed"])
def test_reused_five_tuples_never_open_a_connection_to_a_gone_backend(reset, how):
    """120 connections from fixed ports, b2 drained (weight 0) or removed, all closed, then
    120 new connections from the same ports: not one SYN reaches b2 (issue 19)."""
    lab = reset
    sports = list(range(25000, 25120)) if how == "drained" else list(range(25200, 25320))
    first, fails = lab.call("client", connect, VIP4, len(sports), sports)
    assert fails == [] and first.count("b2") >= 10
    gone = policy(weights=(1, 0, 2)) if how == "drained" else \
        policy(weights=(1, 2), backends=("b1", "b3"))
    apply(lab, lab.tmp, gone)
    with lab.capture("b2", "eth0", filter="tcp[tcpflags] & tcp-syn != 0", timeout=20,
                     direction="in") as syns_to_b2:
        again, fails = lab.call("client", connect, VIP4, len(sports), sports)
        syns_to_b2.wait(timeout=0.5)
    assert fails == [] and "b2" not in again
    assert syns_to_b2.packets == []


@pytest.mark.parametrize("how", ["drained", "removed"])
def test_udp_flows_of_a_gone_backend(reset, how):
    """UDP has no SYN. Drained: a flow stays on its backend while it is active, and once idle
    for idle_timeout its next datagram is balanced again. Removed: balanced again at once."""
    lab = reset
    sports = list(range(26000, 26120)) if how == "drained" else list(range(26200, 26320))
    apply(lab, lab.tmp, policy(proto="udp"))
    first, fails = lab.call("client", exchange_udp, VIP4, sports)
    assert fails == [] and first.count("b2") >= 10
    if how == "drained":
        apply(lab, lab.tmp, policy(weights=(1, 0, 2), proto="udp"))
        kept, fails = lab.call("client", exchange_udp, VIP4, sports)
        assert fails == [] and kept == first                # 30 s default: nobody idled out
        apply(lab, lab.tmp, policy(weights=(1, 0, 2), proto="udp", idle="1s"))
        time.sleep(2)                                       # every flow idle past 1 s
    else:
        apply(lab, lab.tmp, policy(weights=(1, 2), backends=("b1", "b3"), proto="udp"))
    again, fails = lab.call("client", exchange_udp, VIP4, sports)
    assert fails == [] and "b2" not in again


def test_explain_names_the_backend_a_connection_lands_on(lb):
    """explain's backend for a VIP packet (Maglev in Python, and a test run on a copy of the
    attached program) is where a real connection from that 5-tuple goes."""
    names = {addr: name for name, (addr, _) in BACKENDS.items()}
    sports = list(range(27000, 27012))      # below the ephemeral range; this test's own
    said = []
    for sp in sports:
        r = netbpf(lb, "explain", "lb0", "tcp", f"10.20.0.2:{sp}", f"{VIP4}:80", "--json")
        x = json.loads(r.stdout)
        assert x["agree"] and x["model_verdict"] == x["program_verdict"] == "balance", x
        assert x["model_backend"] == x["program_backend"], x
        said.append(names[x["model_backend"].rsplit(":", 1)[0]])
    got, fails = lb.call("client", connect, VIP4, len(sports), sports)
    assert fails == [] and got == said
    assert len(set(said)) > 1                  # more than one backend: the hash is exercised


def test_removing_a_backend_moves_only_its_flows(reset):
    lab = reset
    sports = list(range(22000, 22090))   # below the ephemeral range
    before, f1 = lab.call("client", connect, VIP4, 90, sports)
    apply(lab, lab.tmp, policy(weights=(1, 1), backends=("b1", "b2")))
    after, f2 = lab.call("client", connect, VIP4, 90, sports)
    assert f1 == f2 == []
    for b, a in zip(before, after):
        if b != "b3":
            assert a == b
        else:
            assert a in ("b1", "b2")
    assert "b3" in before


def test_ipv6_vip(reset):
    lab = reset
    apply(lab, lab.tmp, policy(family=6))
    got, fails = lab.call("client", connect, VIP6, 40)
    assert fails == [] and set(got) == {"b1", "b2", "b3"}


def test_health_check_takes_a_dead_backend_out(reset):
    lab = reset
    f = lab.tmp / "health.yaml"
    f.write_text(policy(health=True))
    netbpf(lab, "apply", str(f))
    sports = list(range(23000, 23060))        # below the ephemeral range
    before, fails = lab.call("client", connect, VIP4, 60, sports)
    assert fails == [] and "b2" in before
    lab.servers["b2"].kill()
    lab.servers["b2"].wait()
    try:
        out = netbpf(lab, "lb-health", str(f), "--once").stdout
        assert "backend 10.21.0.12:8080 DOWN" in out
        got, fails = lab.call("client", connect, VIP4, 60)
        assert fails == [] and "b2" not in got
        # the flows b2 had are balanced again, not sent to the dead backend
        again, fails = lab.call("client", connect, VIP4, 60, sports)
        assert fails == [] and "b2" not in again
        assert [b["state"] for b in lb_stats(lab)["backends"]] == ["up", "down", "up"]
    finally:
        lab.servers["b2"] = start_server(lab, "b2")
    out = netbpf(lab, "lb-health", str(f), "--once").stdout
    assert "backend 10.21.0.12:8080 UP again" in out
    got, fails = lab.call("client", connect, VIP4, 60)
    assert fails == [] and "b2" in got


# ---- DSR: one L2 segment, backends own the VIP ----

DSR_VIP = "10.30.0.100"


def test_dsr_backends_answer_the_client_directly(make_lab, tmp_path):
    lab = make_lab("lb-dsr")
    for b in ("b1", "b2", "b3"):
        lab.run(b, ["ip", "addr", "add", f"{DSR_VIP}/32", "dev", "lo"])
    servers = [lab.popen(b, [sys.executable, "-c", SERVER.replace("8080", "80"), b],
                         stdout=subprocess.PIPE, text=True) for b in ("b1", "b2", "b3")]
    try:
        for p in servers:
            assert p.stdout.readline().strip() == "ready"
        text = (f"version: 1\ninterfaces:\n  lb0:\n    xdp: {{mode: generic}}\n"
                f"load_balancers:\n  web:\n    interface: lb0\n    vip: {DSR_VIP}\n"
                f"    port: 80\n    proto: tcp\n    mode: dsr\n    backends:\n"
                + "".join(f"      - {{address: 10.30.0.1{i}, port: 80}}\n" for i in (1, 2, 3)))
        f = tmp_path / "dsr.yaml"
        f.write_text(text)
        netbpf(lab, "apply", str(f))
        try:
            # the lb must know the backends' MACs (bpf_fib_lookup reads the neighbour table)
            for i in (1, 2, 3):
                assert lab.ping("lb", f"10.30.0.1{i}")
            with lab.capture("lb", "lb0", filter="tcp src port 80", timeout=4,
                             direction="in") as replies_via_lb:
                got, fails = lab.call("client", connect, DSR_VIP, 30)
                replies_via_lb.wait(timeout=0.5)
            assert fails == [] and set(got) == {"b1", "b2", "b3"}
            assert replies_via_lb.packets == []       # replies went straight to the client
        finally:
            netbpf(lab, "detach", "lb0", check=False)
    finally:
        for p in servers:
            p.kill()
            p.wait()


def test_nat_vip_nobody_answers_for_is_refused_with_the_fix(lb, tmp_path):
    """The VIP on lb0's own subnet, owned by no one: clients would get no ARP reply. apply
    refuses and names the fix; with the VIP on lo again the same policy plans fine."""
    path = tmp_path / "vip.yaml"
    path.write_text(policy())
    lb.run("lb", ["ip", "addr", "del", f"{VIP4}/32", "dev", "lo"])
    try:
        r = netbpf(lb, "apply", str(path), "--dry-run", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"VIP {VIP4} is on lb0's subnet 10.20.0.0/24" in r.stderr
        assert "nothing answered ARP" in r.stderr
        assert f"addr add {VIP4}/32 dev lo" in r.stderr
    finally:
        lb.run("lb", ["ip", "addr", "add", f"{VIP4}/32", "dev", "lo"])
    assert netbpf(lb, "apply", str(path), "--dry-run").returncode == 0
