"""Kill points for crash tests: the apply engine names each step it passes, and a test that sets
NETBPF_KILL_AT=<step> gets the process SIGKILLed exactly there (no signal handler, no cleanup).

Not a debugging switch and not an error path: unset, a kill point is one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "NETBPF_KILL_AT"

# Every step an apply can be killed after, in the order a program-changing apply passes them
# ("<d>" is a direction), then the steps of a rule-only apply, then those of a set-only one
# (sets updated in place). Tests iterate over these.
PROGRAM_STEPS = ("loaded", "journal", "attached-ingress", "attached-egress", "old-detached",
                 "pins-retired", "pins-renamed", "state-saved")
UPDATE_STEPS = ("written", "journal", "flipped-ingress", "flipped-egress", "state-saved")
SET_STEPS = ("journal", "added", "state-saved")      # a set-only change, in place


def kill_point(step: str) -> None:
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
