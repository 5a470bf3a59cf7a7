"""Where netbpf keeps what it made: pin directories, per-interface state files, journals, locks.

Three roots. Pins live in bpffs (/sys/fs/bpf/netbpf/<key>/, NETBPF_PIN_ROOT) and go with a
reboot. What must outlive one is under /var/lib/netbpf (NETBPF_LIB_ROOT): the state records
(state/<key>.json: what was applied, so `status` can say it is not loaded and `netbpf restore`
re-applies it), the copies of applied policies (policies/, netbpf/store/snapshot.py) and the
restore records (applied/, netbpf/engine/persist.py). What describes this boot only stays in
/run/netbpf (NETBPF_STATE_ROOT): apply journals (they speak of pins; a reboot leaves nothing to
finish or undo), locks, health and event-reader files, the confirm timer, verifier logs.

<key> is the interface name, or NETNS:IFNAME inside a namespace (':' cannot appear in an
interface name). No kernel calls here: plain files only. Longer than 400 lines on purpose:
every file netbpf keeps, and which root it lives under, reads in one place.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from glob import escape as glob_escape
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from netbpf.errors import NetbpfError

PIN_ROOT = Path(os.environ.get("NETBPF_PIN_ROOT", "/sys/fs/bpf/netbpf"))
STATE_ROOT = Path(os.environ.get("NETBPF_STATE_ROOT", "/run/netbpf"))
# A private NETBPF_STATE_ROOT (tests, developers sharing a machine) gets a private lib root
# beside it unless NETBPF_LIB_ROOT says otherwise: never the machine's /var/lib/netbpf.
LIB_ROOT = Path(os.environ.get("NETBPF_LIB_ROOT") or (
    f"{os.environ['NETBPF_STATE_ROOT']}-lib" if os.environ.get("NETBPF_STATE_ROOT")
    else "/var/lib/netbpf"))
LOCK_TIMEOUT_S = 60.0
# prog_hash of a part whose program must be reloaded by the next apply (matches no build)
REPAIR_HASH = "repair"
# A set's digest while its entries are a mix of old and new (a set update in place was
# killed, netbpf/engine/setdelta.py): it matches no policy, so the next apply writes the set.
PARTIAL_SET = "partial"


def iface_key(ifname: str, netns: str | None) -> str:
    return f"{netns}:{ifname}" if netns else ifname


def split_key(key: str) -> tuple[str | None, str]:
    netns, sep, ifname = key.rpartition(":")
    return (netns if sep else None), ifname


def pin_dir(key: str) -> Path:
    return PIN_ROOT / key


# (new, retired) trees used while swapping programs. bpffs refuses '.' in names, hence a
# sibling tree rather than suffixes.
STAGING_ROOT = PIN_ROOT.with_name(PIN_ROOT.name + "_staging")
STAGING_DIRS = (STAGING_ROOT / "new", STAGING_ROOT / "old")


def staging_dirs(key: str) -> tuple[Path, Path]:
    return STAGING_DIRS[0] / key, STAGING_DIRS[1] / key


def prune_pin_roots() -> None:
    """Remove netbpf's pin directories once nothing is pinned in them. An apply of another
    interface may be about to create something in one: it makes its directories with
    make_pin_dirs, which tries again when a directory vanished under it."""
    for d in (*STAGING_DIRS, STAGING_ROOT, PIN_ROOT):
        try:
            d.rmdir()
        except OSError:
            pass  # absent, or still holds something


def make_pin_dirs(*dirs: Path) -> None:
    for attempt in range(5):
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == 4:
                raise


def rename_pins(src: Path, dst: Path) -> None:
    """Move a pin directory; dst's parent is made again if a prune removed it meanwhile."""
    for attempt in range(5):
        try:
            make_pin_dirs(dst.parent)
            os.rename(src, dst)
            return
        except FileNotFoundError:
            if attempt == 4 or not src.exists():
                raise


def state_dir() -> Path:
    """State records: durable (a reboot keeps them; the pins they describe do not)."""
    return LIB_ROOT / "state"


def state_file(key: str) -> Path:
    return state_dir() / f"{key}.json"


def kernel_gone(key: str) -> bool:
    """Nothing of key is left in the kernel's view: no pins, no staging pins, no journal of
    an apply in progress. With a state record, that is a reboot (or a wiped bpffs): the
    record says what to restore, and nothing runs. Staging trees and the journal cover the
    moments an apply moves the pin directory."""
    return not any(d.exists() for d in (pin_dir(key), *staging_dirs(key))) and \
        not journal_file(key).exists()


@dataclass
class RuleState:
    """One rule as applied: its counter slot survives re-applies while name and digest stay."""
    name: str
    action: str              # allow | drop | rate_limit | count
    digest: str
    slot: int
    line: int = 0
    direction: str = "ingress"
    pos: int = -1            # place in the file's rule list (count and terminal rules together)


@dataclass
class SetState:
    name: str
    digest: str
    tag: int
    v4: int = 0              # entry counts, for status and stats
    v6: int = 0


@dataclass
class PartState:
    """One program of an interface: the XDP ingress firewall or the TC egress firewall."""
    direction: str           # ingress | egress
    hook: str                # xdp | tc
    mode: str                # XDP mode in use (native | generic | offload), or 'tc'
    prog_id: int
    prog_hash: str
    words: int
    class_cap: int
    default_action: str
    rules: list[RuleState] = field(default_factory=list)
    sets: list[SetState] = field(default_factory=list)
    sample: int = 0          # the direction's event sampling (1 in N; 0 none)
    fields: int = 0x7ff      # classifier fields compiled in (NB_FIELDS)
    gen: int = 0             # the generation this state's rules were written to
    dir_chunks: int = 64     # address table chunks compiled in (NB_DIR_CHUNKS)
    attach: str = "netlink"  # link (bpf_link pinned beside the maps) | netlink (XDP, cls_bpf)
    sampled: bool = False    # some rule or the direction samples packets into events
    # What the replaced program counted between the counter copy and the swap (CounterCarry):
    # kept here, not written into the live per-CPU maps, and added by whoever reads them.
    # {map name: {key: [packets, bytes, drops]}}; JSON makes the keys strings.
    carried: dict = field(default_factory=dict)

    def carried_counts(self, name: str) -> dict[int, tuple[int, int, int]]:
        return {int(k): tuple(v) for k, v in self.carried.get(name, {}).items()}

    @classmethod
    def from_json(cls, data: dict) -> "PartState":
        data = dict(data)
        data["rules"] = [RuleState(**r) for r in data.get("rules", [])]
        data["sets"] = [SetState(**s) for s in data.get("sets", [])]
        return cls(**data)


@dataclass
class InterfaceState:
    key: str
    ifname: str
    netns: str | None
    ifindex: int
    requested_mode: str      # what the policy asked for (auto | native | generic | offload)
    conntrack: bool
    ct_timeouts: dict
    created_clsact: bool     # netbpf added the clsact qdisc (so detach may remove it)
    policy_path: str
    policy_hash: str
    applied_at: float = field(default_factory=time.time)
    parts: dict[str, PartState] = field(default_factory=dict)
    lb: dict = field(default_factory=dict)          # netbpf.lb.lbtables.LbState as JSON
    set_files: list[str] = field(default_factory=list)   # inputs beside the policy file
    policy_keys: list[str] = field(default_factory=list)  # every interface of that apply

    @classmethod
    def from_json(cls, data: dict) -> "InterfaceState":
        data = dict(data)
        data["parts"] = {k: PartState.from_json(v) for k, v in data.get("parts", {}).items()}
        return cls(**data)

    @property
    def ingress(self) -> PartState | None:
        return self.parts.get("ingress")

    @property
    def rules(self) -> list[RuleState]:
        return [r for p in self.parts.values() for r in p.rules]


def health_file(key: str) -> Path:
    """Backends the health checker found down, for the apply engine to leave out."""
    return STATE_ROOT / "health" / f"{key}.json"


def health_down(key: str) -> set[str]:
    """Backends `netbpf lb-health` last found down (netbpf/lb/health.py writes the file)."""
    try:
        return set(json.loads(health_file(key).read_text()).get("down", []))
    except (OSError, ValueError):
        return set()


def load_state(key: str, not_loaded: bool = False) -> InterfaceState | None:
    """The state of what netbpf runs on key; None if nothing runs there. A record whose
    kernel objects are gone (kernel_gone) counts only with not_loaded=True (status, detach):
    the apply engine and the readers of maps see nothing there, so an apply loads afresh."""
    _migrate_legacy()
    path = state_file(key)
    if not not_loaded and path.exists() and kernel_gone(key):
        return None
    try:
        return InterfaceState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise NetbpfError(f"read state {path}: {e}; 'netbpf detach' and re-apply to repair") from e


def save_state(state: InterfaceState) -> None:
    """Atomic (write, fsync, rename) and private to root: readers never see half a file."""
    _write_private(state_file(state.key), state)


def _write_private(path: Path, data) -> None:
    """data: a dataclass (nested dataclasses, lists, dicts). One line of JSON by the C
    encoder, dataclasses as their fields (as asdict, without its deep copy): a 10,000-rule
    state in milliseconds rather than a second."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, default=vars, separators=(",", ":")))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_state(key: str) -> None:
    try:
        state_file(key).unlink()
    except FileNotFoundError:
        pass


# ---- the apply journal ----
# An apply records what it is about to make true before its first change to what the kernel
# runs (attach, flip) and removes the record once the state file says it. A journal found by
# the next apply, `status` or `detach` means an interrupted apply: the kernel tells whether it
# got far enough to roll forward (netbpf/engine/recover.py).

@dataclass
class Journal:
    kind: str                    # programs (new programs replace the old) | update (a flip)
    state: InterfaceState        # what the interface is once the apply completes
    reload: bool = False         # a roll-forward must also reload the programs (see recover)
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def from_json(cls, data: dict) -> "Journal":
        data = dict(data)
        data["state"] = InterfaceState.from_json(data["state"])
        return cls(**data)


def journal_file(key: str) -> Path:
    return STATE_ROOT / "state" / f"{key}.journal"       # runtime: see the module's notes


def save_journal(journal: Journal) -> None:
    _write_private(journal_file(journal.state.key), journal)


def load_journal(key: str) -> Journal | None:
    path = journal_file(key)
    try:
        return Journal.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        # torn before the rename of save_journal cannot happen; a hand-edited file can
        path.unlink(missing_ok=True)
        return None


def remove_journal(key: str) -> None:
    journal_file(key).unlink(missing_ok=True)


def list_journal_keys() -> list[str]:
    d = STATE_ROOT / "state"
    return sorted(p.stem for p in d.glob("*.journal")) if d.is_dir() else []


def list_states(not_loaded: bool = False) -> list[InterfaceState]:
    """Every interface netbpf runs something on; with not_loaded=True also the records whose
    kernel objects are gone (after a reboot: what `netbpf restore` brings back)."""
    _migrate_legacy()
    d = state_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            st = load_state(p.stem, not_loaded=not_loaded)
        except NetbpfError:
            continue
        if st:
            out.append(st)
    return out


_migrated = False


def _migrate_legacy() -> None:
    """Records a netbpf kept under STATE_ROOT (state/*.json, policies/) move to the lib root,
    once per process: an upgrade without a reboot keeps managing what runs."""
    global _migrated
    if _migrated or STATE_ROOT == LIB_ROOT:
        return
    _migrated = True
    for old in [*(STATE_ROOT / "state").glob("*.json"), *(STATE_ROOT / "policies").glob("*")]:
        target = LIB_ROOT / old.parent.name / old.name
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                shutil.move(str(old), target)
        except OSError:
            pass                     # not root: read-only users see the lib root only


def unpin_tree(d: Path) -> None:
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.is_dir():
            unpin_tree(f)
        else:
            f.unlink(missing_ok=True)
    d.rmdir()


def forget_netns(netns: str) -> list[str]:
    """Drop pins, state and health files of every interface key in netns (the namespace is
    gone, so its programs are detached already), in the runtime and the lib root alike.
    Returns the keys forgotten. Files only."""
    ns = glob_escape(netns)
    keys = {p.stem for p in state_dir().glob(f"{ns}:*.json")}
    keys |= {p.stem for p in (STATE_ROOT / "state").glob(f"{ns}:*.journal")}
    keys |= {p.name for p in PIN_ROOT.glob(f"{ns}:*")} if PIN_ROOT.is_dir() else set()
    # files other parts keep per interface: the health checker's, event readers', the
    # saved copies of applied policies, and locks nobody holds any more
    for sub, suffix in (("health", ".json"), ("locks", ".lock"), ("events", ".lock")):
        keys |= {p.name[:-len(suffix)] for p in (STATE_ROOT / sub).glob(f"{ns}:*{suffix}")}
    keys |= {p.name for p in policies_root().glob(f"{ns}:*")}
    with apply_lock(keys):
        for key in keys:
            for d in (pin_dir(key), *staging_dirs(key)):
                try:
                    unpin_tree(d)
                except OSError:
                    pass
            remove_state(key)
            remove_journal(key)
            health_file(key).unlink(missing_ok=True)
            (STATE_ROOT / "events" / f"{key}.lock").unlink(missing_ok=True)
            shutil.rmtree(policies_root() / key, ignore_errors=True)
            remove_lock(key)
        prune_pin_roots()
    return sorted(keys)


def policies_root() -> Path:
    """Copies of applied policy files, per key (netbpf/store/snapshot.py): durable."""
    return LIB_ROOT / "policies"


def list_pin_keys() -> list[str]:
    if not PIN_ROOT.is_dir():
        return []
    return sorted(p.name for p in PIN_ROOT.iterdir() if p.is_dir())


def lock_file(key: str) -> Path:
    return STATE_ROOT / "locks" / f"{key}.lock"


@contextmanager
def apply_lock(keys, timeout: float = LOCK_TIMEOUT_S, wait_message=None) -> Iterator[None]:
    """One apply/detach at a time per interface: applies to different interfaces or
    namespaces run side by side. Locks are taken in sorted order (no deadlock between two
    policies sharing interfaces); waits up to timeout in all, then fails clearly."""
    fds = []
    deadline = time.monotonic() + timeout
    try:
        for key in sorted(set(keys)):
            path = lock_file(key)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(fd)
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _same_file(fd, path):
                        break
                    # the holder forgot the interface and removed the lock file: lock anew
                    os.close(fds.pop())
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                    fds.append(fd)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    holder = _lock_holder(fd)
                    if not told and wait_message:
                        wait_message(f"waiting for another netbpf apply (pid {holder}) on "
                                     f"{key} to finish")
                        told = True
                    if time.monotonic() >= deadline:
                        raise NetbpfError(f"another netbpf apply (pid {holder}) holds {path} "
                                          f"after {timeout:.0f} s; try again when it is done")
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def host_lock(name: str, wait_message=None):
    """A lock for something host-wide that is not an interface (':' starts no interface key)."""
    return apply_lock([f":{name}"], wait_message=wait_message)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def remove_lock(key: str) -> None:
    """Called with the key's lock held, once netbpf forgets the interface."""
    lock_file(key).unlink(missing_ok=True)


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"
