"""Flattened rules and load balancers -> the text of a netbpf policy, with source comments.

Flow-style YAML written by hand (one rule a line, a comment above it naming the source line),
because that reads like the source ruleset; values are JSON-quoted, which YAML accepts.
Not a parser; nothing here decides semantics (flatten.py does).
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any

from netbpf.importer.flatten import OutDirection, OutInterface, OutRule

KEY_ORDER = ("name", "ct", "src", "dst", "proto", "sport", "dport", "icmp_type", "icmp_code",
             "tcp_flags", "action")


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.").lower()
    return s[:40] or "rule"


class Namer:
    def __init__(self) -> None:
        self.used: set[str] = set()

    def name(self, base: str) -> str:
        base = _slug(base)
        name, n = base, 2
        while name in self.used:
            name, n = f"{base}-{n}", n + 1
        self.used.add(name)
        return name


def expand(fields: dict) -> list[dict]:
    """Fields holding several protocols or ICMP types -> one rule per value (netbpf holds one)."""
    keys = [k for k in ("proto", "icmp_type") if isinstance(fields.get(k), list)]
    if not keys:
        return [fields]
    out = []
    for combo in itertools.product(*(fields[k] for k in keys)):
        f = dict(fields)
        f.update(zip(keys, combo))
        if f.get("proto") not in (None, "tcp", "udp") and ("sport" in f or "dport" in f):
            continue
        if "tcp_flags" in f and f.get("proto") != "tcp":
            continue
        out.append(f)
    return out


def _rule_lines(rule: OutRule, namer: Namer, indent: str) -> list[str]:
    lines = []
    if rule.src.text:
        lines.append(f"{indent}# {rule.src.where}: {rule.src.text[:200]}")
    for note in rule.notes:
        lines.append(f"{indent}# note: {note}")
    base = rule.src.comment or _base_name(rule)
    for f in expand(rule.fields):
        f = dict(f)
        action = f.pop("action", rule.action)
        f["name"] = namer.name(base)
        f["action"] = action
        body = ", ".join(f"{k}: {_value(f[k])}" for k in KEY_ORDER if k in f)
        lines.append(f"{indent}- {{{body}}}")
    return lines


def _base_name(rule: OutRule) -> str:
    where = rule.src.where.rsplit(":", 1)
    line = where[1] if len(where) == 2 and where[1].isdigit() else "x"
    return f"{rule.action.replace('_', '-')}-{line}" if rule.src.text else "other-family"


def emit_policy(title: str, interfaces: dict[str, OutInterface],
                sets: dict[str, list[str]], set_where: dict[str, str],
                load_balancers: list[tuple[str, dict, list[str]]]) -> str:
    out = [f"# netbpf policy imported by {title}",
           "# Review it, then: netbpf validate FILE && netbpf apply FILE",
           "version: 1"]
    if sets:
        out.append("sets:")
        for name, entries in sets.items():
            if name in set_where:
                out.append(f"  # {set_where[name]}")
            out.append(f"  {name}: {_value(entries)}")
    live = {n: i for n, i in interfaces.items() if i.ingress or i.egress}
    if live:
        out.append("interfaces:")
    for name, iface in live.items():
        out.append(f"  {name}:")
        if iface.conntrack:
            out.append(f"    # {iface.conntrack}: replies of tracked connections pass")
            out.append("    conntrack: true")
        namer = Namer()
        for direction in ("ingress", "egress"):
            d: OutDirection | None = getattr(iface, direction)
            if d is None:
                continue
            out.append(f"    {direction}:")
            if d.default_where:
                out.append(f"      # {d.default_where}: chain policy")
            out.append(f"      default: {d.default}")
            if not d.rules:
                out.append("      rules: []")
                continue
            out.append("      rules:")
            for rule in d.rules:
                out += _rule_lines(rule, namer, "        ")
    if load_balancers:
        out.append("load_balancers:")
        for name, lb, comments in load_balancers:
            out += [f"  # {c}" for c in comments]
            out.append(f"  {name}:")
            for key, v in lb.items():
                if key == "backends":
                    out.append("    backends:")
                    out += [f"      - {_value(b)}" for b in v]
                else:
                    out.append(f"    {key}: {_value(v)}")
    return "\n".join(out) + "\n"
