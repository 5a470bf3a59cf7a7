"""netbpf.kernel.attach and netns against the kernel: XDP modes, atomic replace, detach,
offload refusal, TC clsact filters that leave other filters alone, pins made inside a netns.

Each test gets its own throwaway namespace (no dependency on the lab API):

    netns nbt<random>
    +-------+   veth   +-------+
    | nbta0 |----------| nbtb0 |        nbtbr0: a bridge (no native XDP), alone
    +-------+          +-------+

Frames are only ever sent inside that namespace; deleting it removes the veths, their XDP
programs and qdiscs. Pins go under a unique /sys/fs/bpf/netbpf-test-* directory.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest

from netbpf.errors import NetbpfError, NotSupported
from netbpf.kernel import attach, bpfsys
from netbpf.kernel.attach import (NB_TC_HANDLE, NB_TC_PRIO, attach_tc, attach_xdp, detach_tc,
                                  detach_xdp, ensure_clsact, list_tc_filters,
                                  remove_clsact_if_unused, xdp_state)
from netbpf.kernel.bpfsys import KernelError
from netbpf.kernel.netns import current_netns, enter_netns, netns_name
from netbpf.kernel.testrun import XDP_DROP, XDP_PASS


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def tc(ns: str, *args: str) -> str:
    return subprocess.run(["tc", "-n", ns, *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def ns():
    """The namespace drawn above; deleted afterwards whatever happened."""
    name = f"nbt{uuid.uuid4().hex[:8]}"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "nbta0", "type", "veth", "peer", "name", "nbtb0")
        ip("-n", name, "link", "add", "nbtbr0", "type", "bridge")
        for dev in ("lo", "nbta0", "nbtb0", "nbtbr0"):
            ip("-n", name, "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout


@pytest.fixture(scope="module")
def second_xdp():
    """Another XDP program (default verdict drop) to swap in; compiled once."""
    from pathlib import Path

    from netbpf.kernel import load_program

    src = Path(__file__).resolve().parent / "progs" / "tiny_xdp.bpf.c"
    loaded = load_program(src, {"NBT_DEFAULT": XDP_DROP}, {"nbt_xdp": "xdp"}, cache=True)
    yield loaded
    loaded.close()


def prog(loaded, name="nbt_xdp"):
    return loaded.progs[name]


# ---- XDP attach, modes ----

@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attach_in_each_mode_reports_mode_and_program(ns, tiny_xdp, mode):
    assert xdp_state("nbtb0", netns=ns) is None
    assert attach_xdp("nbtb0", prog(tiny_xdp), mode, netns=ns) == mode
    assert xdp_state("nbtb0", netns=ns) == (mode, tiny_xdp.prog_id("nbt_xdp"))


def test_auto_picks_native_on_veth(ns, tiny_xdp):
    assert attach_xdp("nbtb0", prog(tiny_xdp), "auto", netns=ns) == "native"
    assert xdp_state("nbtb0", netns=ns).mode == "native"


def test_auto_falls_back_to_generic_where_the_driver_has_no_native_xdp(ns, tiny_xdp):
    with pytest.raises(KernelError, match=r"native mode: .*\[EOPNOTSUPP\]; the driver has no "
                                          r"native XDP"):
        attach_xdp("nbtbr0", prog(tiny_xdp), "native", netns=ns)
    assert attach_xdp("nbtbr0", prog(tiny_xdp), "auto", netns=ns) == "generic"
    assert xdp_state("nbtbr0", netns=ns).mode == "generic"


def test_second_attach_is_ebusy_and_keeps_the_first(ns, tiny_xdp, second_xdp):
    attach_xdp("nbtb0", prog(tiny_xdp), "native", netns=ns)
    with enter_netns(ns):
        index = socket.if_nametoindex("nbtb0")
    with pytest.raises(KernelError) as e:
        attach_xdp("nbtb0", prog(second_xdp), "native", netns=ns)
    assert str(e.value) == (f"attach xdp to nbtb0 (ifindex {index}) in native mode: device busy "
                            f"[EBUSY]; another XDP program is attached — see 'netbpf status'")
    assert xdp_state("nbtb0", netns=ns).prog_id == tiny_xdp.prog_id("nbt_xdp")


def test_other_mode_while_attached_says_which_mode_holds_it(ns, tiny_xdp, second_xdp):
    attach_xdp("nbtb0", prog(tiny_xdp), "generic", netns=ns)
    with pytest.raises(KernelError, match=r"attached in generic mode"):
        attach_xdp("nbtb0", prog(second_xdp), "native", netns=ns)


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_replace_swaps_programs_in_one_netlink_call(ns, tiny_xdp, second_xdp, monkeypatch,
                                                    mode):
    attach_xdp("nbtb0", prog(tiny_xdp), mode, netns=ns)
    before = xdp_state("nbtb0", netns=ns)
    calls = []
    real = attach._set_xdp
    monkeypatch.setattr(attach, "_set_xdp",
                        lambda ipr, index, fd, flags, expected_fd=None:
                        calls.append((fd, flags, expected_fd)) or
                        real(ipr, index, fd, flags, expected_fd))
    used = attach_xdp("nbtb0", prog(second_xdp), "auto", replace_prog_fd=prog(tiny_xdp),
                      netns=ns)
    after = xdp_state("nbtb0", netns=ns)
    assert before == (mode, tiny_xdp.prog_id("nbt_xdp"))
    assert (used, after) == (mode, (mode, second_xdp.prog_id("nbt_xdp")))
    # one RTM_SETLINK carrying the new fd, REPLACE and the expected old fd; never fd -1
    assert calls == [(int(prog(second_xdp)), attach.MODE_FLAGS[mode] | attach.XDP_FLAGS_REPLACE,
                      int(prog(tiny_xdp)))]


def test_replace_of_a_program_that_is_not_attached_changes_nothing(ns, tiny_xdp, second_xdp):
    attach_xdp("nbtb0", prog(tiny_xdp), "native", netns=ns)
    with pytest.raises(KernelError, match=r"\[EEXIST\]; expected to replace our program but "
                                          r"found program id"):
        attach_xdp("nbtb0", prog(second_xdp), "native", replace_prog_fd=prog(second_xdp),
                   netns=ns)
    assert xdp_state("nbtb0", netns=ns).prog_id == tiny_xdp.prog_id("nbt_xdp")


def test_attached_program_sees_frames_sent_in_the_namespace(ns, tiny_xdp):
    """Frames sent from nbta0 reach tiny_xdp on nbtb0: 0xff-first frames drop, others pass."""
    def count(verdict):
        v = bpfsys.map_lookup_percpu(tiny_xdp.maps["nbt_verdicts"].fd,
                                     struct.pack("<I", verdict), 8)
        return sum(struct.unpack("<Q", x)[0] for x in v)

    attach_xdp("nbtb0", prog(tiny_xdp), "generic", netns=ns)
    drop0, pass0 = count(XDP_DROP), count(XDP_PASS)
    src = bytes.fromhex("020000000001")
    with enter_netns(ns):
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("nbta0", 0))
            for _ in range(5):
                s.send(b"\xff" * 6 + src + b"\x88\xb5" + bytes(50))    # local experimental
            for _ in range(3):
                s.send(bytes.fromhex("020000000002") + src + b"\x88\xb5" + bytes(50))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (count(XDP_DROP) - drop0 < 5):
        time.sleep(0.02)
    assert count(XDP_DROP) - drop0 == 5
    assert count(XDP_PASS) - pass0 >= 3         # the kernel may add its own frames


# ---- XDP detach ----

@pytest.mark.parametrize("mode", ["native", "generic"])
def test_detach_in_each_mode(ns, tiny_xdp, mode):
    attach_xdp("nbtb0", prog(tiny_xdp), mode, netns=ns)
    assert detach_xdp("nbtb0", mode, netns=ns) is True
    assert xdp_state("nbtb0", netns=ns) is None
    assert detach_xdp("nbtb0", mode, netns=ns) is False


def test_detach_without_mode_uses_the_attached_mode(ns, tiny_xdp):
    attach_xdp("nbtb0", prog(tiny_xdp), "generic", netns=ns)
    assert detach_xdp("nbtb0", netns=ns) is True
    assert xdp_state("nbtb0", netns=ns) is None


def test_native_detach_leaves_a_generic_program(ns, tiny_xdp):
    attach_xdp("nbtb0", prog(tiny_xdp), "generic", netns=ns)
    assert detach_xdp("nbtb0", "native", netns=ns) is False
    assert xdp_state("nbtb0", netns=ns).mode == "generic"


def test_detach_by_program_id_leaves_someone_elses_program(ns, tiny_xdp, second_xdp):
    attach_xdp("nbtb0", prog(second_xdp), "native", netns=ns)
    with pytest.raises(KernelError, match="not ours"):
        detach_xdp("nbtb0", prog_id=tiny_xdp.prog_id("nbt_xdp"), netns=ns)
    assert xdp_state("nbtb0", netns=ns).prog_id == second_xdp.prog_id("nbt_xdp")
    assert detach_xdp("nbtb0", prog_id=second_xdp.prog_id("nbt_xdp"), netns=ns) is True
    assert xdp_state("nbtb0", netns=ns) is None


# ---- errors ----

def test_offload_on_veth_is_not_supported_and_names_the_driver(ns, tiny_xdp):
    with pytest.raises(NotSupported) as e:
        attach_xdp("nbtb0", prog(tiny_xdp), "offload", netns=ns)
    assert str(e.value) == ("offload xdp to nbtb0: driver 'veth' cannot offload XDP programs; "
                            "use mode native or generic")
    assert xdp_state("nbtb0", netns=ns) is None


def test_driver_names_come_from_inside_the_namespace(ns):
    assert attach.driver_name("nbtb0", netns=ns) == "veth"
    assert attach.driver_name("nbtbr0", netns=ns) == "bridge"


def test_unknown_interface_names_the_namespace(ns, tiny_xdp):
    with pytest.raises(NetbpfError, match=rf"^no interface 'eth9' in namespace {ns}; "
                                          rf"see 'ip -n {ns} link'$"):
        attach_xdp("eth9", prog(tiny_xdp), "auto", netns=ns)
    with pytest.raises(NetbpfError, match=rf"^no interface 'eth9' in namespace {ns}"):
        with enter_netns(ns):
            xdp_state("eth9")


def test_unknown_mode_is_refused(ns, tiny_xdp):
    with pytest.raises(NetbpfError, match="unknown mode 'turbo'"):
        attach_xdp("nbtb0", prog(tiny_xdp), "turbo", netns=ns)


# ---- TC clsact ----

def test_clsact_is_created_once_and_removed_when_unused(ns, tiny_tc):
    assert ensure_clsact("nbtb0", netns=ns) is True
    assert ensure_clsact("nbtb0", netns=ns) is False
    attach_tc("nbtb0", "egress", prog(tiny_tc, "nbt_tc"), "nbt_tc", netns=ns)
    assert remove_clsact_if_unused("nbtb0", netns=ns) is False
    assert detach_tc("nbtb0", "egress", netns=ns) is True
    assert remove_clsact_if_unused("nbtb0", netns=ns) is True
    assert "clsact" not in tc(ns, "qdisc", "show", "dev", "nbtb0")
    assert list_tc_filters("nbtb0", "ingress", netns=ns) == []


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_users_own_filter_survives_our_attach_and_detach(ns, tiny_tc, direction):
    tc(ns, "qdisc", "add", "dev", "nbtb0", "clsact")
    tc(ns, "filter", "add", "dev", "nbtb0", direction, "prio", "10", "protocol", "all",
       "u32", "match", "u32", "0", "0")
    theirs = list_tc_filters("nbtb0", direction, netns=ns)
    assert theirs and {f.kind for f in theirs} == {"u32"}

    attach_tc("nbtb0", direction, prog(tiny_tc, "nbt_tc"), "nbt_tc", netns=ns)
    ours = [f for f in list_tc_filters("nbtb0", direction, netns=ns) if f.kind == "bpf"]
    assert [(f.prio, f.handle, f.name, f.prog_id, f.direct_action) for f in ours] == \
        [(NB_TC_PRIO, NB_TC_HANDLE, "nbt_tc", tiny_tc.prog_id("nbt_tc"), True)]

    assert detach_tc("nbtb0", direction, netns=ns) is True
    assert detach_tc("nbtb0", direction, netns=ns) is False
    assert list_tc_filters("nbtb0", direction, netns=ns) == theirs
    assert remove_clsact_if_unused("nbtb0", netns=ns) is False
    assert "u32" in tc(ns, "filter", "show", "dev", "nbtb0", direction)


def test_attach_tc_again_replaces_our_filter_in_place(ns, tiny_tc, tiny_xdp):
    from pathlib import Path

    from netbpf.kernel import load_program

    src = Path(__file__).resolve().parent / "progs" / "tiny_tc.bpf.c"
    other = load_program(src, {"NBT_UNUSED": 1}, {"nbt_tc": "sched_cls"})
    try:
        attach_tc("nbtb0", "ingress", prog(tiny_tc, "nbt_tc"), "nbt_tc", netns=ns)
        attach_tc("nbtb0", "ingress", prog(other, "nbt_tc"), "nbt_tc", netns=ns)
        ours = list_tc_filters("nbtb0", "ingress", netns=ns)
        assert [(f.kind, f.prog_id) for f in ours] == [("bpf", other.prog_id("nbt_tc"))]
    finally:
        other.close()


def test_tc_rejects_unknown_direction(ns, tiny_tc):
    with pytest.raises(NetbpfError, match="ingress or egress, not 'sideways'"):
        attach_tc("nbtb0", "sideways", prog(tiny_tc, "nbt_tc"), "nbt_tc", netns=ns)


# ---- netns ----

def test_pins_and_bcc_attach_made_inside_a_namespace_survive_leaving_it(ns, tiny_xdp,
                                                                        pin_dir):
    import bcc

    home = current_netns()
    with enter_netns(ns):
        assert netns_name() == ns
        assert os.path.ismount("/sys/fs/bpf")       # still the root bpffs, unlike netns exec
        fn = tiny_xdp.bpf.load_func(b"nbt_xdp", bcc.BPF.XDP)
        bcc.BPF.attach_xdp(b"nbtb0", fn, attach.XDP_FLAGS_SKB_MODE)
        tiny_xdp.pin_maps(pin_dir, ["nbt_hash"])
    assert current_netns() == home
    assert (pin_dir / "nbt_hash").exists()
    with bpfsys.obj_get(pin_dir / "nbt_hash") as m:
        assert bpfsys.map_info(m).name == "nbt_hash"
    assert xdp_state("nbtb0", netns=ns) == ("generic", tiny_xdp.prog_id("nbt_xdp"))


def test_entering_a_namespace_moves_only_the_calling_thread(ns):
    home = current_netns()
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(5)
        seen["other"] = current_netns()
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with enter_netns(ns):
        seen["self"] = current_netns()
        inside.set()
        done.wait(5)
    t.join(5)
    assert seen["other"] == home
    assert seen["self"] != home
    assert current_netns() == home


def test_entering_a_missing_namespace_says_so():
    with pytest.raises(KernelError, match=r"enter network namespace nbtnothere "
                                          r"\(/run/netns/nbtnothere\): .*\[ENOENT\]; "
                                          r"see 'ip netns list'") as e:
        with enter_netns("nbtnothere"):
            pass
    assert e.value.errno == errno.ENOENT
