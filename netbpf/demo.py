"""`make demo`: the main job end to end on the built-in lab, no real NIC needed.

1. Firewall: lab up (two-hosts) -> netbpf apply policies/demo.yaml on the gateway -> Scapy
   traffic from the client (and out of the gateway) -> what arrived -> `netbpf stats gw0`.
2. Load balancer: lab up (lb) -> TCP servers on three backends -> apply policies/lb.yaml ->
   200 real connections to the VIP -> who answered -> `netbpf stats lb0`.
Runs the real CLI as a user would; not a test (tests/netns checks the same things strictly).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "policies" / "demo.yaml"
TOPOLOGY = REPO / "netns-lab" / "two-hosts.yaml"
LB_POLICY = REPO / "policies" / "lb.yaml"
LB_TOPOLOGY = REPO / "netns-lab" / "lb.yaml"
SERVER = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(256); print("ready", flush=True)
def answer(c):
    with c:
        c.recv(64); c.sendall(sys.argv[1].encode())
while True:
    threading.Thread(target=answer, args=(s.accept()[0],), daemon=True).start()
"""
NETBPF = str(Path(sys.executable).with_name("netbpf"))

console = Console()


def step(text: str) -> None:
    console.print(f"\n[bold cyan]==> {text}[/bold cyan]")


def netbpf(*args: str) -> None:
    console.print(f"[dim]$ netbpf {' '.join(args)}[/dim]")
    p = subprocess.run([NETBPF, *args], text=True, capture_output=True)
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"demo: 'netbpf {' '.join(args)}' failed with exit {p.returncode}")


def traffic(lab) -> list[tuple[str, str, int, int]]:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw

    gw4 = lab.addr("gw", "gw0", 4)
    client4 = lab.addr("client", "client0", 4)
    rows = []

    def ingress(what: str, rule: str, pkts) -> None:
        got = lab.send_and_capture("client", pkts, "gw", "gw0", timeout=3.0)
        rows.append((what, rule, len(pkts), len(got)))

    ingress("UDP from 192.0.2.7 (blocklisted)", "drop-blocklist",
            [IP(src="192.0.2.7", dst=gw4) / UDP(dport=7) / Raw(b"bl")] * 10)
    ingress("UDP from 2001:db8:bad::7 (blocklisted)", "drop-blocklist",
            [IPv6(src="2001:db8:bad::7", dst=lab.addr("gw", "gw0", 6)) / UDP(dport=7)] * 10)
    ingress("UDP to gw:9999", "drop-udp-9999", [IP(dst=gw4) / UDP(dport=9999)] * 20)
    ingress("TCP SYN to gw:80", "count-web", [IP(dst=gw4) / TCP(dport=80, flags="S")] * 15)
    frame = Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) / IP(
        src=lab.addr("client", "client0"), dst=gw4) / UDP(dport=5353)
    ingress("UDP to gw:5353, 300 in a burst", "mdns-limit", [frame] * 300)
    ingress("UDP to gw:12345", "(default allow)", [IP(dst=gw4) / UDP(dport=12345)] * 5)
    with lab.capture("client", "client0", filter=lambda p: TCP in p and p[TCP].dport in (25, 26),
                     timeout=3.0, direction="in") as cap:
        refused = lab.call("gw", _send_each, [IP(dst=client4) / TCP(dport=25, flags="S")] * 5)
        lab.call("gw", _send_each, [IP(dst=client4) / TCP(dport=26, flags="S")] * 5)
        cap.wait(timeout=1.0)
    arrived = [p for p in cap.packets if p[TCP].dport == 25]
    rows.append((f"TCP SYN from gw to client:25 (egress; {refused} refused by the stack)",
                 "no-smtp-out", 5, len(arrived)))
    rows.append(("TCP SYN from gw to client:26 (egress)", "(default allow)", 5,
                 sum(1 for p in cap.packets if p[TCP].dport == 26)))
    ok = lab.ping("client", gw4, count=3)
    rows.append(("ping gw from client", "(default allow)", 3, 3 if ok else 0))
    return rows


def _send_each(packets) -> int:
    """Send one by one (inside a namespace); returns how many the stack refused. A TC egress
    drop of a locally sent packet comes back to the sender as ENOBUFS."""
    from scapy.sendrecv import send

    refused = 0
    for p in packets:
        try:
            send(p, verbose=False)
        except OSError:
            refused += 1
    return refused


def _connect_many(vip: str, n: int) -> dict:
    import collections
    import socket

    seen = collections.Counter()
    for _ in range(n):
        try:
            with socket.create_connection((vip, 80), timeout=2) as c:
                c.sendall(b"hi")
                seen[c.recv(64).decode()] += 1
        except OSError as e:
            seen[f"failed: {e.strerror or e}"] += 1
    return dict(seen)


def load_balancer() -> None:
    from netbpf.lab import Lab

    step(f"lab up: {LB_TOPOLOGY.relative_to(REPO)} (client -> lb -> three backends)")
    with Lab.from_file(LB_TOPOLOGY) as lab:
        lb = lab.ns("lb")
        for b in ("b1", "b2", "b3"):
            p = lab.popen(b, [sys.executable, "-c", SERVER, b], stdout=subprocess.PIPE, text=True)
            p.stdout.readline()
        lab.run("lb", ["ip", "addr", "add", "10.20.0.100/32", "dev", "lo"])
        try:
            step("apply the load balancer: VIP 10.20.0.100:80 -> backends :8080, weights 1:1:2")
            netbpf("-n", lb, "apply", str(LB_POLICY.relative_to(REPO)))
            step("200 real TCP connections from the client to the VIP")
            seen = lab.call("client", _connect_many, "10.20.0.100", 200)
            t = Table(title="who answered")
            t.add_column("backend")
            t.add_column("connections", justify="right")
            for name, n in sorted(seen.items()):
                t.add_row(name, str(n))
            console.print(t)
            step("what the data plane counted")
            netbpf("-n", lb, "stats", "lb0")
        finally:
            step("detach and tear the lab down")
            netbpf("-n", lb, "detach", "lb0")


def main() -> None:
    from netbpf.lab import Lab

    step(f"lab up: {TOPOLOGY.relative_to(REPO)}")
    with Lab.from_file(TOPOLOGY) as lab:
        gw = lab.ns("gw")
        t = Table(title="the lab")
        for col in ("node", "namespace", "interface", "addresses"):
            t.add_column(col)
        for node in ("client", "gw"):
            ifname = f"{node}0"
            t.add_row(node, lab.ns(node), ifname,
                      f"{lab.addr(node, ifname, 4)}, {lab.addr(node, ifname, 6)}")
        console.print(t)
        try:
            step("validate and apply the demo policy to gw0 (inside the gateway's namespace)")
            netbpf("validate", str(POLICY.relative_to(REPO)))
            netbpf("-n", gw, "apply", str(POLICY.relative_to(REPO)))

            step("send traffic with Scapy and see what arrives on gw0")
            t = Table(title="traffic")
            for col in ("what", "rule", "sent", "arrived"):
                t.add_column(col)
            for what, rule, sent, arrived in traffic(lab):
                t.add_row(what, rule, str(sent), str(arrived))
            console.print(t)

            step("what the data plane counted (read from the pinned maps)")
            netbpf("-n", gw, "stats", "gw0")
            netbpf("status")
        finally:
            step("detach and tear the lab down")
            netbpf("-n", gw, "detach", "gw0")
    load_balancer()
    console.print("\n[bold green]demo done[/bold green]: labs removed, nothing left attached")


if __name__ == "__main__":
    main()
