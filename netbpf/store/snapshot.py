"""Copies of applied policy files (the policy and its set files) in netbpf's state directory.

Per interface key: current/ is what the last apply used, previous/ what ran before it. They let
a commit-confirmed apply roll back (netbpf/safety/confirm.py), `status` say when the named file
changed or disappeared, and `show` compare the kernel with the last applied file. Plain files
only, under the lib root (they outlive a reboot); not the apply engine's state
(netbpf/store/state.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

from netbpf.store import state

POLICY_NAME = "policy.yaml"
IR_NAME = "ir.pickle"


def snapshot_root() -> Path:
    return state.policies_root()


def snapshot_dir(key: str, which: str = "current") -> Path:
    return snapshot_root() / key / which


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _set_files(model) -> list[str]:
    from netbpf.policy.models import SetFile

    return sorted({s.file for s in model.sets.values() if isinstance(s, SetFile)})


def set_file_facts(model) -> dict:
    """What a later set-file-only apply (netbpf/engine/setfiles.py) needs without parsing:
    which set reads which file, the files whose every line is a bare IPv4 address, and the
    addresses of `protect:` flows (a set change touching one takes the full path, with its
    lockout check)."""
    from netbpf.policy.models import SetFile

    files = {n: s for n, s in model.sets.items() if isinstance(s, SetFile)}
    return {"sets": {n: s.file for n, s in files.items()},
            "plain": sorted({s.file for s in files.values() if s._plain}),
            "guard": [list(a) for a in sorted({tuple(a) for p in model.protect
                                               for a in (p.src[:2], p.dst[:2])})]}


def record(keys: list[str], loaded, policy_path: str, netns: str | None) -> None:
    """After a successful apply (under the apply lock): keys' current -> previous, and a
    copy of the applied files becomes current. The files are copied from where they were
    loaded (a rollback loads a copy) and recorded under policy_path, the file the state names.
    Set files keep their path relative to the policy (absolute ones are copied, but the copy
    of the policy still names the original)."""
    named = Path(policy_path).resolve()
    loaded_from = Path(loaded.path).resolve()
    rels = _set_files(loaded.model)
    copies = {POLICY_NAME: loaded_from} | {r: (loaded_from.parent / r).resolve() for r in rels}
    sources = {POLICY_NAME: named} | {r: (named.parent / r).resolve() for r in rels}
    stdin = loaded.display == "<stdin>"      # nothing to copy from: the bytes read
    if stdin:
        copies = {r: p for r, p in copies.items() if r != POLICY_NAME}
    files = {rel: _sha(p) for rel, p in copies.items()}
    if stdin:
        files[POLICY_NAME] = hashlib.sha256(loaded.raw).hexdigest()
    data = {"policy_path": str(named), "netns": netns, "policy_hash": loaded.source_hash,
            "files": files,
            "sources": {rel: str(p) for rel, p in sources.items()},
            **set_file_facts(loaded.model)}
    for key in keys:
        was = manifest(key)
        if was is not None and was == data:
            continue                      # the same files again: keep previous as it was
        base = snapshot_root() / key
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = base / f"new{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, src in copies.items():
            target = tmp / "files" / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        if stdin:
            (tmp / "files").mkdir(parents=True, exist_ok=True)
            (tmp / "files" / POLICY_NAME).write_bytes(loaded.raw)
        (tmp / "manifest.json").write_text(json.dumps(data, indent=1))
        # the policy as the planner read it: the next apply's plan diff needs it, and
        # reading it back is faster than parsing and validating the copy again
        (tmp / IR_NAME).write_bytes(pickle.dumps((_ir_stamp(), loaded.ir),
                                                 protocol=pickle.HIGHEST_PROTOCOL))
        prev, cur = base / "previous", base / "current"
        shutil.rmtree(prev, ignore_errors=True)
        if cur.exists():
            os.rename(cur, prev)
        os.rename(tmp, cur)


def record_set_files(keys: list[str], changed: dict[str, tuple[bytes, str]],
                     policy_hash: str) -> None:
    """After a set-file-only apply (netbpf/engine/setfiles.py): as record(), with the current
    copy's files but changed (set file name -> new bytes and their sha256). The recorded IR
    is dropped: the next plan diff reads the copy again."""
    for key in keys:
        base = snapshot_root() / key
        cur, prev = base / "current", base / "previous"
        data = manifest(key)
        tmp = base / f"new{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        skip = {rel.lstrip("/") for rel in changed}      # written below, not copied
        shutil.copytree(cur / "files", tmp / "files",
                        ignore=lambda d, names: [n for n in names
                                                 if (Path(d) / n).relative_to(cur / "files")
                                                 .as_posix() in skip])
        for rel, (raw, sha) in changed.items():
            target = tmp / "files" / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw)
            data["files"][rel] = sha
        data["policy_hash"] = policy_hash
        (tmp / "manifest.json").write_text(json.dumps(data, indent=1))
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(cur, prev)
        os.rename(tmp, cur)


def forget(key: str) -> None:
    """The interface was detached: nothing of it is applied any more."""
    cur = snapshot_root() / key / "current"
    if cur.exists():
        prev = snapshot_root() / key / "previous"
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(cur, prev)


def manifest(key: str, which: str = "current") -> dict | None:
    try:
        return json.loads((snapshot_dir(key, which) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def policy_ir(key: str, which: str = "current"):
    """The PolicyIR recorded with the copy; None when there is none or another netbpf's IR
    classes wrote it (then the copy is read again)."""
    try:
        stamp, ir = pickle.loads((snapshot_dir(key, which) / IR_NAME).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError,
            ValueError, ImportError):
        return None
    return ir if stamp == _ir_stamp() else None


def _ir_stamp() -> str:
    from netbpf.policy import ir
    return hashlib.sha256(Path(ir.__file__).read_bytes()).hexdigest()[:16]


def policy_copy(key: str, which: str = "current") -> Path | None:
    """The stored copy of the policy file (its set files sit beside it as they did)."""
    m = manifest(key, which)
    if m is None:
        return None
    p = snapshot_dir(key, which) / "files" / POLICY_NAME
    if any(os.path.isabs(rel) for rel in m["files"]):
        return Path(m["sources"][POLICY_NAME])   # absolute set paths: the copy cannot rebase
    return p if p.exists() else None


def file_status(key: str, policy_path: str) -> str:
    """'unchanged', 'changed' (the policy or one of its set files), 'gone', or 'unknown'
    (applied by a netbpf that kept no copy)."""
    m = manifest(key)
    if m is None or m.get("policy_path") != str(Path(policy_path)):
        return "unknown"
    if not Path(policy_path).exists():
        return "gone"
    for rel, digest in m["files"].items():
        if _sha(Path(m["sources"][rel])) != digest:
            return "changed"
    return "unchanged"
