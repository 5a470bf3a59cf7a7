"""The XDP firewall on a real interface: `netbpf apply` to the gateway, Scapy from the client.

    [client] client0 ------------------ gw0 [gw]
             10.10.0.2, fd00:10::2      10.10.0.1, fd00:10::1
                                        ^ XDP firewall (netbpf -n <gw> apply)

Allowed packets arrive, dropped ones do not, and each rule's counter equals what was sent to it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Raw


from netbpf.store.state import PIN_ROOT
from netbpf_cli import netbpf

POLICY = """\
version: 1
sets:
  blocklist: [192.0.2.0/24, "2001:db8:bad::/48"]
interfaces:
  gw0:
    xdp: {{mode: {mode}}}
    ingress:
      default: allow
      rules:
        - {{name: drop-blocklist, src: "@blocklist", action: drop}}
        - {{name: drop-udp-9999, proto: udp, dport: 9999, action: drop}}
        - {{name: count-web, proto: tcp, dport: 80, action: count}}
        - {{name: no-ping6, proto: icmpv6, icmp_type: echo-request, action: drop}}
        - {{name: allow-udp-9998, proto: udp, dport: 9998, action: allow}}
"""


@pytest.fixture(params=["native", "generic"])
def firewall(request, two_hosts, tmp_path):
    policy = tmp_path / "fw.yaml"
    policy.write_text(POLICY.format(mode=request.param))
    try:
        out = netbpf(two_hosts, "apply", str(policy))
        assert f"in {request.param} mode" in out.stdout
        yield two_hosts
    finally:
        netbpf(two_hosts, "detach", "gw0", check=False)


def stats(lab) -> dict:
    return json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)


def arrived(lab, packets, marker: bytes) -> int:
    got = lab.send_and_capture("client", packets, "gw", "gw0", timeout=2.0, marker=marker)
    return len(got)


def test_allowed_arrive_dropped_do_not_and_counters_match(firewall):
    lab = firewall
    gw4, gw6 = lab.addr("gw", "gw0", 4), lab.addr("gw", "gw0", 6)
    sent = {
        "drop-udp-9999": [IP(dst=gw4) / UDP(dport=9999) / Raw(b"m-9999")] * 5,
        "allow-udp-9998": [IP(dst=gw4) / UDP(dport=9998) / Raw(b"m-9998")] * 7,
        "count-web": [IP(dst=gw4) / TCP(dport=80, flags="S") / Raw(b"m-web")] * 4,
        "drop-blocklist": [IP(src="192.0.2.9", dst=gw4) / UDP(dport=9998) / Raw(b"m-bl")] * 3,
        "no-ping6": [IPv6(dst=gw6) / ICMPv6EchoRequest(data=b"m-ping6")] * 2,
    }
    assert arrived(lab, sent["drop-udp-9999"], b"m-9999") == 0
    assert arrived(lab, sent["allow-udp-9998"], b"m-9998") == 7
    assert arrived(lab, sent["count-web"], b"m-web") == 4
    assert arrived(lab, sent["drop-blocklist"], b"m-bl") == 0
    assert arrived(lab, sent["no-ping6"], b"m-ping6") == 0
    assert lab.ping("client", gw4)  # ICMPv4 is not matched: passes

    s = stats(lab)
    counted = {r["name"]: r["packets"] for r in s["rules"]}
    assert counted == {name: len(pkts) for name, pkts in sent.items()}
    assert s["health"] == "ok" and s["parts"]["ingress"]["totals"]["drop"]["packets"] >= 10


def test_reapply_changes_rules_without_replacing_program(firewall, tmp_path):
    lab = firewall
    before = stats(lab)
    changed = tmp_path / "fw2.yaml"
    changed.write_text(POLICY.format(mode=before["parts"]["ingress"]["mode"])
                       .replace("dport: 9999, action: drop", "dport: 9997, action: drop"))
    out = netbpf(lab, "apply", str(changed))
    assert "update maps only" in out.stdout
    gw4 = lab.addr("gw", "gw0", 4)
    assert arrived(lab, [IP(dst=gw4) / UDP(dport=9999) / Raw(b"m-now-ok")] * 3, b"m-now-ok") == 3
    assert arrived(lab, [IP(dst=gw4) / UDP(dport=9997) / Raw(b"m-now-bad")] * 3, b"m-now-bad") == 0
    after = stats(lab)
    assert after["parts"]["ingress"]["prog_id"] == before["parts"]["ingress"]["prog_id"]
    assert after["parts"]["ingress"]["generation"] != before["parts"]["ingress"]["generation"]
    again = netbpf(lab, "apply", str(changed))
    assert "nothing to do" in again.stdout


def test_detach_removes_program_and_pins(two_hosts, tmp_path):
    policy = tmp_path / "fw.yaml"
    policy.write_text(POLICY.format(mode="native"))
    netbpf(two_hosts, "apply", str(policy))
    netbpf(two_hosts, "detach", "gw0")
    link = two_hosts.run("gw", ["ip", "link", "show", "gw0"]).stdout
    assert "xdp" not in link
    assert not list(PIN_ROOT.glob(f"{two_hosts.ns('gw')}:*"))
    gone = netbpf(two_hosts, "stats", "gw0", check=False)
    assert gone.returncode == 1 and "not managed by netbpf" in gone.stderr


def test_counters_of_unchanged_rules_survive_a_reapply(two_hosts, tmp_path):
    """Adding a rule (even one that needs a new program) must not zero the others' counts."""
    lab = two_hosts
    policy = tmp_path / "fw.yaml"
    policy.write_text(POLICY.format(mode="native"))
    netbpf(lab, "apply", str(policy))
    try:
        gw4 = lab.addr("gw", "gw0", 4)
        assert arrived(lab, [IP(dst=gw4) / UDP(dport=9999) / Raw(b"m-keep")] * 6, b"m-keep") == 0
        grown = POLICY.format(mode="native") + \
            "        - {name: new-tcp-flags, proto: tcp, tcp_flags: \"syn,!ack\", dport: 7, action: drop}\n"
        policy.write_text(grown)
        out = netbpf(lab, "apply", str(policy)).stdout
        assert "+ new-tcp-flags" in out and "load programs" in out   # a new field: new program
        counted = {r["name"]: r["packets"] for r in stats(lab)["rules"]}
        assert counted["drop-udp-9999"] == 6 and counted["new-tcp-flags"] == 0
    finally:
        netbpf(lab, "detach", "gw0", check=False)
