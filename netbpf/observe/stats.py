"""Read what the data plane did, straight from the pins: no compilation, no program load.

Returns plain dicts (the documented `netbpf stats --json` schema, docs/stats.md); the CLI
formats them. Not the exporter or the event reader, not any write.
"""
from __future__ import annotations

import time

from netbpf import abi
from netbpf.observe.drift import drift
from netbpf.lb.lbtables import PROTO_NAMES, LbState, LbTables
from netbpf.errors import NetbpfError
from netbpf.fw.fwtables import FwTables
from netbpf.policy.ir import addr_text
from netbpf.kernel import bpfsys
from netbpf.kernel.netns import netns_label
from netbpf.store.state import (InterfaceState, PartState, health_down, iface_key, load_state,
                          pin_dir)

SCHEMA_VERSION = 1


def read_stats(ifname: str, netns: str | None) -> dict:
    key = iface_key(ifname, netns)
    st = load_state(key)
    if st is None:
        raise NetbpfError(f"{ifname}: not managed by netbpf in {netns_label(netns)} "
                          "(see 'netbpf status')")
    parts = {d: _read_part(st, part) for d, part in st.parts.items()}
    out = {
        "schema": SCHEMA_VERSION,
        "interface": st.ifname,
        "netns": st.netns,
        "policy": {"path": st.policy_path, "hash": st.policy_hash, "applied_at": st.applied_at},
        "health": drift(st) or "ok",
        "parts": parts,
        "rules": [r for p in parts.values() for r in p["rules"]],
        "conntrack": _conntrack(st) if st.conntrack else None,
        "load_balancers": _load_balancers(st) if st.lb.get("vips") else [],
        "read_at": time.time(),
    }
    return out


def _load_balancers(st: InterfaceState) -> list[dict]:
    lb = LbState.from_json(st.lb)
    down = health_down(st.key)
    try:
        t = LbTables.from_pins(pin_dir(st.key) / "ingress")
    except NetbpfError as e:
        return [{"error": str(e)}]
    try:
        cnt = t.counters()
    finally:
        t.close()
    out = []
    for v in lb.vips.values():
        p, b, c = cnt.get(v.index, (0, 0, 0))
        backends = []
        for ident in v.backends:
            bid = lb.backends[ident]
            bp, bb, bc = cnt.get(abi.NB_LB_MAX_VIPS + bid, (0, 0, 0))
            _, addr, port = ident.rsplit("|", 2)
            backends.append({"address": addr, "port": int(port), "id": bid,
                             "state": "down" if ident in down else "up",
                             "packets": bp, "bytes": bb, "connections": bc})
        out.append({"name": v.name, "vip": addr_text(v.family, v.addr), "port": v.port,
                    "proto": PROTO_NAMES.get(v.proto, str(v.proto)), "mode": v.mode,
                    "table_size": v.size, "packets": p, "bytes": b, "connections": c,
                    "backends": backends})
    return out


def _plus(live: dict, carried: dict) -> dict:
    """Live counters plus what the replaced program counted after the carry copy."""
    for k, v in carried.items():
        live[k] = tuple(a + b for a, b in zip(live.get(k, (0, 0, 0)), v))
    return live


def _read_part(st: InterfaceState, part: PartState) -> dict:
    try:
        tables = FwTables.from_pins(pin_dir(st.key) / part.direction, part.words,
                                    part.class_cap)
    except NetbpfError as e:
        raise NetbpfError(f"{st.ifname}: pinned {part.direction} maps unreadable ({e}); "
                          "re-apply the policy") from e
    try:
        counters = tables.read_counters(abi.NB_MAP_FW_CNT)
        totals = tables.read_counters(abi.NB_MAP_FW_STATS)
        gen = tables.active_gen()
        table_mem = tables.memory_bytes()
        grids = tables.pair_grids(gen)
    finally:
        tables.close()
    counters = _plus(counters, part.carried_counts(abi.NB_MAP_FW_CNT))
    totals = _plus(totals, part.carried_counts(abi.NB_MAP_FW_STATS))
    rules: list[dict] = []
    by_name: dict[str, dict] = {}
    for r in part.rules:
        p, b, d = counters.get(r.slot, (0, 0, 0))
        if r.name in by_name:       # one file rule lowered to several (ct: invalid): one row
            row = by_name[r.name]
            row["packets"] += p
            row["bytes"] += b
            row["rate_limited"] += d
            continue
        by_name[r.name] = {"name": r.name, "direction": part.direction, "action": r.action,
                           "line": r.line, "packets": p, "bytes": b, "rate_limited": d}
        rules.append(by_name[r.name])
    tot = {}
    for i, name in abi.STAT_NAMES.items():
        p, b, _ = totals.get(i, (0, 0, 0))
        tot[name] = {"packets": p, "bytes": b}
    return {"hook": part.hook, "mode": part.mode, "prog_id": part.prog_id,
            "default_action": part.default_action, "generation": gen, "totals": tot,
            "classifier_bytes": table_mem, "address_chunks": part.dir_chunks,
            "pair_tables": grids,
            "rules": rules, "sets": [{"name": s.name, "ipv4": s.v4, "ipv6": s.v6}
                                     for s in part.sets]}


def _conntrack(st: InterfaceState) -> dict:
    path = pin_dir(st.key) / "ingress" / abi.NB_MAP_CT
    states = {name: 0 for name in abi.CT_STATE_NAMES.values()}
    try:
        with bpfsys.obj_get(path) as fd:
            info = bpfsys.map_info(fd)
            for _, v in bpfsys.map_lookup_batch(fd, info.key_size, info.value_size):
                state = abi.CT_VAL.unpack_from(v)[2]
                name = abi.CT_STATE_NAMES.get(state)
                if name:
                    states[name] += 1
    except NetbpfError as e:
        return {"error": str(e)}
    return {"entries": sum(states.values()), "capacity": info.max_entries, "states": states,
            "timeouts": st.ct_timeouts}
