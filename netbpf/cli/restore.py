"""'netbpf restore': apply again every policy saved by earlier applies (after a reboot, or
when pins and /run were lost). What the systemd unit netbpf-restore.service runs at boot.

Thin: the saved copies and the replay live in netbpf/engine/persist.py.
"""
from __future__ import annotations

import click


@click.command()
@click.pass_context
def restore(ctx: click.Context) -> None:
    """Apply again every policy netbpf applied before (oldest first), from the copies kept
    under /var/lib/netbpf (NETBPF_LIB_ROOT): the policy and its set files as they were.

    Interfaces detached since stay detached; a policy whose network namespace is gone is
    skipped. Run at boot by netbpf-restore.service (before network-pre.target); exit 1 when
    any policy could not be restored.

    \b
    Examples:
      netbpf restore
      systemctl enable netbpf-restore.service
    """
    from netbpf.engine import persist
    from netbpf.cli.dataplane import require_privileges

    require_privileges(ctx)
    if ctx.find_root().obj and ctx.find_root().obj.netns:
        raise click.UsageError("restore re-applies every saved policy in its own namespace; "
                               "it takes no -n")
    failed = persist.restore(log=click.echo)
    if failed:
        ctx.exit(1)


COMMANDS = [restore]
