"""The systemd unit that restores policies at boot: ordered before the network, runs
`netbpf restore` of this checkout, installed by scripts/install-unit.sh and enabled only when
asked. No systemd needed: the unit is parsed, the installer runs into a private directory."""
from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def install(tmp_path: Path, **env: str) -> Path:
    unit_dir = tmp_path / "units"
    subprocess.run(["bash", str(REPO / "scripts" / "install-unit.sh")], check=True,
                   capture_output=True, text=True,
                   env={**os.environ, "NETBPF_UNIT_DIR": str(unit_dir), **env})
    return unit_dir


def parse(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


def test_unit_runs_restore_before_the_network_and_is_not_enabled_by_default(tmp_path):
    unit_dir = install(tmp_path)
    unit = parse(unit_dir / "netbpf-restore.service")
    assert "network-pre.target" in unit["Unit"]["Before"].split()
    assert "network-pre.target" in unit["Unit"]["Wants"].split()
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["ExecStart"] == f"{REPO}/.venv/bin/netbpf restore"
    assert not (unit_dir / "multi-user.target.wants").exists()


def test_unit_is_enabled_on_request_and_install_is_idempotent(tmp_path):
    install(tmp_path)
    unit_dir = install(tmp_path, NETBPF_ENABLE_RESTORE="1")
    wanted = unit_dir / "multi-user.target.wants" / "netbpf-restore.service"
    assert wanted.resolve() == (unit_dir / "netbpf-restore.service").resolve()
    again = subprocess.run(["bash", str(REPO / "scripts" / "install-unit.sh")], check=True,
                           capture_output=True, text=True,
                           env={**os.environ, "NETBPF_UNIT_DIR": str(unit_dir)})
    assert "installed" not in again.stdout
