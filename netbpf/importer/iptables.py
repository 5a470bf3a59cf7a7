"""iptables-save / ip6tables-save text -> Ruleset (tables, chains with policies, -A rules).

Every option of the common matches is read; anything else is kept as an 'unsupported' reason
on its rule, so it is reported with its line, never silently dropped. Not a flattener.
"""
from __future__ import annotations

import shlex

from netbpf.importer import words
from netbpf.importer.model import Chain, ImportInputError, Ruleset, SrcRule, Table

POLICIES = {"ACCEPT": "allow", "DROP": "drop"}
HOOKS = {"INPUT": "input", "OUTPUT": "output", "FORWARD": "forward",
         "PREROUTING": "prerouting", "POSTROUTING": "postrouting"}
TARGETS = {"ACCEPT": "allow", "DROP": "drop", "REJECT": "reject", "LOG": "log",
           "RETURN": "return", "NFLOG": "log", "ULOG": "log"}
# Options whose values we read and ignore: they change nothing about which packets match.
IGNORED = {"--log-prefix", "--log-level", "--log-tcp-sequence", "--log-tcp-options",
           "--log-ip-options", "--log-uid", "--nflog-group", "--nflog-prefix",
           "--nflog-threshold", "--nflog-range", "--nflog-size"}
DPORT_OPTIONS = {"--dport", "--destination-port", "--dports", "--destination-ports"}
FLAGLESS = {"--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--log-uid",
            "--syn", "--set", "--rcheck", "--update", "--remove", "--rsource", "--rdest"}


def parse_iptables(text: str, display: str, ipsets: dict[str, list[str]] | None = None,
                   family: int | None = None) -> Ruleset:
    rs = Ruleset()
    if family is None:
        family = 6 if "ip6tables-save" in text[:400] else 4
    table: Table | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{display}:{n}"
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):            # iptables-save -c: "[packets:bytes] -A ..."
            line = line.partition("]")[2].strip()
        if line.startswith("*"):
            name = line[1:].strip()
            if not name.isidentifier():
                raise ImportInputError(f"{where}: '{line}' is not a table header")
            table = Table(name, family, kind=name, where=where)
            rs.tables.append(table)
        elif line == "COMMIT":
            table = None
        elif line.startswith(":"):
            if table is None:
                raise ImportInputError(f"{where}: chain '{line}' outside a table (no '*table')")
            parts = line[1:].split()
            if len(parts) < 2:
                raise ImportInputError(f"{where}: chain line needs a name and a policy")
            name, policy = parts[0], parts[1]
            if policy != "-" and policy not in POLICIES:
                raise ImportInputError(f"{where}: unknown chain policy '{policy}'")
            table.chains[name] = Chain(name, where, hook=HOOKS.get(name) if policy != "-" else None,
                                       policy=POLICIES.get(policy))
        elif line.startswith("-A ") or line.startswith("--append "):
            if table is None:
                raise ImportInputError(f"{where}: rule outside a table (no '*table')")
            rule, chain = _rule(line, where, family)
            if chain not in table.chains:
                raise ImportInputError(f"{where}: rule for undeclared chain '{chain}'")
            table.chains[chain].rules.append(rule)
        else:
            raise ImportInputError(f"{where}: not an iptables-save line: {line[:60]!r}")
    if not rs.tables:
        raise ImportInputError(f"{display}: no '*table' section: is this iptables-save output?")
    if table is not None:
        raise ImportInputError(f"{display}: table {table.name} has no COMMIT (truncated input?)")
    _attach_sets(rs, ipsets or {}, display)
    return rs


def _attach_sets(rs: Ruleset, ipsets: dict[str, list[str]], display: str) -> None:
    for table in rs.tables:
        for chain in table.chains.values():
            for r in chain.rules:
                for key in ("src", "dst"):
                    ref = r.fields.get(key)
                    if isinstance(ref, str) and ref.startswith("@"):
                        name = ref[1:]
                        if name not in ipsets and name not in rs.sets:
                            rs.notes.append(words.note(
                                r.where, f"ipset '{name}': contents unknown (pass --ipset "
                                         "FILE, the output of 'ipset save'); imported empty"))
                        rs.sets.setdefault(name, ipsets.get(name, []))


def _rule(line: str, where: str, family: int) -> tuple[SrcRule, str]:
    try:
        tokens = shlex.split(line)
    except ValueError as e:
        raise ImportInputError(f"{where}: {e}") from None
    if len(tokens) < 2:
        raise ImportInputError(f"{where}: -A needs a chain name")
    chain = tokens[1]
    r = SrcRule(where=where, text=line, family=family)
    neg: set[str] = set()
    i = 2
    negate = False
    limit = [None, 5]

    def arg() -> str:
        nonlocal i
        if i + 1 >= len(tokens):
            raise ImportInputError(f"{where}: option {tokens[i]} needs a value")
        i += 1
        return tokens[i]

    while i < len(tokens):
        t = tokens[i]
        if t == "!":
            negate = True
            i += 1
            continue
        if t in ("-p", "--protocol"):
            r.fields["proto"] = words.proto(arg(), where)
            if negate:
                r.unsupported.append("'! -p' (protocol negation) cannot be expressed")
        elif t in ("-s", "--source", "-d", "--destination"):
            key = "src" if t in ("-s", "--source") else "dst"
            r.fields[key] = words.cidrs(arg().split(","), where)
            if negate:
                neg.add(key)
        elif t in ("--src-range", "--dst-range"):
            key = "src" if t == "--src-range" else "dst"
            r.fields[key] = words.ip_range(arg(), where)
            if negate:
                neg.add(key)
        elif t in ("-i", "--in-interface", "-o", "--out-interface"):
            spec = ((arg(),), negate)
            if t.startswith("-i") or t == "--in-interface":
                r.iif = spec
            else:
                r.oif = spec
        elif t in ("-j", "--jump", "-g", "--goto"):
            target = arg()
            if t in ("-g", "--goto"):
                r.verdict, r.target = "goto", target
            elif target in TARGETS:
                r.verdict = TARGETS[target]
            elif target in words.IPT_TARGETS:
                r.unsupported.append(f"target {target} has no netbpf counterpart")
            else:
                r.verdict, r.target = "jump", target   # a user chain, checked when flattening
        elif t in ("-m", "--match"):
            mod = arg()
            if mod not in words.IPT_MATCHES:
                r.unsupported.append(f"match '-m {mod}' has no netbpf counterpart")
        elif t in ("--dport", "--destination-port", "--sport", "--source-port",
                   "--dports", "--destination-ports", "--sports", "--source-ports"):
            key = "dport" if t in DPORT_OPTIONS else "sport"
            r.fields[key] = words.ports(arg(), where)
            if negate:
                neg.add(key)
        elif t == "--ports":
            arg()
            r.unsupported.append("multiport --ports (either port) cannot be expressed")
        elif t in ("--state", "--ctstate"):
            states = frozenset(s.lower() for s in arg().split(","))
            if negate:
                r.unsupported.append(f"'! {t}' cannot be expressed")
            r.ct = states
        elif t in ("--icmp-type", "--icmpv6-type"):
            value = arg()
            if value != "any":
                proto = "icmpv6" if t == "--icmpv6-type" else "icmp"
                r.fields["icmp_type"], code = words.icmp(value, proto, where)
                if code is not None:
                    r.fields["icmp_code"] = code
            if negate:
                r.unsupported.append(f"'! {t}' cannot be expressed")
        elif t == "--syn":
            if negate:
                r.unsupported.append("'! --syn' cannot be expressed")
            r.fields["tcp_flags"] = "syn,!rst,!ack,!fin"
        elif t == "--tcp-flags":
            mask, comp = arg(), arg()
            r.fields["tcp_flags"] = words.tcp_flags(mask, comp, where)
            if negate:
                r.unsupported.append("'! --tcp-flags' cannot be expressed")
        elif t == "--match-set":
            name, dirs = words.set_name(arg()), arg()
            if dirs not in ("src", "dst"):
                r.unsupported.append(f"--match-set {name} {dirs}: only one-dimension "
                                     "(src or dst) address sets can be expressed")
            else:
                r.fields[dirs] = "@" + name
                if negate:
                    neg.add(dirs)
        elif t == "--limit":
            limit[0] = words.rate(arg(), where)
        elif t == "--limit-burst":
            limit[1] = words.integer(arg(), where)
        elif t == "--comment":
            r.comment = arg()
        elif t == "--reject-with":
            r.fields["_reject_with"] = arg()
        elif t in IGNORED:
            if t not in FLAGLESS:
                arg()
        elif t.startswith("-"):
            r.unsupported.append(f"option {t} has no netbpf counterpart")
            while i + 1 < len(tokens) and not tokens[i + 1].startswith("-") and tokens[i + 1] != "!":
                i += 1
        else:
            raise ImportInputError(f"{where}: unexpected word {t!r}")
        negate = False
        i += 1
    if limit[0] is not None:
        if limit[0] < 1:
            r.unsupported.append("limit below 1 packet per second cannot be expressed")
        r.limit = (max(int(limit[0]), 1), int(limit[1]))
    r.neg = frozenset(neg)
    _reject_note(r)
    return r, chain


def _reject_note(r: SrcRule) -> None:
    how = r.fields.pop("_reject_with", None)
    if r.verdict != "reject" or how is None:
        return
    tcp = r.fields.get("proto") == "tcp"
    if how == "tcp-reset" and not tcp:
        r.unsupported.append("--reject-with tcp-reset needs -p tcp")
    elif how not in ("tcp-reset", "icmp-port-unreachable", "icmp6-port-unreachable",
                     "port-unreach") or (tcp and how != "tcp-reset"):
        r.warnings.append(f"--reject-with {how}: netbpf answers TCP with a RST and the rest " \
                         "with port unreachable")


def parse_ipset_save(text: str, display: str) -> dict[str, list[str]]:
    """'ipset save' output -> set name -> CIDRs (hash:ip and hash:net sets)."""
    sets: dict[str, list[str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{display}:{n}"
        if parts[0] == "create" and len(parts) >= 3:
            if parts[2] in ("hash:ip", "hash:net", "bitmap:ip"):
                sets[words.set_name(parts[1])] = []
        elif parts[0] == "add" and len(parts) >= 3:
            name = words.set_name(parts[1])
            if name in sets:
                entry = parts[2]
                if "-" in entry:
                    sets[name] += words.ip_range(entry, where)
                else:
                    sets[name] += words.cidrs([entry], where)
        else:
            raise ImportInputError(f"{where}: not an 'ipset save' line: {raw[:60]!r}")
    return sets

