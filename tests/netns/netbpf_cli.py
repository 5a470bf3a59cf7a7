"""Run the real `netbpf` command line inside a lab node, as a user would (`netbpf -n NS ...`).

Shared by the netns test modules; not a fixture so plain helper functions can use it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NETBPF = str(Path(sys.executable).with_name("netbpf"))


def netbpf(lab, *args: str, node: str = "gw", check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """`netbpf -n <node's namespace> ARGS`; with check, a non-zero exit fails the test with
    everything it printed."""
    p = subprocess.run([NETBPF, "-n", lab.ns(node), *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"netbpf {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p
