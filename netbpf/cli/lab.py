"""'netbpf lab up|down|list': the built-in netns lab for people (demos, poking around).

Thin: topology checks, building and teardown live in netbpf.lab. 'up' leaves the lab running
under a stable prefix ('lab-' -> namespaces lab-gw, lab-client) so 'netbpf -n lab-gw ...' works.
"""
from __future__ import annotations

import json
import re

import click

from netbpf.errors import InputError

DEFAULT_PREFIX = "lab-"
PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,11}$")


def _prefix(value: str) -> str:
    from netbpf.lab import RANDOM_PREFIX_RE

    if not PREFIX_RE.match(value):
        raise InputError(f"--prefix {value!r}: use 1-12 characters of [a-z0-9_-], e.g. 'lab-' or 'demo-'")
    if not value.endswith(("-", "_")):
        value += "-"  # 'demo' -> namespaces 'demo-gw', not 'demogw'
    if RANDOM_PREFIX_RE.match(value):
        raise InputError(f"--prefix {value!r} looks like a test run's random prefix (nb<6 hex>-), "
                         "which cleanups remove; pick another")
    return value


def _interfaces_table(rows: list[dict], title: str):
    from rich import box
    from rich.table import Table

    # fits 80 columns: only the last column may wrap
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("namespace", "interface", "mac", "addresses"):
        table.add_column(col, no_wrap=True)
    table.add_column("link", overflow="fold")
    for r in rows:
        link = f"<-> {r['peer']}" if r["peer"] else "bridge" if r["kind"] == "bridge" else ""
        if r.get("master"):
            link += f" (in {r['master']})"
        table.add_row(r["netns"], r["name"], r["mac"], "\n".join(r["addresses"]) or "-", link)
    return table


@click.group("lab")
def lab() -> None:
    """The built-in netns lab: namespaces, veths, bridges, addresses and routes from a topology file.

    \b
    Examples:
      netbpf lab up netns-lab/two-hosts.yaml      # namespaces lab-client, lab-gw
      netbpf -n lab-gw apply policies/demo.yaml
      ip netns exec lab-client ping 10.10.0.1
      netbpf lab down netns-lab/two-hosts.yaml
      netbpf lab down --all                        # every lab, and leftovers of killed test runs
    """


@lab.command("up")
@click.argument("topology")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Namespace name prefix: node 'gw' becomes namespace PREFIX+'gw'.")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print what was created as JSON.")
def up(topology: str, prefix: str, as_json: bool) -> None:
    """Create TOPOLOGY (a file, or a built-in name like 'two-hosts') and leave it running."""
    from netbpf.lab import Lab, load_topology

    prefix = _prefix(prefix)
    topo = load_topology(topology)
    lab_ = Lab(topo, prefix, reaper=False)
    lab_.up()
    lab_.hand_over()
    rows = lab_.interface_rows()
    if as_json:
        click.echo(json.dumps({"prefix": prefix, "topology": topo.name, "path": topo.path,
                               "namespaces": lab_.namespaces, "interfaces": rows}, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(_interfaces_table(rows, f"lab {topo.name!r} is up (prefix {prefix!r}, {lab_.timings['up']:.2f} s)"))
    routes = [f"  {lab_.ns(n.name)}: " + ", ".join(
        f"{r.to} via {r.via}" if r.via else f"{r.to} dev {r.dev}" for r in n.routes)
        for n in topo.nodes.values() if n.routes]
    if routes:
        console.print("routes:\n" + "\n".join(routes), highlight=False)
    first = lab_.namespaces[0]
    console.print(f"enter a node:  ip netns exec {first} bash\nremove it:     netbpf lab down {topology}"
                  + (f" --prefix {prefix}" if prefix != DEFAULT_PREFIX else ""), highlight=False)


@lab.command("down")
@click.argument("topology", required=False)
@click.option("--prefix", default=None, help=f"Prefix the lab was created with [default: {DEFAULT_PREFIX}].")
@click.option("--all", "all_", is_flag=True, help="Remove every lab made by 'lab up' and leftovers of killed runs.")
def down(topology: str | None, prefix: str | None, all_: bool) -> None:
    """Remove a lab made by 'lab up' (and leftovers of killed test runs)."""
    from netbpf.lab import cleanup, load_topology, records
    from netbpf.lab.registry import remove_lab

    if all_ and (topology or prefix):
        raise InputError("--all removes every lab: give it without TOPOLOGY or --prefix")
    removed: list[str] = []
    errors: list[str] = []
    if all_:
        for rec in records():
            if rec.persistent:
                r, e = remove_lab(rec.prefix)
                removed, errors = removed + r, errors + e
    else:
        prefix = _prefix(prefix or DEFAULT_PREFIX)
        # the file names the namespaces even if the record is gone (a killed 'lab up')
        names = [f"{prefix}{n}" for n in load_topology(topology).nodes] if topology else []
        r, e = remove_lab(prefix, names)
        removed, errors = removed + r, errors + e
    try:
        removed += cleanup()  # killed test runs: dead owner, or no record
    except Exception as e:  # noqa: BLE001 - report together with the rest
        errors.append(str(e))
    for name in removed:
        click.echo(f"removed netns {name}")
    if not removed and not errors:
        click.echo("nothing to remove")
    if errors:
        from netbpf.lab import LabError

        raise LabError("could not remove:\n  " + "\n  ".join(errors))


@lab.command("list")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print as JSON.")
def list_(as_json: bool) -> None:
    """Labs that are up: prefix, topology, owner and namespaces; and leftovers of killed runs."""
    from netbpf.lab import list_netns, orphans, records

    present = set(list_netns())
    labs = []
    for rec in records():
        if not rec.readable:
            owner = "unknown (record readable by root only)"
            names = [n for n in sorted(present) if n.startswith(rec.prefix)]
        else:
            owner = "lab up" if rec.persistent else \
                (f"pid {rec.pid}" + (" (dead)" if rec.orphaned else ""))
            names = [n for n in rec.namespaces if n in present]
        labs.append({"prefix": rec.prefix, "topology": rec.topology, "owner": owner,
                     "namespaces": names})
    left = orphans()
    if as_json:
        click.echo(json.dumps({"labs": labs, "leftovers": left}, indent=2))
        return
    if not labs and not left:
        click.echo("no labs are up")
        return
    from rich.table import Table

    from netbpf.cli.output import emit

    table = Table(title="labs", title_justify="left")
    for col in ("prefix", "topology", "owner", "namespaces"):
        table.add_column(col, overflow="fold")
    for item in labs:
        table.add_row(item["prefix"], item["topology"], item["owner"], " ".join(item["namespaces"]) or "-")
    emit(table)
    if left:
        click.echo(f"leftovers of killed runs ({len(left)}): {' '.join(left)}\n"
                   "remove them with: netbpf lab down --all")


COMMANDS = [lab]
