"""'reject' on real interfaces: the client's kernel accepts the refusals (so their checksums
are right) and its sockets see 'connection refused' at once, where a drop would time out.

    [client] client0 ------------------ gw0 [gw]
             10.10.0.2, fd00:10::2      10.10.0.1, fd00:10::1
                                        ^ ingress: XDP (native, generic) rejects tcp/25, udp/69
                                        ^ egress: TC rejects tcp/2525 the gw itself sends
"""
from __future__ import annotations

import errno
import socket

import pytest


from conftest import own_two_hosts
from netbpf_cli import netbpf

@pytest.fixture(scope="module")
def own_lab(_no_lab_left_behind):
    with own_two_hosts("r") as lab:        # namespaces nbi<pid>r-
        yield lab


POLICY = """\
version: 1
interfaces:
  gw0:
    xdp: {{mode: {mode}}}
    ingress:
      rules:
        - {{name: no-smtp, proto: tcp, dport: 25, action: reject}}
        - {{name: no-tftp, proto: udp, dport: 69, action: reject}}
    egress:
      rules:
        - {{name: no-2525-out, proto: tcp, dport: 2525, action: reject}}
"""


def tcp_outcome(addr: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect((addr, port))
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"


def udp_outcome(addr: str, port: int) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((addr, port))
        s.send(b"probe")
        try:
            s.recv(100)
            return "answered"
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return "refused" if e.errno == errno.ECONNREFUSED else "timeout"
        except (socket.timeout, TimeoutError):
            return "timeout"


@pytest.fixture(params=["native", "generic"])
def rejecting(request, own_lab, tmp_path):
    two_hosts = own_lab
    policy = tmp_path / "reject.yaml"
    policy.write_text(POLICY.format(mode=request.param))
    # A veth delivers native XDP_TX frames only to a peer running XDP itself (a NIC needs
    # nothing of the kind; generic XDP transmits through the stack): an empty policy there.
    peer = tmp_path / "peer.yaml"
    peer.write_text("version: 1\ninterfaces:\n  client0:\n    xdp: {mode: native}\n"
                    "    ingress: {rules: []}\n")
    native = request.param == "native"
    try:
        if native:
            netbpf(two_hosts, "apply", str(peer), node="client")
        netbpf(two_hosts, "apply", str(policy))
        yield two_hosts
    finally:
        netbpf(two_hosts, "detach", "gw0", check=False)
        if native:
            netbpf(two_hosts, "detach", "client0", node="client", check=False)


@pytest.mark.parametrize("family", [4, 6])
def test_rejected_tcp_and_udp_are_refused_at_once(rejecting, family):
    lab = rejecting
    gw = lab.addr("gw", "gw0", family)
    assert lab.call("client", tcp_outcome, gw, 25) == "refused"
    assert lab.call("client", udp_outcome, gw, 69) == "refused"
    # a port no rule rejects: the gw's own kernel refuses it too (closed), proving the path
    assert lab.call("client", tcp_outcome, gw, 26) == "refused"


def test_connection_the_host_starts_to_a_rejected_port_is_refused_by_egress(rejecting):
    lab = rejecting
    client = lab.addr("client", "client0", 4)
    assert lab.call("gw", tcp_outcome, client, 2525) == "refused"
    import json
    stats = json.loads(netbpf(lab, "stats", "gw0", "--json").stdout)
    counted = {r["name"]: r["packets"] for r in stats["rules"]}
    assert counted["no-2525-out"] >= 1 and counted["no-smtp"] == 0
