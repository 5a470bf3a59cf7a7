"""The entry point's reading of a plain `apply` (netbpf/__main__.py): only `apply FILE` with
an optional namespace takes the early unchanged check; everything else goes to the CLI."""
from __future__ import annotations

import pytest

from netbpf.__main__ import _apply_args


@pytest.mark.parametrize("argv, want", [
    (["apply", "p.yaml"], ("p.yaml", None)),
    (["-n", "ns1", "apply", "p.yaml"], ("p.yaml", "ns1")),
    (["apply", "p.yaml", "--netns", "ns1"], ("p.yaml", "ns1")),
    (["--netns=ns1", "apply", "p.yaml"], ("p.yaml", "ns1")),
])
def test_plain_applies_are_recognised(argv, want):
    assert _apply_args(argv) == want


@pytest.mark.parametrize("argv", [
    [], ["apply"], ["status"], ["apply", "p.yaml", "--dry-run"], ["apply", "p.yaml", "-v"],
    ["apply", "--json", "p.yaml"], ["apply", "-"], ["-n", "a", "-n", "b", "apply", "p.yaml"],
    ["--netns=", "apply", "p.yaml"], ["apply", "p.yaml", "q.yaml"], ["validate", "p.yaml"],
    ["apply", "p.yaml", "-n"], ["--help"], ["apply", "-h"],
])
def test_anything_else_goes_to_the_cli(argv):
    assert _apply_args(argv) is None
