"""CLI for looking inside: `show` (the policy the kernel enforces), `explain` (one packet,
model vs. program) and `selftest` (every rule probed). Thin: netbpf/observe/inspect.py,
netbpf/safety/explain.py and netbpf/safety/selftest.py do the work; exit 1 on a disagreement.
"""
from __future__ import annotations

import json
import sys

import click

from netbpf.cli.dataplane import _netns, require_privileges


def _key(ctx, interface: str) -> str:
    from netbpf.store.state import iface_key

    return iface_key(interface, _netns(ctx))


@click.command()
@click.argument("interface")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def show(ctx: click.Context, interface: str, as_json: bool) -> None:
    """The policy the kernel enforces on INTERFACE, rebuilt from the pinned maps, and whether
    it equals the policy file last applied.

    \b
    Rules, sets, defaults and sampling are decoded from the maps (names and the XDP mode come
    from the state file: the kernel keeps counter slots). Exit 1 when they differ.
    \b
    Examples:
      netbpf show eth0
      netbpf -n lab-gw show gw0 --json
    """
    require_privileges(ctx)
    from netbpf.observe.inspect import differences, read_enforced
    from netbpf.safety.plandiff import old_policy
    from netbpf.policy.render import policy_dict
    from netbpf.store.state import load_state

    key = _key(ctx, interface)
    enforced = read_enforced(key)
    applied = old_policy(key)
    st = load_state(key)
    diffs = differences(enforced, applied, interface) if applied is not None else None
    doc = policy_dict(enforced)
    if as_json:
        click.echo(json.dumps({"policy": doc, "applied_file": st.policy_path,
                               "equals_applied": diffs == [] if diffs is not None else None,
                               "differences": diffs}, indent=2))
    else:
        from ruamel.yaml import YAML

        y = YAML()
        y.default_flow_style = None
        y.dump(doc, sys.stdout)
        if diffs is None:
            click.echo(f"# no copy of the applied file {st.policy_path} to compare with")
        elif not diffs:
            click.echo(f"# equals the last applied file {st.policy_path}")
        else:
            click.echo(f"# differs from the last applied file {st.policy_path}:")
            for d in diffs:
                click.echo(f"#   {d}")
    if diffs:
        sys.exit(1)


@click.command()
@click.argument("interface")
@click.argument("packet", nargs=-1, required=True)
@click.option("--egress", is_flag=True, help="Explain a packet INTERFACE sends (default: receives).")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def explain(ctx: click.Context, interface: str, packet: tuple[str, ...], egress: bool,
            as_json: bool) -> None:
    """What happens to PACKET on INTERFACE: the policy's verdict and rule, and the attached
    program's (test run on a copy of its maps); exit 1 if they disagree.

    \b
    Examples:
      netbpf explain eth0 tcp 192.0.2.7:40000 10.0.0.1:22 flags=syn
      netbpf explain eth0 udp '[2001:db8::7]:5353' '[ff02::fb]:5353'
      netbpf explain eth0 capture.pcap
    """
    require_privileges(ctx)
    from netbpf.safety.explain import explain as run_explain
    from netbpf.safety.explain import parse_packet

    pkt, data = parse_packet(list(packet))
    x = run_explain(_key(ctx, interface), pkt, data, "egress" if egress else "ingress")
    if as_json:
        click.echo(json.dumps(x.__dict__ | {"agree": x.agree}, indent=2))
    else:
        click.echo(f"{x.packet} ({x.direction})")
        click.echo(f"  policy:  {x.model_verdict} by {x.model_rule}")
        click.echo(f"  program: {x.program_verdict} by {x.program_rule}"
                   + (f", counted by {', '.join(x.counted)}" if x.counted else ""))
        if x.model_backend or x.program_backend:
            click.echo(f"  backend: policy {x.model_backend or 'none'}, "
                       f"program {x.program_backend or 'none'}")
        for n in x.notes:
            click.echo(f"  note: {n}")
        click.echo("  agree" if x.agree else "  DISAGREE: the program does not do what the "
                                              "policy says (see 'netbpf show', re-apply)")
    if not x.agree:
        sys.exit(1)


def run_selftest(ifname: str, netns: str | None, verbose: bool) -> int:
    """Print per-rule results; return the number of failing rules."""
    import time

    from netbpf.safety.selftest import selftest as run
    from netbpf.store.state import iface_key

    start = time.monotonic()
    results = run(iface_key(ifname, netns))
    bad = [r for r in results if r.failures]
    for r in results:
        if r.failures or verbose:
            click.echo(f"{'FAIL' if r.failures else 'ok  '} {r.direction} {r.name} "
                       f"({r.probes} probes)")
            for f in r.failures[:5]:
                click.echo(f"       {f}")
    probes = sum(r.probes for r in results)
    click.echo(f"selftest {ifname}: {len(results) - len(bad)}/{len(results)} rules ok, "
               f"{probes} probes, {time.monotonic() - start:.1f} s")
    return len(bad)


@click.command()
@click.argument("interface")
@click.option("--verbose", "-v", is_flag=True, help="List every rule, not only failures.")
@click.pass_context
def selftest(ctx: click.Context, interface: str, verbose: bool) -> None:
    """Probe every rule of INTERFACE's programs (inside, at the edges, just outside) with
    test runs on a copy of their maps; exit 1 if any verdict or counter differs from the
    policy last applied.

    \b
    Example:
      netbpf selftest eth0
    """
    require_privileges(ctx)
    if run_selftest(interface, _netns(ctx), verbose):
        sys.exit(1)


COMMANDS = [show, explain, selftest]
