"""Set updates in place: when only the contents of sets changed (the rules, and so every
table of the running generation, stay), the entries each set gains are written and those it
loses deleted under its running tag — O(changes) map writes, no generation, no flip.

What a packet sees meanwhile is in docs/policy.md ("While a set changes"); a kill half-way
is repaired by the next apply (docs/engine.md, journal kind "sets"). Not the decision that a
change is set-only (update.py), not the map layout (netbpf/fw/fwtables.py).
"""
from __future__ import annotations

import copy
from typing import Callable

from netbpf.engine import faults
from netbpf.fw.fwtables import FwTables, SetDelta
from netbpf.policy.ir import SetIR
from netbpf.store.state import (PARTIAL_SET, InterfaceState, Journal, pin_dir, remove_journal,
                                save_journal, save_state)


Log = Callable[[str], None]


def write_set_deltas(old: InterfaceState, new: InterfaceState, sets: dict[str, SetIR],
                     log: Log) -> InterfaceState | None:
    """Make new (old with some sets' contents changed, same tags) true by deltas. None, with
    nothing written, when a set would change storage (hash map <-> trie): the caller then
    writes a new generation."""
    opened: dict[str, FwTables] = {}
    try:
        work: list[tuple[str, str, SetDelta]] = []
        for d, part in new.parts.items():
            was = {s.name: s.digest for s in old.parts[d].sets}
            for s in part.sets:
                if was.get(s.name) == s.digest:
                    continue
                if d not in opened:
                    opened[d] = open_part(new, d)
                delta = opened[d].set_delta(s.tag, sets[s.name])
                if delta is None:
                    return None
                work.append((d, s.name, delta))
        return write_deltas(old, new, work, opened, log)
    finally:
        for t in opened.values():
            t.close()


def open_part(st: InterfaceState, d: str) -> FwTables:
    part = st.parts[d]
    return FwTables.from_pins(pin_dir(st.key) / d, part.words, part.class_cap)


def write_deltas(old: InterfaceState, new: InterfaceState,
                 work: list[tuple[str, str, SetDelta]], opened: dict[str, FwTables], log: Log,
                 before_save: Callable[[], None] | None = None) -> InterfaceState:
    """Write work ((direction, set name, delta) on the tables opened per direction) under a
    journal, then record new: additions first, removals after, so an address changes
    membership at most once. before_save runs between the writes and the state."""
    names = {name for _, name, _ in work}
    marked = copy.deepcopy(old)
    for part in marked.parts.values():
        for s in part.sets:
            if s.name in names:
                s.digest = PARTIAL_SET
    save_journal(Journal("sets", marked))
    faults.kill_point("sets:journal")
    for d, _, delta in work:
        opened[d].add_entries(delta)
    faults.kill_point("sets:added")
    for d, _, delta in work:
        opened[d].remove_entries(delta)
    if before_save:
        before_save()
    save_state(new)
    remove_journal(new.key)
    faults.kill_point("sets:state-saved")
    for d, name, delta in work:
        added, removed = delta.counts()
        log(f"{new.key}: {d} set {name} updated in place: +{added} -{removed} entries")
    return new
