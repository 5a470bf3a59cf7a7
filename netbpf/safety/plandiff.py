"""The plan as a real diff: per rule the fields that changed, +N/-M per set, direction settings.

The apply engine decides what changes by digests (netbpf/engine/plan.py); this module says how,
comparing the new IR with the copy of the policy last applied (netbpf/store/snapshot.py). Pure
apart from reading that copy. Long plans are summarised; text lines and JSON come from the
same diff. Not the planner and not the CLI.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from netbpf.fw.compile import counter_key, rule_digest
from netbpf.policy.ir import DirectionIR, PolicyIR, RuleIR, SetIR
from netbpf.policy.render import RULE_FIELDS, rule_values

SUMMARY_AFTER = 20          # change lines per direction before the rest is summarised
SUMMARY_HEAD = 10


@dataclass
class RuleDiff:
    name: str
    what: str                                   # added | removed | changed | kept
    action: str
    fields: list[tuple[str, object, object]] = field(default_factory=list)  # (field, old, new)
    counters: str = ""                          # kept | reset | new


@dataclass
class SetDiff:
    name: str
    added: int
    removed: int
    total: int
    known: bool = True                          # False: no copy of the old contents


@dataclass
class DirectionDiff:
    direction: str
    settings: list[tuple[str, object, object]] = field(default_factory=list)
    rules: list[RuleDiff] = field(default_factory=list)
    sets: list[SetDiff] = field(default_factory=list)

    def changed(self) -> list[RuleDiff]:
        return [r for r in self.rules if r.what != "kept"]


def old_policy(key: str) -> PolicyIR | None:
    """The IR of the policy last applied to key, from its stored copy; None if there is none."""
    from netbpf.store import snapshot
    from netbpf.errors import NetbpfError
    from netbpf.policy import load_policy

    ir = snapshot.policy_ir(key)
    if ir is not None:
        return ir
    path = snapshot.policy_copy(key)
    if path is not None:
        try:
            ir = load_policy(path).ir
        except NetbpfError:
            ir = None
    return ir


def _set_diff(name: str, new: SetIR, old: SetIR | None) -> SetDiff:
    total = len(new.v4) + len(new.v6)
    if old is None:
        return SetDiff(name, total, 0, total, known=False)
    if old.v4 == new.v4 and old.v6 == new.v6:
        return SetDiff(name, 0, 0, total)
    added = removed = 0
    for n, o in ((set(new.v4), set(old.v4)), (set(new.v6), set(old.v6))):
        added, removed = added + len(n - o), removed + len(o - n)
    return SetDiff(name, added, removed, total)


def diff_direction(direction: str, new: DirectionIR, old: DirectionIR | None,
                   changes, new_sets: dict[str, SetIR], old_sets: dict[str, SetIR] | None,
                   set_names: list[str]) -> DirectionDiff:
    """changes: the apply engine's RuleChange list for this part (its verdict stays)."""
    out = DirectionDiff(direction)
    if old is not None:
        for attr in ("default", "sample", "hook"):
            a, b = getattr(old, attr), getattr(new, attr)
            if a != b:
                out.settings.append((attr, a, b))
    old_rules = {r.name: r for r in old.rules} if old is not None else {}
    new_rules = {r.name: r for r in new.rules}
    was_order = [r.name for r in old.rules if r.name in new_rules] if old is not None else []
    now_order = [r.name for r in new.rules if r.name in old_rules]
    if was_order != now_order:
        out.settings.append(("rule order", was_order, now_order))
    for c in changes:
        d = RuleDiff(c.name, c.what, c.action)
        was, now = old_rules.get(c.name), new_rules.get(c.name)
        if c.what == "added":
            d.counters = "new"
        elif c.what == "kept":
            d.counters = "kept"
        elif c.what == "changed":
            d.counters = "reset"
            if was is not None and now is not None:
                before, after = rule_values(was), rule_values(now)
                d.fields = [(f, before[f], after[f]) for f in RULE_FIELDS
                            if before[f] != after[f]]
                if counter_key(rule_digest(was)) == counter_key(rule_digest(now)):
                    d.counters = "kept"
        out.rules.append(d)
    for name in set_names:
        out.sets.append(_set_diff(name, new_sets[name], (old_sets or {}).get(name)
                                  if old_sets is not None else None))
    return out


def diff_plan(plan) -> dict[str, list[DirectionDiff]]:
    """key -> its directions' diffs, for every interface the plan creates or updates."""
    out = {}
    for p in plan.interfaces:
        if p.what == "remove":
            continue
        old_ir = old_policy(p.key)
        old_iface = old_ir.interfaces.get(p.ifname) if old_ir is not None else None
        diffs = []
        for d, pp in p.parts.items():
            old_dir = getattr(old_iface, d) if old_iface is not None else None
            if old_dir is None and old_iface is not None:
                old_dir = DirectionIR("allow")
            names = sorted({r.set_name for r in pp.compiled.setrefs})
            diffs.append(diff_direction(d, pp.ir, old_dir, pp.rules, plan.sets,
                                        old_ir.sets if old_ir is not None else None, names))
        out[p.key] = diffs
    return out


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items()).join("{}")
    return str(v)


MARK = {"added": "+", "removed": "-", "changed": "~"}


def rule_line(r: RuleDiff) -> str:
    if r.what != "changed" or not r.fields:
        return f"{MARK[r.what]} {r.name} ({r.action})"
    what = "; ".join(f"{f} {_value(a)} -> {_value(b)}" for f, a, b in r.fields)
    note = " (counters kept)" if r.counters == "kept" else ""
    return f"~ {r.name}: {what}{note}"


def direction_lines(dd: DirectionDiff, verbose: bool = False) -> list[str]:
    lines = [f"{f}: {_value(a)} -> {_value(b)}" for f, a, b in dd.settings]
    changed = [rule_line(r) for r in dd.changed()]
    if len(changed) > SUMMARY_AFTER and not verbose:
        counts = {w: sum(1 for r in dd.changed() if r.what == w)
                  for w in ("added", "removed", "changed")}
        lines += changed[:SUMMARY_HEAD]
        lines.append(f"... {len(changed) - SUMMARY_HEAD} more: {counts['added']} added, "
                     f"{counts['removed']} removed, {counts['changed']} changed in all "
                     f"(--verbose lists every one)")
    else:
        lines += changed
    kept = sum(1 for r in dd.rules if r.what == "kept")
    if kept:
        lines.append(f"= {kept} rule(s) unchanged (counters kept)")
    for s in dd.sets:
        if not s.known:
            lines.append(f"set {s.name}: {s.total} entries")
        elif s.added or s.removed:
            lines.append(f"set {s.name}: +{s.added}/-{s.removed} ({s.total} entries)")
        else:
            lines.append(f"set {s.name}: unchanged ({s.total} entries)")
    return lines


def plan_json(plan) -> dict:
    """The whole plan for programs: what each interface does and every change, unsummarised."""
    diffs = diff_plan(plan)
    ifaces = []
    for p in plan.interfaces:
        item = {"interface": p.ifname, "netns": p.netns, "key": p.key, "what": p.what}
        if p.what != "remove":
            item.update(mode=p.mode, conntrack=p.conntrack, new_programs=p.reasons,
                        lb_changed=p.lb_changed, lb_removed=p.lb_removed,
                        directions=[_json_dir(dd) for dd in diffs[p.key]])
        ifaces.append(item)
    return {"policy": plan.policy_path, "policy_hash": plan.policy_hash,
            "changes": plan.changes, "interfaces": ifaces}


def _json_dir(dd: DirectionDiff) -> dict:
    data = asdict(dd)
    data["settings"] = [{"field": f, "old": a, "new": b} for f, a, b in dd.settings]
    for r in data["rules"]:
        r["fields"] = [{"field": f, "old": a, "new": b} for f, a, b in r["fields"]]
    return data
