"""CLI for the data plane: apply, detach, stats, status. Thin: formats what netbpf.apply and
netbpf.stats return (tables for people, --json for programs); errors map to exit codes in
netbpf/cli/__init__.py.
"""
from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from netbpf.errors import PolicyError


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
    for p in plan.interfaces:
        where = f"{p.ifname}" + (f" (netns {p.netns})" if p.netns else "")
        if p.what == "remove":
            click.echo(f"{where}: remove (no longer in {plan.policy_path})")
            continue
        if p.what == "unchanged":
            click.echo(f"{where}: unchanged ({len(p.rules)} rules)")
            continue
        prog = (f"load program ({', '.join(p.reasons)}; {p.shape.words * 64} rules x "
                f"{p.shape.class_cap} classes)") if p.new_program else "update maps only"
        click.echo(f"{where}: {p.what} — xdp {p.mode}, default {p.default_action}, {prog}")
        mark = {"added": "+", "removed": "-", "changed": "~"}
        for r in p.changed_rules():
            click.echo(f"  {mark[r.what]} {r.name} ({r.action})")
        kept = sum(1 for r in p.rules if r.what == "kept")
        if kept:
            click.echo(f"  = {kept} rule(s) unchanged (counters kept)")
        for s in p.sets:
            st = plan.sets[s]
            click.echo(f"  set {s}: {len(st.v4)} IPv4 + {len(st.v6)} IPv6 entries")


@click.command()
@click.argument("policy", type=click.Path(dir_okay=False))
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
    from netbpf.apply import apply_plan, plan_apply

    loaded = _load_policy(policy)
    plan = plan_apply(loaded, policy, _netns(ctx))
    _print_plan(plan)
    if dry_run:
        click.echo("dry run: nothing changed")
        return
    if not plan.changes:
        click.echo("nothing to do: the running policy is this one")
        return
    apply_plan(plan, log=click.echo)


@click.command()
@click.argument("interface")
@click.pass_context
def detach(ctx: click.Context, interface: str) -> None:
    """Remove what netbpf attached and pinned on INTERFACE (nothing else)."""
    from netbpf.apply import detach as do_detach

    do_detach(interface, _netns(ctx), log=click.echo)


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _stats_table(s: dict, prev: dict | None, dt: float) -> Table:
    x = s["xdp"]
    state = "attached" if x["attached"] else "NOT ATTACHED"
    title = (f"{s['interface']}" + (f" (netns {s['netns']})" if s["netns"] else "") +
             f" — xdp {x['mode']}, prog {x['prog_id']} {state}, default {s['default_action']}, "
             f"gen {s['policy']['generation']}")
    t = Table(title=title, title_justify="left")
    t.add_column("rule")
    t.add_column("action")
    t.add_column("packets", justify="right")
    t.add_column("bytes", justify="right")
    if prev is not None:
        t.add_column("pps", justify="right")
    old = {r["name"]: r for r in prev["rules"]} if prev else {}
    for r in s["rules"]:
        action = r["action"] + (f" ({r['rate_limited']} over)" if r["rate_limited"] else "")
        row = [r["name"], action, str(r["packets"]), _human(r["bytes"])]
        if prev is not None:
            before = old.get(r["name"], {"packets": r["packets"]})["packets"]
            row.append(_human((r["packets"] - before) / dt))
        t.add_row(*row)
    tot = s["totals"]
    t.add_section()
    for name in ("default", "pass", "drop", "rate_limited", "malformed", "non_ip", "fragment"):
        row = [f"total {name}", "", str(tot[name]["packets"]), _human(tot[name]["bytes"])]
        if prev is not None:
            row.append(_human((tot[name]["packets"] - prev["totals"][name]["packets"]) / dt))
        t.add_row(*row)
    return t


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
    from netbpf.stats import read_stats

    netns = _netns(ctx)
    s = read_stats(interface, netns)
    if as_json and watch is None:
        click.echo(json.dumps(s, indent=2))
        return
    console = Console()
    if watch is None:
        console.print(_stats_table(s, None, 1.0))
        return
    from rich.live import Live

    prev, t0 = s, time.monotonic()
    try:
        with Live(_stats_table(s, None, 1.0), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                cur, t1 = read_stats(interface, netns), time.monotonic()
                if as_json:
                    click.echo(json.dumps(cur))
                else:
                    live.update(_stats_table(cur, prev, t1 - t0), refresh=True)
                prev, t0 = cur, t1
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("-j", "--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Every interface netbpf manages: mode, program, policy, and drift from what was applied."""
    from netbpf.status import read_status

    rows = read_status()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("netbpf manages no interface")
        return
    t = Table()
    for col in ("interface", "netns", "mode", "prog", "rules", "policy", "applied", "health"):
        t.add_column(col)
    for r in rows:
        applied = time.strftime("%m-%d %H:%M", time.localtime(r["applied_at"])) \
            if r.get("applied_at") else "-"
        t.add_row(r["interface"], r["netns"] or "-", r.get("mode") or "-",
                  str(r.get("prog_id") or "-"), str(r.get("rules", "-")),
                  (r.get("policy_hash") or "-")[:8], applied, r["health"])
    Console().print(t)
    if any(r["health"] != "ok" for r in rows):
        sys.exit(1)


COMMANDS = [apply, detach, stats, status]
