"""Is a process alive? For lab owners, reapers, appliers and rollback timers: one answer.

A zombie (exited, not yet reaped) counts as gone; a process we may not signal counts as alive.
"""
from __future__ import annotations

import os


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
