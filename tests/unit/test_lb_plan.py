"""The balancer's control side without a kernel: planning (ids, ring regions, the typed
"ring full" error), the state keys of backends, the VIP signature established flows check,
the port filter, and the health loop (real TCP probes on 127.0.0.1, no root)."""
from __future__ import annotations

import socket

import pytest

from netbpf.lb import health
from netbpf.lb.health import Target, watch
from netbpf.lb.lbtables import LbState, RingFull, plan_lb, port_words, ring_cap_for, vip_sig
from netbpf.lb.maglev import backend_identity, backend_key
from netbpf.policy.ir import BackendIR, LoadBalancerIR


def lb(name="web", vip=0x0A140064, port=80, size=65537, mode="nat", n=3) -> LoadBalancerIR:
    return LoadBalancerIR(name, "lb0", 4, vip, port, 6, mode,
                          tuple(BackendIR(4, 0x0A15000B + i, 8080, 1) for i in range(n)), size)


def test_tables_that_do_not_fit_raise_ring_full_and_a_bigger_ring_takes_them():
    lbs = [lb("a"), lb("b", vip=0x0A140065)]
    with pytest.raises(RingFull) as e:
        plan_lb(lbs, LbState(), 2 * 65537)
    assert e.value.cap == 2 * 65537 and e.value.need > 0
    new, changed = plan_lb(lbs, LbState(), ring_cap_for(lbs))
    assert sorted(changed) == ["a", "b"]


def test_backend_key_is_the_maglev_identity_under_its_load_balancer():
    assert backend_key("web", 4, 0x0A000001, 80) == "web|10.0.0.1|80"
    assert backend_key("web", 6, 0x20010DB8 << 96 | 1, 443) == "web|2001:db8::1|443"
    assert backend_identity((4, 0x0A000001, 80)) == b"4|10.0.0.1|80"


def test_vip_signature_follows_identity_and_mode_only():
    new, _ = plan_lb([lb()], LbState(), 1 << 19)
    v = new.vips["web"]
    again, _ = plan_lb([lb(n=2)], new, 1 << 19)          # backends change: same VIP
    assert vip_sig(again.vips["web"]) == vip_sig(v) != 0
    dsr, _ = plan_lb([lb(mode="dsr")], new, 1 << 19)
    moved, _ = plan_lb([lb(vip=0x0A140099)], new, 1 << 19)
    assert len({vip_sig(v), vip_sig(dsr.vips["web"]), vip_sig(moved.vips["web"])}) == 3


def test_port_words_set_one_bit_per_vip_port():
    new, _ = plan_lb([lb(port=80), lb("dns", vip=0x0A140065, port=53),
                      lb("hi", vip=0x0A140066, port=65535)], LbState(), 1 << 19)
    assert port_words(new.vips.values()) == {1: 1 << 16, 0: 1 << 53, 1023: 1 << 63}


@pytest.fixture
def state_root(tmp_path, monkeypatch):
    monkeypatch.setattr("netbpf.store.state.STATE_ROOT", tmp_path)
    return tmp_path


def _target(port: int, key="lb0") -> Target:
    return Target(key, "web", f"web|127.0.0.1|{port}", 4, "127.0.0.1", port, 0.01, 0.5)


def _stop_after(rounds: int, naps: list):
    def sleep(s: float) -> None:
        naps.append(s)
        if len(naps) == rounds:
            raise KeyboardInterrupt
    return sleep


def test_watch_reports_a_dead_backend_and_its_return(state_root):
    up = socket.socket()
    up.bind(("127.0.0.1", 0))
    up.listen()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                 # bound, not listening: connect is refused
    ts = [_target(up.getsockname()[1]), _target(dead.getsockname()[1])]
    lines, applied = [], []
    try:
        watch(ts, lambda: applied.append("down") or True, lines.append, once=True)
        assert health.health_down("lb0") == {ts[1].identity}
        assert any("DOWN" in ln and str(ts[1].port) in ln for ln in lines)
        dead.listen()
        with pytest.raises(KeyboardInterrupt):
            watch(ts, lambda: applied.append("up") or False, lines.append,
                  sleep=_stop_after(1, []))
    finally:
        up.close()
        dead.close()
    assert health.health_down("lb0") == set()
    assert any("UP again" in ln for ln in lines)
    assert applied == ["down", "up"]


def test_watch_without_changes_applies_only_on_the_first_round(state_root):
    up = socket.socket()
    up.bind(("127.0.0.1", 0))
    up.listen()
    calls, naps = [], []
    try:
        with pytest.raises(KeyboardInterrupt):
            watch([_target(up.getsockname()[1])], lambda: calls.append(1) or False,
                  lambda m: None, sleep=_stop_after(3, naps))
    finally:
        up.close()
    assert calls == [1] and naps == [0.01, 0.01, 0.01]
