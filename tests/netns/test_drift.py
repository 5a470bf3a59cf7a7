"""Drift: someone changes what netbpf set up behind its back. `netbpf status` reports it (its
row is not 'ok', exit 1) and `netbpf apply` of the same policy restores it (status ok, the
policy enforced again).

    [client] client0 ---------------------------- gw0 [gw]   (a private lab per case)
             10.10.0.2                             10.10.0.1
             UDP probes to gw:7001    ----------->  XDP ingress drops udp 7001
             UDP from gw:8001        <-----------   TC egress drops udp 8001

Remounting bpffs empty would hit every user of this machine, so "bpffs lost our pins" is the
removal of this interface's pin directory. The netlink drifts (xdp off, tc filter del) run with
the fallback forced (NETBPF_ATTACH=netlink): a bpf_link cannot be removed that way, only by
`bpftool link detach`. Not killed or racing applies (test_killed_apply.py, test_races.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from netbpf.store.state import pin_dir, state_file

from netbpf_cli import NETBPF, netbpf
from test_races import Probes, policy, status_row, write


def recreate_link(lab) -> None:
    """Delete gw0 (its veth peer client0 goes with it) and build the pair again as the lab did."""
    lab.run("gw", ["ip", "link", "del", "gw0"])
    lab.run("gw", ["ip", "link", "add", "gw0", "address", lab.mac("gw", "gw0"), "type", "veth",
                   "peer", "name", "client0", "address", lab.mac("client", "client0"),
                   "netns", lab.ns("client")])
    for node, ifname in (("gw", "gw0"), ("client", "client0")):
        lab.run(node, ["ip", "addr", "add", f"{lab.addr(node, ifname)}/24", "dev", ifname])
        lab.run(node, ["ip", "link", "set", ifname, "up"])
    lab.run("client", ["ip", "route", "add", "default", "via", lab.addr("gw", "gw0")])


def delete_link(lab) -> None:
    lab.run("gw", ["ip", "link", "del", "gw0"])


def remove_pins(lab) -> None:
    shutil.rmtree(pin_dir(f"{lab.ns('gw')}:gw0"))


def remove_state(lab) -> None:
    state_file(f"{lab.ns('gw')}:gw0").unlink()


def xdp_off(lab) -> None:
    lab.run("gw", ["ip", "link", "set", "dev", "gw0", "xdp", "off"])


def tc_filter_del(lab) -> None:
    lab.run("gw", ["tc", "filter", "del", "dev", "gw0", "egress"])


def link_detach(direction: str):
    def detach(lab) -> None:
        pin = pin_dir(f"{lab.ns('gw')}:gw0") / direction / "link"
        subprocess.run(["bpftool", "link", "detach", "pinned", str(pin)], check=True)
    return detach


# case -> (what someone does, what status must say, what is enforced while drifted)
DRIFTS = {
    "interface-recreated": (recreate_link, "re-created", ((), ())),
    # the pins were the links' last holders: the programs went with them (as at a reboot)
    "pins-removed": (remove_pins, "pins are missing", ((), ())),
    "state-removed": (remove_state, "pins without state", ((1,), (1,))),
    "xdp-detached": (xdp_off, "XDP program was detached", ((), (1,))),
    "tc-filter-deleted": (tc_filter_del, "TC egress filter was removed", ((1,), ())),
    "xdp-link-detached": (link_detach("ingress"), "ingress link was detached", ((), (1,))),
    "tcx-link-detached": (link_detach("egress"), "egress link was detached", ((1,), ())),
}
NETLINK_CASES = ("xdp-detached", "tc-filter-deleted")


def status_exit(lab) -> tuple[int, str]:
    p = subprocess.run([NETBPF, "status"], capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout


@pytest.fixture
def gw(make_lab, tmp_path, monkeypatch, request):
    if getattr(request.node, "callspec", None) and \
            request.node.callspec.params.get("case") in NETLINK_CASES:
        monkeypatch.setenv("NETBPF_ATTACH", "netlink")
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=(1,))
    path = write(tmp_path, "p1.yaml", policy(1))
    netbpf(lab, "apply", str(path))
    assert probes.enforced() == 1
    try:
        yield lab, probes, path
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


LOST_CLSACT = ()  # fixed: was a strict xfail


@pytest.mark.parametrize("case", [pytest.param(c, marks=LOST_CLSACT) if c == "state-removed"
                                  else c for c in DRIFTS])
def test_status_reports_drift_and_apply_restores_the_policy(gw, case):
    lab, probes, path = gw
    break_it, says, while_drifted = DRIFTS[case]
    break_it(lab)
    row = status_row(lab)
    assert says in row["health"], row
    code, table = status_exit(lab)
    assert code == 1 and lab.ns("gw") in table
    for _ in range(50):   # a link whose last pin went is freed by a kernel workqueue, soon
        ing, eg = probes.dropped()
        if (tuple(sorted(ing)), tuple(sorted(eg))) == while_drifted:
            break
        time.sleep(0.1)
    assert (tuple(sorted(ing)), tuple(sorted(eg))) == while_drifted

    out = netbpf(lab, "apply", str(path))
    assert "nothing to do" not in out.stdout, out.stdout
    assert status_row(lab)["health"] == "ok"
    assert probes.enforced() == 1
    stats = netbpf(lab, "stats", "gw0", "--json")
    assert '"in-1"' in stats.stdout and '"out-1"' in stats.stdout
    again = netbpf(lab, "apply", str(path))
    assert "nothing to do" in again.stdout, again.stdout
    # and what was restored is netbpf's own again: detach removes all of it
    netbpf(lab, "detach", "gw0")
    link = lab.run("gw", ["ip", "link", "show", "gw0"]).stdout
    qdiscs = lab.run("gw", ["tc", "qdisc", "show", "dev", "gw0"]).stdout
    assert "prog/xdp" not in link and "clsact" not in qdiscs, link + qdiscs
    assert not pin_dir(f"{lab.ns('gw')}:gw0").exists()


def test_ip_link_xdp_off_cannot_remove_netbpf_and_status_stays_ok(gw):
    lab, probes, path = gw
    off = lab.run("gw", ["ip", "link", "set", "dev", "gw0", "xdp", "off"], check=False)
    assert off.returncode != 0, off
    assert status_row(lab)["health"] == "ok"
    assert probes.enforced() == 1
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    progs = status_row(lab)["programs"]
    shown = {entry["prog_id"] for entry in links}
    assert progs["ingress"] in shown and progs["egress"] in shown, (progs, links)
    assert status_row(lab)["attach"] == {"ingress": "link", "egress": "link"}


def test_forced_netlink_fallback_attaches_xdp_and_cls_bpf(make_lab, tmp_path, monkeypatch):
    monkeypatch.setenv("NETBPF_ATTACH", "netlink")
    lab = make_lab("two-hosts")
    probes = Probes(lab, tags=(1,))
    try:
        out = netbpf(lab, "apply", str(write(tmp_path, "p1.yaml", policy(1)))).stdout
        assert "through netlink" in out and "bpf_link not used" in out, out
        assert probes.enforced() == 1
        row = status_row(lab)
        assert row["health"] == "ok" and row["attach"] == {"ingress": "netlink",
                                                            "egress": "netlink"}
        assert "nb_fw_tc_eg" in lab.run("gw", ["tc", "filter", "show", "dev", "gw0",
                                               "egress"]).stdout
        assert "prog/xdp" in lab.run("gw", ["ip", "link", "show", "gw0"]).stdout
        # a later apply without the override keeps netlink: moving to a link is not atomic
        monkeypatch.delenv("NETBPF_ATTACH")
        out = netbpf(lab, "apply", str(write(tmp_path, "p2.yaml", policy(2)))).stdout
        assert status_row(lab)["attach"] == {"ingress": "netlink", "egress": "netlink"}
    finally:
        probes.close()
        netbpf(lab, "detach", "gw0", check=False)


def test_interface_gone_is_reported_and_apply_says_it_is_missing(gw):
    lab, probes, path = gw
    delete_link(lab)
    row = status_row(lab)
    assert row["health"] == "the interface is gone", row
    r = netbpf(lab, "apply", str(path), check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "no interface 'gw0'" in lines[0], r.stderr
    netbpf(lab, "detach", "gw0")
    assert not pin_dir(f"{lab.ns('gw')}:gw0").exists()
    assert all(r["netns"] != lab.ns("gw") for r in _status_rows())


def _status_rows() -> list[dict]:
    return json.loads(subprocess.run([NETBPF, "status", "--json"], capture_output=True,
                                     text=True, timeout=60).stdout)
