"""A re-apply where only set files changed, each a list of bare IPv4 addresses (the common
blocklist), done without parsing the policy or the unchanged lines of the set file.

In such a file a line is its entry (inet_pton accepts one spelling of an IPv4 address), so
the lines a file gained and lost since the last apply, diffed against the copy that apply
kept (netbpf/store/snapshot.py), are exactly the entries to add and delete. They are written
under the running tags with the journal, kill points and ordering of an in-place set update
(setdelta.py): O(changed lines) parsing and map writes; reading and hashing the file is the
rest.

Anything else returns None, with nothing written, and the full path (parse, plan, lockout
guard) decides: the policy file changed; a changed file with comments, prefixes, IPv6 or a
bad line (the full path names file and line); a set that would become empty; a changed
address that a `protect:` flow or this ssh session uses; drift, an interrupted apply, or a
copy that does not match what runs.
"""
from __future__ import annotations

import copy
import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from netbpf import abi
from netbpf.engine.unchanged import applied_states, settled
from netbpf.policy.inputs import Inputs
from netbpf.store import snapshot
from netbpf.store.state import InterfaceState, apply_lock

Log = Callable[[str], None]


@dataclass
class FileChange:
    rel: str                  # as the policy names it
    raw: bytes                # the new bytes
    sha: str
    added: bytes = b""        # 4-byte network-order addresses, concatenated
    removed: bytes = b""

    def counts(self) -> tuple[int, int]:
        return len(self.added) // 4, len(self.removed) // 4


@dataclass
class SetFilesPlan:
    path: Path
    states: list[InterfaceState]
    changes: dict[str, FileChange] = field(default_factory=dict)
    policy_hash: str = ""
    sets: dict[str, str] = field(default_factory=dict)    # set name -> file


def apply_set_files(policy: str, netns: str | None, log: Log,
                    states: list[InterfaceState], inputs: Inputs) -> bool:
    """Apply policy if only bare-IPv4 set files changed; False (nothing done) otherwise.
    states: applied_states(policy, netns) read before the lock; inputs: the files, read
    once (what is applied is these bytes, whatever the files hold by the end)."""
    if _changes(states, inputs) is None:    # the common no, before any lock
        return False
    keys = sorted(st.key for st in states)
    with apply_lock(keys, wait_message=log):
        plan = plan_set_files(policy, netns, inputs)    # against what runs under the lock
        if (plan is None or sorted(st.key for st in plan.states) != keys
                or not _added_are_new(plan)):
            return False
        write_set_files(plan, log)
    return True


def _changes(states: list[InterfaceState], inputs: Inputs):
    """(the copies' manifest, the set files that changed) when the copies describe what
    runs, the policy file is theirs and each changed file was a plain list; else None."""
    m = snapshot.manifest(states[0].key)
    if (m is None or "plain" not in m or m.get("policy_hash") != states[0].policy_hash
            or any(snapshot.manifest(st.key) != m for st in states[1:])
            or inputs.sha() != m["files"].get(snapshot.POLICY_NAME)
            or list(inputs.sets) != states[0].set_files):
        return None
    changes = {}
    for rel, raw in inputs.sets.items():
        sha = inputs.sha(rel)
        if sha != m["files"].get(rel):
            changes[rel] = FileChange(rel, raw, sha)
    if not changes or any(rel not in m["plain"] for rel in changes):
        return None
    return m, changes


def plan_set_files(policy: str, netns: str | None, inputs: Inputs) -> SetFilesPlan | None:
    applied = applied_states(policy, netns)
    if applied is None:
        return None
    path, states = applied
    found = _changes(states, inputs)
    if found is None:
        return None
    m, changes = found
    plan = SetFilesPlan(path, states, changes, sets=m["sets"])
    try:
        for ch in changes.values():
            old = (snapshot.snapshot_dir(states[0].key) / "files" / ch.rel.lstrip("/")) \
                .read_bytes()
            if _sha(old) != m["files"][ch.rel] or not _diff(old, ch):
                return None
    except OSError:
        return None
    plan.policy_hash = inputs.digest()
    if _touches_guarded(plan, m["guard"]) or not _counts_fit(plan) or not settled(states):
        return None
    return plan


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _diff(old: bytes, ch: FileChange) -> bool:
    """Fill ch's added and removed addresses from the lines between the longest common
    head and tail of the two files (whole lines; an append or a deletion in one place is
    found without looking at the rest). False when that is unsafe or not this case: a
    gained line that is not a bare IPv4 address (the full path reports it), a repeated one,
    an empty file."""
    if not ch.raw:
        return False
    o = old if old.endswith(b"\n") else old + b"\n"
    n = ch.raw if ch.raw.endswith(b"\n") else ch.raw + b"\n"
    limit = min(len(o), len(n))
    head = o.rfind(b"\n", 0, _common_head(o, n, limit)) + 1
    tail = _common_tail(o, n, limit - head)
    x, y = len(o) - tail, len(n) - tail
    if tail and not (x == head or (o[x - 1:x] == b"\n" and n[y - 1:y] == b"\n")):
        x = o.index(b"\n", x) + 1              # the first line start both files share
        y = len(n) - (len(o) - x)
    was = o[head:x][:-1].split(b"\n") if x > head else []
    now = n[head:y][:-1].split(b"\n") if y > head else []
    was_set, now_set = set(was), set(now)
    if len(now_set) != len(now) or len(was_set) != len(was):
        return False
    pton = socket.inet_pton
    try:
        ch.added = b"".join(pton(socket.AF_INET, line.decode("ascii"))
                            for line in now if line not in was_set)
        ch.removed = b"".join(pton(socket.AF_INET, line.decode("ascii"))
                              for line in was if line not in now_set)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


_BLOCK = 1 << 16


def _common_head(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common prefix of a and b, at most limit."""
    return _common_run(lambda x, y: a[x:y] == b[x:y], limit)


def _common_tail(a: bytes, b: bytes, limit: int) -> int:
    """Length of the longest common suffix of a and b, at most limit."""
    la, lb = len(a), len(b)
    return _common_run(lambda x, y: a[la - y:la - x] == b[lb - y:lb - x], limit)


def _common_run(same: Callable[[int, int], bool], limit: int) -> int:
    """The largest k <= limit with same(0, k), given same(x, y): bytes x..y (counted from
    where the run starts) agree. Block compares, then a bisection inside the first block
    that differs: a few memcmp over the files, no Python loop over bytes or lines."""
    i = 0
    while i < limit:
        n = min(_BLOCK, limit - i)
        if not same(i, i + n):
            lo, hi = i, i + n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if same(lo, mid):
                    lo = mid
                else:
                    hi = mid
            return lo
        i += n
    return limit


def _touches_guarded(plan: SetFilesPlan, guard: list) -> bool:
    """A changed address is a protect: flow's end or this ssh session's (found as the
    lockout guard finds it, from our environment or an ancestor's): the full path runs the
    lockout check."""
    from netbpf.safety.lockout import current_ssh_session

    ends = [tuple(a) for a in guard]
    ssh = current_ssh_session()
    if ssh is not None:
        ends += [(ssh.family, ssh.src), (ssh.family, ssh.dst)]
    mine = set()
    for fam, v in ends:
        if fam == 6 and v >> 32 == 0xFFFF:      # an IPv4-mapped address: its IPv4 too
            fam, v = 4, v & 0xFFFFFFFF
        if fam == 4:
            mine.add(v.to_bytes(4, "big"))
    if not mine:
        return False
    for ch in plan.changes.values():
        for blob in (ch.added, ch.removed):
            if any(blob[i:i + 4] in mine for i in range(0, len(blob), 4)):
                return True
    return False


def _set_uses(plan: SetFilesPlan, st: InterfaceState):
    """(direction, SetState, its file's change) for every set of st reading a changed file."""
    for d, part in st.parts.items():
        for s in part.sets:
            ch = plan.changes.get(plan.sets.get(s.name, ""))
            if ch is not None:
                yield d, s, ch


def _counts_fit(plan: SetFilesPlan) -> bool:
    """Every set reading a changed file holds IPv4 hosts only (hash-map storage) and keeps at
    least one (an empty set changes storage: the full path writes it)."""
    for st in plan.states:
        for _, s, ch in _set_uses(plan, st):
            added, removed = ch.counts()
            if s.v6 or s.v4 + added - removed <= 0:
                return False
    return True


def _added_are_new(plan: SetFilesPlan) -> bool:
    """No gained line repeats a line the files share (the set would then hold it already,
    and the file would no longer be one line per entry): asked of the kernel, per key."""
    from netbpf.engine.setdelta import open_part
    from netbpf.fw.fwtables import hosts4_keys
    from netbpf.kernel import bpfsys

    st, checked = plan.states[0], set()
    for d, s, ch in _set_uses(plan, st):
        if ch.rel in checked:
            continue
        checked.add(ch.rel)
        t = open_part(st, d)
        try:
            fd = t.fd(abi.NB_MAP_SETH4)
            if any(bpfsys.map_lookup(fd, k, 4) is not None
                   for k in hosts4_keys(s.tag, ch.added)):
                return False
        finally:
            t.close()
    return True


def write_set_files(plan: SetFilesPlan, log: Log) -> None:
    from netbpf.engine import persist
    from netbpf.engine.records import file_set_digest
    from netbpf.engine.setdelta import open_part, write_deltas
    from netbpf.fw.fwtables import SetDelta, hosts4_keys

    changed = {ch.rel: ch.raw for ch in plan.changes.values()}
    for rel, ch in plan.changes.items():
        added, removed = ch.counts()
        log(f"{plan.path.name}: only set file {rel} changed: +{added} -{removed} lines"
            "; the rules are unchanged")

    def record_files() -> None:
        keys = [st.key for st in plan.states]
        snapshot.record_set_files(keys, {ch.rel: (ch.raw, ch.sha)
                                         for ch in plan.changes.values()}, plan.policy_hash)
        persist.refresh_set_files(
            str(plan.path), plan.states[0].netns,
            {os.path.abspath(plan.path.parent / rel): raw for rel, raw in changed.items()},
            plan.policy_hash)

    for i, old in enumerate(plan.states):
        new = copy.deepcopy(old)
        new.policy_hash, new.applied_at = plan.policy_hash, time.time()
        work, opened = [], {}
        try:
            for d, s, ch in _set_uses(plan, new):
                if d not in opened:
                    opened[d] = open_part(new, d)
                added, removed = ch.counts()
                s.v4, s.digest = s.v4 + added - removed, file_set_digest(ch.sha)
                delta = SetDelta(s.tag)
                for keys, blob in ((delta.add, ch.added), (delta.remove, ch.removed)):
                    if blob:
                        keys[abi.NB_MAP_SETH4] = hosts4_keys(s.tag, blob)
                work.append((d, s.name, delta))
            last = i == len(plan.states) - 1
            write_deltas(old, new, work, opened, log, before_save=record_files if last else None)
        finally:
            for t in opened.values():
                t.close()
