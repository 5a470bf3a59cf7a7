"""Sampled packet events from the firewall's ring buffer, read by `netbpf events`.

    [client] client0 ------------------ gw0 [gw]
             10.10.0.2                   10.10.0.1   XDP firewall, drop-udp-9999 sampled 1:1
"""
from __future__ import annotations

import json
import subprocess
import time

from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from netbpf.store.state import STATE_ROOT

from netbpf_cli import NETBPF

POLICY = """\
version: 1
interfaces:
  gw0:
    xdp: {mode: native}
    ingress:
      default: allow
      rules:
        - {name: drop-udp-9999, proto: udp, dport: 9999, action: drop, sample: 1}
        - {name: allow-udp-9998, proto: udp, dport: 9998, action: allow}
"""


def test_ten_packets_to_a_sampled_drop_rule_give_ten_events(two_hosts, tmp_path):
    lab = two_hosts
    policy = tmp_path / "ev.yaml"
    policy.write_text(POLICY)
    ns = lab.ns("gw")
    subprocess.run([NETBPF, "-n", ns, "apply", str(policy)], check=True, capture_output=True)
    try:
        reader = subprocess.Popen([NETBPF, "-n", ns, "events", "gw0", "--json", "--count", "10",
                                   "--timeout", "20"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)   # the reader has opened the ring buffer
        gw = lab.addr("gw", "gw0")
        lab.send("client", [IP(dst=gw) / UDP(sport=40000 + i, dport=9998) / Raw(b"ok")
                            for i in range(5)])           # not sampled: no events
        lab.send("client", [IP(dst=gw) / UDP(sport=41000 + i, dport=9999) / Raw(b"x")
                            for i in range(10)])
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0
        events = [json.loads(line) for line in out.splitlines()]
        assert len(events) == 10
        assert {e["rule"] for e in events} == {"drop-udp-9999"}
        assert {e["action"] for e in events} == {"drop"}
        assert sorted(e["sport"] for e in events) == list(range(41000, 41010))
        assert {(e["src"], e["dst"], e["dport"], e["proto"], e["direction"]) for e in events} \
            == {(lab.addr("client", "client0"), gw, 9999, "udp", "ingress")}
    finally:
        subprocess.run([NETBPF, "-n", ns, "detach", "gw0"], capture_output=True)


def test_events_on_an_unmanaged_interface_is_a_clear_error(two_hosts):
    p = subprocess.run([NETBPF, "-n", two_hosts.ns("gw"), "events", "gw0", "--timeout", "1"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "not managed by netbpf" in p.stderr


def test_a_second_reader_is_refused_naming_the_first(two_hosts, tmp_path):
    lab = two_hosts
    policy = tmp_path / "ev.yaml"
    policy.write_text(POLICY)
    ns = lab.ns("gw")
    subprocess.run([NETBPF, "-n", ns, "apply", str(policy)], check=True, capture_output=True)
    first = subprocess.Popen([NETBPF, "-n", ns, "events", "gw0", "--timeout", "30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = STATE_ROOT / "events" / f"{ns}:gw0.lock"
    try:
        for _ in range(300):      # until the first reader holds the interface's reader lock
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = subprocess.run([NETBPF, "-n", ns, "events", "gw0", "--timeout", "0"],
                                capture_output=True, text=True)
        assert second.returncode == 1, second
        assert f"already being read by pid {first.pid}" in second.stderr, second.stderr
        assert "events" in second.stderr.split("pid", 1)[1]
    finally:
        first.kill()
        first.wait()
        subprocess.run([NETBPF, "-n", ns, "detach", "gw0"], capture_output=True)


def test_events_without_sampling_says_sampling_is_off(two_hosts, tmp_path):
    lab = two_hosts
    policy = tmp_path / "nosample.yaml"
    policy.write_text(POLICY.replace(", sample: 1", ""))
    ns = lab.ns("gw")
    subprocess.run([NETBPF, "-n", ns, "apply", str(policy)], check=True, capture_output=True)
    try:
        p = subprocess.run([NETBPF, "-n", ns, "events", "gw0", "--timeout", "1"],
                           capture_output=True, text=True)
        assert p.returncode == 1 and p.stdout == ""
        assert "sampling is off for this interface" in p.stderr
        assert "sample: N" in p.stderr
    finally:
        subprocess.run([NETBPF, "-n", ns, "detach", "gw0"], capture_output=True)
