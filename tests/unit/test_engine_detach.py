"""Detach against a fake kernel (tests/unit/fakekernel.py): exactly what netbpf attached and
pinned goes, a program another tool attached stays and is named, netbpf's programs left by
a killed apply are recognised and removed, a gone namespace or interface is forgotten.
"""
from __future__ import annotations

import pytest

from engine_world import k  # noqa: F401  (the fixture)
from engine_world import (apply_text, assert_detach_leaves_nothing, fake_world,
                        killed_apply, policy)
from fakekernel import Prog
from netbpf.engine.apply import detach
from netbpf.errors import NetbpfError
from netbpf.kernel import attach
from netbpf.observe.drift import drift
from netbpf.store.state import list_states, load_journal, load_state


@pytest.mark.parametrize("links", [True, False], ids=["bpf_link", "netlink"])
def test_detach_removes_programs_pins_state_and_the_clsact_it_added(
        tmp_path, monkeypatch, links):
    k = fake_world(tmp_path, monkeypatch, links=links)
    k.add_interface("gw0")
    apply_text(tmp_path / "p.yaml", policy(1))
    assert k.pinned_files() and k.attached("gw0")
    assert bool(k.clsact) is not links
    assert_detach_leaves_nothing(k)


def foreign_program(k) -> int:
    return k._add(Prog(0, "xdp_other_tool", 6))


def test_apply_refuses_an_interface_with_another_tools_xdp_program(k, tmp_path):
    index = k.ifaces[(None, "gw0")]
    k.xdp[index] = attach.XdpState("native", foreign_program(k))
    k.links = False
    with pytest.raises(NetbpfError, match=r"another XDP program \(id \d+\) is attached"):
        apply_text(tmp_path / "p.yaml", policy(1, egress=False))
    assert k.pinned_files() == [] and load_journal("gw0") is None
    assert k.attached("gw0") == {"xdp": k.xdp[index].prog_id}


def test_detach_leaves_another_tools_program_alone_and_names_it(tmp_path, monkeypatch):
    k = fake_world(tmp_path, monkeypatch, links=False)
    index = k.add_interface("gw0")
    apply_text(tmp_path / "p.yaml", policy(1, egress=False))
    other = foreign_program(k)
    k.xdp[index] = attach.XdpState("native", other)          # replaced by hand
    assert drift(load_state("gw0")) == f"another XDP program (id {other}) replaced ours"
    lines: list[str] = []
    detach("gw0", None, log=lines.append)
    assert f"gw0: XDP program id {other} is not netbpf's; left alone" in lines
    assert k.attached("gw0") == {"xdp": other}
    assert k.pinned_files() == [] and list_states() == []


@pytest.mark.parametrize("step", ["program:attached-ingress", "program:pins-renamed"])
def test_detach_after_a_killed_apply_removes_netbpfs_programs_too(k, tmp_path, step):
    """issue 19: a kill after the pin swap left netbpf's program attached after detach."""
    killed_apply(k, tmp_path / "p.yaml", step, policy(1), policy(1, pad=100))
    assert load_journal("gw0") is not None
    assert_detach_leaves_nothing(k)


def test_a_gone_namespace_is_reported_and_detach_forgets_it(k, tmp_path):
    k.add_interface("gw0", netns="ns1")
    apply_text(tmp_path / "p.yaml", policy(1), netns="ns1")
    assert k.attached("gw0", "ns1")
    k.remove_interface("gw0", "ns1")
    k.namespaces.discard("ns1")
    assert drift(load_state("ns1:gw0")).startswith("namespace gone (ns1 was deleted")
    lines: list[str] = []
    detach("gw0", "ns1", log=lines.append)
    assert lines == ["ns1:gw0: the namespace is gone (its programs went with it); forgot "
                     "netbpf's pins and state for it"]
    assert k.pinned_files() == [] and list_states() == []


def test_a_gone_interface_is_forgotten_by_detach(k, tmp_path):
    apply_text(tmp_path / "p.yaml", policy(1))
    k.remove_interface("gw0")
    lines: list[str] = []
    detach("gw0", None, log=lines.append)
    assert lines[-1].startswith("gw0: the interface is gone")
    assert k.pinned_files() == [] and list_states() == []


def test_detach_of_an_interface_netbpf_does_not_manage_says_so(k):
    with pytest.raises(NetbpfError, match="netbpf manages nothing on it"):
        detach("gw0", None, log=lambda line: None)
