"""'netbpf validate' and 'netbpf schema': check a policy file, print the policy JSON Schema.

Thin: the language and its checks live in netbpf/policy. Exit 0 valid, 2 invalid (errors on
stderr, one per line, FILE:LINE:COL: path: message), 1 stays for runtime failures.
"""
from __future__ import annotations

import json
import sys

import click

from netbpf.errors import PolicyError


@click.command(epilog="""\b
Examples:
  netbpf validate policies/demo.yaml
  netbpf validate -q policies/*.yaml
  netbpf validate --json policies/demo.yaml
""")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files but warnings.")
@click.option("-j", "--json", "as_json", is_flag=True,
              help="Print every file's result as JSON on stdout; errors as records "
                   "(file, line, column, path, message).")
@click.pass_context
def validate(ctx: click.Context, files: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Check policy FILEs: every error at once, warnings for shadowed rules.

    Errors and warnings go to stderr as FILE:LINE:COL: path: message. A valid file prints a
    one-line summary. Exit status 2 when any file is invalid.
    """
    from netbpf.policy import load_policy  # pydantic models load only when needed

    invalid = 0
    results = []
    for file in files:
        try:
            loaded = load_policy(file)
        except PolicyError as e:
            invalid += 1
            results.append({"file": file, "valid": False, "errors": e.problems,
                            "warnings": [], "summary": None})
            if as_json:
                continue
            for line in e.errors:
                click.echo(line, err=True)
            click.echo(f"{file}: invalid — {len(e.errors)} "
                       f"{'error' if len(e.errors) == 1 else 'errors'}", err=True)
            continue
        results.append({"file": file, "valid": True, "errors": [],
                        "warnings": list(loaded.warnings), "summary": loaded.summary(),
                        "policy_hash": loaded.source_hash})
        if as_json:
            continue
        for warning in loaded.warnings:
            click.echo(warning, err=True)
        if not quiet:
            click.echo(loaded.summary())
    if as_json:
        click.echo(json.dumps({"valid": not invalid, "files": results},
                              indent=2 if sys.stdout.isatty() else None))
    if invalid:
        ctx.exit(2)


@click.command()
def schema() -> None:
    """Print the JSON Schema of policy files (for editor completion and checking).

    \b
    Example, for editors using yaml-language-server:
      netbpf schema > netbpf-policy.schema.json
      # first line of the policy:  # yaml-language-server: $schema=netbpf-policy.schema.json
    """
    from netbpf.policy import policy_schema

    click.echo(json.dumps(policy_schema(), indent=2))


COMMANDS = [validate, schema]
