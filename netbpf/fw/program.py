"""The firewall program, built by the one recipe that turns a ProgramSpec into a program:
compile and load it with the spec's defines, link its tail calls (the reject replies, the
balancer), open its tables; and the one way a policy is written into them (sets, then a whole
generation) and made live (flip). The apply engine, ProgramCopy (explain/selftest), the tests
and bench all use it.

Not planning or pinning (engine/apply.py), not attach (kernel/attach.py), not map layouts
(fwtables.py, lb/lbtables.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from netbpf import abi
from netbpf.fw.compile import CompiledDirection, compile_direction
from netbpf.fw.fwtables import FwTables
from netbpf.kernel import bpfsys
from netbpf.kernel.loader import Loaded, load_program
from netbpf.policy.ir import DirectionIR, SetIR
from netbpf.store.progspec import ProgramSpec


@dataclass
class Program:
    """A loaded, linked, never attached firewall program and its classifier tables."""
    spec: ProgramSpec
    loaded: Loaded
    tables: FwTables
    compiled: CompiledDirection | None = None     # what install() last made live
    slots: dict[str, int] = field(default_factory=dict)     # rule name -> counter slot
    _tags: list[int] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.loaded.prog_fd(self.spec.func)

    def install(self, policy: DirectionIR | CompiledDirection,
                sets: dict[str, SetIR] | None = None) -> int:
        """Make policy the running one as a rule edit of `netbpf apply` does: sets under
        fresh tags, zeroed counters, the inactive generation written, the flip, the old
        generation cleared. Rules take slots 0..n-1. Returns the live generation."""
        sets = sets or {}
        c = policy if isinstance(policy, CompiledDirection) else compile_direction(policy, sets)
        t = self.tables
        for tag in self._tags:
            t.delete_set(tag)
        tags = {n: i + 1 for i, n in enumerate(sorted({r.set_name for r in c.setrefs}))}
        self._tags = list(tags.values())
        n = len(c.rules) + len(c.count_rules)
        t.zero_slots(list(range(abi.slot_cap(t.words))))
        t.zero_slots_stats()
        gen = 1 - t.active_gen()
        write_policy(t, gen, c, list(range(n)), tags, {name: sets[name] for name in tags})
        t.flip(gen)
        t.clear_generation(1 - gen)
        self.compiled = c
        self.slots = {r.name: i for i, r in enumerate(list(c.rules) + list(c.count_rules))}
        return gen

    def close(self) -> None:
        self.loaded.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_program(spec: ProgramSpec, *, cache: bool = False, device: str | None = None,
                  stored: bool = False, load: Callable | None = None) -> Program:
    """Compile and load spec's source with its defines, point the tail-call slots at the
    reply builder and the balancer loaded beside it (until then a reject only drops and a
    VIP packet passes), open the tables.
    cache=True shares one load per identical spec in this process (tests, explain);
    stored=True loads a spec compiled before from the object cache (kernel/objcache.py).
    load: the loader instead of bcc's (the apply engine passes its kernel's,
    netbpf/kernel/api.py)."""
    if load is None:
        loaded = load_program(spec.source, spec.defines(), spec.functions(), cache=cache,
                              device=device, stored=stored)
    else:
        loaded = load(spec.source, spec.defines(), spec.functions(), device=device,
                      stored=stored)
    try:
        for jump, func in spec.tail_calls().items():
            bpfsys.map_update(loaded.maps[jump].fd, abi.U32.pack(0),
                              abi.U32.pack(loaded.prog_fd(func)))
        tables = FwTables.from_loaded(loaded, spec.words, spec.class_cap)
    except BaseException:
        loaded.close()
        raise
    return Program(spec, loaded, tables)


def write_policy(tables: FwTables, gen: int, c: CompiledDirection, slots: list[int],
                 tags: dict[str, int], to_write: dict[str, SetIR],
                 samples: list[int] | None = None, default_sample: int = 0,
                 on_set: Callable[[str, SetIR], None] | None = None) -> None:
    """Write the sets in to_write under their tags, then generation gen of c (terminal rules
    take slots[:len(c.rules)], count rules the rest). Nothing reads gen until a flip."""
    for name, s in to_write.items():
        if on_set:
            on_set(name, s)
        tables.write_set(tags[name], s)
    tables.write_generation(gen, c, slots[:len(c.rules)], slots[len(c.rules):], tags,
                            samples, default_sample)
