"""Section 4: `netbpf selftest` as a user runs it after an apply (`-n nbbench-rx`, rx0, XDP
native): wall time for 1 rule (the floor: interpreter start, the program copy's compile) and
for 10,000 rules, beside the apply of those 10,000 rules measured in the same run. The
question is #15's: is it cheap enough to run after every apply. Not the data plane.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import netlab
import workload
from measure import Row, last_line, run_timed


def run(rows: dict[str, Row], *, rounds: int, n_rules: int, log) -> None:
    def row(key, label, floor="selftest.1"):
        r = Row("selftest", key, label, "s", floor_key=floor)
        rows[key] = r
        return r

    nb = netlab.netbpf_cmd() + ["-n", netlab.RX_NS]
    tmp = Path(tempfile.mkdtemp(prefix="nbbench-st-"))
    p1, pn = tmp / "one.yaml", tmp / "many.yaml"
    p1.write_text(workload.policy_yaml(netlab.RX_IF, 1))
    pn.write_text(workload.policy_yaml(netlab.RX_IF, n_rules))
    one = row("selftest.1", "selftest, 1 rule (floor)", None)
    many = row(f"selftest.{n_rules}", f"selftest, {n_rules:,} rules")
    apply_n = row(f"selftest.apply.{n_rules}", f"  the apply it follows, {n_rules:,} rules")

    def selftest(r: Row) -> None:
        t = run_timed(nb + ["selftest", netlab.RX_IF])
        r.samples.append(t.wall_s)
        m = re.search(r"(\d+)/(\d+) rules ok, (\d+) probes", t.stdout)
        if m:
            r.extra = {"rules": int(m[2]), "probes": int(m[3])}

    try:
        for k in range(rounds):
            log(f"  round {k + 1}/{rounds}")
            for r, path in ((one, p1), (many, pn)):
                try:
                    t = run_timed(nb + ["apply", str(path)])
                    if r is many:
                        apply_n.samples.append(t.wall_s)
                    selftest(r)
                except Exception as e:
                    r.note = f"failed: {last_line(str(e))}"
                    log(f"  {r.label}: {r.note}")
                finally:
                    netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
    finally:
        netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
        shutil.rmtree(tmp, ignore_errors=True)
