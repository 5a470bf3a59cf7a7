"""`netbpf import` proven equivalent: the same probes against the original ruleset (loaded with
iptables-restore / nft -f in the lab) and against the imported netbpf policy must arrive alike.

    [client] client0 ------------------ gw0 [gw]
             10.10.0.2, fd00:10::2      10.10.0.1, fd00:10::1
                                        ^ original rules (netfilter), then the imported
                                          policy (XDP + TC) with netfilter flushed

'Arrived' = seen by raw sockets in gw, which get packets after netfilter's INPUT hook and
after XDP: the place where both rulesets have decided. Probes open new connections (TCP SYN,
UDP, ICMP echo), inside and at the edges of every rule, plus misses, IPv4 and IPv6; spoofed
sources exercise negation and sets.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw


from conftest import own_two_hosts
from netbpf_cli import NETBPF, netbpf

@pytest.fixture(scope="module")
def own_lab(_no_lab_left_behind):
    with own_two_hosts("e") as lab:        # namespaces nbi<pid>e-
        yield lab


CASES = Path(__file__).parent.parent / "cases" / "import"

RECEIVER = r"""
import json, select, socket, sys, time
socks = [socket.socket(f, socket.SOCK_RAW, p) for f, ps in
         ((socket.AF_INET, (6, 17, 1)), (socket.AF_INET6, (6, 17, 58))) for p in ps]
print("ready", flush=True)
seen, end = set(), time.time() + float(sys.argv[1])
while time.time() < end:
    for s in select.select(socks, [], [], 0.1)[0]:
        data = s.recv(65535)
        at = data.find(b"eqv-")
        if at >= 0:
            seen.add(data[at:at + 12].decode(errors="replace"))
print(json.dumps(sorted(seen)), flush=True)
"""

FLUSH_IPT = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def probes(salt: int) -> dict[str, object]:
    """marker -> packet; every marker is 12 bytes ('eqv-' + 8). salt varies source ports and
    ICMP ids per ruleset, so no conntrack entry of an earlier ruleset's probes matches."""
    out: dict[str, object] = {}
    sport = 40000 + salt

    def add(pkt, l4):
        # whole frames to the gw's MAC: no neighbour resolution (spoofed sources have none)
        marker = f"eqv-{len(out):08d}"
        out[marker] = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / pkt / l4 / \
            Raw(marker.encode())

    srcs4 = ["10.10.0.2", "10.10.0.100", "10.10.0.200", "192.0.2.9", "198.51.100.7"]
    for src in srcs4:
        v4 = IP(src=src, dst="10.10.0.1")
        for port in (22, 25, 53, 69, 79, 80, 81, 443, 1023, 1024, 5000, 5010, 5011, 8000, 8010,
                     8011, 8080):
            add(v4, TCP(sport=sport, dport=port, flags="S"))
            add(v4, UDP(sport=sport, dport=port))
        add(v4, TCP(sport=sport, dport=22, flags="SF"))
        add(v4, ICMP(type=8, id=salt))
    for src in ("fd00:10::2", "fd00:99::2"):
        v6 = IPv6(src=src, dst="fd00:10::1")
        for port in (22, 53, 80, 81, 443, 8080, 8081):
            add(v6, TCP(sport=sport, dport=port, flags="S"))
            add(v6, UDP(sport=sport, dport=port))
        add(v6, ICMPv6EchoRequest(id=salt))
    return out


def arrivals(lab, packets: dict) -> set[str]:
    rx = lab.popen("gw", [sys.executable, "-c", RECEIVER, "4"], stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    lab.send("client", list(packets.values()), iface="client0")
    out, _ = rx.communicate(timeout=30)
    return set(json.loads(out.strip().splitlines()[-1]))


def load_original(lab, kind: str, files: list[Path], ipset: Path | None) -> None:
    if kind == "nft":
        lab.run("gw", ["nft", "-f", "-"], input=files[0].read_text())
        return
    if ipset is not None:
        # the kernel here has no ip_set: the set is expanded into plain rules for the reference
        text = files[0].read_text()
        nets = [ln.split()[2] for ln in ipset.read_text().splitlines() if ln.startswith("add")]
        lines = []
        for ln in text.splitlines():
            if "--match-set" in ln:
                lines += [ln.replace("-m set --match-set blocked src", f"-s {n}") for n in nets]
            else:
                lines.append(ln)
        files = [files[0].with_suffix(".tmp")] + files[1:]
        files[0].write_text("\n".join(lines) + "\n")
    for f in files:
        family = 6 if "ip6tables" in f.read_text()[:200] else 4
        lab.run("gw", ["ip6tables-restore" if family == 6 else "iptables-restore"],
                input=f.read_text())
    if ipset is not None:
        files[0].unlink()


def flush_original(lab) -> None:
    lab.run("gw", ["iptables-restore"], input=FLUSH_IPT, check=False)
    lab.run("gw", ["ip6tables-restore"], input=FLUSH_IPT, check=False)
    lab.run("gw", ["nft", "flush", "ruleset"], check=False)


RULESETS = {
    "host-firewall": ("iptables", ["host.v4", "host.v6"], None),
    "router-chains-ipset": ("iptables", ["router.v4"], "router.ipset"),
    "nft-reject-negation": ("nft", ["edge.nft"], None),
}


@pytest.fixture(scope="module")
def lab(own_lab):
    # spoofed sources must reach the INPUT hook: no reverse-path filter in this lab's gw
    own_lab.run("gw", ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
                       "net.ipv4.conf.gw0.rp_filter=0"])
    own_lab.run("gw", ["ip", "-6", "route", "add", "fd00:99::/64", "via", "fd00:10::2"])
    own_lab.run("gw", ["ip", "route", "add", "default", "via", "10.10.0.2"])
    return own_lab


@pytest.mark.parametrize("case", sorted(RULESETS))
def test_imported_policy_lets_the_same_probes_arrive(case, lab, tmp_path):
    kind, names, ipset = RULESETS[case]
    files = [CASES / n for n in names]
    packets = probes(sorted(RULESETS).index(case) + 1)

    load_original(lab, kind, files, CASES / ipset if ipset else None)
    try:
        expected = arrivals(lab, packets)
    finally:
        flush_original(lab)

    policy = tmp_path / "imported.yaml"
    cmd = [NETBPF, "import", kind, *map(str, files), "-i", "gw0", "-o", str(policy)]
    if ipset:
        cmd += ["--ipset", str(CASES / ipset)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    try:
        netbpf(lab, "apply", str(policy))
        got = arrivals(lab, packets)
    finally:
        netbpf(lab, "detach", "gw0", check=False)

    assert 0 < len(expected) < len(packets), "the probes must hit both sides of the rules"
    diff = sorted(expected ^ got)
    described = [f"{m}: {packets[m].payload.summary()} arrived under "
                 f"{'the original only' if m in expected else 'netbpf only'}" for m in diff]
    assert not diff, "\n".join(described)
