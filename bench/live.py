"""Section 2: live drop rate. trafgen floods one UDP flow from nbbench-tx into the veth; the
receiver drops it with netbpf (XDP native / generic), iptables (legacy and nft backends, raw
PREROUTING), nftables (N rules, and one rule on an N-element set). Not a NIC benchmark: on a
veth the sending CPU also runs the receiver, so a costlier filter shows as fewer packets sent.

Rate = rx packets counted by rx0 per window, times the share the filter's own counter says it
dropped over the whole point (checked: a filter that lets traffic through is flagged).
Each point gets fresh namespaces, so no table or hook left by the previous one costs anything.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from netbpf.kernel import attach, bpfsys
from netbpf.kernel.loader import load_program

import netlab
import packets
import workload
from workload import rules_label as _rules
from measure import Row, last_line

PROGS = Path(__file__).resolve().parent / "progs"
WARMUP_S = 0.4
ATTEMPTS = 4
MIN_DROPPED = 0.95       # below this share the point is flagged: it did not measure a drop


class TrafgenStopped(Exception):
    pass


class Point:
    def __init__(self, row: Row, cfg: Path, windows: int, window_s: float):
        self.row, self.cfg, self.windows, self.window_s = row, cfg, windows, window_s

    def run(self, drops: Callable[[], int] | None) -> None:
        """Measure; if trafgen gives up mid-point, start the point again (ATTEMPTS times).

        trafgen 0.6.8 treats EAGAIN from its TX ring as fatal. On a veth with native XDP the
        frames in flight hold the sender's socket memory until the receiver's NAPI poll frees
        them; when that poll is late (softirq deferred to ksoftirqd) the 208 KiB default runs
        out and trafgen exits. Raising net.core.wmem_* would be a host-wide change, so we retry."""
        errors = []
        for _ in range(ATTEMPTS):
            try:
                self._once(drops)
                break
            except TrafgenStopped as e:
                errors.append(str(e))
        else:
            self.row.note = f"trafgen stopped {ATTEMPTS}x: {errors[-1]}"
        if errors:
            self.row.extra["trafgen_restarts"] = self.row.extra.get("trafgen_restarts", 0) + \
                len(errors)

    def _once(self, drops: Callable[[], int] | None) -> None:
        rx0, d0 = netlab.rx_packets(), drops() if drops else None
        # own session: SIGINT to the group stops trafgen and its worker cleanly
        err = tempfile.TemporaryFile("w+")
        p = subprocess.Popen(["ip", "netns", "exec", netlab.TX_NS, "trafgen", "--dev",
                              netlab.TX_IF, "--conf", str(self.cfg), "--cpp", "-P", "1", "-C"],
                             stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        rates = []
        try:
            time.sleep(WARMUP_S)
            t, n = time.monotonic(), netlab.rx_packets()
            for _ in range(self.windows):
                time.sleep(self.window_s)
                t2, n2 = time.monotonic(), netlab.rx_packets()
                if p.poll() is not None:
                    raise TrafgenStopped(_last_words(err))
                rates.append((n2 - n) / (t2 - t))
                t, n = t2, n2
        finally:
            _stop(p)
            err.close()
        rx = netlab.rx_packets() - rx0
        share = 1.0
        if drops:
            share = (drops() - d0) / rx if rx else 0.0
            self.row.extra["dropped_share"] = min(round(share, 4),
                                                  self.row.extra.get("dropped_share", 1.0))
            if share < MIN_DROPPED:
                self.row.note = f"only {share:.0%} of received packets dropped"
        self.row.samples += [r * share / 1e6 for r in rates]
        if not rx:
            self.row.note = "no packets arrived"


def _last_words(f) -> str:
    f.seek(0)
    lines = [ln.strip() for ln in f.read().splitlines()
             if ln.strip() and "socket memory" not in ln]   # sysctls it may not set in a netns
    return lines[-1] if lines else "exited"


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# ---------------------------------------------------------------- drop counters

def _netbpf_drops() -> int:
    out = netlab.sh(*netlab.netbpf_cmd(), "-n", netlab.RX_NS, "stats", netlab.RX_IF,
                    "--json").stdout
    return int(json.loads(out)["parts"]["ingress"]["totals"]["drop"]["packets"])


def _iptables_drops(tool: str) -> Callable[[], int]:
    def drops() -> int:
        out = netlab.in_ns(netlab.RX_NS, tool, "-t", "raw", "-L", "PREROUTING", "-v", "-x",
                           "-n").stdout
        return sum(int(ln.split()[0]) for ln in out.splitlines()[2:]
                   if ln.split()[2:3] == ["DROP"])
    return drops


def _nft_drops() -> int:
    out = netlab.in_ns(netlab.RX_NS, "nft", "-j", "list", "table", "ip",
                       workload.NFT_TABLE).stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        for e in item.get("rule", {}).get("expr", []):
            if "counter" in e:
                total += int(e["counter"]["packets"])
    return total


def _xdp_drop(mode: str):
    """(setup, drops, teardown) for the floor program, attached in mode."""
    prog = {}

    def setup():
        prog["l"] = load_program(PROGS / "drop.bpf.c", {}, {"nb_bench_drop": "xdp"})
        attach.attach_xdp(netlab.RX_IF, prog["l"].prog_fd("nb_bench_drop"), mode,
                          netns=netlab.RX_NS)

    def drops():
        vals = bpfsys.map_lookup_percpu(prog["l"].map_fd("nb_bench_cnt"), bytes(4), 8)
        return sum(int.from_bytes(v, "little") for v in vals)

    def teardown():
        attach.detach_xdp(netlab.RX_IF, netns=netlab.RX_NS)
        prog.pop("l").close()

    return setup, drops, teardown


# ---------------------------------------------------------------- the run

def _fresh_pair() -> None:
    """New tx/rx namespaces: every point starts with no hooks, tables or programs."""
    if netlab.RX_NS in netlab.our_namespaces():
        netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
    netlab.up(only_pair=True)


def run_point(row: Row, label: str, cfg: Path, windows: int, window_s: float,
              setup: Callable[[], None], drops: Callable[[], int] | None,
              teardown: Callable[[], None], log) -> None:
    """One point on fresh namespaces: set the filter up (timed), measure, tear it down."""
    try:
        _fresh_pair()
        t0 = time.perf_counter()
        setup()
        row.extra["setup_s"] = round(time.perf_counter() - t0, 3)
        Point(row, cfg, windows, window_s).run(drops)
        teardown()
    except Exception as e:          # one broken peer must not hide the others' figures
        row.note = f"failed: {last_line(str(e))}"
    log(f"  {label}: " + (f"{row.samples[-1]:.3f} Mpps" if row.ok else row.note))


def finish(tmp: Path) -> None:
    """Whatever a point left attached, and the configs written."""
    if netlab.RX_NS in netlab.our_namespaces():
        netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


def run(rows: dict[str, Row], *, rule_counts: list[int], passes: int, windows: int,
        window_s: float, log) -> None:
    """Every point `passes` times, a whole matrix apart: a dip caused by the rest of a shared
    machine then lands in one pass's windows (the min), not in the median."""
    tmp = Path(tempfile.mkdtemp(prefix="nbbench-live-"))

    def point(key: str, label: str, n: int, setup: Callable[[], None],
              drops: Callable[[], int] | None, teardown: Callable[[], None] = lambda: None,
              floor_key: str | None = "") -> None:
        row = rows.get(key) or Row("live", key, label, "Mpps",
                                   floor_key=f"live.floor.{n}" if floor_key == "" else floor_key)
        rows[key] = row
        cfg = tmp / f"hit-{n}.cfg"
        if not cfg.exists():
            frame = packets.udp4(workload.hit_src(n), netlab.RX_IP, dport=workload.DPORT,
                                 smac=netlab.TX_MAC, dmac=netlab.RX_MAC)
            cfg.write_text(packets.trafgen_config(frame))
        run_point(row, label, cfg, windows, window_s, setup, drops, teardown, log)

    try:
        for n in [n for _ in range(passes) for n in rule_counts]:
            # The floor again before every rule count: a shared machine's load drifts over
            # the minutes this section takes, and each ratio should see the same load.
            point(f"live.floor.{n}", f"XDP_DROP only, native: floor for {_rules(n)}", n,
                  *_xdp_drop("native"), floor_key=None)
            if n == rule_counts[0] and "live.stack" not in rows:
                point("live.xdpdrop.generic", "XDP_DROP only, generic", n, *_xdp_drop("generic"))
                point("live.stack", "no filter (stack, no listener)", n, lambda: None, None)
            for mode in ("native", "generic"):
                pol = tmp / f"netbpf-{n}-{mode}.yaml"
                pol.write_text(workload.policy_yaml(netlab.RX_IF, n, mode))
                point(f"live.netbpf.{mode}.{n}", f"netbpf XDP {mode}, {_rules(n)}", n,
                      lambda pol=pol: netlab.sh(*netlab.netbpf_cmd(), "-n", netlab.RX_NS,
                                                "apply", str(pol)),
                      _netbpf_drops,
                      lambda: netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF))
            for tool, name in (("iptables-legacy", "legacy"), ("iptables-nft", "nft backend")):
                text = workload.iptables_restore(n)
                point(f"live.{tool}.{n}", f"iptables ({name}), {_rules(n)}", n,
                      lambda tool=tool, text=text: netlab.in_ns(netlab.RX_NS, f"{tool}-restore",
                                                                input=text),
                      _iptables_drops(tool))
            for kind, text in (("rules", workload.nft_rules(n)), ("set", workload.nft_set(n))):
                label = f"nftables, {_rules(n)}" if kind == "rules" \
                    else f"nftables, 1 rule + {n:,}-element set"
                point(f"live.nft.{kind}.{n}", label, n,
                      lambda text=text: netlab.in_ns(netlab.RX_NS, "nft", "-f", "-",
                                                     input=text),
                      _nft_drops)
    finally:
        finish(tmp)
