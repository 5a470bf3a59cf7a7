"""The real firewall program, loaded once per session, and a way to install a policy into it.

Built and installed by the engine's own recipe (netbpf/fw/program.py: load with the spec's
defines, link the tail calls, write the inactive generation, flip), into unpinned maps of a
program that is never attached: verdicts come from BPF_PROG_TEST_RUN.
"""
from __future__ import annotations

from netbpf import abi
from netbpf.fw.program import build_program
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.policy.ir import DirectionIR, SetIR
from netbpf.store.progspec import ProgramSpec

XDP_VERDICTS = {1: "drop", 2: "pass", 0: "aborted", 3: "tx", 4: "redirect"}


class FwProg:
    def __init__(self, words: int, class_cap: int, fields: int | None = None,
                 chunks: int = 64, direction: str = "ingress", hook: str = "xdp"):
        """fields: NB_FIELDS to build with (None: every field, as a superset policy would)."""
        spec = ProgramSpec.for_part(direction, hook, words=words, class_cap=class_cap,
                                    chunks=chunks, fields=fields)
        self.prog = build_program(spec, cache=True)
        self.loaded, self.tables, self.fd = self.prog.loaded, self.prog.tables, self.prog.fd

    @property
    def compiled(self):
        return self.prog.compiled

    @property
    def slots(self) -> dict[str, int]:
        return self.prog.slots

    def install(self, d: DirectionIR, sets: dict[str, SetIR] | None = None) -> None:
        """Make d the running policy (next generation), with zeroed counters."""
        self.prog.install(d, sets)

    def run(self, packet: bytes, repeat: int = 1) -> str:
        return XDP_VERDICTS[run_prog(self.fd, packet, repeat=repeat).retval]

    def counter(self, name: str) -> tuple[int, int, int]:
        return self.tables.read_counters().get(self.slots[name], (0, 0, 0))

    def totals(self) -> dict[str, int]:
        raw = self.tables.read_counters(abi.NB_MAP_FW_STATS)
        return {n: raw.get(i, (0, 0, 0))[0] for i, n in abi.STAT_NAMES.items()}
