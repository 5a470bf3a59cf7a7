"""Read what the data plane did, straight from the pins: no compilation, no program load.

Returns plain dicts (the documented `netbpf stats --json` schema, docs/stats.md); the CLI
formats them. Not the exporter or the event reader (later), not any write.
"""
from __future__ import annotations

import time

from netbpf import abi
from netbpf.errors import NetbpfError
from netbpf.fwtables import FwTables
from netbpf.kernel import attach
from netbpf.kernel.netns import netns_label
from netbpf.state import InterfaceState, iface_key, load_state, pin_dir

SCHEMA_VERSION = 1


def read_stats(ifname: str, netns: str | None) -> dict:
    key = iface_key(ifname, netns)
    st = load_state(key)
    if st is None:
        raise NetbpfError(f"{ifname}: not managed by netbpf in {netns_label(netns)} "
                          "(see 'netbpf status')")
    try:
        tables = FwTables.from_pins(pin_dir(key), st.words, st.class_cap)
    except NetbpfError as e:
        raise NetbpfError(f"{ifname}: pinned maps unreadable ({e}); re-apply the policy") from e
    try:
        counters = tables.read_counters("nb_fw_cnt")
        totals = tables.read_counters("nb_fw_stats")
        gen = tables.active_gen()
    finally:
        tables.close()
    return _report(st, counters, totals, gen)


def _report(st: InterfaceState, counters: dict, totals: dict, gen: int) -> dict:
    rules = []
    for r in st.rules:
        p, b, d = counters.get(r.slot, (0, 0, 0))
        rules.append({"name": r.name, "direction": r.direction, "action": r.action,
                      "line": r.line, "packets": p, "bytes": b, "rate_limited": d})
    tot = {name: {"packets": totals.get(i, (0, 0, 0))[0], "bytes": totals.get(i, (0, 0, 0))[1]}
           for i, name in abi.STAT_NAMES.items()}
    try:
        cur = attach.xdp_state(st.ifname, netns=st.netns)
    except NetbpfError:
        cur = None
    attached = cur is not None and cur.prog_id == st.prog_id
    return {
        "schema": SCHEMA_VERSION,
        "interface": st.ifname,
        "netns": st.netns,
        "xdp": {"mode": st.mode, "requested_mode": st.requested_mode, "prog_id": st.prog_id,
                "attached": attached},
        "policy": {"path": st.policy_path, "hash": st.policy_hash, "applied_at": st.applied_at,
                   "generation": gen},
        "default_action": st.default_action,
        "totals": tot,
        "rules": rules,
        "sets": [{"name": s.name, "ipv4": s.v4, "ipv6": s.v6} for s in st.sets],
        "read_at": time.time(),
    }
