"""What netbpf manages and whether the kernel still runs it: state files vs. pins vs. links.

Reports drift (program detached or replaced, interface gone, pins without state) and state
records with nothing loaded (after a reboot); repairs nothing (re-applying the policy, or
`netbpf restore`, does). Plain dicts for the CLI.
"""
from __future__ import annotations

from netbpf.observe.drift import drift
from netbpf.store.snapshot import file_status
from netbpf.fw.fwtables import table_bytes
from netbpf.store.state import kernel_gone, list_pin_keys, list_states, split_key

# a state record with nothing left in bpffs: after a reboot nothing of it runs (a netlink-
# attached program outlives its pins when someone removes them by hand, so no "not loaded")
NOT_LOADED = ("pins are missing (after a reboot, or removed): 'netbpf restore' or an apply of "
              "the policy loads it again")


def read_status(netns: str | None = None, ifname: str | None = None) -> list[dict]:
    """Every managed interface, or those in netns (None: all namespaces), or one interface."""
    rows = []

    def wanted(key: str) -> bool:
        ns, name = split_key(key)
        return (netns is None or ns == netns) and (ifname is None or name == ifname)

    states = [st for st in list_states(not_loaded=True) if wanted(st.key)]
    for st in states:
        health = drift(st) or "ok"
        if health == "pins are missing" and kernel_gone(st.key):
            health = NOT_LOADED
        ing = st.parts.get("ingress")
        rows.append({"interface": st.ifname, "netns": st.netns,
                     "mode": ing.mode if ing else None,
                     "programs": {d: p.prog_id for d, p in st.parts.items()},
                     "attach": {d: p.attach for d, p in st.parts.items()},
                     "prog_id": ing.prog_id if ing else None,
                     "rules": len(st.rules), "conntrack": st.conntrack,
                     "policy_path": st.policy_path, "policy_hash": st.policy_hash,
                     "applied_at": st.applied_at,
                     "health": health,
                     # unchanged | changed | gone | unknown: the named file since the apply
                     "policy_file": file_status(st.key, st.policy_path),
                     "classifier_bytes": sum(table_bytes(p.words, p.class_cap, p.dir_chunks)
                                             for p in st.parts.values())})
    known = {st.key for st in states}
    for key in list_pin_keys():
        if key not in known and wanted(key):
            netns, ifname = split_key(key)
            rows.append({"interface": ifname, "netns": netns, "health": "pins without state"})
    return rows
