"""What survives a reboot: a copy of each applied policy and its set files, under
/var/lib/netbpf (NETBPF_LIB_ROOT), and `netbpf restore`, which applies them again.

Pins (bpffs) and the runtime files (/run/netbpf) are gone after a reboot; these copies and
the state records (netbpf/store/state.py) are not. Not the apply engine (netbpf/engine/apply.py) and not the systemd unit (scripts/).

Layout: applied/<id>/record.json (where the policy came from, its namespace, the interfaces
it names, those detached since) and applied/<id>/root/<original absolute paths>, a mirror
of the policy and set files as they were applied, so relative set-file names still resolve.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from netbpf.errors import NetbpfError
from netbpf.store import state
from netbpf.store.state import LIB_ROOT  # noqa: F401 - messages name it

STDIN_NAME = "stdin.yaml"

Log = Callable[[str], None]


def applied_dir() -> Path:
    return state.LIB_ROOT / "applied"


def _policy_path(loaded) -> Path:
    if loaded.display == "<stdin>":
        return Path.cwd() / STDIN_NAME
    return Path(os.path.abspath(loaded.path))


def _record_id(policy_path: Path, netns: str | None) -> str:
    return hashlib.sha256(f"{netns or ''}\0{policy_path}".encode()).hexdigest()[:16]


def _interfaces(loaded) -> list[str]:
    ir = loaded.ir
    names = list(ir.interfaces) + [lb.interface for lb in ir.load_balancers.values()]
    return list(dict.fromkeys(names))


def records() -> list[dict]:
    out = []
    for rec in sorted(applied_dir().glob("*/record.json")) if applied_dir().is_dir() else ():
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        data["dir"] = str(rec.parent)
        out.append(data)
    return sorted(out, key=lambda r: r.get("applied_at", 0))


def _write_record(d: Path, data: dict) -> None:
    data = {k: v for k, v in data.items() if k != "dir"}
    tmp = d / "record.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, d / "record.json")


def save_applied(loaded, policy_path: str, netns: str | None) -> Path:
    """Keep a copy of the policy just applied (and its set files) for `netbpf restore`.
    Interfaces it names are taken from older records of the same namespace."""
    source = _policy_path(loaded)
    state_path = str(Path(policy_path).resolve()) if policy_path != "-" else str(source)
    rid = _record_id(Path(state_path), netns)
    final = applied_dir() / rid
    tmp = applied_dir() / f".{rid}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    root = tmp / "root"
    mirror = root / str(source).lstrip("/")
    mirror.parent.mkdir(parents=True, mode=0o700)
    mirror.write_bytes(loaded.raw)
    for f in loaded.set_paths:
        f = Path(os.path.abspath(f))
        target = root / str(f).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    names = _interfaces(loaded)
    _write_record(tmp, {"policy_path": state_path, "netns": netns, "mirror": str(source),
                        "policy_hash": loaded.source_hash, "interfaces": names,
                        "detached": [], "applied_at": time.time()})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for rec in records():
        if rec["dir"] != str(final) and rec.get("netns") == netns:
            _exclude(rec, set(names))
    return final


def refresh_set_files(policy_path: str, netns: str | None, changed: dict[str, bytes],
                      policy_hash: str) -> None:
    """After a set-file-only apply: the saved copy gets the new set files (absolute path ->
    bytes), so `netbpf restore` brings back what runs. No saved copy: nothing to do."""
    d = applied_dir() / _record_id(Path(policy_path), netns)
    try:
        rec = json.loads((d / "record.json").read_text())
    except (OSError, ValueError):
        return
    for path, raw in changed.items():
        target = d / "root" / path.lstrip("/")      # as save_applied lays it out
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_bytes(raw)
        os.replace(tmp, target)
    rec.update(policy_hash=policy_hash, applied_at=time.time())
    _write_record(d, rec)


def _exclude(rec: dict, names: set[str]) -> None:
    """Interfaces another policy (or a detach) took away from rec: restore leaves them."""
    taken = names & set(rec.get("interfaces", []))
    if not taken:
        return
    rec["detached"] = sorted(set(rec.get("detached", [])) | taken)
    if set(rec["detached"]) >= set(rec.get("interfaces", [])):
        shutil.rmtree(rec["dir"], ignore_errors=True)
    else:
        _write_record(Path(rec["dir"]), rec)


def forget_interface(ifname: str, netns: str | None) -> None:
    """After `netbpf detach`: a reboot must not bring the interface's programs back."""
    for rec in records():
        if rec.get("netns") == netns:
            _exclude(rec, {ifname})


def forget_netns(netns: str) -> None:
    """The namespace was deleted (a lab went down): its saved policies describe nothing."""
    for rec in records():
        if rec.get("netns") == netns:
            shutil.rmtree(rec["dir"], ignore_errors=True)


def restore(log: Log = print) -> int:
    """Apply every saved policy again, oldest first; returns how many failed."""
    from netbpf.engine.apply import apply_policy, detach_key
    from netbpf.errors import PolicyError
    from netbpf.kernel.netns import netns_path
    from netbpf.policy import load_policy
    from netbpf.store.state import apply_lock, iface_key

    recs = records()
    if not recs:
        log(f"nothing to restore: no policy was applied (none saved in {applied_dir()})")
        return 0
    failed = 0
    for rec in recs:
        netns = rec.get("netns")
        where = rec["policy_path"] + (f" in netns {netns}" if netns else "")
        if netns and not os.path.exists(netns_path(netns)):
            # not an error: namespaces made by 'ip netns add' do not exist yet at boot
            log(f"{where}: skipped, network namespace {netns} does not exist")
            continue
        root = Path(rec["dir"]) / "root"
        try:
            loaded = load_policy(root / rec["mirror"].lstrip("/"), root=root)
            apply_policy(loaded, rec["policy_path"], netns, log=log)
            for name in rec.get("detached", []):
                if name in _interfaces(loaded):
                    key = iface_key(name, netns)
                    with apply_lock([key], wait_message=log):
                        detach_key(key, log)
            log(f"{where}: restored")
        except PolicyError as e:
            log(f"{where}: saved copy is invalid: {e.errors[0]}")
            failed += 1
        except NetbpfError as e:
            log(f"{where}: not restored: {e}")
            failed += 1
    return failed
