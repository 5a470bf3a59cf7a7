"""`netbpf apply` SIGKILLed at random points (15 kills; NETBPF_SOAK=1: 60): each hook runs a
whole policy afterwards, lab traffic and BPF_PROG_TEST_RUN agree on which, and the next apply
repairs everything. The ordered kills and failing applies are in test_killed_apply.py; this
one has its own file so it runs beside them.

    [client] client0 ---------------------------- gw0 [gw]   (a private lab per test)
"""
from __future__ import annotations

import os
import random
import time

from netbpf_cli import netbpf
from test_killed_apply import KILLS, Killed, drops_by_test_run, gw, repair  # noqa: F401
from test_races import policy, write


def test_sigkill_at_random_points_leaves_whole_hooks_and_the_next_apply_repairs(gw, tmp_path):
    """Policies 1 -> 2 rewrite maps; -> 3 (100 more rules) and back to 1 load new programs.
    Kill times are spread over the whole apply, measured first for each step."""
    lab, probes = gw
    paths = {1: write(tmp_path, "p1.yaml", policy(1)), 2: write(tmp_path, "p2.yaml", policy(2)),
             3: write(tmp_path, "p3.yaml", policy(3, pad=100))}
    nxt = {1: 2, 2: 3, 3: 1}
    took = {}
    netbpf(lab, "apply", str(paths[1]))
    cur = 1
    for _ in range(3):                  # one whole apply of each step: how long each takes
        t0 = time.monotonic()
        netbpf(lab, "apply", str(paths[nxt[cur]]))
        took[cur] = time.monotonic() - t0
        cur = nxt[cur]
    seed = int(os.environ.get("NETBPF_SEED") or time.time())
    rnd = random.Random(seed)
    interrupted, mixed = 0, []
    for i in range(KILLS):
        target = nxt[cur]
        delay = took[cur] * 1.1 * (i + rnd.random()) / KILLS
        run = Killed(lab, paths[target])
        time.sleep(max(0.0, delay - (time.monotonic() - run.started)))
        interrupted += run.kill()
        where = f"seed {seed}, kill {i} after {delay:.2f} s of {cur} -> {target}"
        ing, eg = probes.dropped()
        assert len(ing) == 1 and ing <= {cur, target}, f"{where}: ingress drops {ing}"
        assert len(eg) == 1 and eg <= {cur, target}, f"{where}: egress drops {eg}"
        assert drops_by_test_run(lab, probes.tags) == (ing, eg), f"{where}: test_run disagrees"
        if ing != eg:
            mixed.append(where)         # see test_kill_between_the_two_flips_...
        repair(lab, probes, paths[target], target)
        cur = target
    assert interrupted >= KILLS // 2, f"seed {seed}: only {interrupted} kills hit a running apply"
    print(f"seed {seed}: {interrupted}/{KILLS} applies interrupted; hooks on different "
          f"policies after {len(mixed)}: {mixed}")
