"""Test tiers by directory: tests/unit (no root), tests/bpf (test_run), tests/netns (lab traffic).

bpf and netns tests need root, bpffs and bcc. In CI a missing prerequisite fails the test with
a message saying what is missing; locally (CI unset) it is a skip that says why.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests/ on the path: the case tables (tests/cases) and builders (tests/unit) are shared by tiers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Parallel workers (pytest-xdist, `make test`) each get their own pin, state and saved-policy
# roots, so one worker's `restore`, `status` or cleanup never sees another's interfaces. Labs
# stay shared (/run/netbpf/lab): their names are unique and cleanup spares a live owner's lab.
# Set before any netbpf module reads them; inherited by every CLI the tests run.
# A worker's name (gw0, gw1, ...) repeats in every run: the run's id goes into the roots too,
# so two runs on one machine (a CI clone and a developer's checkout) never share them.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _WORKER = f"{os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getppid()))[:8]}-{_WORKER}"
    os.environ["NETBPF_PIN_ROOT"] = os.environ.get("NETBPF_PIN_ROOT", "/sys/fs/bpf/netbpf") + f"-{_WORKER}"
    os.environ["NETBPF_STATE_ROOT"] = os.environ.get("NETBPF_STATE_ROOT", "/run/netbpf") + f"-{_WORKER}"
    # not inherited from the controller (its conftest set one for itself): state records and
    # saved policies live there, and a worker removes its own at the end
    os.environ["NETBPF_LIB_ROOT"] = os.environ["NETBPF_STATE_ROOT"] + "-lib"
# Programs compiled once in this run load from one object cache (netbpf/kernel/objcache.py)
# shared by the workers and removed at the end, never the machine's /var/cache/netbpf.
if not os.environ.get("NETBPF_OBJ_CACHE"):
    os.environ["NETBPF_OBJ_CACHE"] = f"/run/netbpf-objcache-{os.getpid()}"
    _OWN_OBJ_CACHE = os.environ["NETBPF_OBJ_CACHE"]
else:
    _OWN_OBJ_CACHE = None
# Saved policies for `netbpf restore` go beside the runtime state, never into the machine's
# /var/lib/netbpf.
os.environ.setdefault("NETBPF_LIB_ROOT",
                      os.environ.get("NETBPF_STATE_ROOT", "/run/netbpf") + "-lib")

TIERS = ("unit", "bpf", "netns")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def pytest_sessionfinish(session, exitstatus):
    if _OWN_OBJ_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_OWN_OBJ_CACHE, ignore_errors=True)
    if _WORKER:
        # a worker's own roots: runtime state (locks, verifier logs) and saved policies go;
        # the pin root only if empty (a pin left behind is a leak the lab checks report)
        for root in ("NETBPF_STATE_ROOT", "NETBPF_LIB_ROOT"):
            shutil.rmtree(os.environ[root], ignore_errors=True)
        try:
            os.rmdir(os.environ["NETBPF_PIN_ROOT"])
        except OSError:
            pass


def _missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF and CAP_NET_ADMIN): run 'make test' as root"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted on /sys/fs/bpf: run 'make setup'"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable: run 'make setup' (Debian python3-bpfcc in the venv)"
    if not shutil.which("ip"):
        return "iproute2 'ip' is missing: run 'make setup'"
    return None


@pytest.fixture(autouse=True)
def _require_privileges(request):
    if request.node.get_closest_marker("bpf") or request.node.get_closest_marker("netns"):
        why = _missing_privileges()
        if why:
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)


@pytest.fixture
def world_dir():
    """A directory uid 65534 can enter and read (pytest's tmp_path is private to root), for
    running netbpf as an unprivileged user; emptied even when a test made files unreadable."""
    d = Path(tempfile.mkdtemp(prefix="nb-world-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):
            if not p.is_symlink():
                p.chmod(0o700 if p.is_dir() else 0o600)
        shutil.rmtree(d)
