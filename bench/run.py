"""`make bench`: netbpf beside its floor and its peers, in one run, as one table and
bench/results.json. Needs root, bcc, trafgen, iptables, nft, xdp-tools (see bench/README.md).
Not a test: targets are shown, never asserted; every namespace and pin it makes is removed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console        # noqa: E402
from rich.table import Table            # noqa: E402

import netlab                           # noqa: E402
from measure import Row, ratio          # noqa: E402
from workload import rules_label        # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = {"cost": "1. ns per packet (BPF_PROG_TEST_RUN)",
            "lb": "1. ns per packet (BPF_PROG_TEST_RUN), the balancer's rows only",
            "live": "2. live drop, Mpps (trafgen -> veth)",
            "control": "3. control plane (s, MB)",
            "selftest": "4. selftest after an apply (s)"}
err = Console(stderr=True)


def log(msg: str) -> None:
    err.print(f"[dim]{msg}[/dim]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds; live drop at 1 and 1,000 rules only (about 1.5 minutes)")
    ap.add_argument("--only", choices=list(SECTIONS), action="append",
                    help="run only this section (repeatable)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        err.print("bench: needs root (BPF, namespaces, trafgen)")
        return 1
    only = args.only or list(SECTIONS)
    # Every command the bench times starts a Python: give it the bytecode an installed
    # package has (a shell with PYTHONDONTWRITEBYTECODE would otherwise time the compiling
    # of netbpf's modules into every apply).
    import compileall
    compileall.compile_dir(str(HERE.parent / "netbpf"), quiet=1)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    quick = args.quick
    rule_counts = [1, 100, 1_000, 10_000]
    rows: dict[str, Row] = {}
    started = time.time()
    netlab.up()
    try:
        note_load("start")
        if "cost" in only:
            import cost
            log("1. cost per packet")
            cost.run(rows, rounds=3 if quick else 5, repeat=1_000_000, rule_counts=rule_counts,
                     set_entries=1_000_000, log=log)
        if "lb" in only and "cost" not in only:
            import cost
            log("1. cost per packet: the balancer beside the 1-rule firewall")
            cost.run_lb(rows, rounds=3 if quick else 5, repeat=1_000_000, log=log)
        note_load("after cost")
        if "live" in only:
            import live
            log("2. live drop rate")
            live.run(rows, rule_counts=[1, 1_000] if quick else rule_counts,
                     passes=1 if quick else 2, windows=3 if quick else 2, window_s=0.7, log=log)
            import cblive
            log("2. live drop rate: a ClassBench-like trace mix at 10,000 rules")
            cblive.run(rows, n=10_000, passes=1 if quick else 2, windows=3 if quick else 2,
                       window_s=0.7, log=log)
        note_load("after live")
        if "control" in only:
            import control
            log("3. control plane")
            control.run(rows, rounds=1 if quick else 3, n_rules=10_000,
                        set_entries=1_000_000, log=log)
        if "selftest" in only:
            import selftest
            log("4. selftest")
            selftest.run(rows, rounds=1 if quick else 3, n_rules=10_000, log=log)
        note_load("end")
    finally:
        netlab.down()
    elapsed = time.time() - started
    behind = judge(rows)
    machine = machine_info()
    print_table(rows, behind, machine, elapsed)
    args.out.write_text(json.dumps({
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "duration_s": round(elapsed, 1), "quick": quick, "machine": machine,
        "behind_peers": behind, "rows": [r.as_dict() for r in rows.values()]}, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- targets and peers

def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def judge(rows: dict[str, Row]) -> list[str]:
    """Fill each row's target text; return plain sentences on where netbpf is behind a peer."""
    def get(key):
        r = rows.get(key)
        return r if r is not None and r.ok else None

    behind = []
    floor = get("cost.empty")
    for kind in ("hit", "miss"):
        big, one = get(f"cost.netbpf.10000.{kind}"), get(f"cost.netbpf.1.{kind}")
        if big and one and floor:
            a, b = big.median / one.median, big.median / floor.median
            big.target = (f"<=1.5x 1 rule: {a:.2f}x {_mark(a <= 1.5)}; "
                          f"<=3x floor: {b:.1f}x {_mark(b <= 3)}")
    for n in (1, 10_000):
        for kind in ("hit", "miss"):
            ours, peer = get(f"cost.netbpf.{n}.{kind}"), get(f"cost.xdpfilter.{n}.{kind}")
            if ours and peer and ours.median > peer.median:
                ours.target = (ours.target + "; " if ours.target else "") + \
                    f"behind xdp-filter ({peer.median:.0f} ns)"
                behind.append(f"per packet, {rules_label(n)}, {kind}: netbpf {ours.median:.0f} ns, "
                              f"xdp-filter {peer.median:.0f} ns "
                              f"({ours.median / peer.median:.1f}x slower)")
    s, peer = get("cost.set.hit"), get("cost.xdpfilter.10000.hit")
    if s and peer:
        a = s.median / peer.median
        s.target = f"<=1.2x xdp-filter hash hit ({peer.median:.0f} ns): {a:.2f}x {_mark(a <= 1.2)}"
        if a > 1:
            behind.append(f"per packet, big address set, hit: netbpf {s.median:.0f} ns (hash) "
                          f"vs xdp-filter {peer.median:.0f} ns (hash)")
    # ClassBench-like sets: each beside the 1-rule program with the same fields, same run
    for fam in (4, 6):
        one, xf = get(f"cost.cb.one{fam}"), get("cost.xdpfilter.1.hit")
        if one and xf and fam == 4:
            a = one.median / xf.median
            one.target = f"no slower than xdp-filter 1 address ({xf.median:.0f} ns): {a:.2f}x " \
                         f"{_mark(a <= 1.0)}"
        for kind in ("acl", "fw", "ipc"):
            for what, bound in (("trace", 1.5), ("deep", 2.0), ("miss", 2.0)):
                r = get(f"cost.cb.{kind}{fam}.{what}")
                if r and one:
                    a = r.median / one.median
                    r.target = f"<={bound}x 1 rule: {a:.1f}x {_mark(a <= bound)}"

    for key, most in (("cost.lb.established", 1.5), ("cost.lb.new", 4)):
        r = get(key)
        base = get(r.floor_key) if r else None
        if r and base:
            a = r.median / base.median
            r.target = f"<={most}x 1-rule firewall: {a:.2f}x {_mark(a <= most)}"

    peers = [("iptables-legacy", "iptables legacy"), ("iptables-nft", "iptables nft"),
             ("nft.rules", "nftables rules"), ("nft.set", "nftables set")]
    for n in (1, 100, 1_000, 10_000):
        for mode in ("native", "generic"):
            ours = get(f"live.netbpf.{mode}.{n}")
            if not ours:
                continue
            notes, ahead = [], []
            if n == 1_000 and mode == "native":
                for key, name in peers[:2]:
                    p = get(f"live.{key}.{n}")
                    if p:
                        x = ours.median / p.median
                        notes.append(f">=5x {name}: {x:.1f}x {_mark(x >= 5)}")
            for key, name in peers:
                p = get(f"live.{key}.{n}")
                # behind only if even netbpf's best window is below the peer's median: closer
                # than that, the machine's drift between the two points decides, not the filter
                if p and ours.max < p.median:
                    ahead.append(f"{name} {p.median:.2f}")
            if ahead:
                notes.append(f"behind {', '.join(ahead)}")
                behind.append(f"live drop, {rules_label(n)}, XDP {mode}: netbpf "
                              f"{ours.median:.2f} Mpps; ahead of it: {', '.join(ahead)} Mpps")
            ours.target = "; ".join(notes)

    cb, cbn = get("live.cb.netbpf"), get("live.cb.nft.rules")
    if cb and cbn:
        cb.target = f"nftables rules {cbn.median:.2f} Mpps: {cb.median / cbn.median:.1f}x"
        if cb.max < cbn.median:
            behind.append(f"live drop, ClassBench-like 10,000 rules: netbpf {cb.median:.2f} "
                          f"Mpps, nftables {cbn.median:.2f} Mpps")

    an = get("control.apply.10000")
    for key, name in (("control.iptables.10000", "iptables-legacy-restore"),
                      ("control.nft.10000", "nft -f")):
        p = get(key)
        if an and p and an.median > p.median:
            p.target = f"netbpf apply is {an.median / p.median:.0f}x slower"
            behind.append(f"loading 10,000 rules: netbpf apply {an.median:.2f} s, "
                          f"{name} {p.median:.2f} s")
    st, ap = get("selftest.10000"), get("selftest.apply.10000")
    if st and ap:
        st.target = f"a few s (#15); {st.median / ap.median:.1f}x the apply it follows"
    one, ld = get("control.change1.10000"), get("control.load.10000")
    nft = get("control.nft.10000")
    if one and nft:
        x = one.median / nft.median
        one.target = f"<=1.5x nft -f: {x:.1f}x {_mark(x <= 1.5)}"
        if ld:
            one.target += f"; {ld.median / one.median:.0%} of it is load_policy()"
    for key, limit, unit in (("control.noop.10000", 0.15, "s"), ("control.setadd.100", 0.3, "s"),
                             ("control.apply.10000", 1.0, "s"), ("control.apply.set", 2.5, "s"),
                             ("control.rss.update.10000", 80, "MB")):
        r = get(key)
        if r:
            note = f"<={limit} {unit}: {_mark(r.median <= limit)}"
            r.target = note + (f"; {r.target}" if r.target else "")
    for key, peers in (("control.setadd.100", ("control.nftset.add100", "control.ipset.add100")),
                       ("control.apply.set", ("control.nftset.load", "control.ipset.load"))):
        r = get(key)
        got = [(k.split(".")[1], get(k)) for k in peers]
        if r and any(p for _, p in got):
            r.target += "; " + ", ".join(f"{n} {p.median:.2f} s" for n, p in got if p)
    # the two parallel applies load a program compiled before: compare with one such apply
    par, a1 = get("control.apply.parallel"), get("control.apply.1.cached") or get("control.apply.1")
    if par and a1:
        par.target = f"{par.median / a1.median:.2f}x one apply (target: about 1x)"
    return behind


# ---------------------------------------------------------------- output

def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ns":
        return f"{v:.0f} ns"
    if unit == "Mpps":
        return f"{v:.3f}"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:.2f} s"


def print_table(rows: dict[str, Row], behind: list[str], machine: dict, elapsed: float) -> None:
    t = Table(title=f"netbpf bench — {machine['cpu']}, {machine['nproc']} cores, kernel "
                    f"{machine['kernel']} ({elapsed:.0f} s run)", title_justify="left")
    for name, just in (("figure", "left"), ("min", "right"), ("median", "right"),
                       ("x floor", "right"), ("target / peers / notes", "left")):
        t.add_column(name, justify=just, overflow="fold")
    for sec, title in SECTIONS.items():
        these = [r for r in rows.values() if r.section == sec]
        if not these:
            continue
        t.add_row(f"[bold]{title}[/bold]", "", "", "", "")
        for r in these:
            x = ratio(r, rows.get(r.floor_key) if r.floor_key else None)
            xs = "floor" if r.floor_key is None and r.ok else (f"{x:.2f}x" if x else "")
            t.add_row(r.label, _fmt(r.min, r.unit), _fmt(r.median, r.unit), xs,
                      "; ".join(s for s in (r.target, r.note) if s))
        t.add_section()
    out = Console(width=max(120, Console().width))
    out.print(t)
    if behind:
        out.print("[bold]Where netbpf is behind a peer[/bold]")
        for b in behind:
            out.print(f"  - {b}", soft_wrap=True)


def machine_info() -> dict:
    def cmd(*c: str) -> str:
        try:
            p = subprocess.run(list(c), capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except Exception:
            return "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    try:
        import bcc
        bcc_v = getattr(bcc, "__version__", "?")
    except Exception:
        bcc_v = "?"
    return {"cpu": cpu, "nproc": os.cpu_count(), "kernel": platform.release(),
            "mem_gb": round(int(mem) / 2**20, 1), "python": platform.python_version(),
            "bcc": bcc_v, "trafgen": cmd("trafgen", "-v"), "iptables": cmd("iptables", "-V"),
            "nft": cmd("nft", "-v"),
            "xdp-tools": cmd("dpkg-query", "-W", "-f", "${Version}", "xdp-tools"),
            "loadavg": LOADAVG}


LOADAVG: dict[str, list[str]] = {}


def note_load(when: str) -> None:
    """1/5/15-minute load averages: a shared machine's other work shows up here."""
    LOADAVG[when] = Path("/proc/loadavg").read_text().split()[:3]


if __name__ == "__main__":
    sys.exit(main())
