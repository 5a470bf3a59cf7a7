"""CLI for operator safety: the lockout guard and commit-confirmed apply (used by `apply`),
and `netbpf confirm`. Thin: the logic is in netbpf/safety/lockout.py and netbpf/safety/confirm.py.
"""
from __future__ import annotations

import click

from netbpf.errors import InputError


def guard_lockout(loaded, netns: str | None, force: bool) -> None:
    """Refuse (exit 2, nothing changed) a policy that drops the ssh session we run from or a
    `protect:` flow; with --force, only warn."""
    from netbpf.safety.lockout import current_ssh_session, find_lockouts, local_addresses, \
        protected_flows

    flows = protected_flows(loaded.model)
    ssh = current_ssh_session()
    if ssh is not None:
        flows.append(ssh)
    if not flows:
        return
    owner = local_addresses(netns) if ssh is not None else None
    found = find_lockouts(loaded.ir, flows, owner)
    if not found:
        return
    lines = [f"{loaded.display}: {x.message()}" for x in found]
    if force:
        for line in lines:
            click.echo(f"warning: {line} (applied anyway: --force)", err=True)
        return
    raise InputError("apply refused, nothing changed:\n  " + "\n  ".join(lines) +
                     "\nfix the policy, or apply with --force (with --confirm SECONDS it rolls "
                     "back by itself unless 'netbpf confirm' follows)")


def plan_printer(verbose: bool, as_json: bool = False):
    import functools

    from netbpf.cli.dataplane import _print_plan

    if as_json:
        return lambda plan: None         # the JSON plan is printed once, at the end
    return functools.partial(_print_plan, verbose=verbose)


def logger(as_json: bool):
    """Progress lines: stdout for people, stderr when stdout carries JSON."""
    return (lambda m: click.echo(m, err=True)) if as_json else click.echo


def print_plan_json(plan, as_json: bool, applied: bool) -> None:
    if as_json:
        import json

        from netbpf.safety.plandiff import plan_json

        click.echo(json.dumps(plan_json(plan) | {"applied": applied}, indent=2, default=str))


def apply_confirmed(loaded, policy: str, netns: str | None, seconds: float | None,
                    apply_policy, show, log=click.echo):
    """apply_policy, with a rollback timer armed first when seconds is given (armed before
    any change, so a SIGKILL right after the apply still rolls back)."""
    if seconds is None:
        return apply_policy(loaded, policy, netns, log=log, show_plan=show)
    from netbpf.safety import confirm
    from netbpf.store import state

    with state.host_lock("confirm", wait_message=log):
        cid = confirm.arm(confirm.affected_keys(loaded, policy, netns), seconds, netns)
    try:
        plan = apply_policy(loaded, policy, netns, log=log, show_plan=show)
    except BaseException:
        confirm.disarm(cid)
        raise
    confirm.applied(cid)
    log(f"confirm within {seconds:g} s with 'netbpf confirm', or the previous policy "
               f"comes back by itself (timer pid {confirm.read_pending()['timer_pid']})")
    return plan


def selftest_plan(plan) -> None:
    from netbpf.cli.inspect import run_selftest

    bad = 0
    for p in plan.interfaces:
        if p.what != "remove":
            bad += run_selftest(p.ifname, p.netns, verbose=False)
    if bad:
        raise SystemExit(1)


@click.command("confirm")
@click.pass_context
def confirm_cmd(ctx: click.Context) -> None:
    """Keep the policy of a pending 'apply --confirm SECONDS' (else it rolls back by itself).

    \b
    Example:
      netbpf apply gw.yaml --confirm 60 && netbpf confirm
    """
    from netbpf.cli.dataplane import require_privileges
    from netbpf.safety.confirm import confirm

    require_privileges(ctx)
    data = confirm()
    keys = ", ".join(sorted(data["targets"]))
    click.echo(f"confirmed: the policy applied on {keys} stays; rollback timer stopped")


COMMANDS = [confirm_cmd]
