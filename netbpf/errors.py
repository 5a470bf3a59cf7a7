"""Errors people can act on. The CLI maps them to exit codes in one place (netbpf/cli)."""
from __future__ import annotations


class NetbpfError(Exception):
    """A runtime failure (kernel refused, interface missing...): exit 1."""

    exit_code = 1


class InputError(NetbpfError):
    """Bad input from the user (invalid policy, unknown option value): exit 2."""

    exit_code = 2


class PolicyError(InputError):
    """An invalid policy; .errors holds every problem as 'FILE:LINE:COL: path: message',
    .problems the same as records (file, line, column, path, message) for --json."""

    def __init__(self, errors: list[str], problems: list[dict] | None = None):
        self.errors = list(errors)
        self.problems = list(problems) if problems is not None else [
            {"file": None, "line": None, "column": None, "path": None, "message": e}
            for e in self.errors]
        super().__init__("\n".join(self.errors))


class NotSupported(NetbpfError):
    """The kernel, driver or device cannot do what was asked (e.g. XDP offload on veth)."""
