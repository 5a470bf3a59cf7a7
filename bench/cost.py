"""Section 1: what one packet costs, in ns, through BPF_PROG_TEST_RUN (the kernel runs the
program `repeat` times on one frame and reports the average). No attach, no traffic: the
program alone, next to an empty program (the floor), parsing alone, and xdp-filter.

netbpf's programs are built and filled by apply's own recipe (netbpf/fw/program.py: the
shape apply would choose, tables written as a generation, flip), loaded but never attached.
"""
from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from netbpf import abi
from netbpf.fw.program import build_program
from netbpf.fw.compile import choose_shape, compile_direction
from netbpf.kernel import bpfsys
from netbpf.kernel.loader import load_program
from netbpf.kernel.testrun import XDP_DROP, XDP_PASS, test_run
from netbpf.store.progspec import ProgramSpec

import netlab
import packets
import workload
from workload import rules_label as _rules
from measure import Row

PROGS = Path(__file__).resolve().parent / "progs"
XDP_FILTER_FEATURES = "ipv4"     # picks xdpfilt_alw_ip: the smallest variant that filters by IP


class Subject:
    """A program fd and one frame to run it on, with the verdict it must give."""

    def __init__(self, row: Row, fd, frame: bytes, verdict: int):
        self.row, self.fd, self.frame, self.verdict = row, fd, frame, verdict

    def measure(self, repeat: int) -> None:
        r = test_run(self.fd, self.frame, repeat=repeat)
        if r.retval != self.verdict:
            raise RuntimeError(f"{self.row.label}: verdict {r.retval}, expected {self.verdict}"
                               " (the benchmark would time the wrong path)")
        # The kernel's own average, in whole ns. Not wall time: each test run also pays a
        # fixed 10-40 ms of setup here, which would swamp a 3 ns program even at 1e6 repeats.
        self.row.samples.append(float(r.duration_ns))


class Firewall:
    """The firewall program at the shape apply picks for a policy, with that policy in it."""

    def __init__(self, d, sets=None):
        sets = sets or {}
        c = compile_direction(d, sets)
        self.compiled = c
        self.shape = choose_shape(c.nrules, c.nclasses, None, len(c.dir.chunks))
        # built as apply builds it: the shape it picks, only the fields the rules use
        self.prog = build_program(ProgramSpec(words=self.shape.words,
                                              class_cap=self.shape.class_cap,
                                              chunks=self.shape.chunks, fields=c.field_mask))
        self.loaded, self.tables = self.prog.loaded, self.prog.tables
        t0 = time.perf_counter()
        self.prog.install(c, sets)          # sets, counters, one generation, flip
        self.install_s = time.perf_counter() - t0
        self.fd = self.prog.fd

    def close(self) -> None:
        self.loaded.close()


def _frame(src: str) -> bytes:
    return packets.udp4(src, netlab.RX_IP, dport=workload.DPORT, smac=netlab.TX_MAC,
                        dmac=netlab.RX_MAC)


def run(rows: dict[str, Row], *, rounds: int, repeat: int, rule_counts: list[int],
        set_entries: int, log, classbench_rules: int = 10_000) -> None:
    def row(key, label, floor="cost.empty"):
        r = Row("cost", key, label, "ns", floor_key=floor)
        rows[key] = r
        return r

    keep = []               # loaded programs stay open until every round is done
    subjects: list[Subject] = []
    try:
        empty = load_program(PROGS / "empty.bpf.c", {}, {"nb_bench_empty": "xdp"})
        parse = load_program(PROGS / "parse_only.bpf.c", {}, {"nb_bench_parse": "xdp"})
        keep += [empty, parse]
        miss = _frame(workload.MISS_SRC)
        subjects.append(Subject(row("cost.empty", "empty XDP program (floor)", None),
                                empty.prog_fd("nb_bench_empty"), miss, XDP_PASS))
        subjects.append(Subject(row("cost.parse", "parse only (parse.h)"),
                                parse.prog_fd("nb_bench_parse"), miss, XDP_PASS))
        for n in rule_counts:
            log(f"  netbpf with {n} rules: compile, load, write tables")
            fw = Firewall(workload.direction(n))
            keep.append(fw)
            shape = f"{fw.shape.words}w/{fw.shape.class_cap}c"
            hit = row(f"cost.netbpf.{n}.hit", f"netbpf {_rules(n)}, hit last")
            hit.extra["shape"] = shape
            subjects.append(Subject(hit, fw.fd, _frame(workload.hit_src(n)), XDP_DROP))
            subjects.append(Subject(row(f"cost.netbpf.{n}.miss", f"netbpf {_rules(n)}, miss"),
                                    fw.fd, miss, XDP_PASS))
        if set_entries:
            log(f"  netbpf with a {set_entries:,}-entry set: build, load, write the trie")
            try:
                big = workload.big_set(set_entries)
                fw = Firewall(workload.set_direction(), {"big": big})
                keep.append(fw)
                label = f"{set_entries // 1_000_000}M" if set_entries >= 1_000_000 \
                    else f"{set_entries:,}"
                h = row("cost.set.hit", f"netbpf {label}-entry set, hit")
                h.extra["install_s"] = round(fw.install_s, 2)
                subjects.append(Subject(h, fw.fd,
                                        _frame(workload.set_src(set_entries - 1)), XDP_DROP))
                subjects.append(Subject(row("cost.set.miss", f"netbpf {label}-entry set, miss"),
                                        fw.fd, _frame(workload.SET_MISS_SRC), XDP_PASS))
            except Exception as e:      # recorded, not fatal: the other figures still stand
                row("cost.set.hit", "netbpf set, hit").note = f"failed: {e}"
        # rounds interleave the subjects, so a noisy moment spreads over all of them
        for _ in range(rounds):
            for s in subjects:
                s.measure(repeat)
        if classbench_rules:
            import cbcost
            cbcost.run(row, Firewall, kinds=("acl", "fw", "ipc"),
                       families=(4, 6), rules=classbench_rules, headers=10_000, rounds=rounds,
                       repeat=repeat, log=log)
    finally:
        for k in keep:
            k.close()

    _xdp_filter(rows, row, rounds=rounds, repeat=repeat, n_big=max(rule_counts), log=log)
    try:
        _lb(row, rounds=rounds, repeat=repeat, log=log)
    except Exception as e:          # recorded, not fatal
        row("cost.lb.established", "LB path, established flow").note = f"failed: {e}"


def _lb(row, *, rounds: int, repeat: int, log) -> None:
    """The load balancer's path beside the 1-rule firewall path it extends: the firewall
    program of the 1-rule policy built with the balancer (`NB_LB`), one VIP over three
    backends; the frame misses the rule, so the firewall allows it and the balancer takes it.
    DSR, so a repeated packet stays a VIP packet (NAT would rewrite it into a non-VIP packet
    on the first of the repeats); the FIB lookup fails under test_run (no route on its
    device), so the verdict is XDP_DROP after the whole balancing path.
    A new flow cannot be repeated (the first run records it), so it is timed one run at a
    time over distinct source ports, beside the 1-rule firewall timed the same way."""
    from netbpf.policy.ir import BackendIR, LoadBalancerIR
    from netbpf.lb.lbtables import LbState, LbTables, plan_lb

    log("  load balancer path: compile, load, write a VIP")
    c = compile_direction(workload.direction(1))
    balancer = build_program(ProgramSpec(fields=c.field_mask, lb_ring_cap=abi.NB_LB_RING_CAP))
    fw1 = Firewall(workload.direction(1))
    empty = load_program(PROGS / "empty.bpf.c", {}, {"nb_bench_empty": "xdp"})
    try:
        balancer.install(c)
        vip = int(ipaddress.ip_address(netlab.RX_IP))
        lb = LoadBalancerIR("bench", "rx0", 4, vip, workload.DPORT, 17, "dsr",
                            tuple(BackendIR(4, vip + 100 + i, workload.DPORT, 1)
                                  for i in range(3)), 65537)
        new, changed = plan_lb([lb], LbState(), abi.NB_LB_RING_CAP)
        LbTables.from_loaded(balancer.loaded).write([lb], new, changed, None, set())
        fd = balancer.fd
        est = row("cost.lb.established", "LB path, established flow", "cost.netbpf.1.miss")
        frame = _frame(workload.MISS_SRC)
        test_run(fd, frame)                       # records the flow
        for _ in range(rounds):
            r = test_run(fd, frame, repeat=repeat)
            if r.retval != XDP_DROP:
                raise RuntimeError(f"LB established: verdict {r.retval}, expected XDP_DROP")
            est.samples.append(float(r.duration_ns))
        single_empty = row("cost.empty.single", "empty XDP program, one run at a time",
                           "cost.fw1.single")
        single_fw = row("cost.fw1.single", "netbpf 1 rule, miss, one run at a time", None)
        fresh = row("cost.lb.new", "LB path, new flow (one run at a time)", "cost.fw1.single")
        efd = empty.prog_fd("nb_bench_empty")
        for rnd in range(rounds):
            ns_new, ns_fw, ns_empty = [], [], []
            for i in range(400):
                sport = 10000 + rnd * 400 + i
                f = packets.udp4(workload.MISS_SRC, netlab.RX_IP, dport=workload.DPORT,
                                 sport=sport, smac=netlab.TX_MAC, dmac=netlab.RX_MAC)
                r = test_run(fd, f)
                if r.retval != XDP_DROP:
                    raise RuntimeError(f"LB new flow: verdict {r.retval}, expected XDP_DROP")
                ns_new.append(r.duration_ns)
                ns_fw.append(test_run(fw1.fd, f).duration_ns)
                ns_empty.append(test_run(efd, f).duration_ns)
            for r, ns in ((fresh, ns_new), (single_fw, ns_fw), (single_empty, ns_empty)):
                r.samples.append(float(sorted(ns)[len(ns) // 2]))
    finally:
        balancer.close()
        fw1.close()
        empty.close()


def _xdp_filter(rows, row, *, rounds: int, repeat: int, n_big: int, log) -> None:
    """xdp-filter as its users run it: loaded by its own CLI, first address added by its own
    CLI; the value that CLI wrote is then copied to n_big - 1 more addresses in one batch
    (calling the CLI 10,000 times would take minutes and measure nothing new)."""
    n_big = min(n_big, 10_000)          # xdp-filter's filter_ipv4 holds 10,000 entries
    hit1 = row("cost.xdpfilter.1.hit", "xdp-filter 1 address, hit")
    try:
        log("  xdp-filter: load (skb mode, no dispatcher) and add addresses")
        # no libxdp dispatcher: the program itself is attached and test-run, as netbpf's is
        netlab.in_netns_only(netlab.XF_NS, "xdp-filter", "load", netlab.XF_IF, "--mode", "skb",
                             "-f", XDP_FILTER_FEATURES, env={"LIBXDP_SKIP_DISPATCHER": "1"})
        netlab.in_netns_only(netlab.XF_NS, "xdp-filter", "ip", workload.hit_src(1),
                             "--mode", "src")
        prog_id = netlab.xdp_prog_id(netlab.XF_NS, netlab.XF_IF)
        fd = bpfsys.prog_get_fd_by_id(prog_id)
        info = bpfsys.prog_info(fd)
        hit1.extra["program"] = info.name
        miss = _frame(workload.MISS_SRC)
        one = [Subject(hit1, fd, _frame(workload.hit_src(1)), XDP_DROP),
               Subject(row("cost.xdpfilter.1.miss", "xdp-filter 1 address, miss"), fd, miss,
                       XDP_PASS)]
        for _ in range(rounds):
            for s in one:
                s.measure(repeat)

        m = bpfsys.obj_get("/sys/fs/bpf/xdp-filter/filter_ipv4")
        vals = bpfsys.map_lookup_percpu(m, _ip_key(workload.hit_src(1)), 8)
        stride = b"".join(v.ljust(8, b"\0") for v in vals)
        keys = b"".join(_ip_key(workload.rule_src(i)) for i in range(1, n_big))
        bpfsys.map_update_batch(m, keys, stride * (n_big - 1), n_big - 1)
        many = [Subject(row(f"cost.xdpfilter.{n_big}.hit", f"xdp-filter {n_big:,} addresses, hit"),
                        fd, _frame(workload.hit_src(n_big)), XDP_DROP),
                Subject(row(f"cost.xdpfilter.{n_big}.miss",
                            f"xdp-filter {n_big:,} addresses, miss"), fd, miss, XDP_PASS)]
        for _ in range(rounds):
            for s in many:
                s.measure(repeat)
        m.close()
        fd.close()
    except Exception as e:
        hit1.note = f"failed: {e}"
    finally:
        netlab.in_netns_only(netlab.XF_NS, "xdp-filter", "unload", netlab.XF_IF, check=False)


def _ip_key(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed      # xdp-filter keys are addresses as on the wire
