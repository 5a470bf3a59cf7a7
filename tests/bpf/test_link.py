"""netbpf.kernel.link against the kernel: XDP and TCX links created, pinned, swapped by
bpf_link_update (compare-and-swap), detached; netlink cannot remove a link's program.

Each test gets its own throwaway namespace:

    netns nbl<random>
    +-------+   veth   +-------+
    | nbla0 |----------| nblb0 |     links on nblb0; pins under /sys/fs/bpf/netbpf-test-*
    +-------+          +-------+
"""
from __future__ import annotations

import errno
import json
import subprocess
import uuid

import pytest

from netbpf.kernel import attach, bpfsys, link
from netbpf.kernel.bpfsys import KernelError
from netbpf.kernel.link import LinkUnsupported


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def ns():
    name = f"nbl{uuid.uuid4().hex[:8]}"
    try:
        assert ip("netns", "add", name).returncode == 0
        ip("-n", name, "link", "add", "nbla0", "type", "veth", "peer", "name", "nblb0")
        for dev in ("lo", "nbla0", "nblb0"):
            ip("-n", name, "link", "set", dev, "up")
        yield name
    finally:
        ip("netns", "del", name)


def bpftool_links() -> dict[int, dict]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {entry["id"]: entry for entry in json.loads(out or "[]")}


def test_xdp_link_is_listed_by_bpftool_and_survives_netlink_xdp_off(ns, tiny_xdp, pin_dir):
    pin_dir.mkdir()
    fd, mode = link.create_link(tiny_xdp.prog_fd("nbt_xdp"), "nblb0", "xdp", "auto", netns=ns)
    with fd:
        bpfsys.obj_pin(fd, pin_dir / "link")
    info = link.pinned_link_info(pin_dir / "link")
    assert mode == "native" and info.kind == "xdp" and info.ifindex > 0
    assert info.prog_id == tiny_xdp.prog_id("nbt_xdp")
    listed = bpftool_links()[info.id]
    assert listed["prog_id"] == info.prog_id and listed["type"] == "xdp"
    # the habit of every XDP user: it cannot take a link-attached program away
    off = ip("-n", ns, "link", "set", "dev", "nblb0", "xdp", "off")
    assert off.returncode != 0
    assert attach.xdp_state("nblb0", netns=ns) == ("native", info.prog_id)
    # our own detach works, and the link is gone once its pin is
    link.detach_pinned(pin_dir / "link")
    assert attach.xdp_state("nblb0", netns=ns) is None
    assert link.pinned_link_info(pin_dir / "link").ifindex == 0
    (pin_dir / "link").unlink()
    assert info.id not in bpftool_links()


def test_xdp_link_generic_mode_is_honoured(ns, tiny_xdp):
    fd, mode = link.create_link(tiny_xdp.prog_fd("nbt_xdp"), "nblb0", "xdp", "generic", netns=ns)
    with fd:
        assert mode == "generic"
        assert attach.xdp_state("nblb0", netns=ns).mode == "generic"
    assert attach.xdp_state("nblb0", netns=ns) is None   # last fd closed: link released


def test_link_update_swaps_only_from_the_expected_program(ns, tiny_xdp, tiny_xdp_fresh):
    first, second = tiny_xdp.prog_fd("nbt_xdp"), tiny_xdp_fresh.prog_fd("nbt_xdp")
    fd, _ = link.create_link(first, "nblb0", "xdp", "native", netns=ns)
    with fd:
        link.update_link(fd, second, old_prog_fd=first)
        assert link.link_info(fd).prog_id == tiny_xdp_fresh.prog_id("nbt_xdp")
        with pytest.raises(KernelError) as e:
            link.update_link(fd, first, old_prog_fd=first)   # first no longer runs
        assert e.value.errno == errno.EPERM
        assert attach.xdp_state("nblb0", netns=ns).prog_id == tiny_xdp_fresh.prog_id("nbt_xdp")


def test_tcx_links_on_both_directions_are_listed(ns, tiny_tc):
    prog = tiny_tc.prog_fd("nbt_tc")
    ingress, kind = link.create_link(prog, "nblb0", "ingress", netns=ns)
    egress, _ = link.create_link(prog, "nblb0", "egress", netns=ns)
    with ingress, egress:
        assert kind == "tcx"
        infos = [link.link_info(ingress), link.link_info(egress)]
        listed = bpftool_links()
        for i in infos:
            assert i.kind == "tcx" and i.prog_id == tiny_tc.prog_id("nbt_tc") and i.ifindex > 0
            assert listed[i.id]["prog_id"] == i.prog_id
        assert link.tcx_prog_ids("nblb0", "egress", netns=ns) == [tiny_tc.prog_id("nbt_tc")]
        # no clsact qdisc is needed for TCX
        assert "clsact" not in subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", "nblb0"],
                                              capture_output=True, text=True).stdout


def test_forcing_netlink_refuses_links(ns, tiny_xdp, monkeypatch):
    monkeypatch.setenv(link.FORCE_ENV, "netlink")
    with pytest.raises(LinkUnsupported):
        link.create_link(tiny_xdp.prog_fd("nbt_xdp"), "nblb0", "xdp", "auto", netns=ns)
    assert attach.xdp_state("nblb0", netns=ns) is None
