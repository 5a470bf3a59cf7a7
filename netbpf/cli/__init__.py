"""netbpf command line: subcommands like ip/tc, global -n NETNS, --json where output is data.

This module only wires subcommands and maps errors to exit codes (0 ok, 1 runtime, 2 input).
Each subcommand group lives in its own module and registers itself in COMMAND_MODULES.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

from netbpf.errors import NetbpfError

COMMAND_MODULES = ("netbpf.cli.lab", "netbpf.cli.policy", "netbpf.cli.dataplane", "netbpf.cli.observe",
                   "netbpf.cli.safety", "netbpf.cli.inspect", "netbpf.cli.importer",
                   "netbpf.cli.restore")

EPILOG = """\b
Examples:
  netbpf validate policies/demo.yaml
  cat policy.yaml | netbpf validate -
  netbpf apply policies/demo.yaml --dry-run
  netbpf -n lab-gw apply policies/demo.yaml     (or: netbpf apply policies/demo.yaml -n lab-gw)
  netbpf stats -j
  netbpf lab up netns-lab/two-hosts.yaml
\b
Exit status:
  0  success
  1  runtime failure: the kernel refused, an interface is missing, a lock is held;
     'status' also exits 1 when an interface drifted from what was applied
  2  bad input: an invalid policy (FILE:LINE:COL: field: message), an unknown option
\b
Environment: NETBPF_PIN_ROOT (/sys/fs/bpf/netbpf), NETBPF_STATE_ROOT (/run/netbpf),
NETBPF_LIB_ROOT (/var/lib/netbpf), NETBPF_ATTACH=netlink (no bpf_link).
Each subcommand has its own --help; 'man netbpf-SUBCOMMAND' shows the same text.
"""


class Context:
    def __init__(self, netns: str | None):
        self.netns = netns


NETNS_HELP = "Act inside network namespace NETNS (like 'ip -n'); pins stay in the root bpffs."


def _set_netns(ctx: click.Context, param, value: str | None) -> None:
    """-n given after the subcommand (`netbpf apply p.yaml -n ns1`): same as before it."""
    if not value:
        return
    root = ctx.find_root()
    if root.obj is None:
        root.obj = Context(None)
    if root.obj.netns and root.obj.netns != value:
        raise click.UsageError(f"-n given twice: {root.obj.netns} and {value}")
    root.obj.netns = value


@click.group(epilog=EPILOG, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--netns", metavar="NETNS", default=None, help=NETNS_HELP)
@click.version_option(None, "-V", "--version", package_name="netbpf")
@click.pass_context
def cli(ctx: click.Context, netns: str | None) -> None:
    """netbpf: declarative XDP/TC firewall and L4 load balancer."""
    ctx.obj = Context(netns)
    if ctx.invoked_subcommand is None:
        # bare `netbpf`: the help, as a successful answer (git and ip do the same)
        click.echo(ctx.get_help())
        ctx.exit(0)


def _add_netns_option(command: click.Command) -> None:
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_netns_option(sub)
        return
    if any("-n" in p.opts for p in command.params):
        return
    command.params.append(click.Option(["-n", "--netns", "_netns"], metavar="NETNS",
                                       default=None, expose_value=False, callback=_set_netns,
                                       help=NETNS_HELP))


def _register() -> None:
    for name in COMMAND_MODULES:
        # a renamed or missing module is an error here, not a silently missing subcommand
        mod = importlib.import_module(name)
        for command in mod.COMMANDS:
            _add_netns_option(command)
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    # Pins, state, lock and health files are root's alone, whatever umask the shell had:
    # a world-writable pin directory would let anyone swap a map under the data plane.
    os.umask(0o077)
    try:
        rv = cli.main(args=argv, prog_name="netbpf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except NetbpfError as e:
        click.echo(f"netbpf: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        # a file or kernel call we did not wrap: still one line, never a traceback
        click.echo(f"netbpf: {e}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
