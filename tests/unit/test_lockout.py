"""Lockout guard logic without a kernel: which rule would drop the ssh session or a protected
flow, in which direction; sessions that do not end in this namespace are not checked."""
from __future__ import annotations

from netbpf.safety.lockout import find_lockouts, protected_flows, ssh_session_from_env
from netbpf.policy import load_policy

POLICY = """\
version: 1
protect:
  - {name: dns, src: 10.0.0.9, dst: 10.0.0.1, proto: udp, dport: 53}
interfaces:
  gw0:
    ingress:
      default: drop
      rules:
        - {name: ssh, proto: tcp, dport: 22, action: allow}
    egress:
      default: allow
      rules:
        - {name: no-high-ports, proto: tcp, sport: 22, dport: 60000-65535, action: drop}
"""


def load(tmp_path, text=POLICY):
    (tmp_path / "p.yaml").write_text(text)
    return load_policy(tmp_path / "p.yaml")


def test_ssh_connection_is_parsed_both_families():
    f = ssh_session_from_env({"SSH_CONNECTION": "192.0.2.7 50000 192.0.2.1 22"})
    assert (f.family, f.sports, f.dport, f.local_only) == (4, (50000,), 22, True)
    assert ssh_session_from_env({"SSH_CONNECTION": "fd00::7 1 fd00::1 22"}).family == 6
    assert ssh_session_from_env({"SSH_CONNECTION": "garbage"}) is None
    assert ssh_session_from_env({}) is None


def test_default_drop_names_the_default_and_the_protected_flow(tmp_path):
    p = load(tmp_path)
    [hit] = find_lockouts(p.ir, protected_flows(p.model))
    assert (hit.interface, hit.direction, hit.rule) == ("gw0", "ingress", None)
    assert "the default action (drop) would drop protected flow 'dns'" in hit.message()


def test_reply_dropped_on_egress_names_the_rule(tmp_path):
    p = load(tmp_path)
    ssh = ssh_session_from_env({"SSH_CONNECTION": "10.0.0.7 61000 10.0.0.1 22"})
    [hit] = find_lockouts(p.ir, [ssh], {(4, 0x0A000001): "gw0"})
    assert (hit.direction, hit.rule, hit.line) == ("egress", "no-high-ports", 13)


def test_session_to_an_address_elsewhere_is_not_checked(tmp_path):
    p = load(tmp_path)
    ssh = ssh_session_from_env({"SSH_CONNECTION": "10.0.0.7 61000 10.0.0.1 22"})
    assert find_lockouts(p.ir, [ssh], {}) == []


def test_allowed_session_passes(tmp_path):
    p = load(tmp_path)
    ssh = ssh_session_from_env({"SSH_CONNECTION": "10.0.0.7 50000 10.0.0.1 22"})
    assert find_lockouts(p.ir, [ssh], {(4, 0x0A000001): "gw0"}) == []
