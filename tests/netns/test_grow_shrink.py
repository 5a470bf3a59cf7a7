"""Policies that grow and shrink between 1, 50, 5,000 and the most rules a program takes, with
action changes, in both orders: counters of the rules that stay are kept, the others start at
zero, every step's verdicts are the new policy's (test_run on the attached program) and status
stays ok. Its own file so it runs beside the kill-point cases (it is the longest test).

    [client] client0 ---------------------------- gw0 [gw]   (one private lab per module)
"""
from __future__ import annotations

import json

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netbpf import abi
from netbpf.kernel import attach, bpfsys
from netbpf.kernel.testrun import XDP_DROP
from netbpf.kernel.testrun import test_run as run_prog

from netbpf_cli import netbpf
from test_kill_points import gw, lab, status  # noqa: F401 - the fixtures, shared
from test_races import write

def sized_policy(n: int, variant: int) -> str:
    """n terminal ingress rules: `keep` (the same in every policy), `act` (drop or allow by
    variant), then padding whose actions also follow the variant."""
    act = ("drop", "allow")[variant % 2]
    pad_act = ("allow", "drop")[variant % 2]
    rules = ["        - {name: keep, proto: udp, dport: 7100, action: drop}",
             f"        - {{name: act, proto: udp, dport: 7200, action: {act}}}"]
    rules += [f"        - {{name: pad-{i}, proto: tcp, dport: {1 + i % 100}, "
              f"sport: {1 + i // 100}, action: {pad_act}}}" for i in range(max(0, n - 2))]
    return ("version: 1\ninterfaces:\n  gw0:\n    xdp: {mode: native}\n"
            "    ingress:\n      default: allow\n      rules:\n" + "\n".join(rules[:n]) + "\n")


def probe(lab, dport: int) -> int:
    ns = lab.ns("gw")
    frame = bytes(Ether(src=lab.mac("client", "client0"), dst=lab.mac("gw", "gw0")) /
                  IP(src=lab.addr("client", "client0"), dst=lab.addr("gw", "gw0")) /
                  UDP(sport=40000, dport=dport) / b"probe")
    cur = attach.xdp_state("gw0", netns=ns)
    with bpfsys.prog_get_fd_by_id(cur.prog_id) as fd:
        return run_prog(fd, frame).retval


def counters(lab) -> dict[str, int]:
    st = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    return {r["name"]: r["packets"] for r in st["rules"]}


def test_grow_and_shrink_between_1_50_5000_and_max_rules_keeps_kept_counters(gw, tmp_path):
    lab = gw
    sizes = [1, 50, 5000, abi.NB_MAX_RULES, 5000, 50, 1, abi.NB_MAX_RULES, 1, 5000, 1]
    keep_hits = 0
    for i, n in enumerate(sizes):
        path = write(tmp_path, f"p{i}.yaml", sized_policy(n, i))
        out = netbpf(lab, "apply", str(path), timeout=600)
        where = f"step {i}: {sizes[i - 1] if i else 0} -> {n} rules\n{out.stdout}"
        before = counters(lab)
        assert before.get("keep") == keep_hits, where        # kept through every change
        if n >= 2:
            assert before.get("act") == 0, where             # its action changed: from zero
        assert probe(lab, 7100) == XDP_DROP, where
        keep_hits += 1
        if n >= 2:
            want = XDP_DROP if i % 2 == 0 else 2             # XDP_PASS
            assert probe(lab, 7200) == want, where
            assert counters(lab)["act"] == 1, where
        assert status(lab)[1]["health"] == "ok", where
