"""Selftest: probe packets generated from the last applied policy run through a copy of each
attached program (BPF_PROG_TEST_RUN); every verdict and every rule counter must be what the
policy model (compile.simulate on the file's own compilation) says.

A disagreement is attributed to the rule whose probe (or counter) showed it. Reads the kernel
(netbpf/observe/inspect.py) and the applied file's copy (netbpf/store/snapshot.py); changes nothing live.
"""
from __future__ import annotations

from collections import Counter
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


def selftest(key: str) -> list[RuleResult]:
    st = interface_state(key)
    ir = applied_policy(key)
    iface = ir.interfaces.get(st.ifname)
    results: list[RuleResult] = []
    for d, part in st.parts.items():
        dir_ir = (getattr(iface, d) if iface else None) or DirectionIR("allow")
        c = compile_direction(dir_ir, ir.sets)
        slot = {r.name: r.slot for r in part.rules}
        terminal = [r.name for r in dir_ir.rules if r.action != "count"]
        counting = [r.name for r in dir_ir.rules if r.action == "count"]
        expected: Counter[int] = Counter()
        owner: dict[int, RuleResult] = {}
        with ProgramCopy(st, d) as copy:
            for r in dir_ir.rules:
                res = RuleResult(d, r.name)
                results.append(res)
                owner[slot.get(r.name, -1)] = res
                for pkt in rule_probes(r, ir.sets)[:MAX_PROBES_PER_RULE]:
                    dec = simulate(c, ir.sets, pkt)
                    want = model_verdict(dec, c)
                    got = copy.verdict(frame(pkt))
                    res.probes += 1
                    if dec.terminal is not None:
                        expected[slot.get(terminal[dec.terminal], -1)] += 1
                    for i in dec.counted:
                        expected[slot.get(counting[i], -1)] += 1
                    if not same_verdict(want, got):
                        who = terminal[dec.terminal] if dec.terminal is not None else "default"
                        res.failures.append(f"{pkt_text(pkt)}: the policy says {want} "
                                            f"({who}), the program {got}")
            counted = copy.counters()
        for s, res in owner.items():
            if counted.get(s, 0) != expected.get(s, 0):
                res.failures.append(f"counter: the program counted {counted.get(s, 0)} of the "
                                    f"probes, the policy expects {expected.get(s, 0)}")
        stray = {s: n for s, n in counted.items() if s not in owner and n}
        if stray:
            results.append(RuleResult(d, "(unknown slots)", 0, [
                f"slot {s} counted {n} probes but belongs to no rule" for s, n in stray.items()]))
    return results
