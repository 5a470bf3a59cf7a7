"""Man pages (netbpf.1, netbpf-apply.1, ...) written from the same click commands, docstrings
and epilogs that --help prints, so the two never disagree. `make man` runs this.

Not the help text itself (each command's docstring) and not an installer.
"""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path


def write_man_pages(target: Path) -> list[Path]:
    from click_man.core import write_man_pages as write

    from netbpf.cli import cli

    target.mkdir(parents=True, exist_ok=True)
    write("netbpf", cli, version=version("netbpf"), target_dir=str(target))
    return sorted(target.glob("netbpf*.1"))


if __name__ == "__main__":
    for page in write_man_pages(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/man")):
        print(page)
