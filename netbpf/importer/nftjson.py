"""'nft -j list ruleset' JSON -> Ruleset, by writing each rule's expressions back as nft text
tokens and reading them with nft.py's rule parser: one reader of nft semantics, two syntaxes.

JSON has no line numbers: warnings name the rule as FILE:table/chain#index (handle H).
"""
from __future__ import annotations

import json

from netbpf.importer import nft, words
from netbpf.importer.model import Chain, ImportInputError, Ruleset, Table


def parse_nft_json(text: str, display: str) -> Ruleset:
    try:
        doc = json.loads(text)
        items = doc["nftables"]
        if not isinstance(items, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ImportInputError(f"{display}: not 'nft -j list ruleset' output "
                               "(a JSON object with an 'nftables' list)") from None
    rs = Ruleset()
    tables: dict[tuple[str, str], Table] = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            raise ImportInputError(f"{display}: nftables[{k}] is not a one-key object")
        (kind, body), = item.items()
        if kind == "metainfo":
            continue
        if not isinstance(body, dict):
            raise ImportInputError(f"{display}: nftables[{k}].{kind} is not an object")
        try:
            _item(rs, tables, kind, body, display, k)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ImportInputError(f"{display}: nftables[{k}].{kind}: missing or wrong "
                                   f"field ({e})") from None
    if not rs.tables:
        raise ImportInputError(f"{display}: no table in the JSON ruleset")
    return rs


def _item(rs, tables, kind, body, display, k) -> None:
    where = f"{display}:nftables[{k}]"
    if kind == "table":
        fam = body["family"]
        if fam not in nft.FAMILIES:
            raise ImportInputError(f"{where}: unknown table family '{fam}'")
        t = Table(body["name"], nft.FAMILIES[fam],
                  kind="filter" if fam in ("ip", "ip6", "inet") else fam, where=where)
        tables[(fam, body["name"])] = t
        rs.tables.append(t)
        return
    table = tables.get((body.get("family"), body.get("table")))
    if kind in ("chain", "rule", "set", "map") and table is None:
        raise ImportInputError(f"{where}: {kind} of an unknown table")
    if kind == "chain":
        c = Chain(body["name"], where)
        if "hook" in body:
            c.hook = body["hook"]
            c.policy = "drop" if body.get("policy") == "drop" else "allow"
            if body.get("type", "filter") != "filter":
                table.kind = body["type"]
        table.chains[c.name] = c
    elif kind == "set":
        name = words.set_name(body["name"])
        if "addr" not in str(body.get("type", "")):
            rs.notes.append(words.note(where, f"set {body['name']}: only address sets are "
                                              "imported"))
            return
        rs.sets[name] = [e for x in body.get("elem", []) for e in _cidrs(x, where)]
        rs.set_where[name] = f"{where}: set {body['name']}"
    elif kind == "rule":
        chain = table.chains.get(body["chain"])
        if chain is None:
            raise ImportInputError(f"{where}: rule of an unknown chain '{body['chain']}'")
        where = f"{display}:{body['table']}/{body['chain']}#{len(chain.rules) + 1}" \
                f" (handle {body.get('handle', '?')})"
        tok = [t for e in body["expr"] for t in _expr(e)]
        if body.get("comment"):
            tok += ["comment", str(body["comment"])]
        chain.rules += nft.parse_rule(tok, where, " ".join(tok), table.family)


def _cidrs(x, where) -> list[str]:
    if isinstance(x, dict) and "prefix" in x:
        return words.cidrs([f"{x['prefix']['addr']}/{x['prefix']['len']}"], where)
    if isinstance(x, dict) and "range" in x:
        return words.ip_range(f"{x['range'][0]}-{x['range'][1]}", where)
    if isinstance(x, dict) and "elem" in x:
        return _cidrs(x["elem"]["val"], where)
    return words.cidrs([str(x)], where)


def _left(x) -> list[str]:
    if isinstance(x, dict):
        if "payload" in x:
            p = x["payload"]
            return [p.get("protocol", "th"), p["field"]]
        if "meta" in x:
            key = x["meta"]["key"]
            return [key] if key in ("iifname", "oifname", "iif", "oif") else ["meta", key]
        if "ct" in x:
            return ["ct", x["ct"]["key"]]
        if "&" in x:
            a, b = x["&"]
            return _left(a) + ["&", "(", _right(b)[0], ")"]
    return ["<" + json.dumps(x)[:40] + ">"]


def _right(x) -> list[str]:
    if isinstance(x, dict):
        if "set" in x:
            body = [_right(e)[0] for e in x["set"]]
            return ["{"] + [t for b in body for t in (b, ",")][:-1] + ["}"]
        if "prefix" in x:
            return [f"{x['prefix']['addr']}/{x['prefix']['len']}"]
        if "range" in x:
            return [f"{x['range'][0]}-{x['range'][1]}"]
        if "|" in x:
            return ["|".join(_right(e)[0] for e in x["|"])]
    if isinstance(x, list):
        return ["{"] + [t for e in x for t in (_right(e)[0], ",")][:-1] + ["}"]
    return [str(x)]


def _expr(e) -> list[str]:
    if not isinstance(e, dict) or len(e) != 1:
        return ["<expr>"]
    (kind, v), = e.items()
    if kind == "match":
        op = v.get("op", "==")
        left = _left(v["left"])
        mid = ["!="] if op == "!=" else (["=="] if "&" in left else [])
        return left + mid + _right(v["right"])
    if kind in ("accept", "drop", "return", "continue"):
        return [kind]
    if kind == "reject":
        how = (v or {}).get("type")
        return ["reject"] + (["with", "tcp", "reset"] if how == "tcp reset" else [])
    if kind in ("jump", "goto"):
        return [kind, v["target"]]
    if kind == "counter":
        return ["counter"]
    if kind == "log":
        return ["log"]
    if kind == "limit":
        out = ["limit", "rate"] + (["over"] if v.get("inv") else [])
        out.append(f"{v['rate']}/{v.get('per', 'second')}")
        return out + (["burst", str(v["burst"]), "packets"] if v.get("burst") else [])
    if kind == "vmap":
        items = []
        for key, verdict in v["data"]["set"]:
            items += [_right(key)[0], ":", *_expr(verdict), ","]
        return _left(v["key"]) + ["vmap", "{"] + items[:-1] + ["}"]
    return [kind]
