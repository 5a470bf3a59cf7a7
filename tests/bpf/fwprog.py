"""The real firewall program, loaded once per session, and a way to install a policy into it.

Installs exactly as `netbpf apply` does (compile -> FwTables.write_generation -> flip), but
into unpinned maps of a program that is never attached: verdicts come from BPF_PROG_TEST_RUN.
"""
from __future__ import annotations

from netbpf import abi
from netbpf.store.progspec import FW_PROG, FW_SOURCE
from netbpf.fw.compile import compile_direction
from netbpf.fw.fwtables import FwTables
from netbpf.policy.ir import DirectionIR, SetIR
from netbpf.kernel.loader import load_program
from netbpf.kernel.testrun import test_run as run_prog
from netbpf.fw.reject import REJECT_ENTRY, link_reject_entry

XDP_VERDICTS = {1: "drop", 2: "pass", 0: "aborted", 3: "tx", 4: "redirect"}


class FwProg:
    def __init__(self, words: int, class_cap: int, fields: int | None = None,
                 chunks: int = 64):
        """fields: NB_FIELDS to build with (None: every field, as a superset policy would)."""
        defines = {"NB_WORDS": words, "NB_CLASS_CAP": class_cap, "NB_DIR_CHUNKS": chunks}
        if fields is not None:
            defines["NB_FIELDS"] = fields
        self.loaded = load_program(FW_SOURCE, defines,
                                   {FW_PROG: "xdp", REJECT_ENTRY["xdp"]: "xdp"}, cache=True)
        link_reject_entry(self.loaded, "xdp")
        self.tables = FwTables.from_loaded(self.loaded, words, class_cap)
        self.fd = self.loaded.prog_fd(FW_PROG)
        self.compiled = None
        self.slots: dict[str, int] = {}
        self._tags: list[int] = []

    def install(self, d: DirectionIR, sets: dict[str, SetIR] | None = None) -> None:
        """Make d the running policy (next generation), with zeroed counters."""
        sets = sets or {}
        c = compile_direction(d, sets)
        for tag in self._tags:
            self.tables.delete_set(tag)
        names = sorted({r.set_name for r in c.setrefs})
        tags = {n: i + 1 for i, n in enumerate(names)}
        self._tags = list(tags.values())
        for n, t in tags.items():
            self.tables.write_set(t, sets[n])
        nslots = len(c.rules) + len(c.count_rules)
        rule_slots = list(range(len(c.rules)))
        count_slots = list(range(len(c.rules), nslots))
        self.tables.zero_slots(list(range(abi.slot_cap(self.tables.words))))
        self.tables.zero_slots_stats()
        gen = 1 - self.tables.active_gen()
        self.tables.write_generation(gen, c, rule_slots, count_slots, tags)
        self.tables.flip(gen)
        self.tables.clear_generation(1 - gen)
        self.compiled = c
        self.slots = {r.name: s for r, s in zip(c.rules, rule_slots)}
        self.slots.update({r.name: s for r, s in zip(c.count_rules, count_slots)})

    def run(self, packet: bytes, repeat: int = 1) -> str:
        return XDP_VERDICTS[run_prog(self.fd, packet, repeat=repeat).retval]

    def counter(self, name: str) -> tuple[int, int, int]:
        return self.tables.read_counters().get(self.slots[name], (0, 0, 0))

    def totals(self) -> dict[str, int]:
        raw = self.tables.read_counters("nb_fw_stats")
        return {n: raw.get(i, (0, 0, 0))[0] for i, n in abi.STAT_NAMES.items()}
