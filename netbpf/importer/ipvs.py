"""'ipvsadm -Sn' output -> netbpf load balancers (VIP, port, protocol, mode, weighted backends).

Maglev is netbpf's only scheduler: other schedulers, persistence and firewall-mark services
are reported. NAT (-m) maps to nat, direct routing (-g) to dsr; tunnelling (-i) has no peer.
"""
from __future__ import annotations

import ipaddress
import shlex

from netbpf.importer.model import ImportInputError, Note

MODES = {"-m": "nat", "--masquerading": "nat", "-g": "dsr", "--gatewaying": "dsr",
         "-i": "ipip", "--ipip": "ipip"}


def _endpoint(text: str, where: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ImportInputError(f"{where}: {text!r} is not ADDRESS:PORT (use ipvsadm -Sn)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ImportInputError(f"{where}: {text!r} has no valid port")
    return host, int(port)


def parse_ipvs(text: str, display: str, interface: str | None):
    services: dict[tuple, dict] = {}
    comments: dict[tuple, list[str]] = {}
    notes: list[Note] = []
    if interface is None:
        interface = "eth0"
        notes.append(Note("import", "no interface given; load balancers use 'eth0' "
                                    "(pass --interface NAME)"))
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{display}:{n}"
        try:
            tok = shlex.split(raw, comments=True)
        except ValueError as e:
            raise ImportInputError(f"{where}: {e}") from None
        if not tok:
            continue
        opts = dict(_pairs(tok[1:], where))
        proto = "tcp" if "-t" in opts else "udp" if "-u" in opts else None
        if "-f" in opts:
            notes.append(Note(where, "firewall-mark services have no netbpf counterpart; "
                                     "not imported"))
            continue
        if proto is None:
            raise ImportInputError(f"{where}: needs -t or -u ADDRESS:PORT")
        key = (proto,) + _endpoint(opts["-t" if proto == "tcp" else "-u"], where)
        if tok[0] in ("-A", "--add-service"):
            sched = opts.get("-s", "wlc")
            comments[key] = [f"{where}: {raw.strip()}"]
            if sched not in ("mh", "sh"):
                notes.append(Note(where, f"scheduler {sched}: netbpf balances new flows by "
                                         "weighted Maglev hashing (like mh)"))
            if "-p" in opts:
                notes.append(Note(where, "persistence (-p) has no netbpf counterpart: "
                                         "established flows stick, new ones are hashed"))
            services[key] = {"interface": interface, "vip": key[1], "port": key[2],
                             "proto": proto, "backends": [], "_modes": set()}
        elif tok[0] in ("-a", "--add-server"):
            if key not in services:
                raise ImportInputError(f"{where}: server for a service not added before (-A)")
            host, port = _endpoint(opts.get("-r", ""), where)
            mode = next((MODES[o] for o in opts if o in MODES), "dsr")
            svc = services[key]
            if mode == "ipip":
                notes.append(Note(where, "tunnelling (-i) has no netbpf counterpart; "
                                         "backend not imported"))
                continue
            svc["_modes"].add(mode)
            weight = int(opts.get("-w", "1"))
            svc["backends"].append({"address": host, "port": port, "weight": weight})
        else:
            raise ImportInputError(f"{where}: not an 'ipvsadm -Sn' line: {raw[:60]!r}")
    out = []
    for key, svc in services.items():
        modes = svc.pop("_modes")
        if len(modes) > 1:
            notes.append(Note(comments[key][0].rsplit(":", 1)[0] if False else comments[key][0]
                              .split(": ", 1)[0], "servers mix NAT and direct routing; "
                              "netbpf has one mode per load balancer: nat used"))
        svc["mode"] = "nat" if "nat" in modes or not modes else "dsr"
        if not svc["backends"]:
            notes.append(Note(comments[key][0].split(": ", 1)[0],
                              "service without servers; not imported"))
            continue
        if svc["mode"] == "dsr":
            for b in svc["backends"]:
                b.pop("port")
        name = f"{key[0]}-{key[1].replace(':', '-').replace('.', '-')}-{key[2]}"
        out.append((name, svc, comments[key]))
    return out, notes


def _pairs(tok: list[str], where: str):
    i = 0
    while i < len(tok):
        t = tok[i]
        if t in MODES or t in ("-t", "-u", "-f", "-s", "-p", "-r", "-w", "-M", "-b", "-x", "-y",
                               "--tcp-service", "--udp-service", "--scheduler", "--persistent",
                               "--real-server", "--weight"):
            has_value = t not in MODES and not (t == "-p" and (i + 1 >= len(tok)
                                                               or tok[i + 1].startswith("-")))
            short = {"--tcp-service": "-t", "--udp-service": "-u", "--scheduler": "-s",
                     "--persistent": "-p", "--real-server": "-r", "--weight": "-w"}.get(t, t)
            if has_value:
                if i + 1 >= len(tok):
                    raise ImportInputError(f"{where}: {t} needs a value")
                yield short, tok[i + 1]
                i += 2
            else:
                yield short, ""
                i += 1
        else:
            raise ImportInputError(f"{where}: unknown ipvsadm option {t!r}")
