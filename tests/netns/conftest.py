"""Fixtures for the netns tier: the built-in labs, once per session, and a leak check at the end.

two_hosts / lb_lab are shared by every netns test module: do not leave state in them (detach what
you attach, or use make_lab for a lab of your own). Not where traffic helpers live (netbpf.lab).
Session fixtures run before the function-scoped privilege check in tests/conftest.py, so they
check root and iproute2 themselves (fail in CI, skip locally, with the reason).
"""
from __future__ import annotations

import os
import shutil

import pytest

from netbpf.lab import TOPOLOGY_DIR, Lab, cleanup, list_netns, run_prefixes

TWO_HOSTS = TOPOLOGY_DIR / "two-hosts.yaml"
LB = TOPOLOGY_DIR / "lb.yaml"


def _require_lab() -> None:
    why = None
    if os.geteuid() != 0:
        why = "the netns lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns): run 'make test' as root"
    elif not shutil.which("ip"):
        why = "iproute2 'ip' is missing: run 'make setup'"
    elif not shutil.which("ping"):
        why = "'ping' is missing (iputils-ping): run 'make setup'"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def own_two_hosts(tag: str):
    """two-hosts under a prefix of the caller's own (nbi<pid><tag>-), for a module fixture: the
    leftover sweep of a concurrent run with another lab state dir (netbpf.lab.registry.cleanup)
    removes random-prefix namespaces it has no record of, live ones included."""
    _require_lab()
    return Lab.from_file(TWO_HOSTS, prefix=f"nbi{os.getpid() % 100000:05d}{tag}-")


@pytest.fixture(scope="session", autouse=True)
def _no_lab_left_behind():
    """Fail loudly if a lab made by this test run is still there at the end."""
    if os.geteuid() == 0:
        cleanup()  # leftovers of earlier, killed runs (owner dead); live runs are not touched
    yield
    ours = [n for n in list_netns() if any(n.startswith(p) for p in run_prefixes())]
    if ours:
        for prefix in {p for p in run_prefixes() if any(n.startswith(p) for n in ours)}:
            cleanup(prefix)
        pytest.fail(f"the netns tests left {len(ours)} namespace(s) of this run behind: {' '.join(ours)} "
                    "(removed now; a Lab was not torn down)", pytrace=False)


@pytest.fixture(scope="session")
def two_hosts(_no_lab_left_behind):
    """client (10.10.0.2, fd00:10::2, client0) <-> gw (10.10.0.1, fd00:10::1, gw0)."""
    _require_lab()
    with Lab.from_file(TWO_HOSTS) as lab:
        yield lab


@pytest.fixture(scope="session")
def lb_lab(_no_lab_left_behind):
    """client 10.20.0.2 <-> lb0 10.20.0.1 [lb, forwarding] br-be 10.21.0.1 <-> b1 .11, b2 .12, b3 .13."""
    _require_lab()
    with Lab.from_file(LB) as lab:
        yield lab


@pytest.fixture
def make_lab(_no_lab_left_behind):
    """A function making private labs (make_lab('two-hosts')), torn down when the test ends."""
    _require_lab()
    labs: list[Lab] = []

    def make(topology: str = "two-hosts", **kw) -> Lab:
        lab = Lab.from_file(topology, **kw)
        labs.append(lab)
        return lab.up()

    yield make
    errors = []
    for lab in reversed(labs):
        try:
            lab.down()
        except Exception as e:  # noqa: BLE001 - tear down the others first
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
