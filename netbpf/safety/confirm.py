"""Commit-confirmed apply: `apply --confirm N` rolls back by itself unless `netbpf confirm`.

arm() copies what each affected interface ran before (netbpf/store/snapshot.py) and starts a detached
timer process (its own session: it outlives the apply, the terminal and the ssh session, and a
SIGKILL of the apply). The timer counts N seconds from the end of the apply (or from the
apply's death when it never reported) and then re-applies the saved policies, or detaches what
had none. Files under STATE_ROOT/confirm; the apply engine itself knows nothing of this.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from netbpf.procs import pid_alive
from netbpf.store import snapshot
from netbpf.store import state
from netbpf.errors import NetbpfError

POLL_S = 0.1


def confirm_dir() -> Path:
    return state.STATE_ROOT / "confirm"


def pending_file() -> Path:
    return confirm_dir() / "pending.json"


def rollback_log() -> Path:
    return confirm_dir() / "rollback.log"


def read_pending() -> dict | None:
    try:
        return json.loads(pending_file().read_text())
    except (OSError, ValueError):
        return None


def _write_pending(data: dict) -> None:
    path = pending_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def affected_keys(loaded, policy_path: str, netns: str | None) -> list[str]:
    """Interface keys an apply of this policy may change (named, or dropped from the file)."""
    ir = loaded.ir
    names = list(ir.interfaces) + [lb.interface for lb in ir.load_balancers.values()]
    keys = [state.iface_key(n, netns) for n in dict.fromkeys(names)]
    path = str(Path(policy_path).resolve())
    keys += [st.key for st in state.list_states()
             if st.policy_path == path and st.netns == netns and st.key not in keys]
    return keys


def _timer_alive(data: dict) -> bool:
    pid = data.get("timer_pid") or 0
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return data["id"].encode() in cmd


def _stop_timer(data: dict) -> None:
    if _timer_alive(data):
        try:
            os.kill(data["timer_pid"], signal.SIGTERM)
        except OSError:
            pass


def arm(keys: list[str], seconds: float, netns: str | None) -> str:
    """Save the rollback targets of keys and start the timer; returns the pending id. A
    pending confirm still armed is replaced, keeping its older targets (roll back to the last
    confirmed state). Call under the apply lock."""
    old = read_pending()
    cid = uuid.uuid4().hex[:12]
    work = confirm_dir() / cid
    targets = {}
    if old is not None:
        _stop_timer(old)
        for key, t in old["targets"].items():
            if t.get("copy"):
                dst = work / key
                shutil.copytree(t["copy"], dst)
                t = dict(t, copy=str(dst))
            targets[key] = t
        shutil.rmtree(confirm_dir() / old["id"], ignore_errors=True)
    for key in keys:
        if key in targets:
            continue
        cur = snapshot.snapshot_dir(key)
        m = snapshot.manifest(key)
        st = state.load_state(key)
        if m is None or st is None:
            targets[key] = {"copy": None, "netns": state.split_key(key)[0]}
            continue
        dst = work / key
        shutil.copytree(cur, dst)
        targets[key] = {"copy": str(dst), "policy_path": m["policy_path"],
                        "netns": m.get("netns")}
    data = {"id": cid, "seconds": seconds, "targets": targets, "applier_pid": os.getpid(),
            "applied_at": None, "armed_at": time.time(), "timer_pid": None}
    _write_pending(data)
    log = open(rollback_log(), "a")
    proc = subprocess.Popen([sys.executable, "-m", "netbpf.safety.confirm", cid],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, close_fds=True, cwd="/")
    log.close()
    data["timer_pid"] = proc.pid
    _write_pending(data)
    return cid


def applied(cid: str) -> None:
    """The apply finished: the timer counts from now."""
    data = read_pending()
    if data is not None and data["id"] == cid:
        data["applied_at"] = time.time()
        _write_pending(data)


def disarm(cid: str) -> None:
    """The apply failed (the old policy still runs): nothing to roll back."""
    data = read_pending()
    if data is not None and data["id"] == cid:
        _stop_timer(data)
        pending_file().unlink(missing_ok=True)
        shutil.rmtree(confirm_dir() / cid, ignore_errors=True)


def confirm() -> dict:
    """Keep what the pending apply did. Raises when there is nothing to confirm."""
    with state.host_lock("confirm"):
        data = read_pending()
        if data is None:
            rolling = confirm_dir() / "rolling.json"
            if rolling.exists():
                raise NetbpfError("too late: the rollback has started (see "
                                  f"{rollback_log()})")
            raise NetbpfError("nothing to confirm: no 'apply --confirm' is pending")
        pending_file().unlink()
        _stop_timer(data)
        shutil.rmtree(confirm_dir() / data["id"], ignore_errors=True)
        return data


# ---- the timer process ----

def _deadline(data: dict, applier_gone_at: float | None) -> float | None:
    if data.get("applied_at"):
        return data["applied_at"] + data["seconds"]
    if applier_gone_at is not None:
        return applier_gone_at + data["seconds"]
    return None


def _prepare(data: dict) -> dict:
    """Load the saved policies before the deadline (imports and parsing take about a second
    on a busy machine): at the deadline only the apply itself is left."""
    from netbpf.engine import apply  # noqa: F401 - imported now, not at the deadline
    from netbpf.policy import load_policy

    loaded = {}
    for key, t in data["targets"].items():
        if t.get("copy"):
            try:
                loaded[key] = load_policy(Path(t["copy"]) / "files" / snapshot.POLICY_NAME)
            except NetbpfError:
                pass                      # reported by rollback(), which loads it again
    return loaded


def _last_change(data: dict) -> float | None:
    """When a killed apply last saved an interface's state (its change was live by then):
    the N seconds count from there, as they would have from its report."""
    times = []
    for key in data["targets"]:
        try:
            times.append(state.state_file(key).stat().st_mtime)
        except OSError:
            pass
    latest = max(times, default=0.0)
    return latest if latest > data["armed_at"] else None


def run_timer(cid: str) -> int:
    gone_at = None
    prepared = None
    while True:
        data = read_pending()
        if data is None or data["id"] != cid:
            return 0                    # confirmed, or replaced by a newer --confirm
        if gone_at is None and not data.get("applied_at") and \
                not pid_alive(data["applier_pid"]):
            gone_at = _last_change(data) or time.time()
        if prepared is None:
            prepared = _prepare(data)
        due = _deadline(data, gone_at)
        if due is not None and time.time() >= due:
            break
        time.sleep(POLL_S)
    rolling = confirm_dir() / "rolling.json"
    with state.host_lock("confirm"):
        data = read_pending()
        if data is None or data["id"] != cid:
            return 0
        os.replace(pending_file(), rolling)
    try:
        rollback(data, prepared=prepared)
    finally:
        rolling.unlink(missing_ok=True)
        shutil.rmtree(confirm_dir() / cid, ignore_errors=True)
    return 0


def rollback(data: dict, log=None, prepared: dict | None = None) -> None:
    """Re-apply each saved policy under its original path; detach what had none."""
    from netbpf.engine.apply import apply_policy, detach_key
    from netbpf.policy import load_policy

    log = log or (lambda m: print(f"{time.strftime('%F %T')} rollback {data['id']}: {m}",
                                  flush=True))
    done: set[tuple[str, str | None]] = set()
    for key, t in sorted(data["targets"].items()):
        if t.get("copy") is None:
            with state.apply_lock([key]):
                if detach_key(key, log):
                    snapshot.forget(key)
            log(f"{key}: had no policy before; detached")
            continue
        what = (t["policy_path"], t.get("netns"))
        if what in done:
            continue
        done.add(what)
        copy = Path(t["copy"]) / "files" / snapshot.POLICY_NAME
        try:
            loaded = (prepared or {}).get(key) or load_policy(copy)
            apply_policy(loaded, t["policy_path"], t.get("netns"), log=log)
            log(f"{key}: previous policy {t['policy_path']} applied again")
        except NetbpfError as e:
            log(f"{key}: rollback failed: {e}")


if __name__ == "__main__":
    sys.exit(run_timer(sys.argv[1]))
