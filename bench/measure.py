"""What every section produces: rows of repeated samples, summarised as min and median and put
beside the floor measured in the same run. Not a runner and not a printer (run.py does both).
"""
from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

TIME = "/usr/bin/time"     # GNU time (Debian package 'time'): peak RSS of one command


@dataclass
class Row:
    section: str                 # "cost" | "live" | "control"
    key: str                     # stable id in results.json, e.g. "cost.netbpf.10000.hit"
    label: str                   # what the table shows
    unit: str                    # ns | Mpps | s | MB
    samples: list[float] = field(default_factory=list)
    floor_key: str | None = None  # the row this one is relative to (None: it is a floor)
    target: str = ""             # filled in by run.py once every row exists
    note: str = ""               # failures, caveats: shown in the table, never hidden
    extra: dict = field(default_factory=dict)   # raw detail for results.json

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def min(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def max(self) -> float | None:
        return max(self.samples) if self.samples else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_dict(self) -> dict:
        return {"key": self.key, "section": self.section, "label": self.label,
                "unit": self.unit, "samples": self.samples, "min": self.min,
                "median": self.median, "max": self.max, "floor": self.floor_key,
                "target": self.target, "note": self.note, **({"extra": self.extra}
                                                             if self.extra else {})}


def ratio(row: Row, floor: Row | None) -> float | None:
    """Median over the floor's median. For rates (Mpps) this is a fraction of the floor's
    rate; for costs (ns, s, MB) a multiple of the floor's cost."""
    if floor is None or not row.ok or not floor.ok or not floor.median:
        return None
    return row.median / floor.median


@dataclass
class Timed:
    wall_s: float
    max_rss_kb: int
    rc: int
    stdout: str
    stderr: str


def run_timed(cmd: list[str], *, check: bool = True, timeout: float = 600) -> Timed:
    """Run cmd; its wall time and peak RSS. The RSS comes from /usr/bin/time, not from our
    own wait4(): exec() records the forking process's peak in the child's maxrss, so any
    child of this (large) Python would report at least our size."""
    with tempfile.NamedTemporaryFile("r", prefix="nbbench-rss-") as rss:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([TIME, "-f", "%M", "-o", rss.name, *cmd], capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd)}: no answer after {timeout:.0f} s") from None
        wall = time.perf_counter() - t0
        text = rss.read().strip().splitlines()
    res = Timed(wall, int(text[-1]) if text and text[-1].isdigit() else 0, p.returncode,
                p.stdout, p.stderr)
    if check and res.rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.rc}: "
                           f"{(res.stderr or res.stdout).strip()[-800:]}")
    return res


def last_line(text: str) -> str:
    """A CLI's traceback or message, shortened to the line that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return re.sub(r"\s+", " ", lines[-1])[:200] if lines else "no output"
