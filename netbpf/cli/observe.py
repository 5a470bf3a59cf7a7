"""CLI for observing the data plane from outside: `netbpf exporter` (Prometheus /metrics).

Thin: parses --listen, serves netbpf.observe.exporter's registry until Ctrl-C or SIGTERM (exit 0).
Not the metrics themselves (netbpf/observe/exporter.py), not stats/status (netbpf/cli/dataplane.py).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from netbpf.errors import NetbpfError


@click.command()
@click.option("--listen", default="127.0.0.1:9105", show_default=True, metavar="HOST:PORT",
              help="Address for /metrics; [::1]:9105 for IPv6, 0.0.0.0:9105 for every address.")
@click.option("-v", "--verbose", is_flag=True, help="Log every HTTP request to stderr.")
@click.pass_context
def exporter(ctx: click.Context, listen: str, verbose: bool) -> None:
    """Serve Prometheus metrics of every interface netbpf manages on HOST:PORT/metrics.

    Each scrape reads the pinned maps afresh (nothing is cached). With -n NETNS only that
    namespace's interfaces are exported. Metric names: docs/stats.md.

    \b
    Examples:
      netbpf exporter
      netbpf exporter --listen [::1]:9105
      netbpf -n lab-gw exporter --listen 127.0.0.1:9200
    """
    from netbpf.cli.dataplane import require_privileges

    require_privileges(ctx)
    try:
        from netbpf.observe import exporter as exp
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("prometheus_client"):
            raise NetbpfError("the exporter needs the Python package prometheus_client: "
                              "pip install prometheus_client") from e
        raise

    host, port = exp.parse_listen(listen)
    logging.basicConfig(format="netbpf exporter: %(message)s", stream=sys.stderr,
                        level=logging.DEBUG if verbose else logging.INFO)
    root = ctx.find_root().obj
    only_ns = root.netns if root else None
    if only_ns:
        def targets():
            return [t for t in exp.managed_interfaces() if t[1] == only_ns]
        collector = exp.NetbpfCollector(targets=targets)
    else:
        collector = exp.NetbpfCollector()
    server = exp.make_http_server(host, port, exp.make_registry(collector))

    # serve_forever() runs on a thread; the main thread only waits for a signal, so the
    # handler never has to interrupt a request half-way (shutdown() lets it finish).
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="netbpf-exporter",
                               daemon=True)
    serving.start()
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("netbpf.observe.exporter").info(
        "serving http://%s:%d/metrics (Ctrl-C to stop)", shown, server.server_port)
    try:
        while not stop.wait(1.0):
            if not serving.is_alive():
                raise NetbpfError("the HTTP server stopped unexpectedly")
    finally:
        server.shutdown()
        server.server_close()
    logging.getLogger("netbpf.observe.exporter").info("stopped")


COMMANDS = [exporter]
