"""apply/detach --json against the kernel: the plan, then the outcome with the program ids the
kernel runs; a re-apply reports nothing changed; detach reports what it removed.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab)
             10.10.0.2                             10.10.0.1
             ping gw    ---------------------->   XDP ingress drops echo requests (second policy,
                                                  a map update: the program id stays)

Not the --json of bad input (tests/unit/test_cli_json.py).
"""
from __future__ import annotations

import json
import os

from netbpf.kernel.attach import xdp_state

from netbpf_cli import netbpf

POLICY = """\
version: 1
interfaces:
  gw0:
    ingress:
      default: allow
      rules:
        - {name: drop-udp-9, proto: udp, dport: 9, action: drop}
        - {name: drop-timestamp, proto: icmp, icmp_type: 13, action: drop}
"""
DROP_PING = "        - {name: drop-ping, proto: icmp, icmp_type: echo-request, action: drop}\n"


def apply_json(lab, path, *args):
    return json.loads(netbpf(lab, "apply", "--json", *args, str(path)).stdout)


def test_apply_json_reports_the_plan_then_the_programs_running(make_lab, tmp_path):
    lab = make_lab("two-hosts", prefix=f"cj{os.getpid()}-")
    path = tmp_path / "gw.yaml"
    path.write_text(POLICY)
    try:
        dry = apply_json(lab, path, "--dry-run")
        assert dry["dry_run"] and dry["changed"]
        [iface] = dry["interfaces"]
        assert (iface["interface"], iface["netns"], iface["action"]) == ("gw0", lab.ns("gw"),
                                                                         "create")
        assert "programs" not in iface
        assert lab.call("gw", xdp_state, "gw0") is None, "a dry run attaches nothing"

        done = apply_json(lab, path)
        [iface] = done["interfaces"]
        assert done["changed"] and iface["applied"] and iface["changed"]
        running = lab.call("gw", xdp_state, "gw0")
        assert iface["programs"] == {"ingress": running.prog_id}

        again = apply_json(lab, path)
        assert again["changed"] is False and again["diff"] == ""
        assert again["interfaces"][0]["action"] == "unchanged"
        assert again["interfaces"][0]["programs"] == {"ingress": running.prog_id}

        path.write_text(POLICY + DROP_PING)
        assert lab.ping("client", lab.addr("gw", "gw0"))
        edit = apply_json(lab, path)
        assert edit["diff"].splitlines() == [f"~ gw0 (netns {lab.ns('gw')}): update",
                                             "  + ingress drop-ping (drop)"]
        assert edit["interfaces"][0]["programs"] == {"ingress": running.prog_id}
        assert not lab.ping("client", lab.addr("gw", "gw0"), timeout=1.0)
    finally:
        out = json.loads(netbpf(lab, "detach", "--json", "gw0", check=False).stdout)
    assert out["detached"] and out["errors"] == []
    assert lab.call("gw", xdp_state, "gw0") is None
    again = netbpf(lab, "detach", "-j", "gw0", check=False)
    assert again.returncode == 1
    assert json.loads(again.stdout)["errors"][0]["message"].startswith("gw0: netbpf manages nothing")
