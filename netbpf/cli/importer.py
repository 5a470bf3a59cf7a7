"""'netbpf import iptables|nft|ipvs FILE|-': print a netbpf policy converted from a ruleset.

Thin: parsing and conversion live in netbpf/importer. The policy goes to stdout, every rule or
match that could not be expressed to stderr as FILE:LINE: warning: why. Exit 2 on unparseable
input; a produced policy that netbpf itself rejects is a bug, reported with exit 1.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from netbpf.errors import InputError, NetbpfError


def _read(file: str) -> tuple[str, str]:
    if file == "-":
        data = sys.stdin.buffer.read()
        display = "<stdin>"
    else:
        try:
            data = Path(file).read_bytes()
        except OSError as e:
            raise InputError(f"{file}: cannot read: {e.strerror}") from None
        display = file
    try:
        return data.decode("utf-8-sig"), display
    except UnicodeDecodeError as e:
        raise InputError(f"{display}: not UTF-8 text (byte {e.start})") from None


def _finish(result, out: str | None) -> None:
    from netbpf.errors import PolicyError
    from netbpf.policy import load_policy

    for note in result.warnings:
        click.echo(f"{note.where}: warning: {note.message}", err=True)
    # The policy must be one netbpf accepts: a converter bug must not reach an apply.
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "imported.yaml"
        check.write_text(result.policy)
        try:
            load_policy(check)
        except PolicyError as e:
            raise NetbpfError("import produced a policy netbpf rejects (a bug in the "
                              "importer; please report it with the input):\n  "
                              + "\n  ".join(e.errors)) from None
    if out:
        Path(out).write_text(result.policy)
    else:
        click.echo(result.policy, nl=False)


def _guard(fn):
    from netbpf.importer import ImportInputError
    try:
        return fn()
    except ImportInputError as e:
        raise InputError(str(e)) from None
    except RecursionError:
        raise InputError("input nests too deeply") from None


_interface = click.option("-i", "--interface", "interfaces", multiple=True, metavar="IFNAME",
                          help="Interface that rules without -i/-o (iifname/oifname) apply to; "
                               "repeat for several. Default: the interfaces the rules name.")
_forward = click.option("--forward", is_flag=True,
                        help="Import the FORWARD chain (hook forward) as ingress instead of "
                             "INPUT: for a router whose own services are not the concern.")
_output = click.option("-o", "--output", "out", metavar="FILE", help="Write the policy to FILE.")


@click.group(name="import", epilog="""\b
Examples:
  iptables-save | netbpf import iptables - > policy.yaml
  netbpf import iptables rules.v4 rules.v6 --ipset ipset.save -i eth0
  nft -j list ruleset | netbpf import nft -
  ipvsadm -Sn | netbpf import ipvs - -i eth0
""")
def import_cmd() -> None:
    """Convert an iptables, nftables or ipvsadm ruleset to a netbpf policy (docs/migrate.md)."""


@import_cmd.command(name="iptables")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--ipset", "ipset_file", metavar="FILE", help="'ipset save' output: set contents.")
@_interface
@_forward
@_output
def import_iptables(files, ipset_file, interfaces, forward, out) -> None:
    """iptables-save / ip6tables-save output (one file per family; '-' is stdin)."""
    from netbpf.importer import import_ruleset
    from netbpf.importer.iptables import parse_ipset_save, parse_iptables
    from netbpf.importer.model import Ruleset

    def run():
        ipsets = parse_ipset_save(*_read(ipset_file)) if ipset_file else {}
        merged = Ruleset()
        for file in files:
            rs = parse_iptables(*_read(file), ipsets=ipsets)
            merged.tables += rs.tables
            merged.notes += rs.notes
            merged.sets.update(rs.sets)
        for name in merged.sets:
            if name in ipsets:
                merged.set_where[name] = f"ipset {name} from {ipset_file}"
        return import_ruleset(merged, "netbpf import iptables " + " ".join(files),
                              list(interfaces), forward)
    _finish(_guard(run), out)


@import_cmd.command(name="nft")
@click.argument("file", metavar="FILE")
@_interface
@_forward
@_output
def import_nft(file, interfaces, forward, out) -> None:
    """'nft list ruleset' text or 'nft -j list ruleset' JSON ('-' is stdin)."""
    from netbpf.importer import import_ruleset
    from netbpf.importer.nft import parse_nft
    from netbpf.importer.nftjson import parse_nft_json

    def run():
        text, display = _read(file)
        parse = parse_nft_json if text.lstrip().startswith("{") else parse_nft
        rs = parse(text, display)
        return import_ruleset(rs, "netbpf import nft " + file, list(interfaces), forward)
    _finish(_guard(run), out)


@import_cmd.command(name="ipvs")
@click.argument("file", metavar="FILE")
@_interface
@_output
def import_ipvs(file, interfaces, out) -> None:
    """'ipvsadm -Sn' output: virtual services become load balancers ('-' is stdin)."""
    from netbpf.importer import import_ruleset
    from netbpf.importer.ipvs import parse_ipvs
    from netbpf.importer.model import Ruleset

    def run():
        text, display = _read(file)
        lbs, notes = parse_ipvs(text, display, interfaces[0] if interfaces else None)
        rs = Ruleset(notes=notes)
        return import_ruleset(rs, "netbpf import ipvs " + file, load_balancers=lbs)
    _finish(_guard(run), out)


COMMANDS = (import_cmd,)
