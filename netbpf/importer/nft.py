"""'nft list ruleset' text -> Ruleset: tables, base chains (hook, policy), rules, named sets.

Reads the line-per-rule layout nft prints. Expressions it does not know become an
'unsupported' reason on their rule (reported with the line), never a silent match-all.
Simple verdict maps ('tcp dport vmap { 22 : accept }') become one rule per element.
"""
from __future__ import annotations

import re

from netbpf.importer import words
from netbpf.importer.model import (Chain, ImportInputError, Ruleset, SrcRule, Table,
                                   format_ranges, intersect_ports, parse_ranges)

FAMILIES = {"ip": 4, "ip6": 6, "inet": None, "bridge": None, "arp": None, "netdev": None}
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|::[^\s{}();,"]*|[{}();,:]|!=|==|[^\s{}();,:"]+(?::[^\s{}();,"]+)*')
VERDICTS = {"accept": "allow", "drop": "drop", "reject": "reject", "return": "return"}
L4 = {"tcp", "udp", "th", "sctp"}


def _tokens(line: str, where: str) -> list[str]:
    if line.count('"') % 2:
        raise ImportInputError(f"{where}: unbalanced quote")
    return [t[1:-1] if t.startswith('"') else t for t in TOKEN.findall(line)]


def parse_nft(text: str, display: str) -> Ruleset:
    rs = Ruleset()
    table: Table | None = None
    chain: Chain | None = None
    pending_set: tuple[str, str, list[str]] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if '"' not in raw else raw.strip()
        where = f"{display}:{n}"
        if not line:
            continue
        if pending_set is not None:
            pending_set[2].append(line)
            body = " ".join(pending_set[2])
            if body.count("{") <= body.count("}"):
                _finish_set(rs, pending_set, where)
                pending_set = None
            continue
        tok = _tokens(line, where)
        if tok[0] == "table" and len(tok) >= 3 and tok[-1] == "{":
            fam = tok[1] if len(tok) == 4 else "ip"
            name = tok[-2]
            if fam not in FAMILIES:
                raise ImportInputError(f"{where}: unknown table family '{fam}'")
            table = Table(name, FAMILIES[fam], kind="filter" if fam in ("ip", "ip6", "inet")
                          else fam, where=where)
            rs.tables.append(table)
        elif table is None:
            raise ImportInputError(f"{where}: {line[:60]!r} outside a table")
        elif tok[0] == "chain" and len(tok) == 3 and tok[2] == "{" and chain is None:
            chain = Chain(tok[1], where)
            table.chains[tok[1]] = chain
        elif tok[0] in ("set", "map") and tok[-1] == "{" and chain is None:
            pending_set = (tok[1], where, ["{"])
        elif tok == ["}"]:
            if chain is not None:
                chain = None
            else:
                table = None
        elif chain is None:
            if tok[0] in ("flags", "comment"):
                continue
            raise ImportInputError(f"{where}: {line[:60]!r} is not a chain, set or '}}'")
        elif tok[0] == "type":
            _base_chain(chain, table, tok, where)
        elif tok[0] in ("policy", "comment", "devices", "device"):
            if tok[0] == "policy":
                chain.policy = _policy(tok[1] if len(tok) > 1 else "", where)
        else:
            for r in parse_rule(tok, where, line, table.family):
                chain.rules.append(r)
    if pending_set is not None or chain is not None or table is not None:
        raise ImportInputError(f"{display}: input ends inside a block (missing '}}')")
    if not rs.tables:
        raise ImportInputError(f"{display}: no 'table' found: is this 'nft list ruleset' output?")
    return rs


def _policy(word: str, where: str) -> str:
    word = word.rstrip(";")
    if word not in ("accept", "drop"):
        raise ImportInputError(f"{where}: unknown chain policy '{word}'")
    return "allow" if word == "accept" else "drop"


def _base_chain(chain: Chain, table: Table, tok: list[str], where: str) -> None:
    if "hook" not in tok:
        raise ImportInputError(f"{where}: chain type without a hook")
    chain.hook = tok[tok.index("hook") + 1]
    if len(tok) > 1 and tok[1] != "filter":
        table.kind = tok[1]          # nat / route chains: reported with their table
    if "policy" in tok:
        chain.policy = _policy(tok[tok.index("policy") + 1], where)
    chain.policy = chain.policy or "allow"


def _finish_set(rs: Ruleset, pending: tuple[str, str, list[str]], where: str) -> None:
    name, at, lines = pending
    body = " ".join(lines)
    m = re.search(r"elements\s*=\s*\{([^}]*)\}", body)
    entries = [e.strip() for e in m.group(1).split(",") if e.strip()] if m else []
    clean = words.set_name(name)
    if "_addr" not in body:
        rs.notes.append(words.note(at, f"set {name}: only address sets are imported"))
        return
    cidrs = []
    for e in entries:
        cidrs += words.ip_range(e, where) if "-" in e else words.cidrs([e], where)
    rs.sets[clean] = cidrs
    rs.set_where[clean] = f"{at}: set {name}"


def _value(tok: list[str], i: int, where: str) -> tuple[list[str] | str, int]:
    """A single value, '{ a, b }' or '@set' at tok[i] -> (value or list, next index)."""
    if i >= len(tok):
        raise ImportInputError(f"{where}: expression ends without a value")
    if tok[i] != "{":
        if tok[i + 1:i + 2] != [","]:
            return tok[i], i + 1
        out = [tok[i]]                     # 'established,related': a bare comma list
        while tok[i + 1:i + 2] == [","] and i + 2 < len(tok):
            out.append(tok[i + 2])
            i += 2
        return out, i + 1
    out, i = [], i + 1
    while i < len(tok) and tok[i] != "}":
        if tok[i] != ",":
            out.append(tok[i])
        i += 1
    if i >= len(tok):
        raise ImportInputError(f"{where}: '{{' without '}}'")
    return out, i + 1


def _as_list(v) -> list[str]:
    return v if isinstance(v, list) else [v]


def parse_rule(tok: list[str], where: str, line: str, family: int | None) -> list[SrcRule]:
    r = SrcRule(where=where, text=line, family=family)
    neg: set[str] = set()
    vmap: list[tuple[str, str]] = []
    vmap_key = None
    i = 0
    while i < len(tok):
        t = tok[i]
        nxt = tok[i + 1] if i + 1 < len(tok) else ""
        negate = False
        if t in ("iifname", "iif", "oifname", "oif"):
            i += 1
            if tok[i:i + 1] == ["!="]:
                negate, i = True, i + 1
            v, i = _value(tok, i, where)
            spec = (tuple(_as_list(v)), negate)
            if t.startswith("i"):
                r.iif = spec
            else:
                r.oif = spec
            continue
        if t in ("ip", "ip6") and nxt in ("saddr", "daddr"):
            key = "src" if nxt == "saddr" else "dst"
            r.family = 4 if t == "ip" else 6
            i += 2
            if tok[i:i + 1] == ["!="]:
                neg.add(key)
                i += 1
            v, i = _value(tok, i, where)
            r.fields[key] = "@" + words.set_name(v[1:]) if isinstance(v, str) and v.startswith("@") \
                else words.cidrs(_as_list(v), where)
            continue
        if (t, nxt) in (("ip", "protocol"), ("ip6", "nexthdr"), ("meta", "l4proto")):
            if t != "meta":
                r.family = 4 if t == "ip" else 6
            v, i = _value(tok, i + 2, where)
            protos = [words.proto(p, where) for p in _as_list(v)]
            r.fields["proto"] = protos if len(protos) > 1 else protos[0]
            continue
        if (t, nxt) == ("meta", "nfproto"):
            v, i = _value(tok, i + 2, where)
            r.family = {"ipv4": 4, "ipv6": 6}.get(str(v))
            continue
        if t in L4 and nxt in ("dport", "sport"):
            if t != "th":
                r.fields.setdefault("proto", t)
            key = nxt
            i += 2
            if tok[i:i + 1] == ["!="]:
                neg.add("_next")
                i += 1
            if tok[i:i + 1] == ["vmap"]:
                v, i = _value(tok, i + 1, where)
                vmap_key = key
                vmap = _vmap(v, where)
                continue
            v, i = _value(tok, i, where)
            if isinstance(v, str) and v.startswith("@"):
                r.unsupported.append(f"port set {v} cannot be expressed")
                continue
            _and_ports(r, neg, key, words.ports(",".join(_as_list(v)), where))
            continue
        if (t, nxt) == ("tcp", "flags"):
            i = _tcp_flags(r, tok, i + 2, where)
            continue
        if t in ("icmp", "icmpv6") and nxt in ("type", "code"):
            v, i = _value(tok, i + 2, where)
            r.fields["proto"] = t
            if nxt == "code":
                r.fields["icmp_code"] = words.integer(str(v), where)
                continue
            types = [words.icmp(x, t, where) for x in _as_list(v)]
            if any(c is not None for _, c in types):
                if len(types) > 1:
                    r.unsupported.append("ICMP names with codes in a set cannot be expressed")
                else:
                    r.fields["icmp_code"] = types[0][1]
            names = [x for x, _ in types]
            r.fields["icmp_type"] = names if len(names) > 1 else names[0]
            continue
        if (t, nxt) == ("ct", "state"):
            i += 2
            if tok[i:i + 1] == ["!="]:
                r.unsupported.append("'ct state !=' cannot be expressed")
                i += 1
            v, i = _value(tok, i, where)
            r.ct = frozenset(s for x in _as_list(v) for s in x.split(",") if s)
            continue
        if t == "limit":
            i = _limit(r, tok, i + 1, where)
            continue
        if t == "counter":
            i += 1
            while i + 1 < len(tok) and tok[i] in ("packets", "bytes"):
                i += 2
            continue
        if t == "log":
            r.verdict = r.verdict or "log"
            i += 1
            while i < len(tok) and tok[i] in ("prefix", "level", "flags", "group", "snaplen",
                                             "queue-threshold"):
                i += 2
            continue
        if t == "comment":
            r.comment = nxt
            i += 2
            continue
        if t in VERDICTS:
            r.verdict = VERDICTS[t]
            i += 1
            if t == "reject" and tok[i:i + 1] == ["with"]:
                how = " ".join(tok[i + 1:i + 4])
                i += 4 if tok[i + 1:i + 2] != ["tcp"] else 3
                if "port-unreachable" not in how and "reset" not in how:
                    r.warnings.append(f"reject with {how}: netbpf answers TCP with a RST and "
                                      "the rest with port unreachable")
            continue
        if t in ("jump", "goto"):
            r.verdict, r.target = t, nxt
            i += 2
            continue
        r.unsupported.append(f"expression '{' '.join(tok[i:i + 3])}' has no netbpf counterpart")
        break
    r.neg = frozenset(neg - {"_next"})
    if not vmap:
        return [r]
    out = []
    for value, verdict in vmap:
        x = SrcRule(where=where, text=line, fields={**r.fields,
                                                    vmap_key: words.ports(value, where)},
                    neg=r.neg - {vmap_key}, iif=r.iif, oif=r.oif, family=r.family, ct=r.ct,
                    unsupported=list(r.unsupported), comment=r.comment)
        x.verdict, _, x.target = verdict.partition(" ")
        x.verdict = VERDICTS.get(x.verdict, x.verdict)
        x.target = x.target or None
        out.append(x)
    return out


def _and_ports(r: SrcRule, neg: set[str], key: str, ports: list) -> None:
    """Set a port match; a second match on the same field is ANDed in (as plain ranges)."""
    negated = "_next" in neg
    neg.discard("_next")
    if key not in r.fields:
        r.fields[key] = ports
        if negated:
            neg.add(key)
        return
    def ranges(values, is_neg):
        rs = sorted(parse_ranges(values))
        if not is_neg:
            return rs
        out, start = [], 0
        for lo, hi in rs:
            if lo > start:
                out.append((start, lo - 1))
            start = max(start, hi + 1)
        return out + ([(start, 65535)] if start <= 65535 else [])
    a = format_ranges(ranges(r.fields[key], key in neg))
    b = format_ranges(ranges(ports, negated))
    neg.discard(key)
    r.fields[key] = intersect_ports(a, b)
    if not r.fields[key]:
        r.unsupported.append(f"{key} matches no port")


def _vmap(v, where: str) -> list[tuple[str, str]]:
    items, cur = [], []
    for x in (_as_list(v) + [","]):
        if x == ",":
            continue
        cur.append(x)
        if len(cur) >= 3 and cur[1] == ":" and (cur[2] not in ("jump", "goto") or len(cur) == 4):
            items.append((cur[0], " ".join(cur[2:])))
            cur = []
    if cur:
        raise ImportInputError(f"{where}: verdict map element {' '.join(cur)!r} not understood")
    return items


def _tcp_flags(r: SrcRule, tok: list[str], i: int, where: str) -> int:
    # tcp flags syn | tcp flags & (fin|syn|rst|ack) == syn | tcp flags == syn
    text = " ".join(tok[i:])
    m = re.match(r"& \( ?([a-z|]+) ?\) == ([a-z|]+)", text) or re.match(r"& ([a-z|]+) == ([a-z|]+)", text)
    if m:
        mask, comp = m.group(1).split("|"), set(m.group(2).split("|"))
        r.fields["tcp_flags"] = ",".join(f if f in comp else "!" + f for f in mask)
        return i + len(m.group(0).split())
    if tok[i:i + 1] == ["=="]:
        comp = set(tok[i + 1].split("|"))
        r.fields["tcp_flags"] = ",".join(f if f in comp else "!" + f
                                         for f in words.FLAG_NAMES.values())
        return i + 2
    if i < len(tok) and re.fullmatch(r"[a-z|]+", tok[i]) and \
            all(f in words.FLAG_NAMES.values() for f in tok[i].split("|")):
        r.fields["tcp_flags"] = ",".join(tok[i].split("|"))
        return i + 1
    r.unsupported.append(f"tcp flags expression '{text[:40]}' cannot be expressed")
    return len(tok)


def _limit(r: SrcRule, tok: list[str], i: int, where: str) -> int:
    if tok[i:i + 1] != ["rate"]:
        raise ImportInputError(f"{where}: 'limit' without 'rate'")
    i += 1
    if tok[i:i + 1] == ["over"]:
        r.unsupported.append("limit rate over cannot be expressed")
        i += 1
    rate = words.rate(tok[i] if i < len(tok) else "", where)
    i += 1
    burst = max(int(rate), 5)
    if tok[i:i + 1] == ["burst"]:
        burst = words.integer(tok[i + 1] if i + 1 < len(tok) else "", where)
        i += 3 if tok[i + 2:i + 3] == ["packets"] else 2
    if rate < 1:
        r.unsupported.append("limit below 1 packet per second cannot be expressed")
    r.limit = (max(int(rate), 1), burst)
    return i
