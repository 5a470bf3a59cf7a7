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

COMMAND_MODULES = ("netbpf.cli.lab", "netbpf.cli.policy", "netbpf.cli.dataplane", "netbpf.cli.observe")

EPILOG = """\b
Examples:
  netbpf validate policies/demo.yaml
  netbpf apply policies/demo.yaml --dry-run
  netbpf -n lab-gw apply policies/demo.yaml
  netbpf stats eth0 --json
  netbpf lab up netns-lab/two-hosts.yaml
"""


class Context:
    def __init__(self, netns: str | None):
        self.netns = netns


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--netns", metavar="NETNS", default=None,
              help="Act inside network namespace NETNS (like 'ip -n'); pins stay in the root bpffs.")
@click.version_option(package_name="netbpf")
@click.pass_context
def cli(ctx: click.Context, netns: str | None) -> None:
    """netbpf: declarative XDP/TC firewall and L4 load balancer."""
    ctx.obj = Context(netns)


def _register() -> None:
    for name in COMMAND_MODULES:
        # a renamed or missing module is an error here, not a silently missing subcommand
        mod = importlib.import_module(name)
        for command in mod.COMMANDS:
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
