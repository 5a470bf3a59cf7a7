"""How the CLI prints tables: rich on a terminal; into a pipe, full width (nothing cut at 80
columns), no trailing spaces, and plain ASCII when the locale is C/POSIX (LANG=C).

Not what the tables hold (each command builds its own renderables).
"""
from __future__ import annotations

import io
import os
import sys

from rich import box
from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 1000          # wide enough that no table is ever wrapped or cut
_ASCII = str.maketrans({"—": "-", "–": "-", "→": "->", "…": "...", "×": "x", "·": "."})


def ascii_only() -> bool:
    """True under a C/POSIX locale. Python turns on its UTF-8 mode by itself for that locale
    (PEP 540), so the stream's encoding says utf-8 even then: the flag is what tells."""
    if sys.flags.utf8_mode and not os.environ.get("PYTHONUTF8"):
        return True
    return (getattr(sys.stdout, "encoding", None) or "ascii").lower().replace("-", "") \
        not in ("utf8",)


def _plain(item):
    if isinstance(item, Table) and ascii_only():
        item.box = box.ASCII
    return item


def render(*items) -> str:
    """The text emit() would print into a pipe."""
    buf = io.StringIO()
    console = Console(file=buf, width=PIPE_WIDTH, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, legacy_windows=False)
    for item in items:
        console.print(_plain(item), crop=False, overflow="ignore")
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines())
    if ascii_only():
        text = text.translate(_ASCII).encode("ascii", "replace").decode()
    return text + "\n" if text else ""


def emit(*items) -> None:
    """Print rich renderables: styled on a terminal, render() text into a pipe or file."""
    if sys.stdout.isatty():
        console = Console()
        for item in items:
            console.print(_plain(item))
        return
    sys.stdout.write(render(*items))
    sys.stdout.flush()
