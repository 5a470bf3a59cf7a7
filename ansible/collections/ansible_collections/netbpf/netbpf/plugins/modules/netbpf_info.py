#!/usr/bin/python
# netbpf_info: what netbpf runs on a host (status --json) and, on request, its counters
# (stats --json), for playbooks to assert on drift and counters. Reads only; never changes.
from __future__ import annotations

DOCUMENTATION = r"""
module: netbpf_info
short_description: Read netbpf's status and per-interface counters
description:
  - Runs C(netbpf status --json) and, with O(stats=true), C(netbpf stats IF --json) for every
    interface netbpf manages (in O(netns) when given). Never changes anything.
options:
  netns:
    description: Report only interfaces in this network namespace (C(netbpf -n)).
    type: str
  stats:
    description: Also read each interface's counters.
    type: bool
    default: false
  executable:
    description: Path of the netbpf command; found on PATH when omitted.
    type: path
"""

EXAMPLES = r"""
- netbpf.netbpf.netbpf_info:
    netns: gw
    stats: true
  register: nb
- ansible.builtin.assert:
    that: nb.healthy
    fail_msg: "netbpf drift on {{ inventory_hostname }}: {{ nb.drift }}"
"""

RETURN = r"""
status:
  description: Rows of C(netbpf status --json) (interface, netns, health, programs, policy_hash...).
  type: list
  returned: always
stats:
  description: C(netbpf stats --json) per interface name, with O(stats=true).
  type: dict
  returned: always
drift:
  description: The status rows whose health is not C(ok).
  type: list
  returned: always
healthy:
  description: True when netbpf manages at least one interface here and none has drifted.
  type: bool
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.netbpf.netbpf.plugins.module_utils.netbpf_cli import fail_from, run_json


def main():
    module = AnsibleModule(
        argument_spec=dict(netns=dict(type="str"), stats=dict(type="bool", default=False),
                           executable=dict(type="path")),
        supports_check_mode=True,
    )
    netns = module.params["netns"]
    rc, rows, err = run_json(module, "status", "--json")
    # status exits 1 when something drifted, and still prints every row
    if rows is None or rc not in (0, 1):
        fail_from(module, "netbpf status", rc, None, err)
    rows = [r for r in rows if r.get("netns") == netns]
    stats = {}
    if module.params["stats"]:
        for r in rows:
            if r.get("health") == "pins without state":
                continue
            src, data, err = run_json(module, "stats", r["interface"], "--json")
            if src != 0 or data is None:
                fail_from(module, f"netbpf stats {r['interface']}", src, data, err)
            stats[r["interface"]] = data
    drift = [r for r in rows if r.get("health") != "ok"]
    module.exit_json(changed=False, status=rows, stats=stats, drift=drift,
                     healthy=bool(rows) and not drift)


if __name__ == "__main__":
    main()
