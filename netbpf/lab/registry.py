"""What each lab created, on disk (/run/netbpf/lab/<prefix>.json), and removal of leftovers.

A lab writes its record before creating anything and removes it after its namespaces are gone,
so a namespace with a dead owner (or with no record and no live reaper: a run using another
state dir, e.g. another checkout's tests, has its records elsewhere) is a leftover of a killed run.
Not the lab itself (lab.py) and not the CLI.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netbpf.lab.iproute import LabError, delete_netns, list_netns, pid_alive

STATE_DIR = Path(os.environ.get("NETBPF_LAB_STATE_DIR", "/run/netbpf/lab"))
# A test run's prefix: nb<6 hex>p<owner pid>- (older runs: nb<6 hex>-). The pid makes a
# lab's owner known machine-wide: helpers with their own NETBPF_LAB_STATE_DIR cannot see each
# other's records, and without it each took the other's live labs for leftovers.
RANDOM_PREFIX_RE = re.compile(r"^nb[0-9a-f]{6}(?:p([0-9]+))?-")


def _owner_alive(m: re.Match) -> bool:
    return m.group(1) is not None and pid_alive(int(m.group(1)))


@dataclass
class LabRecord:
    prefix: str
    topology: str  # topology name
    path: str  # topology file
    namespaces: list[str]
    pid: int | None  # owning process; None once 'netbpf lab up' handed the lab to people
    created: float = field(default_factory=time.time)
    interfaces: list[dict] = field(default_factory=list)  # for 'lab list' / 'lab up' output
    readable: bool = True  # False: the record exists but this user may not read it


    @property
    def persistent(self) -> bool:
        return self.pid is None

    @property
    def orphaned(self) -> bool:
        # a record we cannot read is someone's lab, not a leftover
        return self.readable and not self.persistent and not pid_alive(self.pid)


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


def claim(record: LabRecord) -> bool:
    """Create the record only if no lab with this prefix exists (O_EXCL): two runs never share a prefix."""
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        STATE_DIR.chmod(0o755)  # the CLI's umask is 077; records are for everyone to read
        fd = os.open(state_path(record.prefix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise LabError(f"cannot record the lab in {STATE_DIR}: {e.strerror} (the lab needs root)") from None
    os.fchmod(fd, 0o644)  # whatever the umask: 'lab list' works for every user
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f, indent=1)
    return True


def save(record: LabRecord) -> None:
    tmp = state_path(record.prefix).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.chmod(0o644)
    os.replace(tmp, state_path(record.prefix))


def load(prefix: str) -> LabRecord | None:
    try:
        data = json.loads(state_path(prefix).read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        return LabRecord(prefix=prefix, topology="?", path="?", namespaces=[], pid=None,
                         readable=False)
    except (OSError, ValueError):
        return LabRecord(prefix=prefix, topology="?", path="?", namespaces=[], pid=0)  # corrupt: a leftover
    return LabRecord(**{k: v for k, v in data.items() if k in LabRecord.__dataclass_fields__})


def records() -> list[LabRecord]:
    if not STATE_DIR.is_dir():
        return []
    out = []
    for p in sorted(STATE_DIR.glob("*.json")):
        rec = load(p.stem)
        if rec is not None:
            out.append(rec)
    return out


def forget(prefix: str) -> None:
    try:
        state_path(prefix).unlink()
    except FileNotFoundError:
        pass


def remove_lab(prefix: str, namespaces: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Delete a lab's namespaces (given, recorded, and for a random prefix any NAME starting with it).

    Returns (removed namespaces, errors); never raises, so teardown always gets as far as it can."""
    rec = load(prefix)
    names = set(namespaces or []) | set(rec.namespaces if rec else [])
    # Only a random prefix is safe to match by name: 'lab-' would also match another lab's 'lab-x-gw'.
    if RANDOM_PREFIX_RE.fullmatch(prefix):
        names |= {n for n in list_netns() if n.startswith(prefix)}
    removed, errors = [], []
    for name in sorted(names):
        if not os.path.exists(f"/run/netns/{name}"):
            continue
        err = delete_netns(name)
        (errors if err else removed).append(err or name)
    if not errors:
        forget(prefix)
    return removed, errors


def watched_prefixes() -> set[str]:
    """Prefixes whose reaper (netbpf/lab/reaper.py) is alive: the lab's owner is alive too,
    whichever state dir holds its record."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if b"netbpf.lab.reaper" in argv[:-1]:   # python -P -m netbpf.lab.reaper PREFIX
            out.add(argv[-1].decode(errors="replace"))
    return out


def orphans() -> list[str]:
    """Namespaces of killed runs: random-prefix ones whose record is missing or whose owner died,
    and any recorded lab (random prefix or not) whose owner died before handing it over."""
    present = list_netns()  # before the records: see cleanup()
    if STATE_DIR.is_dir() and not os.access(STATE_DIR, os.R_OK | os.X_OK):
        return []  # records we may not read: every lab would look like a leftover
    recs = {r.prefix: r for r in records()}
    watched = watched_prefixes()
    out = set()
    for name in present:
        m = RANDOM_PREFIX_RE.match(name)
        if m and not _owner_alive(m) and (
                (m.group(0) not in recs and m.group(0) not in watched)
                or (m.group(0) in recs and recs[m.group(0)].orphaned)):
            out.add(name)
    for r in recs.values():
        if r.orphaned:
            out.update(n for n in r.namespaces if n in present)
    return sorted(out)


def cleanup(prefix: str | None = None, include_live: bool = False) -> list[str]:
    """Remove lab leftovers; returns the namespaces removed.

    prefix given: that lab's recorded namespaces (for nb<6 hex>- also every namespace starting with it).
    prefix None: every run with a random prefix (nb<6 hex>-) whose owning process is gone, and
    records of killed runs. Labs of live processes and labs made by 'netbpf lab up' are kept
    unless include_live (random-prefix labs only: people's labs go with 'lab down --all')."""
    removed: list[str] = []
    errors: list[str] = []
    if prefix is not None:
        r, e = remove_lab(prefix)
        removed += r
        errors += e
    else:
        # Namespaces first, records second: a lab writes its record before its namespaces, so a
        # namespace listed here without a record really has none (not a lab starting right now).
        present = list_netns()
        recs = {r.prefix: r for r in records()}
        prefixes = {p for p, r in recs.items() if r.orphaned or (include_live and RANDOM_PREFIX_RE.match(p))}
        # No record here is not enough: another checkout (its own NETBPF_LAB_STATE_DIR) may own
        # the lab, running or being built; its reaper, started before any namespace, says so.
        watched = watched_prefixes()
        for name in present:
            m = RANDOM_PREFIX_RE.match(name)
            if m and (m.group(0) in prefixes or
                      (m.group(0) not in recs and m.group(0) not in watched
                       and not _owner_alive(m))):
                prefixes.add(m.group(0))
        for p in sorted(prefixes):
            r, e = remove_lab(p)
            removed += r
            errors += e
    if errors:
        raise LabError("could not remove every lab namespace:\n  " + "\n  ".join(errors))
    return removed
