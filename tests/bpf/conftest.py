"""Fixtures for the bpf tier: the tiny test programs compiled once per session, and a unique
pin directory under /sys/fs/bpf that is removed after each test, also when it fails.

Session fixtures run before the function-scoped privilege check in tests/conftest.py, so they
check root/bpffs/bcc themselves (fail in CI, skip locally, with the reason).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

PROGS = Path(__file__).resolve().parent / "progs"
TINY_XDP = PROGS / "tiny_xdp.bpf.c"
TINY_TC = PROGS / "tiny_tc.bpf.c"


def _require_bpf() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (CAP_BPF and CAP_NET_ADMIN): run 'make test' as root"
    elif not os.path.ismount("/sys/fs/bpf"):
        why = "bpffs is not mounted on /sys/fs/bpf: run 'make setup'"
    else:
        try:
            import bcc  # noqa: F401
        except ImportError:
            why = "bcc is not importable: run 'make setup' (Debian python3-bpfcc in the venv)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_xdp():
    """tiny_xdp.bpf.c loaded once (program nbt_xdp); its maps are shared by every test."""
    _require_bpf()
    from netbpf.kernel import load_program

    loaded = load_program(TINY_XDP, {}, {"nbt_xdp": "xdp"}, cache=True)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def tiny_xdp_fresh():
    """tiny_xdp.bpf.c loaded for one test module alone: its maps start empty."""
    _require_bpf()
    from netbpf.kernel import load_program

    loaded = load_program(TINY_XDP, {}, {"nbt_xdp": "xdp"})
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def tiny_tc():
    """tiny_tc.bpf.c loaded once (program nbt_tc, SCHED_CLS)."""
    _require_bpf()
    from netbpf.kernel import load_program

    loaded = load_program(TINY_TC, {}, {"nbt_tc": "sched_cls"}, cache=True)
    yield loaded
    loaded.close()


@pytest.fixture
def pin_dir():
    """A fresh /sys/fs/bpf/netbpf-test-<random>/ (not created), removed with its pins."""
    _require_bpf()
    path = Path("/sys/fs/bpf") / f"netbpf-test-{uuid.uuid4().hex[:10]}"
    try:
        yield path
    finally:
        # bpffs supports unlink and rmdir, so rmtree removes pins and directories.
        shutil.rmtree(path, ignore_errors=True)
        assert not path.exists(), f"could not remove {path}"

