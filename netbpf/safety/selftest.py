"""Selftest: probe packets generated from the last applied policy run through a copy of each
attached program (BPF_PROG_TEST_RUN); every verdict and every rule counter must be what the
policy model (compile.simulate on the file's own compilation) says.

A disagreement is attributed to the rule whose probe (or counter) showed it. Reads the kernel
(netbpf/observe/inspect.py) and the applied file's copy (netbpf/store/snapshot.py); changes nothing live.
The program copies compile (bcc, outside the GIL) on a worker thread while the model works out
every probe's frame and expected verdict, so a 10,000-rule policy takes seconds.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from netbpf.fw.compile import Pkt, compile_direction, simulate, verdict
from netbpf.errors import NetbpfError
from netbpf.observe.inspect import ProgramCopy, interface_state, same_verdict
from netbpf.policy.ir import DirectionIR, addr_text
from netbpf.safety.probe import frame, rule_probes

MAX_PROBES_PER_RULE = 40


@dataclass
class RuleResult:
    direction: str
    name: str
    probes: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class _Probe:
    """One probe packet and what the model says of it."""
    pkt: Pkt
    data: bytes
    want: str
    who: str


def pkt_text(p: Pkt) -> str:
    from netbpf.policy.vocab import proto_name

    def end(addr: int, port: int | None) -> str:
        text = addr_text(p.family, addr)
        if port is None:
            return text
        return f"[{text}]:{port}" if p.family == 6 else f"{text}:{port}"

    icmp = f" type {p.icmp_type} code {p.icmp_code}" if p.icmp_type is not None else ""
    flags = f" flags {p.tcp_flags:#04x}" if p.tcp_flags is not None else ""
    return (f"{proto_name(p.proto)} {end(p.src, p.sport)} -> {end(p.dst, p.dport)}"
            f"{icmp}{flags}")


def applied_policy(key: str):
    from netbpf.safety.plandiff import old_policy

    ir = old_policy(key)
    if ir is None:
        raise NetbpfError(f"{key}: no copy of the applied policy file (re-apply it with this "
                          "netbpf); the model needs it")
    return ir


def model_verdict(decision, c) -> str:
    """pass | drop | rate_limit (either, by the bucket)."""
    v = verdict(decision, c)
    return {"allow": "pass", "default-allow": "pass", "drop": "drop",
            "default-drop": "drop"}.get(v, v)


def _model(direction: str, part, dir_ir: DirectionIR, sets) -> tuple[
        list[tuple[RuleResult, list[_Probe]]], Counter[int], dict[int, RuleResult]]:
    """Per rule its probes with the model's verdicts; the counter each slot should end with."""
    c = compile_direction(dir_ir, sets)
    slot = {r.name: r.slot for r in part.rules}
    terminal = [slot.get(r.name, -1) for r in dir_ir.rules if r.action != "count"]
    terminal_names = [r.name for r in dir_ir.rules if r.action != "count"]
    counting = [slot.get(r.name, -1) for r in dir_ir.rules if r.action == "count"]
    expected: Counter[int] = Counter()
    owner: dict[int, RuleResult] = {}
    out = []
    for r in dir_ir.rules:
        res = RuleResult(direction, r.name)
        owner[slot.get(r.name, -1)] = res
        probes = []
        for pkt in list(dict.fromkeys(rule_probes(r, sets)))[:MAX_PROBES_PER_RULE]:
            dec = simulate(c, sets, pkt)
            if dec.terminal is not None:
                expected[terminal[dec.terminal]] += 1
            for i in dec.counted:
                expected[counting[i]] += 1
            who = terminal_names[dec.terminal] if dec.terminal is not None else "default"
            probes.append(_Probe(pkt, frame(pkt), model_verdict(dec, c), who))
        out.append((res, probes))
    return out, expected, owner


def _run(copy: ProgramCopy, model, expected: Counter[int], owner: dict[int, RuleResult],
         direction: str) -> list[RuleResult]:
    results = []
    run = copy.verdict
    for res, probes in model:
        results.append(res)
        res.probes = len(probes)
        for p in probes:
            got = run(p.data)
            if got != p.want and not same_verdict(p.want, got):
                res.failures.append(f"{pkt_text(p.pkt)}: the policy says {p.want} "
                                    f"({p.who}), the program {got}")
    counted = copy.counters()
    for s, res in owner.items():
        if counted.get(s, 0) != expected.get(s, 0):
            res.failures.append(f"counter: the program counted {counted.get(s, 0)} of the "
                                f"probes, the policy expects {expected.get(s, 0)}")
    stray = {s: n for s, n in counted.items() if s not in owner and n}
    if stray:
        results.append(RuleResult(direction, "(unknown slots)", 0, [
            f"slot {s} counted {n} probes but belongs to no rule" for s, n in stray.items()]))
    return results


def selftest(key: str) -> list[RuleResult]:
    st = interface_state(key)
    with ThreadPoolExecutor(1, thread_name_prefix="selftest-compile") as pool:
        compiling = [pool.submit(ProgramCopy.compile, st, d) for d in st.parts]
        try:
            ir = applied_policy(key)
            iface = ir.interfaces.get(st.ifname)
            models = {d: _model(d, part, (getattr(iface, d) if iface else None)
                                or DirectionIR("allow"), ir.sets)
                      for d, part in st.parts.items()}
        except BaseException:
            for f in compiling:
                f.cancel()
            raise
        for f in compiling:
            f.result()                    # a compile error is the selftest's error
    results: list[RuleResult] = []
    for d, (model, expected, owner) in models.items():
        with ProgramCopy(st, d) as copy:  # the compiled program, from the loader's cache
            results += _run(copy, model, expected, owner, d)
    return results
