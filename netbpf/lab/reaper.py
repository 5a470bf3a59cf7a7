"""Watchdog that removes a lab when the process owning it dies without tearing it down (SIGKILL).

Run as 'python -m netbpf.lab.reaper PREFIX' with a pipe on stdin held by the owner: 'done' on the
pipe means the owner cleaned up; EOF without it means the owner is gone, so remove the lab.
Not a daemon: one per lab, in its own session so a signal to the owner's process group spares it.
"""
from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    prefix = argv[1]
    data = b""
    while True:
        chunk = sys.stdin.buffer.read1(4096)
        if not chunk:
            break
        data += chunk
    if b"done" in data:
        return 0
    from netbpf.lab.registry import cleanup

    try:
        cleanup(prefix)
    except Exception as e:  # noqa: BLE001 - nobody is left to tell but stderr
        print(f"netbpf lab reaper: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
