"""Prometheus metrics for every interface netbpf manages, read live from the pins on each scrape.

A custom prometheus_client Collector over netbpf.observe.stats.read_stats (no global registry, no cached
numbers) and a small HTTP server for /metrics. Not the CLI (netbpf/cli/observe.py), not a writer.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from netbpf.abi import STAT_NAMES
from netbpf.errors import InputError, NetbpfError

log = logging.getLogger("netbpf.observe.exporter")

IFACE_LABELS = ["interface", "netns"]
PART_LABELS = IFACE_LABELS + ["direction"]
RULE_LABELS = PART_LABELS + ["rule", "action"]
LB_LABELS = IFACE_LABELS + ["lb"]
BACKEND_LABELS = LB_LABELS + ["backend"]

# name -> (type, labels, help). The one list of what we export; docs/stats.md mirrors it.
METRICS: dict[str, tuple[str, list[str], str]] = {
    "netbpf_rule_packets": (
        "counter", RULE_LABELS, "Packets that matched the rule (first match; count rules too)."),
    "netbpf_rule_bytes": (
        "counter", RULE_LABELS, "Bytes (L2 frame length) of packets that matched the rule."),
    "netbpf_rule_rate_limited": (
        "counter", RULE_LABELS, "Packets a rate_limit rule dropped for being over its rate "
        "(rate_limit rules only)."),
    "netbpf_packets": (
        "counter", PART_LABELS + ["result"], "Packets seen by the program, by result "
        f"({'/'.join(STAT_NAMES.values())})."),
    "netbpf_bytes": (
        "counter", PART_LABELS + ["result"], "Bytes seen by the program, by result."),
    "netbpf_conntrack_entries": (
        "gauge", IFACE_LABELS, "Live connection-tracking entries (interfaces with conntrack)."),
    "netbpf_conntrack_capacity": (
        "gauge", IFACE_LABELS, "Size of the connection-tracking table (LRU; full evicts)."),
    "netbpf_lb_info": (
        "gauge", LB_LABELS + ["vip", "port", "proto", "mode"], "A load balancer's VIP; always 1."),
    "netbpf_lb_packets": (
        "counter", LB_LABELS, "Packets sent to the load balancer's VIP."),
    "netbpf_lb_bytes": (
        "counter", LB_LABELS, "Bytes sent to the load balancer's VIP."),
    "netbpf_lb_connections": (
        "counter", LB_LABELS, "New flows (connections) the load balancer placed on a backend."),
    "netbpf_lb_backend_packets": (
        "counter", BACKEND_LABELS, "Packets the load balancer forwarded to the backend."),
    "netbpf_lb_backend_bytes": (
        "counter", BACKEND_LABELS, "Bytes the load balancer forwarded to the backend."),
    "netbpf_lb_backend_connections": (
        "counter", BACKEND_LABELS, "New flows (connections) placed on the backend."),
    "netbpf_lb_backend_up": (
        "gauge", BACKEND_LABELS, "1 if the backend is in the Maglev table, 0 if 'netbpf "
        "lb-health' took it out."),
    "netbpf_program_info": (
        "gauge", PART_LABELS + ["hook", "mode", "prog_id"], "The BPF program netbpf attached; "
        "always 1."),
    "netbpf_policy_info": (
        "gauge", IFACE_LABELS + ["policy_hash", "policy_path"], "The policy applied; always 1."),
    "netbpf_policy_applied_timestamp_seconds": (
        "gauge", IFACE_LABELS, "When the running policy was applied (Unix time)."),
    "netbpf_up": (
        "gauge", IFACE_LABELS, "1 if the interface runs what netbpf applied and all its maps were "
        "read; 0 on drift or a read error (see the exporter's log or 'netbpf status')."),
    "netbpf_scrape_duration_seconds": (
        "gauge", [], "Time this scrape took to read every interface."),
}


def _families() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
    out = {}
    for name, (kind, labels, doc) in METRICS.items():
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        out[name] = cls(name, doc, labels=labels)
    return out


def managed_interfaces() -> list[tuple[str, str | None]]:
    """(interface, netns) of every state file: what `netbpf status` lists."""
    from netbpf.store.state import list_states

    return [(st.ifname, st.netns) for st in list_states()]


def _default_reader(ifname: str, netns: str | None) -> dict:
    from netbpf.observe.stats import read_stats

    return read_stats(ifname, netns)


class NetbpfCollector(Collector):
    """Reads every managed interface on each collect(); one failing interface gets netbpf_up 0
    and no other series, the rest of the scrape goes on."""

    def __init__(self, targets: Callable[[], Iterable[tuple[str, str | None]]] = managed_interfaces,
                 reader: Callable[[str, str | None], dict] = _default_reader,
                 clock: Callable[[], float] = time.perf_counter):
        self._targets = targets
        self._reader = reader
        self._clock = clock
        # Scrapes run on server threads; one at a time keeps a slow scrape from piling up
        # concurrent netlink and map reads, and keeps the error log below in order.
        self._lock = threading.Lock()
        self._last_error: dict[tuple[str, str], str] = {}

    def describe(self) -> Iterator:
        # Names only, so registering never reads the kernel.
        return iter(_families().values())

    def collect(self) -> Iterator:
        with self._lock:
            t0 = self._clock()
            fams = _families()
            for ifname, netns in self._targets():
                self._collect_one(fams, ifname, netns)
            fams["netbpf_scrape_duration_seconds"].add_metric([], self._clock() - t0)
        return iter(fams.values())

    def _collect_one(self, fams: dict, ifname: str, netns: str | None) -> None:
        ns = netns or ""
        where = (ifname, ns)
        try:
            s = self._reader(ifname, netns)
        except NetbpfError as e:
            self._note_error(where, str(e))
            fams["netbpf_up"].add_metric([ifname, ns], 0)
            return
        except OSError as e:  # a kernel call stats did not wrap: still this interface only
            self._note_error(where, f"{ifname}: {e}")
            fams["netbpf_up"].add_metric([ifname, ns], 0)
            return
        add_stats(fams, s)
        why = problem(s)
        self._note_error(where, f"{ifname}: {why}" if why else None)

    def _note_error(self, where: tuple[str, str], msg: str | None) -> None:
        # Once per change, not once per scrape: a 15 s scrape interval would flood the log.
        if self._last_error.get(where) == msg:
            return
        if msg:
            log.warning("%s%s", f"netns {where[1]}: " if where[1] else "", msg)
        elif where in self._last_error:
            log.warning("%s%s: ok again", f"netns {where[1]}: " if where[1] else "", where[0])
        self._last_error[where] = msg


def problem(s: dict) -> str | None:
    """Why a read_stats() dict is not all good (drift, or a table stats could not read)."""
    if s.get("health", "ok") != "ok":
        return s["health"]
    ct = s.get("conntrack") or {}
    if "error" in ct:
        return f"conntrack table unreadable: {ct['error']}"
    for lb in s.get("load_balancers") or []:
        if "error" in lb:
            return f"load balancer tables unreadable: {lb['error']}"
    return None


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def add_stats(fams: dict, s: dict) -> None:
    """Add one read_stats() dict to the metric families (pure: the unit tests call it too)."""
    ifname, ns = s["interface"], s["netns"] or ""
    iface = [ifname, ns]
    fams["netbpf_up"].add_metric(iface, 0 if problem(s) else 1)
    pol = s.get("policy") or {}
    if pol.get("applied_at") is not None:
        fams["netbpf_policy_applied_timestamp_seconds"].add_metric(iface, float(pol["applied_at"]))
    if pol.get("hash"):
        fams["netbpf_policy_info"].add_metric(iface + [pol["hash"], pol.get("path") or ""], 1)
    for direction, part in s["parts"].items():
        where = iface + [direction]
        fams["netbpf_program_info"].add_metric(
            where + [part["hook"], part["mode"], str(part["prog_id"])], 1)
        for result, tot in part["totals"].items():
            fams["netbpf_packets"].add_metric(where + [result], tot["packets"])
            fams["netbpf_bytes"].add_metric(where + [result], tot["bytes"])
        for r in part["rules"]:
            labels = where + [r["name"], r["action"]]
            fams["netbpf_rule_packets"].add_metric(labels, r["packets"])
            fams["netbpf_rule_bytes"].add_metric(labels, r["bytes"])
            # Only rate_limit rules can rate-limit: a 10,000-rule policy of drops should not
            # export 10,000 series that are zero forever.
            if r["action"] == "rate_limit":
                fams["netbpf_rule_rate_limited"].add_metric(labels, r["rate_limited"])
    ct = s.get("conntrack")
    if ct and "entries" in ct:
        fams["netbpf_conntrack_entries"].add_metric(iface, ct["entries"])
        fams["netbpf_conntrack_capacity"].add_metric(iface, ct["capacity"])
    for lb in s.get("load_balancers") or []:
        if "error" in lb:
            continue
        where = iface + [lb["name"]]
        fams["netbpf_lb_info"].add_metric(
            where + [lb["vip"], str(lb["port"]), lb["proto"], lb["mode"]], 1)
        fams["netbpf_lb_packets"].add_metric(where, lb["packets"])
        fams["netbpf_lb_bytes"].add_metric(where, lb["bytes"])
        fams["netbpf_lb_connections"].add_metric(where, lb["connections"])
        for b in lb["backends"]:
            labels = where + [_hostport(b["address"], b["port"])]
            fams["netbpf_lb_backend_packets"].add_metric(labels, b["packets"])
            fams["netbpf_lb_backend_bytes"].add_metric(labels, b["bytes"])
            fams["netbpf_lb_backend_connections"].add_metric(labels, b["connections"])
            fams["netbpf_lb_backend_up"].add_metric(labels, 1 if b["state"] == "up" else 0)


def make_registry(collector: Collector | None = None) -> CollectorRegistry:
    """A registry of our own: no process/platform collectors, no module-level state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or NetbpfCollector())
    return registry


# -- HTTP ------------------------------------------------------------------------------------------

def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); InputError (exit 2) if it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9105 or "
                         "[::1]:9105 (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True   # a stuck client never blocks shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)


def _index_then_metrics(metrics_app):
    def app(environ, start_response):
        if environ.get("PATH_INFO", "/") in ("/", ""):
            body = b'<html><body>netbpf exporter: <a href="/metrics">/metrics</a></body></html>\n'
            start_response("200 OK", [("Content-Type", "text/html"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        return metrics_app(environ, start_response)
    return app


def make_http_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Bind now (so 'address in use' surfaces before we say we listen); serve_forever() later."""
    server_cls = _ThreadingWSGIServer
    if ":" in host:
        server_cls = type("_V6Server", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6})
    try:
        return make_server(host, port, _index_then_metrics(make_wsgi_app(registry)),
                           server_class=server_cls, handler_class=_QuietHandler)
    except socket.gaierror as e:
        raise InputError(f"--listen {host}:{port}: cannot resolve {host!r} ({e.strerror})") from e
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise NetbpfError(f"listen on {host}:{port}: address already in use; another "
                              "exporter may be running (pick another --listen port)") from e
        if e.errno == errno.EADDRNOTAVAIL:
            raise NetbpfError(f"listen on {host}:{port}: no local interface has address "
                              f"{host}") from e
        raise NetbpfError(f"listen on {host}:{port}: {e.strerror or e}") from e
