"""The apply engine's planning against a fake kernel (tests/unit/fakekernel.py): why new
programs are loaded, interfaces a file no longer names, drift repaired by the next apply,
the balancer's planning (backend ids, changed VIPs, forwarding). No root needed.
"""
from __future__ import annotations

import pytest

from engine_world import k  # noqa: F401  (the fixture)
from engine_world import apply_text, assert_runs_state, lb_policy, policy
from netbpf.engine.apply import plan_apply
from netbpf.errors import NetbpfError
from netbpf.kernel.api import kernel
from netbpf.lb.lbtables import LbState
from netbpf.observe.drift import drift
from netbpf.policy import load_policy
from netbpf.store.state import load_state, pin_dir


def plan_of(path, text):
    path.write_text(text)
    return plan_apply(load_policy(path), str(path), None)


def test_reasons_for_new_programs_name_what_changed(k, tmp_path):
    f = tmp_path / "p.yaml"
    apply_text(f, policy(1, egress=False))
    (p,) = plan_of(f, policy(1)).interfaces
    assert p.reasons == ["egress program added"]
    src = "        - {name: from-net, src: 10.1.0.0/16, action: drop}\n"
    (p,) = plan_of(f, policy(1, egress=False, extra_in=src)).interfaces
    assert p.reasons == ["ingress program rules use new match fields"]
    (p,) = plan_of(f, policy(1, egress=False).replace("mode: native", "mode: generic")) \
        .interfaces
    assert p.reasons == ["xdp mode native -> generic"]
    (p,) = plan_of(f, policy(5, egress=False)).interfaces
    assert p.what == "update" and not p.reasons


def test_an_interface_the_file_no_longer_names_is_detached(k, tmp_path):
    k.add_interface("gw1")
    f = tmp_path / "p.yaml"
    both = policy(1) + policy(2, iface="gw1").split("interfaces:\n", 1)[1]
    apply_text(f, both)
    assert set(k.attached("gw1")) == {"xdp", "egress"}
    plan = apply_text(f, policy(1))
    assert {p.key: p.what for p in plan.interfaces} == {"gw0": "unchanged", "gw1": "remove"}
    assert k.attached("gw1") == {} and load_state("gw1") is None
    assert not pin_dir("gw1").exists()


def test_an_unknown_interface_is_refused_before_anything_changes(k, tmp_path):
    with pytest.raises(NetbpfError, match="no interface 'eth9' in the root namespace"):
        apply_text(tmp_path / "p.yaml", policy(1, iface="eth9"))
    assert k.pinned_files() == [] and k.calls["load_program"] == 0


def test_a_hand_detached_link_is_drift_and_the_next_apply_puts_the_program_back(k, tmp_path):
    f = tmp_path / "p.yaml"
    apply_text(f, policy(1))
    kernel().detach_pinned(pin_dir("gw0") / "ingress" / "link")      # as bpftool would
    assert drift(load_state("gw0")) == "the ingress link was detached by someone else"
    (p,) = apply_text(f, policy(1)).interfaces
    assert p.new_program and "the ingress link was detached by someone else" in p.reasons
    assert_runs_state(k)


def test_a_re_created_interface_gets_new_programs(k, tmp_path):
    f = tmp_path / "p.yaml"
    apply_text(f, policy(1))
    k.remove_interface("gw0")
    assert drift(load_state("gw0")) == "the interface is gone"
    new = k.add_interface("gw0")
    (p,) = apply_text(f, policy(1)).interfaces
    assert p.stale and any("interface was re-created" in r for r in p.reasons)
    assert load_state("gw0").ifindex == new
    assert_runs_state(k)


def test_balancer_plan_keeps_backend_ids_and_rewrites_only_changed_vips(k, tmp_path):
    f = tmp_path / "lb.yaml"
    (p,) = apply_text(f, lb_policy(1, 1, 1)).interfaces
    assert p.new_program and p.lb_changed == ["web"]
    assert "egress" in p.parts                 # NAT replies are translated on egress
    first = LbState.from_json(load_state("gw0").lb)
    assert sorted(first.backends.values()) == [0, 1, 2]
    assert k.loads[0]["NB_LB"] == 1 and k.loads[0]["NB_LB_RING_CAP"] == first.ring_cap
    (p,) = apply_text(f, lb_policy(1, 1, 0)).interfaces      # drain the third
    assert p.what == "update" and not p.new_program and p.lb_changed == ["web"]
    assert LbState.from_json(load_state("gw0").lb).backends == first.backends
    (p,) = apply_text(f, lb_policy(1, 1, 0)).interfaces
    assert p.what == "unchanged"
    # replace it: the newcomer does not take the id the running tables still use
    (p,) = apply_text(f, lb_policy(1, 1, 1).replace("10.30.0.13", "10.30.0.99")).interfaces
    now = LbState.from_json(load_state("gw0").lb).backends
    assert sorted(now.values()) == [0, 1, 3] and len(now) == 3
    assert_runs_state(k)


def test_balancing_without_forwarding_is_refused_with_the_sysctl_to_run(k, tmp_path):
    k.forwarding_off.add("gw0")
    with pytest.raises(NetbpfError, match=r"sysctl -w net.ipv4.conf.gw0.forwarding=1"):
        apply_text(tmp_path / "lb.yaml", lb_policy(1))
    assert k.pinned_files() == []
