"""Recognise a re-apply of exactly what runs, before parsing anything: the policy file and its
set files hash to what the last apply recorded, every interface it made is still there, and
nothing drifted or was interrupted. Then `apply` has nothing to do.

Reads files, state and (for drift) netlink; imports neither the policy models nor bcc.
"""
from __future__ import annotations

from pathlib import Path

from netbpf.observe.drift import drift
from netbpf.policy.inputs import input_hash
from netbpf.store.state import (PARTIAL_SET, health_file, list_states, load_journal,
                                staging_dirs)

MESSAGE = "nothing to do: the running policy is this one (input unchanged)"


def input_unchanged(policy: str, netns: str | None) -> bool:
    path = Path(policy)
    try:
        resolved = str(path.resolve())
    except (OSError, RuntimeError):      # a symlink loop: the full path reports it
        return False
    states = [st for st in list_states() if st.policy_path == resolved and st.netns == netns]
    if not states:
        return False
    first = states[0]
    if not first.policy_keys or sorted(first.policy_keys) != sorted(st.key for st in states):
        return False
    if any((st.policy_hash, st.set_files, st.policy_keys) !=
           (first.policy_hash, first.set_files, first.policy_keys) for st in states):
        return False
    if input_hash(path, first.set_files) != first.policy_hash:
        return False
    # the health checker's findings also shape the tables, and leftovers of a killed apply
    # (staging pins) are for the full path to remove
    # (a set left half-updated by a killed repair is also for the full path to finish)
    return not any(load_journal(st.key) or health_file(st.key).exists()
                   or any(d.exists() for d in staging_dirs(st.key))
                   or any(s.digest == PARTIAL_SET for p in st.parts.values() for s in p.sets)
                   or drift(st)
                   for st in states)
