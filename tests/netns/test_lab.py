"""The netns lab itself: topologies come up as drawn, traffic crosses them, teardown always happens.

    two-hosts:  [client] client0 ---- gw0 [gw]
                         10.10.0.2    10.10.0.1
                         fd00:10::2   fd00:10::1

    lb:         [client] client0 ---- lb0 [lb] br-be ---- lb-b1 -- eth0 [b1] 10.21.0.11
                         10.20.0.2    10.20.0.1  10.21.0.1  \\- lb-b2 -- eth0 [b2] 10.21.0.12
                                     (forwarding on)         \\- lb-b3 -- eth0 [b3] 10.21.0.13
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netbpf.lab import Lab, LabError, RemoteTraceback, TopologyError, cleanup, list_netns, parse_topology
from netbpf.lab.registry import STATE_DIR as LAB_RECORDS
from netbpf.lab.registry import forget, watched_prefixes
from netbpf.lab.topology import TOPOLOGY_DIR

NETBPF = os.path.join(os.path.dirname(sys.executable), "netbpf")


def ours(lab: Lab) -> list[str]:
    return [n for n in list_netns() if n.startswith(lab.prefix)]


# -- topologies as drawn ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_client_pings_gw(two_hosts, family):
    assert two_hosts.ping("client", two_hosts.addr("gw", "gw0", family))
    assert two_hosts.ping("gw", two_hosts.addr("client", "client0", family))


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["b1", "b2", "b3"])
def test_client_reaches_each_backend_through_lb(lb_lab, backend, family):
    assert lb_lab.ping("client", lb_lab.addr(backend, "eth0", family))


def test_lb_routes_between_subnets_and_rewrites_macs(lb_lab):
    from scapy.layers.inet import IP, UDP

    pkt = IP(dst=lb_lab.addr("b2", "eth0")) / UDP(sport=40000, dport=9) / b"via-lb"
    got = lb_lab.send_and_capture("client", pkt, "b2", "eth0")
    assert len(got) == 1
    assert got[0]["IP"].src == lb_lab.addr("client", "client0")
    assert got[0]["IP"].ttl == 63  # one routed hop
    assert got[0].src == lb_lab.mac("lb", "br-be")


def test_accessors_match_the_kernel(two_hosts):
    assert two_hosts.ns("gw") == f"{two_hosts.prefix}gw"
    assert two_hosts.addr("gw", "gw0") == "10.10.0.1"
    assert two_hosts.addr("gw", "gw0", family=6) == "fd00:10::1"
    assert two_hosts.network("client", "client0") == "10.10.0.0/24"
    link = json.loads(two_hosts.run("gw", ["ip", "-j", "addr", "show", "dev", "gw0"]).stdout)[0]
    assert link["address"] == two_hosts.mac("gw", "gw0") == "02:00:00:00:00:01"
    assert link["ifindex"] == two_hosts.ifindex("gw", "gw0")
    assert {a["local"] for a in link["addr_info"] if a["scope"] == "global"} == {"10.10.0.1", "fd00:10::1"}
    with pytest.raises(KeyError, match="no interface 'eth9'"):
        two_hosts.addr("gw", "eth9")


def test_lab_names_are_prefixed_and_interface_names_are_plain(two_hosts):
    # nb<6 hex>p<owner pid>-: the owner is known to every user of the machine
    assert two_hosts.prefix == f"{two_hosts.prefix[:8]}p{os.getpid()}-"
    assert two_hosts.prefix.startswith("nb")
    assert set(ours(two_hosts)) == {f"{two_hosts.prefix}client", f"{two_hosts.prefix}gw"}
    names = two_hosts.run("client", ["ip", "-br", "link"]).stdout.split()
    assert "client0@if2" in names or any(n.startswith("client0") for n in names)


# -- traffic ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_scapy_udp_from_client_arrives_on_gw_with_payload_intact(two_hosts, family):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    l3 = IP if family == 4 else IPv6
    payload = b"hello-netbpf-" + secrets.token_hex(4).encode()
    pkt = l3(dst=two_hosts.addr("gw", "gw0", family)) / UDP(sport=40000, dport=9) / payload
    got = two_hosts.send_and_capture("client", pkt, "gw", "gw0", marker=payload)
    assert len(got) == 1
    assert bytes(got[0]["UDP"].payload) == payload
    assert got[0]["UDP"].dport == 9
    assert got[0].dst == two_hosts.mac("gw", "gw0")


def test_send_and_capture_appends_a_marker_when_none_is_given(two_hosts):
    from scapy.layers.inet import IP, UDP

    pkts = [IP(dst="10.10.0.1") / UDP(sport=40000 + i, dport=9) / (b"p%d" % i) for i in range(3)]
    got = two_hosts.send_and_capture("client", pkts, "gw", "gw0")
    assert sorted(p["UDP"].sport for p in got) == [40000, 40001, 40002]
    assert all(bytes(p["UDP"].payload).startswith(b"p") for p in got)


def test_ethernet_frames_are_sent_on_the_given_interface(two_hosts):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    frame = (Ether(src=two_hosts.mac("client", "client0"), dst=two_hosts.mac("gw", "gw0"))
             / IP(src="10.10.0.2", dst="10.10.0.1") / UDP(sport=40000, dport=9) / b"l2-frame")
    got = two_hosts.send_and_capture("client", frame, "gw", "gw0", iface="client0", marker=b"l2-frame")
    assert len(got) == 1 and got[0].src == "02:00:00:00:00:02"


def test_capture_direction_in_sees_requests_but_not_replies(two_hosts):
    with two_hosts.capture("gw", "gw0", "icmp", direction="in") as cap:
        assert two_hosts.ping("client", "10.10.0.1")
    kinds = [p["ICMP"].type for p in cap.packets]
    assert kinds == [8]
    with two_hosts.capture("gw", "gw0", "icmp", direction="both", count=2, timeout=3) as cap:
        assert two_hosts.ping("client", "10.10.0.1")
    assert sorted(p["ICMP"].type for p in cap.packets) == [0, 8]


def test_capture_returns_nothing_after_its_timeout_when_nothing_arrives(two_hosts):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    # addressed to a MAC nobody has, on the gw side: gw0 never sees it
    frame = Ether(dst="02:00:00:00:00:99") / IP(dst="10.10.0.1") / UDP(dport=9) / b"lost"
    got = two_hosts.send_and_capture("gw", frame, "gw", "gw0", iface="gw0", timeout=0.3)
    assert got == []


def test_ping_to_an_address_nobody_has_is_false(two_hosts):
    assert not two_hosts.ping("client", "10.10.0.77", timeout=0.3)


# -- running code inside ---------------------------------------------------------------------------

def _netns_view() -> dict:
    import socket

    mounts = open("/proc/self/mountinfo").read().splitlines()
    bpffs = any(line.split()[4] == "/sys/fs/bpf" and " - bpf " in line for line in mounts)
    return {"ifaces": sorted(n for _, n in socket.if_nameindex()), "root_bpffs": bpffs}


def test_call_runs_in_the_namespace_and_sees_its_interfaces(two_hosts):
    assert two_hosts.call("gw", _netns_view) == {"ifaces": ["gw0", "lo"], "root_bpffs": True}
    assert two_hosts.call("client", _netns_view)["ifaces"] == ["client0", "lo"]
    assert two_hosts.call("client", lambda a, b=0: a + b, 2, b=3) == 5


def test_call_reraises_with_the_remote_traceback(two_hosts):
    def boom():
        raise ValueError("bad value inside")

    with pytest.raises(ValueError, match="bad value inside") as info:
        two_hosts.call("gw", boom)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in boom" in info.value.__cause__.tb


def test_call_with_scapy_uses_the_namespace_routes(two_hosts):
    import scapy.all  # noqa: F401 - imported in the parent first, so the child must refresh its tables

    def route():
        from scapy.config import conf

        return conf.route.route("10.99.0.1")[0], conf.route6.route("fd00:99::1")[0]

    assert two_hosts.call("client", route) == ("client0", "client0")


def test_call_with_bcc_attaches_xdp_and_pins_in_the_root_bpffs(two_hosts):
    pin = f"/sys/fs/bpf/nbtest_{two_hosts.prefix.rstrip('-')}_cnt"

    def load_and_attach(pin: str) -> tuple[bool, bool]:
        import subprocess

        from bcc import BPF

        b = BPF(text=f"""
            BPF_TABLE_PINNED("array", u32, u64, nbtest_cnt, 1, "{pin}");
            int nbtest_xdp(struct xdp_md *ctx) {{ return XDP_PASS; }}
        """)
        b.attach_xdp("gw0", b.load_func("nbtest_xdp", BPF.XDP), BPF.XDP_FLAGS_SKB_MODE)
        try:
            shown = subprocess.run(["ip", "-j", "link", "show", "dev", "gw0"], capture_output=True, text=True)
            return "xdp" in shown.stdout, os.path.exists(pin)
        finally:
            b.remove_xdp("gw0", BPF.XDP_FLAGS_SKB_MODE)

    try:
        assert two_hosts.call("gw", load_and_attach, pin) == (True, True)
        assert os.path.exists(pin)  # pinned from inside the namespace, visible in the root bpffs
        assert "xdp" not in two_hosts.run("gw", ["ip", "link", "show", "dev", "gw0"]).stdout
    finally:
        if os.path.exists(pin):
            os.unlink(pin)


def test_run_raises_with_stderr_when_check_fails(two_hosts):
    with pytest.raises(LabError, match="nope0.*does not exist"):
        two_hosts.run("gw", ["ip", "link", "show", "dev", "nope0"])
    with pytest.raises(subprocess.CalledProcessError):
        two_hosts.run("gw", ["false"])
    assert two_hosts.run("gw", ["false"], check=False).returncode == 1


# -- life cycle ------------------------------------------------------------------------------------

def test_two_labs_at_once_do_not_collide(make_lab):
    a, b = make_lab("two-hosts"), make_lab("two-hosts")
    assert a.prefix != b.prefix
    assert len(ours(a)) == len(ours(b)) == 2
    assert a.ping("client", "10.10.0.1") and b.ping("client", "10.10.0.1")
    a.down()
    assert ours(a) == [] and len(ours(b)) == 2
    assert b.ping("client", "10.10.0.1")


def test_exception_inside_with_block_leaves_no_namespace():
    lab = Lab.from_file(TOPOLOGY_DIR / "two-hosts.yaml")
    with pytest.raises(RuntimeError, match="test failed here"):
        with lab:
            assert len(ours(lab)) == 2
            server = lab.popen("gw", ["sleep", "60"])
            raise RuntimeError("test failed here")
    assert ours(lab) == []
    assert server.poll() is not None  # the lab ended what it started
    assert not (LAB_RECORDS / f"{lab.prefix}.json").exists()


def test_failed_up_removes_what_it_created(tmp_path):
    bad = (TOPOLOGY_DIR / "two-hosts.yaml").read_text().replace("gw: {}", "gw: {sysctls: {net.ipv4.no_such_knob: 1}}")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    lab = Lab.from_file(path)
    with pytest.raises(LabError, match="no_such_knob"):
        lab.up()
    assert ours(lab) == []


def test_ctrl_c_during_up_removes_what_it_created(monkeypatch):
    import netbpf.lab.lab as lab_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_module, "ip_batch", interrupted)  # after the namespaces exist
    lab = Lab.from_file("two-hosts")
    with pytest.raises(KeyboardInterrupt):
        lab.up()
    assert ours(lab) == []
    assert not (LAB_RECORDS / f"{lab.prefix}.json").exists()


def test_killed_owner_is_cleaned_up_by_the_reaper():
    script = textwrap.dedent("""
        import time
        from netbpf.lab import Lab
        lab = Lab.from_file("two-hosts").up()
        lab.popen("gw", ["sleep", "60"])
        print(lab.prefix, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=str(TOPOLOGY_DIR.parent))
    prefix = proc.stdout.readline().strip()
    try:
        assert prefix and [n for n in list_netns() if n.startswith(prefix)]
        proc.send_signal(signal.SIGKILL)  # no atexit, no handler: only the reaper can clean up
        proc.wait()
        deadline = time.monotonic() + 10
        while [n for n in list_netns() if n.startswith(prefix)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [n for n in list_netns() if n.startswith(prefix)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            cleanup(prefix)


def test_cleanup_removes_namespaces_of_dead_runs_only(two_hosts):
    orphan = f"nb{secrets.token_hex(3)}-x"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        removed = cleanup()
        assert orphan in removed
        assert len(ours(two_hosts)) == 2  # a live run's lab stays
    finally:
        if orphan in list_netns():
            subprocess.run(["ip", "netns", "del", orphan])


def test_cleanup_keeps_a_live_run_whose_record_is_in_another_state_dir(make_lab):
    """Another checkout's tests (their own NETBPF_LAB_STATE_DIR) run labs with random prefixes:
    their reaper is alive, so they are not leftovers even without a record here."""
    lab = make_lab("two-hosts")
    forget(lab.prefix)                 # as seen from a run whose state dir lacks the record
    assert lab.prefix in watched_prefixes()
    assert not set(lab.namespaces) & set(cleanup())
    assert set(lab.namespaces) <= set(list_netns())


# -- CLI -------------------------------------------------------------------------------------------

def netbpf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NETBPF, *args], capture_output=True, text=True, timeout=60,
                          cwd=str(TOPOLOGY_DIR.parent))


def test_cli_lab_up_list_down_round_trip():
    prefix = f"t{secrets.token_hex(3)}-"
    try:
        up = netbpf("lab", "up", "netns-lab/two-hosts.yaml", "--prefix", prefix)
        assert up.returncode == 0, up.stderr
        assert f"{prefix}gw" in up.stdout and "10.10.0.1/24" in up.stdout
        assert {f"{prefix}client", f"{prefix}gw"} <= set(list_netns())
        ping = subprocess.run(["ip", "netns", "exec", f"{prefix}client", "ping", "-c1", "-W2", "10.10.0.1"],
                              capture_output=True)
        assert ping.returncode == 0
        again = netbpf("lab", "up", "netns-lab/two-hosts.yaml", "--prefix", prefix)
        assert again.returncode == 1 and "already up" in again.stderr
        listed = json.loads(netbpf("lab", "list", "--json").stdout)
        assert any(item["prefix"] == prefix and item["owner"] == "lab up" for item in listed["labs"])
        down = netbpf("lab", "down", "netns-lab/two-hosts.yaml", "--prefix", prefix)
        assert down.returncode == 0, down.stderr
        assert f"removed netns {prefix}gw" in down.stdout
        assert not [n for n in list_netns() if n.startswith(prefix)]
    finally:
        netbpf("lab", "down", "--prefix", prefix)


def test_cli_bad_topology_exits_2_with_positions(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nodes:\n  a: {}\nlinks:\n  - a: {name: a0, addresses: [10.0.0.1]}\n")
    out = netbpf("lab", "up", str(path))
    assert out.returncode == 2
    assert f"{path}:4:" in out.stderr and "needs a prefix length" in out.stderr
    assert netbpf("lab", "up", "no-such-topology").returncode == 2


def test_topology_errors_point_into_the_file():
    text = textwrap.dedent("""\
        nodes:
          a:
            routes: [{to: default, via: 10.9.9.9}]
            sysctls: {kernel.panic: 1}
          b: {}
        links:
          - a: {name: a0, mac: "02:00:00:00:00:01", addresses: [10.0.0.1/24]}
            b: {name: b0-name-too-long-x}
          - a: {name: a1, mac: "02:00:00:00:00:01"}
            b: {name: b1}
        """)
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "t.yaml")
    errors = info.value.errors
    assert any(e.startswith("t.yaml:3:") and "not in any subnet" in e for e in errors)
    assert any(e.startswith("t.yaml:4:") and "net.*" in e for e in errors)
    assert any(e.startswith("t.yaml:8:") and "1-15 characters" in e for e in errors)
    assert any("02:00:00:00:00:01 is also used" in e for e in errors)


def test_lab_list_as_an_unprivileged_user_shows_a_live_lab_as_live(tmp_path):
    """`netbpf lab up` runs with umask 077; its record must still read as a live lab (owner
    'lab up', its namespaces) for a user without root, not as a dead leftover."""
    import json as _json
    import secrets

    from netbpf_cli import NETBPF

    import shutil
    import tempfile

    prefix = f"nbu{secrets.token_hex(2)}-"
    # a lab state directory every user can reach (the test's own roots are root-only)
    state = Path(tempfile.mkdtemp(prefix="netbpf-labtest-"))
    state.chmod(0o755)
    env = {**os.environ, "NETBPF_LAB_STATE_DIR": str(state / "lab")}
    up = subprocess.run([NETBPF, "lab", "up", "two-hosts", "--prefix", prefix],
                        capture_output=True, text=True, timeout=120, env=env)
    try:
        assert up.returncode == 0, up.stderr
        r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                            "--clear-groups", "--inh-caps=-all", NETBPF, "lab", "list", "-j"],
                           capture_output=True, text=True, timeout=60, cwd="/", env=env)
        assert r.returncode == 0, r.stderr
        doc = _json.loads(r.stdout)
        ours = [lab for lab in doc["labs"] if lab["prefix"] == prefix]
        assert ours and ours[0]["owner"] == "lab up", doc
        assert sorted(ours[0]["namespaces"]) == [f"{prefix}client", f"{prefix}gw"]
        assert not any(n.startswith(prefix) for n in doc["leftovers"])
    finally:
        subprocess.run([NETBPF, "lab", "down", "two-hosts", "--prefix", prefix],
                       capture_output=True, text=True, timeout=120, env=env)
        shutil.rmtree(state, ignore_errors=True)


def test_a_live_runs_lab_is_no_leftover_even_without_its_record(two_hosts, monkeypatch,
                                                                 tmp_path):
    """Another user of the machine, with another lab state directory, sees our lab's
    namespaces but not its record: the pid in the prefix says its owner is alive."""
    from netbpf.lab import registry as state
    monkeypatch.setattr(state, "STATE_DIR", tmp_path / "other-lab-state")
    # orphans() only (read-only): cleanup() here would remove other runs' old-style labs
    assert not any(n.startswith(two_hosts.prefix) for n in state.orphans())
    assert two_hosts.ns("gw") in state.list_netns()
