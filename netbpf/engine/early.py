"""`netbpf apply FILE` answered before the policy is parsed: the input is what runs
(unchanged.py: "nothing to do"), or only bare-IPv4 set files changed (setfiles.py: their
changed lines written in place). One read of the states serves both; each process asks once
(netbpf/__main__.py for a plain apply, else the CLI's apply), so the full path that follows
a "no" pays for it once.
"""
from __future__ import annotations

from typing import Callable

ASKED = False


def early_apply(policy: str, netns: str | None, log: Callable[[str], None]) -> bool:
    """True when done (and said so through log); False: the full path decides."""
    global ASKED
    ASKED = True
    from netbpf.engine.unchanged import MESSAGE, applied_states, settled
    from netbpf.policy.inputs import read_inputs

    applied = applied_states(policy, netns)
    if applied is None:
        return False
    path, states = applied
    inputs = read_inputs(path, states[0].set_files)
    if inputs is None:
        return False
    if inputs.digest() == states[0].policy_hash:
        if settled(states):
            log(MESSAGE)
            return True
        return False
    from netbpf.engine.setfiles import apply_set_files
    return apply_set_files(policy, netns, log, states, inputs)
