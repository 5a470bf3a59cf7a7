"""The `netbpf` command's entry point.

`netbpf [-n NETNS] apply POLICY` is the command automation repeats most, and most often the
input is what runs, or only a blocklist file changed. Both are answered here, before the CLI
framework and the policy models load: the input is hashed and the state and pins are
checked (netbpf/engine/unchanged.py), or the changed lines of bare-IPv4 set files are
written in place (netbpf/engine/setfiles.py). Any other command line, option or doubt goes
to netbpf.cli, which answers the same way.
"""
from __future__ import annotations

import os
import sys


def _apply_args(argv: list[str]) -> tuple[str, str | None] | None:
    """(policy, netns) when argv is a plain apply: `apply FILE`, with -n/--netns NETNS
    before or after `apply`, and nothing else."""
    netns, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-n", "--netns") and i + 1 < len(argv):
            if netns is not None:
                return None
            netns, i = argv[i + 1], i + 2
            continue
        if a.startswith("--netns="):
            if netns is not None:
                return None
            netns = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if len(rest) != 2 or rest[0] != "apply" or rest[1].startswith("-") or netns == "":
        return None
    return rest[1], netns


def _early(argv: list[str]) -> bool:
    """A plain apply done here (netbpf/engine/early.py); False: the CLI takes it."""
    args = _apply_args(argv)
    if args is None or os.geteuid() != 0:
        return False
    from netbpf.engine.early import early_apply
    from netbpf.errors import NetbpfError
    try:
        return early_apply(*args, log=print)
    except NetbpfError as e:    # as netbpf.cli.main reports it
        print(f"netbpf: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o077)             # as netbpf.cli.main: pins and state are root's alone
    if _early(argv):
        sys.exit(0)
    from netbpf.cli import main as cli_main
    cli_main(argv)


if __name__ == "__main__":
    main()
