"""What netbpf manages and whether the kernel still runs it: state files vs. pins vs. links.

Reports drift (program detached or replaced, interface gone, pins without state or state
without pins); repairs nothing (re-applying the policy does). Plain dicts for the CLI.
"""
from __future__ import annotations

from netbpf.apply import PROG_PIN
from netbpf.errors import NetbpfError
from netbpf.kernel import attach
from netbpf.state import list_pin_keys, list_states, pin_dir, split_key


def read_status() -> list[dict]:
    rows = []
    states = list_states()
    for st in states:
        health = "ok"
        if not (pin_dir(st.key) / PROG_PIN).exists():
            health = "pins missing"
        try:
            cur = attach.xdp_state(st.ifname, netns=st.netns)
        except NetbpfError:
            cur, health = None, "interface gone"
        if health == "ok":
            if cur is None:
                health = "detached by someone else"
            elif cur.prog_id != st.prog_id:
                health = f"replaced by program {cur.prog_id}"
        rows.append({"interface": st.ifname, "netns": st.netns, "mode": st.mode,
                     "prog_id": st.prog_id, "rules": len(st.rules),
                     "policy_path": st.policy_path, "policy_hash": st.policy_hash,
                     "applied_at": st.applied_at, "health": health})
    known = {st.key for st in states}
    for key in list_pin_keys():
        if key not in known:
            netns, ifname = split_key(key)
            rows.append({"interface": ifname, "netns": netns, "health": "pins without state"})
    return rows
