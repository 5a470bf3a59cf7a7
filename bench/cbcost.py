"""Section 1, ClassBench-like rows: what a packet costs in a 10k-rule acl/fw/ipc set (IPv4 and
IPv6, bench/classbench.py) beside a 1-rule program built with the same fields, same run.

Deepest rule and miss: BPF_PROG_TEST_RUN with repeat, like every other cost row. Trace mean:
a call with repeat > 1 pays ~20 ms of fixed setup on this kernel, so timing all 10,000 headers
would take 200 s per set; a uniform sample of 200 of them is timed with repeat 2,000 (one
run per call is no substitute: it measures a cold cache, 5x the warm cost even for 1 rule).
"""
from __future__ import annotations

import random
import statistics

from netbpf.fw.compile import simulate
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR
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


def run(row, firewall_cls, *, kinds, families, rules: int, headers: int,
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
                _one_set(row, firewall_cls, keep, ones[fam], kind, fam, rules=rules,
                         headers=headers, rounds=rounds, repeat=repeat)
    finally:
        for k in keep:
            k.close()


def _timed(fd, frame: bytes, repeat: int, verdict: int | None) -> float:
    r = test_run(fd, frame, repeat=repeat)
    if verdict is not None and r.retval != verdict:
        raise RuntimeError(f"verdict {r.retval}, expected {verdict}: the wrong path is timed")
    return float(r.duration_ns)


def _one_set(row, firewall_cls, keep, one, kind, fam, *, rules, headers, rounds,
             repeat, sample_size: int = 200, trace_repeat: int = 2000) -> None:
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
    # the model of the program (property-tested against the rule loop, which would take
    # ~14 ms a header at 10k rules): every run's verdict is checked against it
    decided = [simulate(fw.compiled, None, p).terminal for p in trace]
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

    # trace mean: a uniform sample of the trace's headers, each timed with repeat like every
    # other row (see the module text for why not all of them); the sample is the same for
    # every round, and the verdict of each is checked against the model
    rng = random.Random(f"sample-{kind}-{fam}")
    sample = rng.sample(range(len(frames)), min(sample_size, len(frames)))
    tr = row(f"{tag}.trace", f"{kind} IPv{fam} trace mean ({len(sample)} of {len(frames):,} "
             "headers)", floor_key)
    tr.extra["trace_headers"] = len(frames)
    for _ in range(rounds):
        ns = []
        for i in sample:
            want = XDP_PASS if decided[i] is None else XDP[terminal[decided[i]].action]
            ns.append(_timed(fw.fd, frames[i], trace_repeat, want))
        tr.samples.append(statistics.fmean(ns))


_made: dict = {}
