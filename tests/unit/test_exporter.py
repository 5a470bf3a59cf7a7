"""The Prometheus collector turns read_stats() dicts into the documented metric families.

Pure: the interface list and the reader are fakes, nothing touches the kernel or the network.
Not the HTTP server or the CLI (tests/netns/test_observe_lab.py runs those for real).
"""
from __future__ import annotations

import copy

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netbpf.observe import exporter
from netbpf.abi import STAT_NAMES
from netbpf.errors import InputError, NetbpfError


def _totals(**packets: int) -> dict:
    return {name: {"packets": packets.get(name, 0), "bytes": packets.get(name, 0) * 60}
            for name in STAT_NAMES.values()}


def _rule(name: str, direction: str, action: str, packets: int, rate_limited: int = 0) -> dict:
    return {"name": name, "direction": direction, "action": action, "line": 7,
            "packets": packets, "bytes": packets * 60, "rate_limited": rate_limited}


def fake_stats(ifname: str = "gw0", netns: str | None = "lab-gw", health: str = "ok",
               conntrack: bool = True) -> dict:
    """The shape netbpf.observe.stats.read_stats returns (docs/stats.md, schema 1)."""
    ingress_rules = [_rule("drop-udp-9999", "ingress", "drop", 5),
                     _rule("dns-limit", "ingress", "rate_limit", 6, rate_limited=4),
                     _rule("count-web", "ingress", "count", 4)]
    egress_rules = [_rule("no-udp-5000", "egress", "drop", 2)]
    return {
        "schema": 1, "interface": ifname, "netns": netns,
        "policy": {"path": "/etc/netbpf/fw.yaml", "hash": "c705" * 16, "applied_at": 1700000000.5},
        "health": health,
        "parts": {
            "ingress": {"hook": "xdp", "mode": "native", "prog_id": 467, "default_action": "allow",
                        "generation": 1, "totals": _totals(**{"pass": 10, "drop": 9, "default": 5,
                                                              "rate_limited": 4, "non_ip": 3}),
                        "rules": ingress_rules, "sets": []},
            "egress": {"hook": "tc", "mode": "tc", "prog_id": 468, "default_action": "allow",
                       "generation": 0, "totals": _totals(**{"pass": 12, "drop": 2}),
                       "rules": egress_rules, "sets": []},
        },
        "rules": ingress_rules + egress_rules,
        "conntrack": ({"entries": 3, "capacity": 65536,
                       "states": {"syn_sent": 1, "established": 2, "closing": 0},
                       "timeouts": {"udp": 30.0}} if conntrack else None),
        "load_balancers": [
            {"name": "web", "vip": "10.20.0.100", "port": 80, "proto": "tcp", "mode": "nat",
             "table_size": 65537, "packets": 30, "bytes": 3000, "connections": 6,
             "backends": [
                 {"address": "10.21.0.11", "port": 8080, "id": 0, "state": "up",
                  "packets": 20, "bytes": 2000, "connections": 4},
                 {"address": "fd00:21::12", "port": 8080, "id": 1, "state": "down",
                  "packets": 10, "bytes": 1000, "connections": 2}]}],
        "read_at": 1700000100.0,
    }


def scrape(targets, reader) -> dict:
    """Collect through a real registry and the text format, as Prometheus would see it:
    {(sample name, sorted label items): value}."""
    registry = exporter.make_registry(exporter.NetbpfCollector(targets=lambda: targets,
                                                               reader=reader))
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def L(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


def test_rule_counters_become_labelled_counter_samples():
    m = scrape([("gw0", "lab-gw")], lambda i, n: fake_stats(i, n))
    where = dict(interface="gw0", netns="lab-gw")
    assert m[("netbpf_rule_packets_total",
              L(**where, direction="ingress", rule="drop-udp-9999", action="drop"))] == 5
    assert m[("netbpf_rule_bytes_total",
              L(**where, direction="ingress", rule="drop-udp-9999", action="drop"))] == 300
    assert m[("netbpf_rule_packets_total",
              L(**where, direction="egress", rule="no-udp-5000", action="drop"))] == 2
    assert m[("netbpf_rule_rate_limited_total",
              L(**where, direction="ingress", rule="dns-limit", action="rate_limit"))] == 4
    rules = [k for k in m if k[0] == "netbpf_rule_packets_total"]
    assert len(rules) == 4


def test_rate_limited_is_exported_for_rate_limit_rules_only():
    m = scrape([("gw0", "lab-gw")], lambda i, n: fake_stats(i, n))
    limited = [dict(k[1])["rule"] for k in m if k[0] == "netbpf_rule_rate_limited_total"]
    assert limited == ["dns-limit"]


def test_every_result_total_is_exported_per_direction():
    m = scrape([("gw0", "lab-gw")], lambda i, n: fake_stats(i, n))
    for direction in ("ingress", "egress"):
        results = {dict(k[1])["result"] for k in m
                   if k[0] == "netbpf_packets_total" and dict(k[1])["direction"] == direction}
        assert results == set(STAT_NAMES.values())
    ing = dict(interface="gw0", netns="lab-gw", direction="ingress")
    assert m[("netbpf_packets_total", L(**ing, result="drop"))] == 9
    assert m[("netbpf_packets_total", L(**ing, result="rate_limited"))] == 4
    assert m[("netbpf_bytes_total", L(**ing, result="pass"))] == 600


def test_program_policy_conntrack_and_up_gauges():
    m = scrape([("gw0", "lab-gw")], lambda i, n: fake_stats(i, n))
    where = dict(interface="gw0", netns="lab-gw")
    assert m[("netbpf_program_info", L(**where, direction="ingress", hook="xdp", mode="native",
                                       prog_id="467"))] == 1
    assert m[("netbpf_program_info", L(**where, direction="egress", hook="tc", mode="tc",
                                       prog_id="468"))] == 1
    assert m[("netbpf_policy_applied_timestamp_seconds", L(**where))] == 1700000000.5
    assert m[("netbpf_policy_info", L(**where, policy_hash="c705" * 16,
                                      policy_path="/etc/netbpf/fw.yaml"))] == 1
    assert m[("netbpf_conntrack_entries", L(**where))] == 3
    assert m[("netbpf_conntrack_capacity", L(**where))] == 65536
    assert m[("netbpf_up", L(**where))] == 1
    assert m[("netbpf_scrape_duration_seconds", ())] >= 0


def test_root_namespace_is_an_empty_netns_label():
    m = scrape([("eth0", None)], lambda i, n: fake_stats(i, n))
    assert m[("netbpf_up", L(interface="eth0", netns=""))] == 1


def test_no_conntrack_exports_no_conntrack_series():
    m = scrape([("eth0", None)], lambda i, n: fake_stats(i, n, conntrack=False))
    assert not [k for k in m if k[0].startswith("netbpf_conntrack_")]
    assert m[("netbpf_up", L(interface="eth0", netns=""))] == 1


@pytest.mark.parametrize("table", ["conntrack", "load_balancers"])
def test_an_unreadable_table_is_down_but_the_rest_of_the_interface_is_exported(table, caplog):
    def reader(i, n):
        s = fake_stats(i, n)
        err = {"error": "open /sys/fs/bpf/netbpf/eth1/ingress/nb_x: No such file"}
        s[table] = err if table == "conntrack" else [err]
        return s
    m = scrape([("eth1", None)], reader)
    assert m[("netbpf_up", L(interface="eth1", netns=""))] == 0
    prefix = {"conntrack": "netbpf_conntrack_", "load_balancers": "netbpf_lb_"}[table]
    assert not [k for k in m if k[0].startswith(prefix)]
    assert m[("netbpf_rule_packets_total", L(interface="eth1", netns="", direction="ingress",
                                             rule="drop-udp-9999", action="drop"))] == 5
    assert "unreadable" in caplog.text and "nb_x" in caplog.text


def test_load_balancer_vip_and_backend_counters():
    m = scrape([("lb0", "lab-lb")], lambda i, n: fake_stats(i, n))
    lb = dict(interface="lb0", netns="lab-lb", lb="web")
    assert m[("netbpf_lb_info", L(**lb, vip="10.20.0.100", port="80", proto="tcp",
                                  mode="nat"))] == 1
    assert m[("netbpf_lb_packets_total", L(**lb))] == 30
    assert m[("netbpf_lb_bytes_total", L(**lb))] == 3000
    assert m[("netbpf_lb_connections_total", L(**lb))] == 6
    assert m[("netbpf_lb_backend_packets_total", L(**lb, backend="10.21.0.11:8080"))] == 20
    assert m[("netbpf_lb_backend_connections_total", L(**lb, backend="10.21.0.11:8080"))] == 4
    assert m[("netbpf_lb_backend_bytes_total", L(**lb, backend="[fd00:21::12]:8080"))] == 1000
    assert m[("netbpf_lb_backend_up", L(**lb, backend="10.21.0.11:8080"))] == 1
    assert m[("netbpf_lb_backend_up", L(**lb, backend="[fd00:21::12]:8080"))] == 0


def test_drift_keeps_counters_but_reports_down():
    m = scrape([("gw0", "lab-gw")],
               lambda i, n: fake_stats(i, n, health="the XDP program was detached by someone else"))
    where = dict(interface="gw0", netns="lab-gw")
    assert m[("netbpf_up", L(**where))] == 0
    assert m[("netbpf_rule_packets_total",
              L(**where, direction="ingress", rule="drop-udp-9999", action="drop"))] == 5


@pytest.mark.parametrize("error", [NetbpfError("eth1: pinned ingress maps unreadable"),
                                   PermissionError(1, "Operation not permitted")])
def test_one_unreadable_interface_is_down_and_the_rest_still_scraped(error, caplog):
    def reader(i, n):
        if i == "eth1":
            raise error
        return fake_stats(i, n)
    m = scrape([("eth0", None), ("eth1", None), ("gw0", "lab-gw")], reader)
    assert m[("netbpf_up", L(interface="eth1", netns=""))] == 0
    assert m[("netbpf_up", L(interface="eth0", netns=""))] == 1
    assert m[("netbpf_up", L(interface="gw0", netns="lab-gw"))] == 1
    assert not [k for k in m if k[0] != "netbpf_up" and dict(k[1]).get("interface") == "eth1"]
    assert "eth1" in caplog.text


def test_errors_are_logged_once_per_change_not_per_scrape(caplog):
    state = {"fail": True}

    def reader(i, n):
        if state["fail"]:
            raise NetbpfError(f"{i}: pinned ingress maps unreadable")
        return fake_stats(i, n)
    c = exporter.NetbpfCollector(targets=lambda: [("eth1", None)], reader=reader)
    for _ in range(3):
        list(c.collect())
    assert caplog.text.count("unreadable") == 1
    state["fail"] = False
    list(c.collect())
    assert "eth1: ok again" in caplog.text


def test_each_collect_reads_again():
    # Live numbers: no caching between scrapes.
    s = fake_stats()
    calls = []

    def reader(i, n):
        calls.append(i)
        s2 = copy.deepcopy(s)
        s2["parts"]["ingress"]["rules"][0]["packets"] = 5 * len(calls)
        return s2
    c = exporter.NetbpfCollector(targets=lambda: [("gw0", "lab-gw")], reader=reader)
    values = []
    for _ in range(2):
        fam = {f.name: f for f in c.collect()}["netbpf_rule_packets"]
        values.append(fam.samples[0].value)
    assert values == [5, 10] and len(calls) == 2


def test_registering_does_not_read_the_kernel():
    def reader(i, n):
        raise AssertionError("read at registration")

    def targets():
        raise AssertionError("listed at registration")
    exporter.make_registry(exporter.NetbpfCollector(targets=targets, reader=reader))


def test_every_documented_metric_is_described():
    c = exporter.NetbpfCollector(targets=lambda: [], reader=lambda i, n: {})
    assert {f.name for f in c.describe()} == set(exporter.METRICS)
    for name in exporter.METRICS:
        assert name.startswith("netbpf_") and not name.endswith("_total")


@pytest.mark.parametrize("listen,want", [("127.0.0.1:9105", ("127.0.0.1", 9105)),
                                         ("[::1]:9105", ("::1", 9105)),
                                         ("0.0.0.0:1", ("0.0.0.0", 1)),
                                         ("localhost:65535", ("localhost", 65535))])
def test_parse_listen_accepts_host_port(listen, want):
    assert exporter.parse_listen(listen) == want


@pytest.mark.parametrize("listen", ["9105", ":9105", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0",
                                    "127.0.0.1:65536", "127.0.0.1:http", "host:-1"])
def test_parse_listen_rejects_what_is_not_host_port(listen):
    with pytest.raises(InputError, match="expected HOST:PORT"):
        exporter.parse_listen(listen)
