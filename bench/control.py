"""Section 3: the control plane, as a user meets it: wall time and peak memory of the netbpf
CLI (`-n nbbench-rx`, on rx0, XDP native) for big policies, beside a 1-rule apply (the floor)
and beside iptables-restore / nft -f loading the same 10,000 rules. Not the data plane.

"of which" rows time the pure-Python policy load in this process, to show where time goes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from netbpf.kernel import objcache
from netbpf.policy import load_policy

import netlab
import workload
from measure import Row, last_line, run_timed


def run(rows: dict[str, Row], *, rounds: int, n_rules: int, set_entries: int, log) -> None:
    def row(key, label, unit="s", floor="control.apply.1"):
        r = Row("control", key, label, unit, floor_key=floor)
        rows[key] = r
        return r

    nb = netlab.netbpf_cmd() + ["-n", netlab.RX_NS]
    tmp = Path(tempfile.mkdtemp(prefix="nbbench-cp-"))
    big = f"{set_entries // 1_000_000}M" if set_entries >= 1_000_000 else f"{set_entries:,}"
    p1, pn, pn_b, pset = (tmp / "one.yaml", tmp / "many.yaml", tmp / "many-b.yaml",
                          tmp / "set.yaml")
    p1.write_text(workload.policy_yaml(netlab.RX_IF, 1))
    pn.write_text(workload.policy_yaml(netlab.RX_IF, n_rules))
    pn_b.write_text(workload.policy_yaml(netlab.RX_IF, n_rules, changed=n_rules // 2))
    (tmp / "big.txt").write_text(workload.set_file_text(set_entries))
    pset.write_text(workload.set_policy_yaml(netlab.RX_IF, tmp / "big.txt"))

    # the object cache (netbpf/kernel/objcache.py) in a directory of the bench's own: emptied
    # before each "first" apply (they compile), kept for the "from the object cache" rows
    cache = tmp / "objcache"
    os.environ[objcache.ENV] = str(cache)
    a1 = row("control.apply.1", "apply, 1 rule, first (floor)", floor=None)
    a1c = row("control.apply.1.cached", "apply, 1 rule, first, program compiled before (cache)")
    m1c = row("control.rss.1.cached", "max RSS of apply, 1 rule, program from the cache", "MB",
              "control.rss.1")
    an = row(f"control.apply.{n_rules}", f"apply, {n_rules:,} rules, first")
    anc = row(f"control.apply.{n_rules}.cached",
              f"apply, {n_rules:,} rules, first, program compiled before (cache)")
    noop = row(f"control.noop.{n_rules}", f"re-apply, {n_rules:,} rules unchanged")
    one = row(f"control.change1.{n_rules}", f"re-apply, 1 of {n_rules:,} rules changed")
    st = row(f"control.stats.{n_rules}", f"stats --json, {n_rules:,} rules")
    aset = row("control.apply.set", f"apply, {big}-entry set, first")
    m1 = row("control.rss.1", "max RSS of apply, 1 rule (floor)", "MB", None)
    mn = row(f"control.rss.{n_rules}", f"max RSS of apply, {n_rules:,} rules", "MB",
             "control.rss.1")
    mset = row("control.rss.set", f"max RSS of apply, {big}-entry set", "MB", "control.rss.1")
    par = row("control.apply.parallel", "2 applies at once, 2 interfaces, 1 rule each")
    p1x = tmp / "one-xf.yaml"
    p1x.write_text(workload.policy_yaml(netlab.XF_IF, 1))
    ipt = row(f"control.iptables.{n_rules}", f"iptables-legacy-restore, {n_rules:,} rules")
    nft = row(f"control.nft.{n_rules}", f"nft -f, {n_rules:,} rules")
    setadd = row("control.setadd.100", f"re-apply, 100 entries added to a {big}-entry set")
    setdel = row("control.setdel.100", f"re-apply, those 100 entries removed again")
    mupd = row(f"control.rss.update.{n_rules}",
               f"max RSS of apply, 1 of {n_rules:,} rules changed", "MB", "control.rss.1")
    nftset = row("control.nftset.load", f"nft -f, {big}-element set", floor=None)
    nftadd = row("control.nftset.add100", f"nft add element, 100 to a {big}-element set",
                 floor=None)
    ips = row("control.ipset.load", f"ipset restore, {big} entries", floor=None)
    ipsadd = row("control.ipset.add100", f"ipset restore, 100 added to {big} entries",
                 floor=None)
    ld = row(f"control.load.{n_rules}", f"  of which load_policy(), {n_rules:,} rules")
    ldset = row("control.load.set", f"  of which load_policy(), {big}-entry set")

    def apply(path: Path, r: Row | None = None, rss: Row | None = None,
              compile: bool = False) -> str:
        if compile:
            shutil.rmtree(cache, ignore_errors=True)
        t = run_timed(nb + ["apply", str(path)])
        if r is not None:
            r.samples.append(t.wall_s)
        if rss is not None:
            rss.samples.append(t.max_rss_kb / 1024)
        return t.stdout

    def guarded(r: Row, fn) -> None:
        """A failure is recorded on its row (and the interface detached); the rest go on."""
        try:
            fn()
        except Exception as e:
            r.note = f"failed: {last_line(str(e))}"
            log(f"  {r.label}: {r.note}")
        finally:
            netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)

    def cached(path: Path, r: Row, rss: Row | None = None) -> None:
        """The same first apply again, after a detach: its program now from the cache."""
        netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
        if "loaded new programs" not in apply(path, r, rss):
            r.note = "no program was loaded"

    def big_policy() -> None:
        apply(pn, an, mn, compile=True)
        cached(pn, anc)
        apply(pn, noop)
        for path in (pn_b, pn):         # both directions: each is a one-rule edit
            out = apply(path, one, mupd)
            if "unchanged)" not in out:     # the plan must say the program (and id) stayed
                one.note = "a new program was loaded (expected a map rewrite only)"
        for _ in range(2):
            st.samples.append(run_timed(nb + ["stats", netlab.RX_IF, "--json"]).wall_s)

    def big_set() -> None:
        apply(pset, aset, mset)
        base = (tmp / "big.txt").read_text()
        extra = "".join(workload.set_src(set_entries + i) + "\n" for i in range(100))
        for text, r in ((base + extra, setadd), (base, setdel)):
            (tmp / "big.txt").write_text(text)
            if "updated in place" not in apply(pset, r):
                r.note = "not updated in place"

    def parallel() -> None:
        """rx0 and xf0 at once: with a lock per interface this takes about one apply."""
        nx = netlab.netbpf_cmd() + ["-n", netlab.XF_NS]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            runs = [ex.submit(run_timed, nb + ["apply", str(p1)]),
                    ex.submit(run_timed, nx + ["apply", str(p1x)])]
            for r in runs:
                r.result()
        par.samples.append(time.perf_counter() - t0)
        netlab.detach_netbpf(netlab.XF_NS, netlab.XF_IF)

    try:
        for k in range(rounds):
            log(f"  round {k + 1}/{rounds}")
            for _ in range(2):      # the floor twice: every other row is divided by it
                guarded(a1, lambda: apply(p1, a1, m1, compile=True))
            guarded(a1c, lambda: (apply(p1, compile=True), cached(p1, a1c, m1c)))
            guarded(par, parallel)
            guarded(an, big_policy)
            guarded(aset, big_set)
            for r, fn in ((nftset, _nft_set_load), (ips, _ipset_load)):
                try:
                    r.samples.append(fn(set_entries, nftadd if r is nftset else ipsadd))
                except Exception as e:
                    r.note = f"failed: {last_line(str(e))}"
            for r, fn in ((ipt, _iptables_load), (nft, _nft_load)):
                try:
                    r.samples.append(fn(n_rules))
                except Exception as e:
                    r.note = f"failed: {last_line(str(e))}"
            ld.samples.append(_load_time(pn))
            ldset.samples.append(_load_time(pset))
    finally:
        netlab.detach_netbpf(netlab.RX_NS, netlab.RX_IF)
        os.environ.pop(objcache.ENV, None)
        shutil.rmtree(tmp, ignore_errors=True)


def _iptables_load(n: int) -> float:
    text = workload.iptables_restore(n)
    t0 = time.perf_counter()
    netlab.in_ns(netlab.RX_NS, "iptables-legacy-restore", input=text)
    dt = time.perf_counter() - t0
    netlab.in_ns(netlab.RX_NS, "iptables-legacy", "-t", "raw", "-F", "PREROUTING")
    return dt


def _nft_load(n: int) -> float:
    text = workload.nft_rules(n)
    t0 = time.perf_counter()
    netlab.in_ns(netlab.RX_NS, "nft", "-f", "-", input=text)
    dt = time.perf_counter() - t0
    netlab.in_ns(netlab.RX_NS, "nft", "delete", "table", "ip", workload.NFT_TABLE)
    return dt


def _nft_set_load(n: int, add: Row) -> float:
    """An nft set of n addresses in one `nft -f`, then 100 more in one `nft add element`."""
    t = workload.NFT_TABLE
    text = (f"table ip {t} {{\n  set big {{\n    type ipv4_addr\n    size {2 * n}\n"
            f"    elements = {{ " + ", ".join(workload.set_src(i) for i in range(n)) + " }\n"
            f"  }}\n}}\n")
    t0 = time.perf_counter()
    netlab.in_ns(netlab.RX_NS, "nft", "-f", "-", input=text)
    dt = time.perf_counter() - t0
    try:
        more = ", ".join(workload.set_src(n + i) for i in range(100))
        t0 = time.perf_counter()
        netlab.in_ns(netlab.RX_NS, "nft", "add", "element", "ip", t, "big", f"{{ {more} }}")
        add.samples.append(time.perf_counter() - t0)
    finally:
        netlab.in_ns(netlab.RX_NS, "nft", "delete", "table", "ip", t)
    return dt


def _ipset_load(n: int, add: Row) -> float:
    """An ipset hash:ip of n addresses by `ipset restore`, then 100 more by another."""
    text = f"create nbbench hash:ip maxelem {2 * n}\n" + \
        "".join(f"add nbbench {workload.set_src(i)}\n" for i in range(n))
    t0 = time.perf_counter()
    netlab.in_ns(netlab.RX_NS, "ipset", "restore", input=text)
    dt = time.perf_counter() - t0
    try:
        more = "".join(f"add nbbench {workload.set_src(n + i)}\n" for i in range(100))
        t0 = time.perf_counter()
        netlab.in_ns(netlab.RX_NS, "ipset", "restore", input=more)
        add.samples.append(time.perf_counter() - t0)
    finally:
        netlab.in_ns(netlab.RX_NS, "ipset", "destroy", "nbbench")
    return dt


def _load_time(path: Path) -> float:
    t0 = time.perf_counter()
    load_policy(path)
    return time.perf_counter() - t0
