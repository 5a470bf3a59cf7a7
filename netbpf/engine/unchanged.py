"""Recognise a re-apply of exactly what runs, before parsing anything: the policy file and its
set files hash to what the last apply recorded, every interface it made is still there, and
nothing drifted or was interrupted. Then `apply` has nothing to do (netbpf/engine/early.py
asks; setfiles.py uses the same two checks).

Reads files, state and pins (drift: bpf() calls for link-attached parts, netlink for the
others); imports neither the policy models nor bcc.
"""
from __future__ import annotations

from pathlib import Path

from netbpf.observe.drift import drift
from netbpf.store.progspec import ProgramSpec
from netbpf.store.state import (PARTIAL_SET, InterfaceState, health_file, list_states,
                                load_journal, staging_dirs)

MESSAGE = "nothing to do: the running policy is this one (input unchanged)"


def applied_states(policy: str, netns: str | None):
    """(resolved policy path, the states its last apply made) when that apply is complete and
    consistent: every interface it names is recorded with the same input. None otherwise."""
    path = Path(policy)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):      # a symlink loop: the full path reports it
        return None
    states = [st for st in list_states() if st.policy_path == str(resolved)
              and st.netns == netns]
    if not states:
        return None
    first = states[0]
    if not first.policy_keys or sorted(first.policy_keys) != sorted(st.key for st in states):
        return None
    if any((st.policy_hash, st.set_files, st.policy_keys) !=
           (first.policy_hash, first.set_files, first.policy_keys) for st in states):
        return None
    return resolved, states


def programs_current(st: InterfaceState) -> bool:
    """Every running program is the one this netbpf builds for its recorded shape: after an
    upgrade (other BPF sources or headers) the same input must still get the new programs."""
    lb_cap = st.lb.get("ring_cap", 0) if st.lb and st.lb.get("vips") else 0
    try:
        return all(ProgramSpec.recorded(st, d, lb_cap).hash() == part.prog_hash
                   for d, part in st.parts.items())
    except (ValueError, OSError):
        return False


def settled(states) -> bool:
    """Nothing for the full path to do first: no interrupted apply, no health findings (they
    also shape the tables), no staging pins of a killed apply, no half-updated set, no
    program another netbpf built, no drift."""
    return not any(load_journal(st.key) or health_file(st.key).exists()
                   or any(d.exists() for d in staging_dirs(st.key))
                   or any(s.digest == PARTIAL_SET for p in st.parts.values() for s in p.sets)
                   or not programs_current(st)
                   or drift(st)
                   for st in states)
