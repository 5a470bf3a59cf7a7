"""CLI for the data plane: apply, detach, stats, status. Thin: formats what netbpf.apply and
netbpf.stats return (tables for people, --json for programs); errors map to exit codes in
netbpf/cli/__init__.py.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
import time

import click
from rich.console import Console
from rich.table import Table

from netbpf.errors import PolicyError
from netbpf.ir import addr_text


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _capabilities() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def require_privileges(ctx: click.Context) -> None:
    """One clear line instead of a kernel error deep inside: what this command needs."""
    caps = _capabilities()
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    if (has(CAP_BPF) or has(CAP_SYS_ADMIN)) and has(CAP_NET_ADMIN):
        return
    click.echo(f"netbpf {ctx.info_name}: needs root, or CAP_BPF and CAP_NET_ADMIN (and "
               "CAP_SYS_ADMIN for -n NETNS); run it with sudo", err=True)
    raise SystemExit(1)


def _netns(ctx: click.Context) -> str | None:
    return ctx.find_root().obj.netns if ctx.find_root().obj else None


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _load_policy(path: str):
    from netbpf.policy import load_policy

    try:
        loaded = load_policy(path)
    except PolicyError as e:
        for line in e.errors:
            _err(line)
        raise SystemExit(2)
    for w in loaded.warnings:
        _err(f"warning: {w}")
    return loaded


def _print_plan(plan) -> None:
    if not plan.interfaces:
        click.echo("plan: the policy names no interfaces; nothing to do")
    mark = {"added": "+", "removed": "-", "changed": "~"}
    for p in plan.interfaces:
        where = f"{p.ifname}" + (f" (netns {p.netns})" if p.netns else "")
        if p.what == "remove":
            click.echo(f"{where}: remove (no longer in {plan.policy_path})")
            continue
        if p.what == "unchanged":
            click.echo(f"{where}: unchanged ({len(p.rules)} rules)")
            continue
        how = f"load programs ({', '.join(p.reasons)})" if p.new_program else "update maps only"
        ct = ", conntrack" if p.conntrack else ""
        click.echo(f"{where}: {p.what} — xdp {p.mode}{ct}, {how}")
        for d, pp in p.parts.items():
            hook = "xdp" if pp.hook == "xdp" else "tc"
            click.echo(f"  {d} ({hook}, default {pp.ir.default}, room for "
                       f"{pp.shape.words * 64} rules x {pp.shape.class_cap} classes)")
            for r in pp.changed_rules():
                click.echo(f"    {mark[r.what]} {r.name} ({r.action})")
            kept = sum(1 for r in pp.rules if r.what == "kept")
            if kept:
                click.echo(f"    = {kept} rule(s) unchanged (counters kept)")
            for s in sorted({r.set_name for r in pp.compiled.setrefs}):
                st = plan.sets[s]
                click.echo(f"    set {s}: {len(st.v4)} IPv4 + {len(st.v6)} IPv6 entries")
        for lb in p.lbs:
            vip = addr_text(lb.family, lb.vip)
            what = "new table" if lb.name in p.lb_changed else "unchanged"
            live = sum(1 for b in lb.backends if b.weight > 0)
            click.echo(f"  load balancer {lb.name}: {vip} port {lb.port} "
                       f"{'tcp' if lb.proto == 6 else 'udp'}, {lb.mode}, {len(lb.backends)} "
                       f"backends ({live} taking new flows), {what}")
        for name in p.lb_removed:
            click.echo(f"  - load balancer {name}")


@contextmanager
def _progress():
    """Long steps (compiling, big sets) on a terminal as a transient spinner line; nothing
    when stdout is a pipe or a file."""
    from netbpf import progress

    if not sys.stdout.isatty():
        yield
        return
    with Console().status("") as spinner, progress.shown_with(spinner.update):
        yield


@click.command()
@click.argument("policy")
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing.")
@click.pass_context
def apply(ctx: click.Context, policy: str, dry_run: bool) -> None:
    """Validate POLICY, show the plan, and make the data plane match it.

    \b
    Rule changes rewrite maps atomically (the program and its id stay); a failure leaves
    the previous policy running. The same policy twice changes nothing.
    \b
    Examples:
      netbpf apply policies/demo.yaml --dry-run
      netbpf -n lab-gw apply policies/demo.yaml
    """
    if not dry_run and os.geteuid() == 0:
        from netbpf.unchanged import input_unchanged
        if input_unchanged(policy, _netns(ctx)):
            click.echo("nothing to do: the running policy is this one (input unchanged)")
            return
    from netbpf.apply import apply_policy, plan_apply

    loaded = _load_policy(policy)          # bad input is reported first, as by validate
    require_privileges(ctx)
    if dry_run:
        _print_plan(plan_apply(loaded, policy, _netns(ctx)))
        click.echo("dry run: nothing changed")
        return
    with _progress():
        plan = apply_policy(loaded, policy, _netns(ctx), log=click.echo, show_plan=_print_plan)
    if not plan.changes:
        click.echo("nothing to do: the running policy is this one")


@click.command()
@click.argument("interface")
@click.pass_context
def detach(ctx: click.Context, interface: str) -> None:
    """Remove what netbpf attached and pinned on INTERFACE (nothing else)."""
    require_privileges(ctx)
    from netbpf.apply import detach as do_detach

    do_detach(interface, _netns(ctx), log=click.echo)


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


TOTALS_SHOWN = ("default", "pass", "drop", "rate_limited", "conntrack_reply", "malformed",
                "non_ip", "fragment")
LB_TOTALS = ("lb_tx", "lb_redirect", "lb_stack", "lb_drop")


def _stats_tables(s: dict, prev: dict | None, dt: float) -> list:
    from rich.text import Text

    tables = []
    for d, part in s["parts"].items():
        hook = f"xdp {part['mode']}" if part["hook"] == "xdp" else "tc"
        title = (f"{s['interface']}" + (f" (netns {s['netns']})" if s["netns"] else "") +
                 f" {d} — {hook}, prog {part['prog_id']}, default {part['default_action']}, "
                 f"gen {part['generation']}, {s['health']}")
        tables.append(Text(title, style="bold"))
        t = Table()
        for col, just in (("rule", "left"), ("action", "left"), ("packets", "right"),
                          ("bytes", "right")):
            t.add_column(col, justify=just)
        if prev is not None:
            t.add_column("pps", justify="right")
        old = prev["parts"].get(d) if prev else None
        before = {r["name"]: r["packets"] for r in old["rules"]} if old else {}
        for r in part["rules"]:
            action = r["action"] + (f" ({r['rate_limited']} over)" if r["rate_limited"] else "")
            row = [r["name"], action, str(r["packets"]), _human(r["bytes"])]
            if prev is not None:
                row.append(_human((r["packets"] - before.get(r["name"], r["packets"])) / dt))
            t.add_row(*row)
        t.add_section()
        tot = part["totals"]
        shown = TOTALS_SHOWN + (LB_TOTALS if s.get("load_balancers") and d == "ingress" else ())
        for name in shown:
            if name == "conntrack_reply" and not s.get("conntrack"):
                continue
            row = [f"total {name}", "", str(tot[name]["packets"]), _human(tot[name]["bytes"])]
            if prev is not None and old:
                row.append(_human((tot[name]["packets"] - old["totals"][name]["packets"]) / dt))
            t.add_row(*row)
        tables.append(t)
    for lb in s.get("load_balancers", []):
        if "error" in lb:
            tables.append(Text(f"load balancers: {lb['error']}", style="bold red"))
            continue
        tables.append(Text(f"load balancer {lb['name']} — {lb['vip']} port {lb['port']} "
                           f"{lb['proto']}, {lb['mode']}: {lb['connections']} connections, "
                           f"{lb['packets']} packets", style="bold"))
        t = Table()
        for col, just in (("backend", "left"), ("state", "left"), ("connections", "right"),
                          ("packets", "right"), ("bytes", "right")):
            t.add_column(col, justify=just)
        for b in lb["backends"]:
            t.add_row(f"{b['address']}:{b['port']}", b["state"], str(b["connections"]),
                      str(b["packets"]), _human(b["bytes"]))
        tables.append(t)
    ct = s.get("conntrack")
    if ct and "entries" in ct:
        tables.append(Text("conntrack", style="bold"))
        t = Table()
        t.add_column("entries", justify="right")
        t.add_column("capacity", justify="right")
        for name in ct["states"]:
            t.add_column(name, justify="right")
        t.add_row(str(ct["entries"]), str(ct["capacity"]), *map(str, ct["states"].values()))
        tables.append(t)
    return tables


@click.command()
@click.argument("interface")
@click.option("-j", "--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", "watch", type=float, is_flag=False, flag_value=1.0, default=None,
              metavar="[SECONDS]", help="Redraw every SECONDS (default 1) with rates.")
@click.pass_context
def stats(ctx: click.Context, interface: str, as_json: bool, watch: float | None) -> None:
    """Per-rule and total packet/byte counters of INTERFACE, read from the pinned maps.

    \b
    Examples:
      netbpf stats eth0
      netbpf -n lab-gw stats gw0 --json
      netbpf stats eth0 --watch 2
    """
    require_privileges(ctx)
    from netbpf.stats import read_stats

    netns = _netns(ctx)
    s = read_stats(interface, netns)
    if as_json and watch is None:
        # indented for a terminal; compact (and several times faster) for a pipe
        click.echo(json.dumps(s, indent=2 if sys.stdout.isatty() else None))
        return
    console = Console()
    if watch is None:
        for t in _stats_tables(s, None, 1.0):
            console.print(t)
        return
    from rich.console import Group
    from rich.live import Live

    prev, t0 = s, time.monotonic()
    try:
        with Live(Group(*_stats_tables(s, None, 1.0)), console=console,
                  auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                cur, t1 = read_stats(interface, netns), time.monotonic()
                if as_json:
                    click.echo(json.dumps(cur))
                else:
                    live.update(Group(*_stats_tables(cur, prev, t1 - t0)), refresh=True)
                prev, t0 = cur, t1
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("interface", required=False)
@click.option("-j", "--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, interface: str | None, as_json: bool) -> None:
    """Every interface netbpf manages (with -n, those in NETNS; or just INTERFACE): mode,
    programs, policy, and drift from what was applied. Exits 1 when any row shown drifted.

    \b
    Examples:
      netbpf status
      netbpf -n lab-gw status gw0 --json
    """
    require_privileges(ctx)
    from netbpf.status import read_status

    netns = _netns(ctx)
    rows = read_status(netns=netns if (netns or interface) else None, ifname=interface)
    if interface and not rows:
        from netbpf.errors import NetbpfError
        from netbpf.kernel.netns import netns_label
        raise NetbpfError(f"{interface}: not managed by netbpf in {netns_label(netns)} "
                          "(see 'netbpf status')")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        if any(r["health"] != "ok" for r in rows):
            sys.exit(1)
        return
    if not rows:
        click.echo("netbpf manages no interface")
        return
    t = Table()
    for col in ("interface", "xdp", "programs", "rules", "applied", "health"):
        t.add_column(col)
    for r in rows:
        applied = time.strftime("%m-%d %H:%M", time.localtime(r["applied_at"])) \
            if r.get("applied_at") else "-"
        progs = " ".join(f"{d}:{i}" for d, i in r.get("programs", {}).items()) or "-"
        where = f"{r['netns']}:{r['interface']}" if r["netns"] else r["interface"]
        t.add_row(where, r.get("mode") or "-", progs, str(r.get("rules", "-")), applied,
                  r["health"])
    Console().print(t)
    if any(r["health"] != "ok" for r in rows):
        sys.exit(1)


@click.command("lb-health")
@click.argument("policy")
@click.option("--once", is_flag=True, help="One round of checks (and apply), then exit.")
@click.pass_context
def lb_health(ctx: click.Context, policy: str, once: bool) -> None:
    """Health-check the backends of POLICY's load balancers; take dead ones out of the Maglev
    table and put them back when they answer again (each change is logged and applied).

    \b
    Examples:
      netbpf -n lab-lb lb-health policies/lb.yaml
      netbpf lb-health policies/lb.yaml --once
    """
    require_privileges(ctx)
    from netbpf.apply import apply_policy
    from netbpf.errors import InputError
    from netbpf.health import check_once, targets, write_down
    from netbpf.kernel.netns import enter_netns

    netns = _netns(ctx)
    loaded = _load_policy(policy)
    ts = targets(loaded, netns)
    if not ts:
        raise InputError(f"{policy}: no load balancer has a health check "
                         "(health: {tcp: {interval, timeout}})")

    def log(msg: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {msg}")

    from netbpf.state import health_down

    # start from what the last run found, so a recovery is reported as one
    down: dict[str, set[str]] = {t.key: health_down(t.key) for t in ts}
    interval = min(t.interval for t in ts)
    log(f"checking {len(ts)} backends every {interval:g} s")
    first = True
    try:
        while True:
            with enter_netns(netns):
                changed = check_once(ts, down, log)
            if changed or first:
                for key, ids in down.items():
                    write_down(key, ids)
                plan = apply_policy(loaded, policy, netns, log=lambda m: None)
                if plan.changes:
                    log("applied: load balancer tables follow the backends' health")
            first = False
            if once:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        log("stopped")


@click.command()
@click.argument("interface")
@click.option("-j", "--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("-d", "--direction", type=click.Choice(["ingress", "egress", "both"]),
              default="both", show_default=True)
@click.option("-c", "--count", type=click.IntRange(min=1), default=None,
              help="Stop after COUNT events.")
@click.option("-t", "--timeout", type=click.FloatRange(min=0), default=None,
              help="Stop after SECONDS.")
@click.pass_context
def events(ctx: click.Context, interface: str, as_json: bool, direction: str,
           count: int | None, timeout: float | None) -> None:
    """Print sampled packet events of INTERFACE as they happen: rule, action, 5-tuple.

    Sampling is set in the policy (`sample: N` on a rule or a direction: 1 in N packets).
    Stops on Ctrl-C, after --count events or --timeout seconds.

    \b
    Examples:
      netbpf events eth0
      netbpf -n lab-gw events gw0 --json --count 10
    """
    require_privileges(ctx)
    from netbpf.events import follow

    dirs = ("ingress", "egress") if direction == "both" else (direction,)
    deadline = time.monotonic() + timeout if timeout is not None else None
    seen = 0

    def stop() -> bool:
        return (count is not None and seen >= count) or \
            (deadline is not None and time.monotonic() >= deadline)

    try:
        for ev in follow(interface, _netns(ctx), dirs, stop):
            seen += 1
            if as_json:
                click.echo(json.dumps(ev))
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
                ports = ev["proto"] in ("tcp", "udp")
                src = f"{ev['src']}:{ev['sport']}" if ports else ev["src"]
                dst = f"{ev['dst']}:{ev['dport']}" if ports else ev["dst"]
                click.echo(f"{stamp}.{int(ev['time'] * 1000) % 1000:03d} {ev['direction']:7} "
                           f"{ev['rule']:20} {ev['action']:6} {ev['proto']:6} {src} -> {dst} "
                           f"len {ev['len']}")
            sys.stdout.flush()
            if stop():
                break
    except KeyboardInterrupt:
        pass


COMMANDS = [apply, detach, stats, status, lb_health, events]
