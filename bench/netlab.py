"""The benchmark's own throwaway topology and the commands it runs in it. Not netbpf's lab
(netbpf/lab/): this one is two namespaces and a veth, made and torn down by every run.

    nbbench-tx                          nbbench-rx
    +------------------------+         +------------------------+
    | tx0 10.199.0.1/24      |=========| rx0 10.199.0.2/24      |
    | 02:00:00:00:00:01      |  veth   | 02:00:00:00:00:02      |
    | trafgen sends here     |         | XDP / iptables / nft   |
    +------------------------+         +------------------------+
    nbbench-xf: xf0 (== xf1), only to host xdp-filter for the per-packet figures
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# overridable, so developers sharing a machine can each run a bench without touching another's
PREFIX = os.environ.get("NETBPF_BENCH_NS_PREFIX", "nbbench-")
TX_NS, RX_NS, XF_NS = f"{PREFIX}tx", f"{PREFIX}rx", f"{PREFIX}xf"
TX_IF, RX_IF = "tx0", "rx0"
TX_MAC, RX_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
TX_IP, RX_IP = "10.199.0.1", "10.199.0.2"
XF_IF, XF_PEER = "xf0", "xf1"


def netbpf_cmd() -> list[str]:
    """The netbpf CLI of this interpreter's venv (what `make bench` installed)."""
    exe = Path(sys.executable).with_name("netbpf")
    return [str(exe)] if exe.exists() else [shutil.which("netbpf") or "netbpf"]


def sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-800:]}")
    return p


def in_ns(ns: str, *cmd: str, check: bool = True, input: str | None = None):
    """iptables, nft, trafgen: `ip netns exec` is right for them (they need no bpffs)."""
    return sh("ip", "netns", "exec", ns, *cmd, check=check, input=input)


def in_netns_only(ns: str, *cmd: str, env: dict | None = None, check: bool = True):
    """xdp-filter pins maps: enter only the network namespace so /sys/fs/bpf stays the root
    bpffs (`ip netns exec` remounts /sys and the pins would vanish with the command)."""
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *cmd], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-800:]}")
    return p


def our_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(PREFIX)]


def up(only_pair: bool = False) -> None:
    """Fresh namespaces and veths (leftovers torn down first). only_pair: just tx/rx, for a
    clean receiver per live point; nbbench-xf is left as it is."""
    if only_pair:
        for ns in (TX_NS, RX_NS):
            if ns in our_namespaces():
                sh("ip", "netns", "del", ns)
    else:
        down()
    for ns in (TX_NS, RX_NS) if only_pair else (TX_NS, RX_NS, XF_NS):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", TX_IF, "netns", TX_NS, "address", TX_MAC, "type", "veth",
       "peer", "name", RX_IF, "netns", RX_NS, "address", RX_MAC)
    sh("ip", "-n", TX_NS, "addr", "add", f"{TX_IP}/24", "dev", TX_IF)
    sh("ip", "-n", RX_NS, "addr", "add", f"{RX_IP}/24", "dev", RX_IF)
    links = [(TX_NS, (TX_IF, "lo")), (RX_NS, (RX_IF, "lo"))]
    if not only_pair:
        sh("ip", "-n", XF_NS, "link", "add", XF_IF, "type", "veth", "peer", "name", XF_PEER)
        links.append((XF_NS, (XF_IF, XF_PEER, "lo")))
    for ns, ifs in links:
        for i in ifs:
            sh("ip", "-n", ns, "link", "set", i, "up")


def detach_netbpf(ns: str, ifname: str) -> None:
    """netbpf's own detach: removes its program and its pins, and nothing else."""
    sh(*netbpf_cmd(), "-n", ns, "detach", ifname, check=False)


def down() -> None:
    """Remove everything a run (even an interrupted one) made: netbpf pins first (they live
    in the root bpffs and outlive the namespace), then xdp-filter's, then the namespaces,
    which take their veths, iptables rules and nft tables with them."""
    names = our_namespaces()
    if RX_NS in names:
        detach_netbpf(RX_NS, RX_IF)
    if XF_NS in names:
        in_netns_only(XF_NS, "xdp-filter", "unload", XF_IF, check=False)
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)


def ifindex(ns: str, ifname: str) -> int:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", ifname).stdout)[0]["ifindex"]


def link_stats(ns: str, ifname: str) -> dict:
    """The interface's stats64 (rx/tx packets, drops) as the kernel counts them."""
    out = sh("ip", "-n", ns, "-j", "-s", "link", "show", "dev", ifname).stdout
    return json.loads(out)[0]["stats64"]


def rx_packets(ns: str = RX_NS, ifname: str = RX_IF) -> int:
    return int(link_stats(ns, ifname)["rx"]["packets"])


def xdp_prog_id(ns: str, ifname: str) -> int | None:
    info = json.loads(sh("ip", "-n", ns, "-j", "-d", "link", "show", "dev", ifname).stdout)[0]
    xdp = info.get("xdp") or {}
    prog = xdp.get("prog") or {}
    if prog.get("id"):
        return int(prog["id"])
    for att in xdp.get("attached", []):
        if att.get("prog", {}).get("id"):
            return int(att["prog"]["id"])
    return None
