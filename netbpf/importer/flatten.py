"""A parsed Ruleset -> ordered netbpf rules per interface and direction, plus warnings.

Jumps and gotos are inlined in order (the jump's matches ANDed into each rule of the called
chain), RETURN ends a chain (a conditional RETURN on one field becomes that field negated for
the rest), conntrack states become the interface's conntrack switch or `ct: invalid`.
Not a parser and not a YAML writer (emit.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from netbpf.importer.model import NEGATABLE, Chain, Note, Ruleset, SrcRule, Table, conjoin

MAX_DEPTH = 32       # iptables allows deeper chains; past this a loop is the likelier reason
HOOK_DIRECTION = {"input": "ingress", "output": "egress"}


@dataclass
class OutRule:
    src: SrcRule
    fields: dict
    action: str
    notes: list[str] = field(default_factory=list)


@dataclass
class OutDirection:
    default: str = "allow"
    default_where: str = ""
    rules: list[OutRule] = field(default_factory=list)


@dataclass
class OutInterface:
    conntrack: str | None = None                 # where the ESTABLISHED accept was, if any
    ingress: OutDirection | None = None
    egress: OutDirection | None = None


class Flattener:
    def __init__(self, ruleset: Ruleset, interfaces: list[str], forward: bool):
        self.rs = ruleset
        self.forward = forward
        self.notes: list[Note] = list(ruleset.notes)
        self.interfaces = interfaces or self._named_interfaces()

    def warn(self, where: str, message: str) -> None:
        self.notes.append(Note(where, message))

    def _named_interfaces(self) -> list[str]:
        names: list[str] = []
        for table in self.rs.tables:
            for chain in table.chains.values():
                for r in chain.rules:
                    for spec in (r.iif, r.oif):
                        if spec and not spec[1]:
                            names += [n for n in spec[0] if n != "lo" and not n.endswith("+")]
        names = list(dict.fromkeys(names))
        if not names:
            self.warn("import", "no interface is named in the rules; using 'eth0' (pass "
                                "--interface NAME to choose)")
            names = ["eth0"]
        return names

    # ---- chains -> flat rule lists ----------------------------------------------------------

    def flat(self, table: Table, chain: Chain, ctx: SrcRule | None, stack: tuple[str, ...],
             policy: str | None) -> list[SrcRule]:
        out: list[SrcRule] = []
        for r in chain.rules:
            for why in r.unsupported:
                self.warn(r.where, f"{why}; the rule is not imported")
            if r.unsupported:
                continue
            for why in r.warnings:
                self.warn(r.where, why)
            rr = r
            if ctx is not None:
                rr, why = conjoin(ctx, r)
                if rr is None:
                    if why:
                        self.warn(r.where, f"not imported: {why} (called from {ctx.where})")
                    continue
            if r.verdict in ("jump", "goto"):
                target = table.chains.get(r.target or "")
                if target is None:
                    self.warn(r.where, f"jump to unknown chain '{r.target}'; not imported")
                elif target.name in stack or len(stack) >= MAX_DEPTH:
                    self.warn(r.where, f"jump to '{r.target}' loops; not imported")
                else:
                    call = replace(rr, verdict=None, target=None)
                    out += self.flat(table, target, call, stack + (target.name,), policy)
                    if r.verdict == "goto" and _conditional(r) and _falls_through(target):
                        self.warn(r.where, f"goto '{r.target}' is imported as a jump: packets "
                                           "that leave it continue with the next rules")
            elif r.verdict == "return":
                if not _conditional(r):
                    break
                if ctx is None:          # base chain: RETURN applies the chain policy
                    out.append(replace(rr, verdict=policy or "allow"))
                    continue
                negated = _negate_one(ctx, r)
                if negated is None:
                    self.warn(r.where, "a RETURN on several matches cannot be expressed; "
                                       "the rules after it are imported as if it never matched")
                else:
                    ctx = negated
            elif r.verdict is None:
                continue                 # counter-only rule: every netbpf rule counts anyway
            else:
                out.append(rr)
        return out

    # ---- per interface ----------------------------------------------------------------------

    def build(self) -> dict[str, OutInterface]:
        hooks = {"input": "ingress", "output": "egress"}
        if self.forward:
            hooks = {"forward": "ingress", "output": "egress"}
        per_dir: dict[str, list[tuple[Table, Chain, list[SrcRule]]]] = {"ingress": [], "egress": []}
        for table in self.rs.tables:
            if table.kind != "filter":
                self._skip_table(table)
                continue
            for chain in table.chains.values():
                if chain.hook is None:
                    continue
                if chain.hook not in hooks:
                    if chain.rules or chain.policy == "drop":
                        hint = " (pass --forward to import it as ingress)" \
                            if chain.hook == "forward" else ""
                        self.warn(chain.where, f"chain {chain.name} (hook {chain.hook}) is not "
                                               f"imported: netbpf filters what interfaces "
                                               f"receive and send{hint}")
                    continue
                rules = self.flat(table, chain, None, (chain.name,), chain.policy)
                per_dir[hooks[chain.hook]].append((table, chain, rules))
        out = {name: OutInterface() for name in self.interfaces}
        for direction, parts in per_dir.items():
            if not parts:
                continue
            for name, iface in out.items():
                setattr(iface, direction, self._direction(name, iface, direction, parts))
        return out

    def _skip_table(self, table: Table) -> None:
        used = any(c.rules or c.policy == "drop" for c in table.chains.values())
        if used:
            self.warn(table.where, f"table {table.name} ({table.kind}) is not imported: netbpf "
                                   "has no NAT, mangling or raw-table counterpart")

    def _direction(self, ifname: str, iface: OutInterface, direction: str,
                   parts: list[tuple[Table, Chain, list[SrcRule]]]) -> OutDirection:
        d = OutDirection()
        policies: dict[int, str] = {}
        for table, chain, rules in parts:
            for fam in ((table.family,) if table.family else (4, 6)):
                if fam in policies and policies[fam] != (chain.policy or "allow"):
                    self.warn(chain.where, f"two base chains on hook {chain.hook} for IPv{fam} "
                                           "with different policies; the first one is used")
                policies.setdefault(fam, chain.policy or "allow")
            d.default_where = d.default_where or chain.where
            for r in rules:
                spec = r.iif if direction == "ingress" else r.oif
                if not _on_interface(spec, ifname):
                    continue
                family = r.family or table.family
                self._add(d, iface, r, family, direction)
        fams = set(policies)
        both = fams == {4, 6}
        for r in d.rules:
            fam = r.src.family or _table_family(parts, r.src)
            if both and fam and not _family_pinned(r.fields, fam):
                _pin_family(r, fam)
        missing = {4, 6} - fams
        if missing:
            other = missing.pop()
            d.rules.insert(0, OutRule(SrcRule("import", ""), {"src": _ANY[other]}, "allow",
                                      [f"IPv{other} is not in the input: it passes untouched"]))
        pols = set(policies.values())
        if len(pols) == 1:
            d.default = pols.pop()
        else:
            d.default = "drop"
            for fam, pol in sorted(policies.items()):
                if pol == "allow":
                    d.rules.append(OutRule(SrcRule(d.default_where, ""), {"src": _ANY[fam]},
                                           "allow", [f"IPv{fam} chain policy is accept"]))
        return d

    def _add(self, d: OutDirection, iface: OutInterface, r: SrcRule, family: int | None,
             direction: str) -> None:
        fields = dict(r.fields)
        notes: list[str] = []
        action = {"allow": "allow", "drop": "drop", "reject": "reject", "log": "count",
                  "count": "count"}.get(r.verdict or "", None)
        if action is None:
            self.warn(r.where, f"verdict '{r.verdict}' has no netbpf counterpart; not imported")
            return
        if r.verdict == "log":
            notes.append("LOG becomes a count rule (see 'netbpf stats' and 'netbpf events')")
        if r.ct is not None:
            states = set(r.ct)
            if states <= {"established", "related"} and action == "allow":
                if iface.conntrack is None:
                    iface.conntrack = r.where
                if "related" in states:
                    self.warn(r.where, "RELATED (ICMP errors, FTP data) is not tracked by "
                                       "netbpf conntrack; ESTABLISHED replies are")
                return
            if states == {"invalid"} and action in ("drop", "reject", "count"):
                if fields.get("proto") not in (None, "tcp") or "tcp_flags" in fields:
                    self.warn(r.where, "ct state invalid is matched for TCP only; this "
                                       "rule is not imported")
                    return
                fields["ct"] = "invalid"
                iface.conntrack = iface.conntrack or r.where
                d.rules.append(OutRule(r, fields, action, [INVALID_NOTE]))
                return
            elif "new" in states and states <= {"new", "established", "related", "untracked"}:
                if states & {"established", "related"} and action == "allow":
                    iface.conntrack = iface.conntrack or r.where
                notes.append("ct state new: packets reaching netbpf rules are the ones "
                             "conntrack did not pass")
            else:
                self.warn(r.where, f"ct state {','.join(sorted(states))} with {r.verdict} "
                                   "cannot be expressed; not imported")
                return
        if r.limit is not None:
            if action != "allow":
                self.warn(r.where, f"limit with {r.verdict} cannot be expressed (netbpf limits "
                                   "allow rules only); not imported")
                return
            pps, burst = r.limit
            fields["action"] = {"rate_limit": {"pps": pps, "burst": max(burst, 1), "per": "rule"}}
            notes.append("over the limit iptables/nft go on to later rules; netbpf drops")
            self.warn(r.where, "limit: packets over the rate are dropped by netbpf, where "
                               "the source would go on to the next rules")
            action = "rate_limit"
        if action == "allow" and iface.conntrack and fields.get("tcp_flags") == "syn,!rst,!ack,!fin":
            del fields["tcp_flags"]
            notes.append("--syn dropped: netbpf conntrack does not track inbound connections, "
                         "so their later packets meet this rule")
        for key in NEGATABLE:
            if key in r.neg:
                fields[key] = {"not": fields[key]}
        d.rules.append(OutRule(r, fields, action, notes))


_ANY = {4: "0.0.0.0/0", 6: "::/0"}
INVALID_NOTE = ("ct state invalid: netbpf matches the TCP flag combinations Linux calls "
                "invalid, not out-of-window or untracked FIN/RST")



def _table_family(parts, r: SrcRule) -> int | None:
    for table, _chain, rules in parts:
        if any(x is r for x in rules):
            return table.family
    return None


def _family_pinned(fields: dict, fam: int) -> bool:
    if fields.get("proto") in ("icmp", "icmpv6"):
        return True
    for key in ("src", "dst"):
        v = fields.get(key)
        if isinstance(v, list) and v:
            return True
        if isinstance(v, str) and not v.startswith("@"):
            return True
    return False


def _pin_family(r: OutRule, fam: int) -> None:
    for key in ("src", "dst"):
        if key not in r.fields:
            r.fields[key] = _ANY[fam]
            return
    r.notes.append(f"matches IPv{fam} in the source; here both families")


def _on_interface(spec, ifname: str) -> bool:
    if spec is None:
        return True
    names, negated = spec
    hit = any(n == ifname or (n.endswith("+") and ifname.startswith(n[:-1])) for n in names)
    return hit != negated


def _conditional(r: SrcRule) -> bool:
    return bool(r.fields or r.iif or r.oif or r.ct or r.limit or r.family)


def _falls_through(chain: Chain) -> bool:
    last = chain.rules[-1] if chain.rules else None
    return not (last and not _conditional(last) and
                last.verdict in ("allow", "drop", "reject"))


def _negate_one(ctx: SrcRule, r: SrcRule) -> SrcRule | None:
    """ctx AND NOT r, when r matches on one negatable field that ctx leaves free."""
    if r.iif or r.oif or r.ct or r.limit or len(r.fields) != 1:
        return None
    (key, value), = r.fields.items()
    if key not in NEGATABLE or key in ctx.fields:
        return None
    neg = set(ctx.neg)
    if key not in r.neg:
        neg.add(key)
    return replace(ctx, fields={**ctx.fields, key: value}, neg=frozenset(neg))
