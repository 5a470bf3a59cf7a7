"""Controller-side health checks for load balancers: TCP connects to each backend; a backend
that stops answering leaves the Maglev table (its flows go elsewhere), and comes back when
it answers again. Each change is logged and applied through the apply engine, which the
caller hands in (`netbpf lb-health` passes apply_policy), so this module needs no engine.

Probes run in the load balancer's network namespace (the caller's `enter`). Not the data
plane, and not the command line (netbpf/cli/dataplane.py only parses and prints).
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

from netbpf.policy.ir import addr_text
from netbpf.lb.maglev import backend_key
from netbpf.store.state import health_down, health_file, iface_key

Log = Callable[[str], None]


@dataclass
class Target:
    key: str                 # interface key the LB lives on
    lb: str
    identity: str            # maglev.backend_key
    family: int
    addr: str
    port: int                # port checked
    interval: float
    timeout: float


def targets(loaded_policy, netns: str | None) -> list[Target]:
    out = []
    for name, lb_model in loaded_policy.model.load_balancers.items():
        if lb_model.health is None:
            continue
        tcp = lb_model.health.tcp
        lb = loaded_policy.ir.load_balancers[name]
        for b in lb.backends:
            out.append(Target(iface_key(lb.interface, netns), name,
                              backend_key(name, b.family, b.addr, b.port), b.family,
                              addr_text(b.family, b.addr),
                              tcp.port or b.port, float(tcp.interval), float(tcp.timeout)))
    return out


def probe(t: Target) -> str | None:
    """None when the backend accepts a TCP connection, else why not."""
    fam = socket.AF_INET if t.family == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(t.timeout)
    try:
        s.connect((t.addr, t.port))
        return None
    except socket.timeout:
        return f"no answer in {t.timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        s.close()


def write_down(key: str, down: set[str]) -> None:
    path = health_file(key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"down": sorted(down), "at": time.time()}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def check_once(ts: list[Target], down: dict[str, set[str]], log: Log) -> bool:
    """Probe every target; update `down` (per interface key); True if anything changed."""
    changed = False
    for t in ts:
        why = probe(t)
        was_down = t.identity in down.setdefault(t.key, set())
        if why and not was_down:
            down[t.key].add(t.identity)
            log(f"lb {t.lb}: backend {t.addr}:{t.port} DOWN ({why}); out of the Maglev table")
            changed = True
        elif not why and was_down:
            down[t.key].discard(t.identity)
            log(f"lb {t.lb}: backend {t.addr}:{t.port} UP again; back in the Maglev table")
            changed = True
    return changed


def watch(ts: list[Target], apply: Callable[[], bool], log: Log, *, once: bool = False,
          enter: Callable[[], AbstractContextManager] = nullcontext,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """The health loop: probe every target each interval (the shortest one asked for); on
    the first round and on every change write the down file and call apply() (True when the
    tables changed). Starts from what the last run found, so a recovery is reported as one.
    once: one round, then return. Runs until interrupted otherwise."""
    down: dict[str, set[str]] = {t.key: health_down(t.key) for t in ts}
    interval = min(t.interval for t in ts)
    log(f"checking {len(ts)} backends every {interval:g} s")
    first = True
    while True:
        with enter():
            changed = check_once(ts, down, log)
        if changed or first:
            for key, ids in down.items():
                write_down(key, ids)
            if apply():
                log("applied: load balancer tables follow the backends' health")
        first = False
        if once:
            return
        sleep(interval)
