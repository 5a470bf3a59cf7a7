"""CLI for the data plane: apply, detach, stats, status. Thin: formats what netbpf.engine.apply and
netbpf.observe.stats return (tables for people, --json for programs); errors map to exit codes in
netbpf/cli/__init__.py.

Over 400 lines because it holds four commands (apply, detach, stats, status) with their
options, tables and --json; each is parsing and formatting only.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
import time

import click
from rich.table import Table

from netbpf.cli.output import emit

from netbpf.errors import PolicyError
from netbpf.policy.ir import addr_text


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


def _print_plan(plan, verbose: bool = False) -> None:
    from netbpf.safety.plandiff import diff_plan, direction_lines

    if not plan.interfaces:
        click.echo("plan: the policy names no interfaces; nothing to do")
    diffs = diff_plan(plan)
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
            dd = next(x for x in diffs[p.key] if x.direction == d)
            for line in direction_lines(dd, verbose):
                click.echo(f"    {line}")
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
    from rich.console import Console

    from netbpf.engine import progress

    if not sys.stdout.isatty():
        yield
        return
    with Console().status("") as spinner, progress.shown_with(spinner.update):
        yield


@click.command()
@click.argument("policy")
@click.option("--dry-run", is_flag=True, help="Show the plan; change nothing.")
@click.option("--confirm", "confirm_s", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Roll back to the previous policy after SECONDS unless 'netbpf confirm'.")
@click.option("--force", is_flag=True,
              help="Apply even when it would drop this ssh session or a protect: flow.")
@click.option("--selftest", "selftest", is_flag=True,
              help="Probe every rule of the attached programs afterwards (exit 1 on a miss).")
@click.option("--verbose", "-v", is_flag=True, help="Print every change of a long plan.")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="Print the plan (every change) as JSON on stdout; progress goes to stderr.")
@click.pass_context
def apply(ctx: click.Context, policy: str, dry_run: bool, confirm_s: float | None,
          force: bool, selftest: bool, verbose: bool, as_json: bool) -> None:
    """Validate POLICY, show the plan, and make the data plane match it.

    \b
    Rule changes rewrite maps atomically (the program and its id stay); a failure leaves
    the previous policy running. The same policy twice changes nothing. A policy that would
    drop the ssh session apply runs from, or a flow under 'protect:', is refused (exit 2).
    With --json, stdout holds one object: the plan per interface ("changed", rule changes,
    "diff", "changes"), "programs" after the apply, and "errors" (file, line, column, path,
    message).
    \b
    Examples:
      netbpf apply policies/demo.yaml --dry-run
      netbpf -n lab-gw apply policies/demo.yaml
      netbpf apply gw.yaml --confirm 60      # then 'netbpf confirm', or it rolls back
      netbpf apply policies/demo.yaml --dry-run --json
    """
    if as_json:
        # the full plan even when the input is unchanged: tools read every interface's record
        _apply_json(ctx, policy, dry_run, confirm_s, force, selftest)
        return
    if not (dry_run or confirm_s or selftest) and os.geteuid() == 0:
        from netbpf.engine import early
        if not early.ASKED and early.early_apply(policy, _netns(ctx), log=click.echo):
            return
    from netbpf.engine.apply import apply_policy, plan_apply
    from netbpf.cli import safety

    loaded = _load_policy(policy)          # bad input is reported first, as by validate
    require_privileges(ctx)
    safety.guard_lockout(loaded, _netns(ctx), force)
    show = safety.plan_printer(verbose, as_json)
    if dry_run:
        plan = plan_apply(loaded, policy, _netns(ctx))
        show(plan)
        safety.print_plan_json(plan, as_json, applied=False)
        if not as_json:
            click.echo("dry run: nothing changed")
        return
    with _progress():
        plan = safety.apply_confirmed(loaded, policy, _netns(ctx), confirm_s, apply_policy,
                                      show, log=safety.logger(as_json))
    safety.print_plan_json(plan, as_json, applied=plan.changes)
    if not plan.changes and not as_json:
        click.echo("nothing to do: the running policy is this one")
    if selftest:
        safety.selftest_plan(plan)
    _save_for_restore(loaded, policy, _netns(ctx))


def _apply_json(ctx: click.Context, policy: str, dry_run: bool, confirm_s: float | None,
                force: bool, selftest: bool) -> None:
    """apply --json: one JSON object on stdout whatever happens; the exit code is kept."""
    from netbpf.engine.apply import apply_policy, plan_apply
    from netbpf.cli import safety
    from netbpf.safety.plandiff import plan_json
    from netbpf.errors import NetbpfError
    from netbpf.safety.planreport import error_record, outcome_record, plan_record
    from netbpf.policy import load_policy

    def fail(errors: list[dict], code: int, plan_rec: dict | None = None) -> None:
        rec = plan_rec or {"policy": policy, "netns": _netns(ctx), "dry_run": dry_run,
                           "changed": False, "interfaces": [], "diff": ""}
        rec["errors"] = errors
        click.echo(json.dumps(rec, indent=2 if sys.stdout.isatty() else None))
        raise SystemExit(code)

    try:
        loaded = load_policy(policy)
    except PolicyError as e:
        for line in e.errors:
            _err(line)
        fail(e.problems, 2)
    for w in loaded.warnings:
        _err(f"warning: {w}")
    require_privileges(ctx)
    safety.guard_lockout(loaded, _netns(ctx), force)
    seen = []
    started = time.time()
    try:
        if dry_run:
            plan = plan_apply(loaded, policy, _netns(ctx))
            rec = plan_record(plan, dry_run=True)
        else:
            plan = safety.apply_confirmed(loaded, policy, _netns(ctx), confirm_s, apply_policy,
                                          seen.append, log=_err)
            rec = outcome_record(plan, started)
        rec["changes"] = plan_json(plan)
    except NetbpfError as e:
        _err(f"netbpf: {e}")
        if seen:
            rec = outcome_record(seen[0], started, e)
            click.echo(json.dumps(rec, indent=2 if sys.stdout.isatty() else None))
            raise SystemExit(e.exit_code)
        fail([error_record(e)], e.exit_code)
    click.echo(json.dumps(rec, indent=2 if sys.stdout.isatty() else None, default=str))
    if not dry_run:
        _save_for_restore(loaded, policy, _netns(ctx))
    if selftest and not dry_run:
        safety.selftest_plan(plan)


def _save_for_restore(loaded, policy: str, netns: str | None) -> None:
    from netbpf.engine import persist

    try:
        persist.save_applied(loaded, policy, netns)
    except OSError as e:
        _err(f"warning: applied, but not saved for 'netbpf restore' under {persist.LIB_ROOT}: "
             f"{e.strerror or e}")


@click.command()
@click.argument("interface")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="Print what was detached as JSON on stdout (progress goes to stderr).")
@click.pass_context
def detach(ctx: click.Context, interface: str, as_json: bool) -> None:
    """Remove what netbpf attached and pinned on INTERFACE (nothing else)."""
    require_privileges(ctx)
    from netbpf.engine.apply import detach as do_detach
    from netbpf.errors import NetbpfError
    from netbpf.safety.planreport import error_record

    from netbpf.engine import persist

    if not as_json:
        do_detach(interface, _netns(ctx), log=click.echo)
        persist.forget_interface(interface, _netns(ctx))
        return
    log: list[str] = []

    def note(line: str) -> None:
        log.append(line)
        _err(line)

    rec = {"interface": interface, "netns": _netns(ctx), "detached": False, "log": log,
           "errors": []}
    try:
        do_detach(interface, _netns(ctx), log=note)
        persist.forget_interface(interface, _netns(ctx))
        rec["detached"] = True
    except NetbpfError as e:
        _err(f"netbpf: {e}")
        rec["errors"] = [error_record(e)]
    click.echo(json.dumps(rec, indent=2 if sys.stdout.isatty() else None))
    if rec["errors"]:
        raise SystemExit(rec["errors"][0]["exit_code"])


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
        if "classifier_bytes" in part:
            pairs = "".join(f", {' x '.join(g['fields'])} pairs {g['rows']:,} x {g['cols']:,}"
                            for g in part.get("pair_tables") or [])
            tables.append(Text(f"classifier tables: {_human(part['classifier_bytes'])} of kernel "
                               f"memory ({part['address_chunks']} address chunks{pairs})"))
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


def _targets(interface: str | None, netns: str | None) -> list[tuple[str, str | None]]:
    """(ifname, netns) to show: INTERFACE, or every interface netbpf manages (in NETNS
    alone with -n)."""
    if interface:
        return [(interface, netns)]
    from netbpf.store.state import list_states

    return [(st.ifname, st.netns) for st in list_states() if netns is None or st.netns == netns]


@click.command()
@click.argument("interface", required=False)
@click.option("-j", "--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", "watch", type=float, is_flag=False, flag_value=1.0, default=None,
              metavar="[SECONDS]", help="Redraw every SECONDS (default 1) with rates; into a "
              "pipe, one block (or JSON line) per interval.")
@click.pass_context
def stats(ctx: click.Context, interface: str | None, as_json: bool,
          watch: float | None) -> None:
    """Per-rule and total packet/byte counters of INTERFACE (every managed interface when
    none is named), read from the pinned maps.

    \b
    Examples:
      netbpf stats eth0
      netbpf stats                      # every interface netbpf manages
      netbpf -n lab-gw stats gw0 --json
      netbpf stats eth0 --watch 2 | tee counters.log
    """
    require_privileges(ctx)
    from netbpf.observe.stats import read_stats

    targets = _targets(interface, _netns(ctx))

    def read() -> list[dict]:
        return [read_stats(name, ns) for name, ns in targets]

    s = read()
    if as_json and watch is None:
        doc = s[0] if interface else s
        # indented for a terminal; compact (and several times faster) for a pipe
        click.echo(json.dumps(doc, indent=2 if sys.stdout.isatty() else None))
        return
    if not targets:
        click.echo("netbpf manages no interface" + (f" in netns {_netns(ctx)}"
                                                    if _netns(ctx) else ""))
        return

    def tables(cur, prev, dt) -> list:
        return [t for i, one in enumerate(cur)
                for t in _stats_tables(one, prev[i] if prev else None, dt)]

    if watch is None:
        emit(*tables(s, None, 1.0))
        return
    prev, t0 = s, time.monotonic()
    live = None
    try:
        if sys.stdout.isatty() and not as_json:
            from rich.console import Group
            from rich.live import Live

            live = Live(Group(*tables(s, None, 1.0)), auto_refresh=False)
            live.start()
        elif as_json:
            click.echo(json.dumps(s[0] if interface else s))
        else:
            emit(*tables(s, None, 1.0))
        while True:
            time.sleep(watch)
            cur, t1 = read(), time.monotonic()
            if as_json:
                click.echo(json.dumps(cur[0] if interface else cur))
            elif live is not None:
                live.update(Group(*tables(cur, prev, t1 - t0)), refresh=True)
            else:
                # streamed into a pipe: one block per interval, stamped, flushed
                click.echo(f"--- {time.strftime('%H:%M:%S')}")
                emit(*tables(cur, prev, t1 - t0))
            sys.stdout.flush()
            prev, t0 = cur, t1
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        if live is not None:
            live.stop()


@click.command()
@click.argument("interface", required=False)
@click.option("-j", "--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, interface: str | None, as_json: bool) -> None:
    """Every interface netbpf manages (with -n, those in NETNS; or just INTERFACE): mode,
    how it is attached (bpf_link or netlink), programs, policy, and drift from what was applied. Exits 1 when any row shown drifted.

    \b
    Examples:
      netbpf status
      netbpf -n lab-gw status gw0 --json
    """
    require_privileges(ctx)
    from netbpf.observe.status import read_status

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
        click.echo("netbpf manages no interface" + (f" in netns {netns}" if netns else ""))
        return
    t = Table()
    for col in ("interface", "xdp", "attach", "programs", "rules", "applied", "health"):
        t.add_column(col)
    for r in rows:
        applied = time.strftime("%m-%d %H:%M", time.localtime(r["applied_at"])) \
            if r.get("applied_at") else "-"
        progs = " ".join(f"{d}:{i}" for d, i in r.get("programs", {}).items()) or "-"
        where = f"{r['netns']}:{r['interface']}" if r["netns"] else r["interface"]
        how = ",".join(sorted(set(r.get("attach", {}).values()))) or "-"
        t.add_row(where, r.get("mode") or "-", how, progs, str(r.get("rules", "-")), applied,
                  r["health"])
    emit(t)
    for r in rows:
        if r.get("policy_file") in ("changed", "gone"):
            where = f"{r['netns']}:{r['interface']}" if r["netns"] else r["interface"]
            how = "changed since" if r["policy_file"] == "changed" else "is gone since"
            click.echo(f"{where}: {r['policy_path']} {how} it was applied "
                       f"('netbpf show {r['interface']}' prints what runs)")
    # below the table, not a column: the table must stay readable at 80 columns
    mem = [f"{r['netns'] + ':' if r['netns'] else ''}{r['interface']} "
           f"{_human(r['classifier_bytes'])}B" for r in rows if r.get("classifier_bytes")]
    if mem:
        click.echo("classifier tables (kernel memory): " + ", ".join(mem))
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
    from netbpf.engine.apply import apply_policy
    from netbpf.errors import InputError
    from netbpf.lb.health import targets, watch
    from netbpf.kernel.netns import enter_netns

    netns = _netns(ctx)
    loaded = _load_policy(policy)
    ts = targets(loaded, netns)
    if not ts:
        raise InputError(f"{policy}: no load balancer has a health check "
                         "(health: {tcp: {interval, timeout}})")

    def log(msg: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {msg}")

    def apply() -> bool:
        return bool(apply_policy(loaded, policy, netns, log=lambda m: None).changes)

    try:
        watch(ts, apply, log, once=once, enter=lambda: enter_netns(netns))
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
    from netbpf.observe.events import follow

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
