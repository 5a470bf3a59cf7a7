"""Section 1, ClassBench-like rows: what a packet costs in a 10k-rule acl/fw/ipc set (IPv4 and
IPv6, bench/classbench.py) beside a 1-rule program built with the same fields, same run.

Deepest rule and miss: BPF_PROG_TEST_RUN with repeat, like every other cost row. The trace
mean (10,000 headers) cannot use repeat: on this kernel a call with repeat > 1 pays ~20 ms of
fixed setup, so each header is run once (~11 us a call) and the kernel's duration of that one
run is averaged over the trace; one-run durations carry a fixed timer overhead, so the empty
program and the 1-rule program are timed the same way over the same headers.
"""
from __future__ import annotations

import statistics

from netbpf.compile import reference_match
from netbpf.ir import AddrMatch, DirectionIR, Prefix, RuleIR
from netbpf.kernel.testrun import XDP_DROP, XDP_PASS, test_run

import classbench

XDP = {"drop": XDP_DROP, "allow": XDP_PASS}


def one_rule(family: int) -> tuple[DirectionIR, bytes]:
    """A 1-rule policy on the five fields, and a frame that hits it."""
    if family == 4:
        src, dst = Prefix(4, 10 << 24, 8), Prefix(4, 10 << 24 | 1 << 16, 16)
    else:
        src, dst = Prefix(6, classbench.V6_BASE, 40), Prefix(6, classbench.V6_BASE, 48)
    r = RuleIR("one", "drop", src=AddrMatch((src,)), dst=AddrMatch((dst,)), proto=17,
               sport=((1024, 65535),), dport=((53, 53),))
    pkt = classbench.Pkt(family, src.addr | 5, dst.addr | 9, 17, sport=40000, dport=53)
    return DirectionIR(default="allow", rules=(r,)), classbench.frame(pkt)


def run(row, firewall_cls, empty_fd, *, kinds, families, rules: int, headers: int,
        rounds: int, repeat: int, log) -> None:
    keep = []
    try:
        ones = {}
        for fam in families:
            d, f = one_rule(fam)
            fw = firewall_cls(d)
            keep.append(fw)
            ones[fam] = (fw, f)
        for kind in kinds:
            for fam in families:
                log(f"  ClassBench-like {kind} IPv{fam}, {rules:,} rules: generate, compile, load")
                _one_set(row, firewall_cls, keep, ones[fam], empty_fd, kind, fam, rules=rules,
                         headers=headers, rounds=rounds, repeat=repeat)
    finally:
        for k in keep:
            k.close()


def _timed(fd, frame: bytes, repeat: int, verdict: int | None) -> float:
    r = test_run(fd, frame, repeat=repeat)
    if verdict is not None and r.retval != verdict:
        raise RuntimeError(f"verdict {r.retval}, expected {verdict}: the wrong path is timed")
    return float(r.duration_ns)


def _one_set(row, firewall_cls, keep, one, empty_fd, kind, fam, *, rules, headers, rounds,
             repeat) -> None:
    d = classbench.ruleset(kind, rules, fam, seed=1)
    fw = firewall_cls(d)
    keep.append(fw)
    one_fw, one_frame = one
    tag = f"cost.cb.{kind}{fam}"
    floor_key = f"cost.cb.one{fam}"
    if floor_key not in _made:
        _made[floor_key] = row(floor_key, f"1-rule program, 5 fields, IPv{fam}, hit")
    one_row = _made[floor_key]
    trace = classbench.trace(d, headers, fam, seed=2)
    terminal = [r for r in d.rules if r.action != "count"]
    decided = [reference_match(d, None, p).terminal for p in trace]
    deep_i = max(range(len(trace)), key=lambda i: -1 if decided[i] is None else decided[i])
    deep_rule = terminal[decided[deep_i]]
    frames = [classbench.frame(p) for p in trace]
    miss = classbench.frame(classbench.miss(fam))
    deep = row(f"{tag}.deep", f"{kind} IPv{fam} {len(terminal):,} rules, deepest rule hit",
               floor_key)
    deep.extra.update(rule=decided[deep_i], shape=f"{fw.shape.words}w/{fw.shape.class_cap}c/"
                      f"{fw.shape.chunks}ch", classes=fw.compiled.nclasses,
                      chunks=len(fw.compiled.dir.chunks), kernel_bytes=fw.tables.memory_bytes())
    missr = row(f"{tag}.miss", f"{kind} IPv{fam} {len(terminal):,} rules, miss", floor_key)
    subjects = [(deep, fw.fd, frames[deep_i], XDP[deep_rule.action]),
                (missr, fw.fd, miss, XDP_PASS)]
    if not one_row.samples:
        subjects.append((one_row, one_fw.fd, one_frame, XDP_DROP))
    for _ in range(rounds):
        for r, fd, f, v in subjects:
            r.samples.append(_timed(fd, f, repeat, v))

    # trace mean, one run per header, interleaved with the 1-rule and empty programs
    label = f"{kind} IPv{fam}"
    one_tr = row(f"{tag}.trace.one", f"{label}: 1-rule program, same headers", None)
    empty_tr = row(f"{tag}.trace.empty", f"{label}: empty program, same headers", None)
    tr = row(f"{tag}.trace", f"{label} trace mean ({len(frames):,} headers, one run each)",
             f"{tag}.trace.one")
    for _ in range(rounds):
        a, b, c = [], [], []
        for i, f in enumerate(frames):
            want = XDP_PASS if decided[i] is None else XDP[terminal[decided[i]].action]
            a.append(_timed(fw.fd, f, 1, want))
            b.append(_timed(one_fw.fd, f, 1, None))
            c.append(_timed(empty_fd, f, 1, None))
        tr.samples.append(statistics.fmean(a))
        one_tr.samples.append(statistics.fmean(b))
        empty_tr.samples.append(statistics.fmean(c))


_made: dict = {}
