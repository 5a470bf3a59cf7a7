"""The plan and the outcome of an apply as plain dicts, for `netbpf apply --json` and tools
driving it (the Ansible collection in ansible/). Reads the plan and the state files only;
not the engine (netbpf/engine/) and not the people's text (netbpf/cli/dataplane.py).
"""
from __future__ import annotations

from netbpf.policy.ir import addr_text
from netbpf.store.state import load_state

# rule-level marks shared by the JSON "diff" text and the people's plan
MARK = {"added": "+", "removed": "-", "changed": "~"}


def _part_record(pp, plan) -> dict:
    return {
        "hook": pp.hook,
        "default": pp.ir.default,
        "rules": [{"name": r.name, "action": r.action, "change": r.what} for r in pp.rules],
        "sets": {s: {"ipv4": len(plan.sets[s].v4), "ipv6": len(plan.sets[s].v6)}
                 for s in sorted({r.set_name for r in pp.compiled.setrefs})},
    }


def _iface_record(p, plan) -> dict:
    rec = {
        "interface": p.ifname,
        "netns": p.netns,
        "action": p.what,                       # create | update | unchanged | remove
        "changed": p.what != "unchanged",
        "new_programs": p.new_program,
        "reasons": list(p.reasons),
    }
    if p.what == "remove":
        rec["parts"], rec["load_balancers"] = {}, []
        return rec
    rec["mode"] = p.mode
    rec["conntrack"] = p.conntrack
    rec["parts"] = {d: _part_record(pp, plan) for d, pp in p.parts.items()}
    rec["load_balancers"] = [
        {"name": lb.name, "vip": addr_text(lb.family, lb.vip), "port": lb.port,
         "proto": "tcp" if lb.proto == 6 else "udp", "mode": lb.mode,
         "backends": len(lb.backends),
         "change": "changed" if lb.name in p.lb_changed else "unchanged"}
        for lb in p.lbs] + [{"name": n, "change": "removed"} for n in p.lb_removed]
    return rec


def plan_diff(records: list[dict]) -> str:
    """The plan as a diff people read: one line per interface that changes, one per rule."""
    out = []
    for r in records:
        where = r["interface"] + (f" (netns {r['netns']})" if r["netns"] else "")
        if not r["changed"]:
            continue
        if r["action"] == "remove":
            out.append(f"- {where}: detach")
            continue
        why = f" ({', '.join(r['reasons'])})" if r["reasons"] else ""
        out.append(f"~ {where}: {r['action']}{why}")
        for d, part in r["parts"].items():
            for rule in part["rules"]:
                if rule["change"] in MARK:
                    out.append(f"  {MARK[rule['change']]} {d} {rule['name']} ({rule['action']})")
        for lb in r["load_balancers"]:
            if lb["change"] == "removed":
                out.append(f"  - load balancer {lb['name']}")
            elif lb["change"] == "changed":
                out.append(f"  ~ load balancer {lb['name']} ({lb['vip']}:{lb['port']})")
    return "\n".join(out) + ("\n" if out else "")


def plan_record(plan, dry_run: bool) -> dict:
    ifaces = [_iface_record(p, plan) for p in plan.interfaces]
    return {"policy": plan.policy_path, "policy_hash": plan.policy_hash, "netns": plan.netns,
            "dry_run": dry_run, "changed": plan.changes, "interfaces": ifaces,
            "diff": plan_diff(ifaces), "errors": []}


def outcome_record(plan, started_at: float, error: Exception | None = None) -> dict:
    """The plan plus what the kernel now runs, read back from the state files: an interface
    whose state was written after started_at was applied, program ids included. With an
    error, the interfaces not reached (or rolled back) say applied: false."""
    rec = plan_record(plan, dry_run=False)
    for r, p in zip(rec["interfaces"], plan.interfaces):
        st = load_state(p.key)
        if p.what == "remove":
            r["applied"] = st is None
        elif p.what == "unchanged":
            r["applied"] = True
        else:
            r["applied"] = st is not None and st.applied_at >= started_at
        r["programs"] = {d: part.prog_id for d, part in st.parts.items()} if st else {}
        if error is not None and not r["applied"]:
            r["changed"] = False
    rec["changed"] = any(r["changed"] for r in rec["interfaces"])
    if error is not None:
        rec["errors"] = [error_record(error)]
    return rec


def error_record(error: Exception) -> dict:
    """A runtime error: no place in a file, the message and the exit code."""
    return {"file": None, "line": None, "column": None, "path": None, "message": str(error),
            "exit_code": getattr(error, "exit_code", 1)}
