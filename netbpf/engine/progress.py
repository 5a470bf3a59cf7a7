"""What a long apply is doing right now (compiling, writing a big set), for a person watching.

The engine names each long step; the CLI shows it on a terminal (a spinner line that goes
away) and shows nothing in a pipe or a log. Not the apply's output: that goes through log().
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

_show: Callable[[str], None] | None = None


def step(text: str) -> None:
    if _show is not None:
        _show(text)


@contextmanager
def shown_with(show: Callable[[str], None]) -> Iterator[None]:
    global _show
    before, _show = _show, show
    try:
        yield
    finally:
        _show = before
