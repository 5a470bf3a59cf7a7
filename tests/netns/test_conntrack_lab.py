"""TC egress rules, connection tracking and coexistence, with real sockets in the lab.

    [client] client0 ------------------------------- gw0 [gw]
             10.10.0.2                                10.10.0.1
             servers: TCP 7000 echo, UDP 7001 echo,   XDP ingress: default drop
             UDP 7003 late echo (after 3 s)           TC egress: no-udp-5000, conntrack on
                                                      (udp timeout 1.5 s)

"Deny inbound, allow established": the gateway may start connections; only their replies
come back in.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

USER_PROG = Path(__file__).parent / "progs" / "user_counter.bpf.c"

from netbpf_cli import netbpf

POLICY = """\
version: 1
interfaces:
  gw0:
    xdp: {mode: native}
    conntrack: {timeouts: {udp: 1.5}}
    ingress:
      default: drop
      rules:
        - {name: allow-ping, proto: icmp, icmp_type: echo-request, action: allow}
    egress:
      default: allow
      rules:
        - {name: no-udp-5000, proto: udp, dport: 5000, action: drop}
"""

SERVERS = textwrap.dedent("""
    import socket, threading, time
    def tcp_echo():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 7000)); s.listen(16)
        while True:
            c, _ = s.accept()
            data = c.recv(1024); c.sendall(b"echo:" + data); c.close()
    def udp_echo(port, delay):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
        while True:
            data, peer = s.recvfrom(1024); time.sleep(delay); s.sendto(b"echo:" + data, peer)
    for target, args in ((tcp_echo, ()), (udp_echo, (7001, 0)), (udp_echo, (7003, 3.0)),
                         (udp_echo, (5001, 0))):
        threading.Thread(target=target, args=args, daemon=True).start()
    print("ready", flush=True)
    time.sleep(3600)
""")


@pytest.fixture(scope="module")
def gw(two_hosts, tmp_path_factory):
    lab = two_hosts
    server = lab.popen("client", [sys.executable, "-c", SERVERS], stdout=subprocess.PIPE,
                       text=True)
    assert server.stdout.readline().strip() == "ready"
    policy = tmp_path_factory.mktemp("ct") / "ct.yaml"
    policy.write_text(POLICY)
    try:
        netbpf(lab, "apply", str(policy))
        yield lab
    finally:
        netbpf(lab, "detach", "gw0", check=False)
        server.kill()
        server.wait()


def tcp_roundtrip(addr: str, port: int, timeout: float = 2.0) -> bytes:
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.sendall(b"hello")
        return s.recv(1024)


def udp_roundtrip(addr: str, port: int, wait: float) -> bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(wait)
    try:
        s.sendto(b"ping", (addr, port))
        return s.recvfrom(1024)[0]
    except (socket.timeout, OSError):
        return None
    finally:
        s.close()


def stats(lab) -> dict:
    return json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)


def test_tcp_connection_from_gateway_works_end_to_end(gw):
    client = gw.addr("client", "client0")
    assert gw.call("gw", tcp_roundtrip, client, 7000) == b"echo:hello"
    s = stats(gw)
    assert s["conntrack"]["entries"] >= 1
    assert s["parts"]["ingress"]["totals"]["conntrack_reply"]["packets"] >= 2  # SYN-ACK, data, FIN


def test_unsolicited_inbound_syn_is_dropped(gw):
    listener = gw.popen("gw", [sys.executable, "-c", textwrap.dedent("""
        import socket, time
        s = socket.socket(); s.bind(("0.0.0.0", 7100)); s.listen(4); print("ready", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        before = stats(gw)["parts"]["ingress"]["totals"]["default"]["packets"]
        with pytest.raises(OSError):
            gw.call("client", tcp_roundtrip, gw.addr("gw", "gw0"), 7100, 1.0)
        assert stats(gw)["parts"]["ingress"]["totals"]["default"]["packets"] > before
    finally:
        listener.kill()
        listener.wait()


def test_udp_request_response_works(gw):
    assert gw.call("gw", udp_roundtrip, gw.addr("client", "client0"), 7001, 2.0) == b"echo:ping"


def test_late_udp_reply_after_timeout_is_dropped(gw):
    # the server answers after 3 s; the policy's udp timeout is 1.5 s
    assert gw.call("gw", udp_roundtrip, gw.addr("client", "client0"), 7003, 5.0) is None
    assert gw.call("gw", udp_roundtrip, gw.addr("client", "client0"), 7001, 2.0) == b"echo:ping"


def test_egress_rule_blocks_udp_to_one_port_not_another(gw):
    client = gw.addr("client", "client0")
    assert gw.call("gw", udp_roundtrip, client, 5001, 2.0) == b"echo:ping"
    with gw.capture("client", "client0", filter="udp dst port 5000", timeout=2.0) as cap:
        assert gw.call("gw", udp_roundtrip, client, 5000, 0.5) is None
        cap.wait(timeout=0.5)
    assert cap.packets == []
    eg = {r["name"]: r["packets"] for r in stats(gw)["parts"]["egress"]["rules"]}
    assert eg["no-udp-5000"] >= 1


def test_inbound_flood_cannot_fill_the_conntrack_table(gw):
    """Only egress creates entries: 3,000 unsolicited datagrams from distinct ports add none,
    and a connection started from the gateway still works right after."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    before = stats(gw)["conntrack"]
    assert before["capacity"] == 65536
    frame = Ether(src=gw.mac("client", "client0"), dst=gw.mac("gw", "gw0")) / \
        IP(src=gw.addr("client", "client0"), dst=gw.addr("gw", "gw0"))
    gw.send("client", [frame / UDP(sport=20000 + i, dport=6000 + i % 100) for i in range(3000)])
    after = stats(gw)
    assert after["conntrack"]["entries"] <= before["entries"] + 2   # our own traffic only
    assert after["parts"]["ingress"]["totals"]["drop"]["packets"] >= 3000
    assert gw.call("gw", tcp_roundtrip, gw.addr("client", "client0"), 7000) == b"echo:hello"


# ---- a user's own clsact filter lives beside netbpf's ----

def _user_filter_count(lab) -> int:
    out = lab.run("gw", ["tc", "-j", "filter", "show", "dev", "gw0", "egress"]).stdout
    ids = [f["options"]["prog"]["id"] for f in json.loads(out)
           if f.get("kind") == "bpf" and f.get("options", {}).get("bpf_name", "").startswith(
               "user_counter")]
    assert len(ids) == 1, out
    prog = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(ids[0])],
                                     capture_output=True, text=True, check=True).stdout)
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id",
                                      str(prog["map_ids"][0])],
                                     capture_output=True, text=True, check=True).stdout)
    return int(dump[0]["value"]) if isinstance(dump[0]["value"], int) else \
        int.from_bytes(bytes(int(b, 16) for b in dump[0]["value"]), "little")


def _send_udp(lab, n: int) -> None:
    lab.call("gw", lambda: [udp_roundtrip(lab.addr("client", "client0"), 5001, 0.2)
                            for _ in range(n)])


def test_user_filter_keeps_counting_after_apply_and_detach(make_lab, tmp_path):
    lab = make_lab("two-hosts")
    obj = tmp_path / "user_counter.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
                    "-c", str(USER_PROG), "-o", str(obj)], check=True)
    lab.run("gw", ["tc", "qdisc", "add", "dev", "gw0", "clsact"])
    lab.run("gw", ["tc", "filter", "add", "dev", "gw0", "egress", "prio", "10", "handle", "1",
                   "bpf", "da", "obj", str(obj), "sec", "tc"])
    _send_udp(lab, 3)
    c0 = _user_filter_count(lab)
    assert c0 >= 3
    policy = tmp_path / "ct.yaml"
    policy.write_text(POLICY)
    netbpf(lab, "apply", str(policy))
    try:
        _send_udp(lab, 3)
        c1 = _user_filter_count(lab)
        assert c1 >= c0 + 3
        eg = stats(lab)["parts"]["egress"]["totals"]["pass"]["packets"]
        assert eg >= 3  # both filters saw the packets: theirs first (prio 10), then ours
    finally:
        netbpf(lab, "detach", "gw0")
    _send_udp(lab, 3)
    assert _user_filter_count(lab) >= c1 + 3
    qdiscs = lab.run("gw", ["tc", "qdisc", "show", "dev", "gw0"]).stdout
    assert "clsact" in qdiscs  # not ours to remove: the user created it


# A user's own TCX program appended after netbpf's: it runs only because netbpf's program
# returns TCX_NEXT (TC_ACT_UNSPEC) when it has no verdict (here: allowed, counted).
USER_TCX = """\
#include <uapi/linux/bpf.h>
BPF_ARRAY(user_tcx_cnt, u64, 1);
int user_tcx(struct __sk_buff *skb)
{
    int k = 0;
    u64 *v = user_tcx_cnt.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return -1;
}
"""


def test_user_tcx_program_after_netbpf_keeps_seeing_packets(make_lab, tmp_path):
    from netbpf.kernel import bpfsys, link
    from netbpf.kernel.loader import load_program

    lab = make_lab("two-hosts")
    ns = lab.ns("gw")
    policy = tmp_path / "ct.yaml"
    policy.write_text(POLICY)
    netbpf(lab, "apply", str(policy))
    src = tmp_path / "user_tcx.bpf.c"
    src.write_text(USER_TCX)
    loaded = load_program(src, {}, {"user_tcx": "sched_cls"})
    fd, _ = link.create_link(loaded.prog_fd("user_tcx"), "gw0", "egress", netns=ns)
    try:
        ours = stats(lab)["parts"]["egress"]["prog_id"]
        assert link.tcx_prog_ids("gw0", "egress", netns=ns) == [ours, loaded.prog_id("user_tcx")]
        _send_udp(lab, 3)
        raw = bpfsys.map_lookup(loaded.maps["user_tcx_cnt"].fd, bytes(4), 8)
        assert int.from_bytes(raw, "little") >= 3
        assert stats(lab)["parts"]["egress"]["totals"]["pass"]["packets"] >= 3
    finally:
        fd.close()
        loaded.close()
        netbpf(lab, "detach", "gw0", check=False)


# ---- the same firewall on the clsact ingress hook instead of XDP ----

TC_HOOK_POLICY = POLICY.replace("    ingress:\n      default: drop", "    ingress:\n      hook: tc\n      default: drop")


def tcx_names(lab, direction: str) -> list[str]:
    """Names of the programs on gw0's TCX hook, in the order they run."""
    from netbpf.kernel import bpfsys, link

    names = []
    for pid in link.tcx_prog_ids("gw0", direction, netns=lab.ns("gw")):
        with bpfsys.prog_get_fd_by_id(pid) as fd:
            names.append(bpfsys.prog_info(fd).name)
    return names


def test_tc_ingress_hook_enforces_rules_and_conntrack_then_yields_to_xdp(make_lab, tmp_path):
    lab = make_lab("two-hosts")
    server = lab.popen("client", [sys.executable, "-c", SERVERS], stdout=subprocess.PIPE,
                       text=True)
    assert server.stdout.readline().strip() == "ready"
    policy = tmp_path / "tc.yaml"
    policy.write_text(TC_HOOK_POLICY)
    try:
        out = netbpf(lab, "apply", str(policy)).stdout
        assert "nb_fw_tc_in" in out and "on tc ingress" in out
        assert "nb_fw_tc_in" in tcx_names(lab, "ingress")     # a TCX link, no clsact
        assert lab.run("gw", ["ip", "link", "show", "gw0"]).stdout.count("xdp") == 0
        client = lab.addr("client", "client0")
        assert lab.call("gw", tcp_roundtrip, client, 7000) == b"echo:hello"   # conntrack
        assert lab.ping("client", lab.addr("gw", "gw0"))                     # allow-ping
        with pytest.raises(OSError):                                         # default drop
            lab.call("client", tcp_roundtrip, lab.addr("gw", "gw0"), 7100, 1.0)
        policy.write_text(POLICY)
        assert "ingress hook tc -> xdp" in netbpf(lab, "apply", str(policy)).stdout
        assert tcx_names(lab, "ingress") == []
        assert lab.call("gw", tcp_roundtrip, client, 7000) == b"echo:hello"
    finally:
        netbpf(lab, "detach", "gw0", check=False)
        server.kill()
        server.wait()
