"""What an apply records: rule and set digests, conntrack timeouts, the state records of a
part and an interface, and the grace period before an old generation is cleared. Pure.
Not what a program is (store/progspec.py ProgramSpec), not planning (plan.py).
"""
from __future__ import annotations

import hashlib
import time
from array import array
from operator import itemgetter
from typing import TYPE_CHECKING

from netbpf import abi
from netbpf.fw.compile import CompiledDirection
from netbpf.policy.ir import DirectionIR, InterfaceIR, SetIR
from netbpf.store.state import InterfaceState, PartState, RuleState, SetState

if TYPE_CHECKING:
    from netbpf.engine.plan import IfacePlan, PartPlan, Plan

# A packet being classified holds the old generation for microseconds (XDP and TC run under
# RCU); the old generation's entries are removed only after this grace period.
GRACE_S = 0.05


def rule_states(c: CompiledDirection, ir: DirectionIR) -> list[tuple[str, str, str, int]]:
    """(name, action, digest, line) of every rule, terminal and count, in file order."""
    by_name = {r.name: r for r in ir.rules}
    out = [(r.name, by_name[r.name].action, r.digest, by_name[r.name].line) for r in c.rules]
    out += [(r.name, "count", r.digest, by_name[r.name].line) for r in c.count_rules]
    return out


def set_digest(s: SetIR) -> str:
    """A set's fingerprint in the state: a set file's is its bytes' (so a change to the file
    alone can be applied, and recorded, without reading every line: engine/setfiles.py)."""
    if s.file_sha:
        return file_set_digest(s.file_sha)
    h = hashlib.sha256()
    # addresses, then prefix lengths: C-level loops over a million entries
    h.update(array("I", map(itemgetter(0), s.v4)).tobytes())
    h.update(bytes(map(itemgetter(1), s.v4)))
    for a, p in s.v6:
        h.update(a.to_bytes(16, "big") + bytes([p]))
    return h.hexdigest()[:16]


def file_set_digest(sha: str) -> str:
    return "file:" + sha[:16]


def set_digests(c: CompiledDirection, sets: dict[str, SetIR]) -> dict[str, str]:
    return {n: set_digest(sets[n]) for n in sorted({r.set_name for r in c.setrefs})}


def ct_timeouts(iface: InterfaceIR) -> dict:
    t = dict(abi.CT_DEFAULT_TIMEOUTS)
    t.update(dict(iface.ct_timeouts))
    return t if iface.conntrack else {}


def part_state(pp: "PartPlan", *, mode: str, prog_id: int, slots: list[int],
               tags: dict[str, SetState], gen: int = 0, attach: str = "netlink") -> PartState:
    pos = {r.name: i for i, r in enumerate(pp.ir.rules)}
    rules = [RuleState(n, a, d, s, line, pp.direction, pos[n]) for (n, a, d, line), s in
             zip(rule_states(pp.compiled, pp.ir), slots)]
    return PartState(direction=pp.direction, hook=pp.hook, fields=pp.fields, mode=mode,
                     prog_id=prog_id,
                     prog_hash=pp.prog_hash, words=pp.shape.words,
                     class_cap=pp.shape.class_cap, dir_chunks=pp.shape.chunks,
                     default_action=pp.ir.default,
                     rules=rules, sets=list(tags.values()), sample=pp.ir.sample, gen=gen,
                     attach=attach,
                     sampled=bool(pp.ir.sample or any(r.sample for r in pp.ir.rules)))


def iface_state(plan: "Plan", p: "IfacePlan", parts: dict[str, PartState],
                created_clsact: bool) -> InterfaceState:
    return InterfaceState(key=p.key, ifname=p.ifname, netns=p.netns, ifindex=p.ifindex,
                          requested_mode=p.mode, conntrack=p.conntrack,
                          ct_timeouts=p.ct_timeouts, created_clsact=created_clsact,
                          policy_path=plan.policy_path, policy_hash=plan.policy_hash,
                          set_files=plan.set_files,
                          policy_keys=[q.key for q in plan.interfaces if q.what != "remove"],
                          applied_at=time.time(), parts=parts,
                          lb=p.lb_state.to_json() if p.lb_state else {})
