#!/usr/bin/python
# netbpf_policy: make a host (or one of its network namespaces) run a netbpf policy, through
# `netbpf apply --json`. Changed only when netbpf's plan is non-empty. Not a policy checker of
# its own: every verdict on the policy, and every error text, is netbpf's.
from __future__ import annotations

DOCUMENTATION = r"""
module: netbpf_policy
short_description: Apply a netbpf XDP/TC policy to a host or network namespace
description:
  - Validates the policy, then runs C(netbpf apply --json) and reports netbpf's plan.
  - C(changed) is true only when the plan changes something on some interface.
  - Check mode runs C(netbpf apply --dry-run --json) and touches nothing.
  - Diff mode returns the plan as a diff (rules added, removed or changed per interface).
  - A bad policy fails with netbpf's FILE:LINE:COL messages and exit code (2); the running
    policy stays. A kernel failure fails with exit code 1; netbpf keeps the old policy running.
options:
  content:
    description:
      - The policy text. It is written under O(dest_dir) (with O(sets) beside it) only
        once it validates, so a bad policy leaves the last good copy in place.
      - Messages name the file as netbpf saw it, O(filename):LINE:COL.
      - Mutually exclusive with O(src).
    type: str
  src:
    description: Path of a policy file already on the host (set files resolve next to it).
    type: path
  filename:
    description:
      - File name the O(content) is kept under (use the name of your source file, so
        messages point at it).
    type: str
    default: policy.yaml
  sets:
    description:
      - Set files for O(content), by file name as the policy names them (the C(file) of a
        set); each value is the file's text, or a list of networks.
    type: dict
    default: {}
  dest_dir:
    description:
      - Where O(content) and O(sets) are kept on the host, in a folder per namespace
        (C(<dest_dir>/<netns or host>/policy.yaml)), so netbpf recognises the same policy
        file from one run to the next.
    type: path
    default: /etc/netbpf/ansible
  netns:
    description: Apply inside this network namespace (C(netbpf -n NETNS)).
    type: str
  confirm:
    description:
      - Commit-confirmed apply with C(netbpf apply --confirm SECONDS); netbpf rolls the policy back
        unless O(state=confirmed) follows within SECONDS. Run a connectivity check in between.
    type: int
  state:
    description:
      - C(applied) applies the policy; C(confirmed) runs C(netbpf confirm) for a pending
        O(confirm) apply (no policy needed).
    type: str
    choices: [applied, confirmed]
    default: applied
  executable:
    description: Path of the netbpf command; found on PATH when omitted.
    type: path
"""

EXAMPLES = r"""
- name: Roll out the gateway policy
  netbpf.netbpf.netbpf_policy:
    content: "{{ lookup('file', 'policies/gw.yaml') }}"
    sets:
      blocklist.txt: "{{ lookup('file', 'policies/blocklist.txt') }}"
    netns: "{{ netbpf_netns | default(omit) }}"
  register: applied
"""

RETURN = r"""
plan:
  description: C(netbpf apply --json) output (interfaces, their rule changes, programs, errors).
  type: dict
  returned: always
interfaces:
  description: Names of the interfaces whose plan changes something.
  type: list
  returned: always
rc:
  description: netbpf's exit code (0 ok, 1 runtime error, 2 bad input).
  type: int
  returned: always
"""

import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.netbpf.netbpf.plugins.module_utils.netbpf_cli import (
    fail_from, netbpf_command, run_json)


def _write_tree(directory, filename, content, sets):
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = {filename: content, **sets}
    for name, text in files.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"'{name}': filename and set file names are plain file names "
                             "(no directories)")
        if isinstance(text, list):          # a set given as a YAML list of networks
            text = "\n".join(str(entry) for entry in text)
        with open(os.path.join(directory, name), "w") as f:
            f.write(text if text.endswith("\n") or not text else text + "\n")


def _swap_in(staged, dest):
    """Make the validated copy the kept one; return the previous copy's path (or None)."""
    previous = None
    if os.path.isdir(dest):
        previous = dest + ".previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(dest, previous)
    os.rename(staged, dest)
    return previous


def _swap_back(dest, previous):
    shutil.rmtree(dest, ignore_errors=True)
    if previous:
        os.rename(previous, dest)


def _changed_names(plan):
    return [i["interface"] for i in (plan or {}).get("interfaces", []) if i.get("changed")]


def _result(module, rc, plan):
    out = dict(changed=bool((plan or {}).get("changed")), plan=plan or {},
               interfaces=_changed_names(plan), rc=rc)
    if module._diff and plan:
        where = module.params.get("netns") or "host"
        out["diff"] = {"before_header": f"netbpf ({where}) running",
                       "after_header": f"netbpf ({where}) planned",
                       "prepared": plan.get("diff", "")}
    return out


def _confirm(module):
    """`netbpf confirm`: keep the policy a `confirm:` apply put in place (its text is shown)."""
    if module.check_mode:
        module.exit_json(changed=True, rc=0, plan={}, interfaces=[])
    rc, out, err = module.run_command(netbpf_command(module, "confirm"))
    if rc != 0:
        fail_from(module, "netbpf confirm", rc, None, err)
    module.exit_json(changed=True, rc=rc, plan={}, interfaces=[], stdout=out)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            content=dict(type="str"), src=dict(type="path"),
            filename=dict(type="str", default="policy.yaml"),
            sets=dict(type="dict", default={}),
            dest_dir=dict(type="path", default="/etc/netbpf/ansible"),
            netns=dict(type="str"), confirm=dict(type="int"),
            state=dict(type="str", default="applied", choices=["applied", "confirmed"]),
            executable=dict(type="path"),
        ),
        mutually_exclusive=[("content", "src")],
        required_if=[("state", "applied", ("content", "src"), True)],
        supports_check_mode=True,
    )
    p = module.params
    if p["state"] == "confirmed":
        _confirm(module)
    extra = ["--confirm", str(p["confirm"])] if p["confirm"] else []

    if p["src"]:
        args = ["apply", "--json"] + (["--dry-run"] if module.check_mode else extra)
        rc, plan, err = run_json(module, *args, p["src"], cwd=os.path.dirname(p["src"]) or None)
        if rc != 0:
            fail_from(module, "netbpf apply", rc, plan, err, plan=plan or {})
        module.exit_json(**_result(module, rc, plan))

    dest = os.path.join(p["dest_dir"], p["netns"] or "host")
    staged = tempfile.mkdtemp(prefix=".netbpf-", dir=_staging_parent(dest, module.check_mode))
    try:
        try:
            _write_tree(staged, p["filename"], p["content"], p["sets"])
        except ValueError as e:
            module.fail_json(msg=str(e), rc=2)
        # Run from the staged copy by relative name: messages read FILENAME:LINE:COL.
        if module.check_mode:
            rc, plan, err = run_json(module, "apply", "--json", "--dry-run", p["filename"],
                                     cwd=staged)
            if rc != 0:
                fail_from(module, "netbpf apply --dry-run", rc, plan, err, plan=plan or {})
            module.exit_json(**_result(module, rc, plan))
        rc, checked, err = run_json(module, "validate", "--json", p["filename"], cwd=staged)
        if rc != 0:
            errors = [e for f in (checked or {}).get("files", []) for e in f["errors"]]
            fail_from(module, "netbpf validate", rc, {"errors": errors}, err)
        previous = _swap_in(staged, dest)
        rc, plan, err = run_json(module, "apply", "--json", *extra, p["filename"], cwd=dest)
        if rc != 0:
            # the running policy is still the previous one: keep its files with it
            _swap_back(dest, previous)
            fail_from(module, "netbpf apply", rc, plan, err, plan=plan or {},
                      changed=bool((plan or {}).get("changed")))
        if previous:
            shutil.rmtree(previous, ignore_errors=True)
        module.exit_json(**_result(module, rc, plan))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _staging_parent(dest, check_mode):
    """Stage next to dest (same filesystem, so the swap is a rename); in check mode in the
    temporary directory, so nothing is created where the policy is kept."""
    if check_mode:
        return None
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    os.makedirs(parent, mode=0o755, exist_ok=True)
    return parent


if __name__ == "__main__":
    main()
