"""The apply engine's entry points: plan (desired policy vs. what is pinned) under the locks
of the interfaces it touches, then make it so, interface by interface, atomically.

An interface runs up to two programs ("parts"): the XDP ingress firewall and, when the policy
has egress rules or conntrack, the TC egress firewall. Rule edits write the inactive
generation of each part's pinned maps and flip one value (update.py); new programs are
filled before they replace the old ones, each in one kernel call (programs.py, hooks.py).
Any failure leaves the previous policy running; a kill is finished or undone by the next
apply (recover.py). The layout: records.py (what an apply records), plan.py, update.py,
programs.py, hooks.py, detach.py, recover.py. Not the CLI (netbpf/cli/dataplane.py), not
map layouts (netbpf/fw/fwtables.py), not the kernel (netbpf/kernel/api.py).
"""
from __future__ import annotations

from glob import escape as glob_escape
from pathlib import Path
from typing import Callable

from netbpf.engine.detach import detach, detach_key  # noqa: F401  (public names)
from netbpf.engine.plan import IfacePlan, PartPlan, Plan, RuleChange, plan_apply  # noqa: F401
from netbpf.engine.programs import apply_new_programs
from netbpf.engine.recover import recover_all
from netbpf.engine.update import apply_update
from netbpf.store import snapshot
from netbpf.store.state import (apply_lock, iface_key, InterfaceState, list_states,
                                save_state, staging_dirs, state_file, unpin_tree)

Log = Callable[[str], None]


def apply_policy(loaded_policy, policy_path: str, netns: str | None, log: Log = print,
                 show_plan: Callable[[Plan], None] | None = None) -> Plan:
    """Plan and apply under the locks of the interfaces the plan touches, so the plan is made
    against the state it changes (a plan made before waiting for another apply would work
    from a stale state). Applies to other interfaces go on meanwhile."""
    keys = _policy_keys(loaded_policy, policy_path, netns)
    while True:
        with apply_lock(keys, wait_message=log):
            unrepaired = recover_all(log, keys)
            remove_leftovers(keys, keep=unrepaired)
            plan = plan_apply(loaded_policy, policy_path, netns)
            more = {p.key for p in plan.interfaces} - keys
            if more:          # another apply of this file added an interface meanwhile
                keys |= more
                continue
            if show_plan:
                show_plan(plan)
            if plan.changes:
                apply_plan(plan, log, locked=True)
            _record_inputs(plan)
            # copies of the files for status, show and commit-confirmed rollback
            snapshot.record([p.key for p in plan.interfaces if p.what != "remove"],
                            loaded_policy, policy_path, netns)
            return plan


def _record_inputs(plan: Plan) -> None:
    """An interface whose tables did not change still records this apply's input (file, its
    hash, set files, sibling interfaces), so the next identical apply is known unchanged
    before parsing (netbpf/engine/unchanged.py)."""
    keys = [q.key for q in plan.interfaces if q.what != "remove"]
    for p in plan.interfaces:
        st = p.old
        if p.what != "unchanged" or st is None:
            continue
        now = (plan.policy_path, plan.policy_hash, plan.set_files, keys)
        if (st.policy_path, st.policy_hash, st.set_files, st.policy_keys) != now:
            st.policy_path, st.policy_hash, st.set_files, st.policy_keys = now
            save_state(st)


def _policy_keys(loaded_policy, policy_path: str, netns: str | None) -> set[str]:
    """The interfaces an apply of this file may change: those it names, and those it named
    before (removed by the plan)."""
    ir = loaded_policy.ir
    names = set(ir.interfaces) | {lb.interface for lb in ir.load_balancers.values()}
    path = str(Path(policy_path).resolve())
    return {iface_key(n, netns) for n in names} | \
        {st.key for st in list_states() if st.policy_path == path and st.netns == netns}


def remove_leftovers(keys, keep: frozenset[str] = frozenset()) -> None:
    """Staging pins and half-written state files of an apply of keys killed before it wrote
    its journal (only an apply holding a key's lock uses them); keep: keys being repaired."""
    for key in set(keys) - keep:
        for d in staging_dirs(key):
            unpin_tree(d)
        for kind in ("json", "journal"):
            for tmp in state_file(key).parent.glob(f"{glob_escape(key)}.{kind}.tmp*"):
                tmp.unlink(missing_ok=True)


def apply_plan(plan: Plan, log: Log = print, locked: bool = False) -> list[InterfaceState]:
    """Make the plan so; each interface either switches whole or not. Takes the apply lock
    unless the caller holds it (apply_policy)."""
    if not locked:
        with apply_lock({p.key for p in plan.interfaces}, wait_message=log):
            return apply_plan(plan, log, locked=True)
    done = []
    for p in plan.interfaces:
        if p.what == "unchanged":
            done.append(p.old)
            continue
        if p.what == "remove":
            detach_key(p.key, log)
            continue
        st = apply_new_programs(plan, p, log) if p.new_program else apply_update(plan, p, log)
        done.append(st)
    return done
