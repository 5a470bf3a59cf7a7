"""Which BPF programs netbpf builds, how they are named, pinned and told apart, and the spec
of one build (source, function, defines, tail-call programs, hash).

The one place that knows source files, function names and the pins of a part; used by the
apply engine, the read path (status, stats, detach), the tests and bench. Pure: not loading
(kernel/loader.py) and not the build recipe (fw/program.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from netbpf import abi

FW_SOURCE = abi.BPF_DIR / "xdp" / "firewall.bpf.c"
FW_PROG = abi.NB_PROG_FW_XDP
TC_SOURCE = abi.BPF_DIR / "tc" / "firewall.bpf.c"
TC_EGRESS_PROG = abi.NB_PROG_FW_TC_EG
TC_INGRESS_PROG = abi.NB_PROG_FW_TC_IN
PROG_PIN = "prog"
# Maps of the ingress program that the egress program and later reloads open by pin:
# tracked connections, load-balanced flows and their NAT, LB counters survive program changes.
SHARED_MAPS = (abi.NB_MAP_CT, abi.NB_MAP_CT_CFG, abi.NB_MAP_LB_FLOWS, abi.NB_MAP_LB_NAT,
               abi.NB_MAP_LB_CNT)
PROGRAMS = {  # (direction, hook) -> (source, function, program type)
    ("ingress", "xdp"): (FW_SOURCE, FW_PROG, "xdp"),
    ("ingress", "tc"): (TC_SOURCE, TC_INGRESS_PROG, "sched_cls"),
    ("egress", "tc"): (TC_SOURCE, TC_EGRESS_PROG, "sched_cls"),
}
# The reject replies' builder loaded beside each firewall program, per program type.
REJECT_ENTRY = {"xdp": abi.NB_PROG_REJ_XDP, "sched_cls": abi.NB_PROG_REJ_TC}
LB_ENTRY = abi.NB_PROG_LB_ENTRY     # the balancer, beside the XDP firewall (NB_LB)
# Names the kernel reports for netbpf's attached programs (bpf_prog_info.name is cut at 15).
PROGRAM_NAMES = frozenset(func[:15] for _, func, _ in PROGRAMS.values())


@dataclass(frozen=True)
class ProgramSpec:
    """One firewall program to build: which part, its shape and the features compiled in.
    Deterministic: the same spec gives the same defines and the same hash."""
    direction: str = "ingress"              # ingress | egress
    hook: str = "xdp"                       # xdp | tc (egress is always tc)
    words: int = 1                          # NB_WORDS
    class_cap: int = 64                     # NB_CLASS_CAP
    chunks: int = 64                        # NB_DIR_CHUNKS
    fields: int | None = None               # NB_FIELDS; None: every field
    conntrack: bool = False                 # NB_CONNTRACK
    lb_ring_cap: int = 0                    # > 0: built with the balancer (NB_LB)
    shared_pin: Path | None = None          # NB_SHARED_PIN: where shared maps are pinned

    @classmethod
    def for_part(cls, direction: str, hook: str, **kw) -> ProgramSpec:
        if (direction, hook) not in PROGRAMS:
            raise ValueError(f"no {hook} program for {direction}")
        return cls(direction, hook, **kw)

    @classmethod
    def recorded(cls, st, direction: str, lb_ring_cap: int = 0) -> ProgramSpec:
        """The spec of a part as its state (netbpf/store/state.py InterfaceState) records
        it: shape, fields, conntrack; the balancer's ring is the caller's choice."""
        part = st.parts[direction]
        return cls.for_part(direction, part.hook, words=part.words, class_cap=part.class_cap,
                            chunks=part.dir_chunks, fields=part.fields,
                            conntrack=st.conntrack, lb_ring_cap=lb_ring_cap)

    @property
    def source(self) -> Path:
        return PROGRAMS[(self.direction, self.hook)][0]

    @property
    def func(self) -> str:
        return PROGRAMS[(self.direction, self.hook)][1]

    @property
    def prog_type(self) -> str:
        return PROGRAMS[(self.direction, self.hook)][2]

    @property
    def lb(self) -> bool:
        return self.lb_ring_cap > 0

    def defines(self) -> dict[str, int | str]:
        d: dict[str, int | str] = {"NB_WORDS": self.words, "NB_CLASS_CAP": self.class_cap,
                                   "NB_DIR_CHUNKS": self.chunks}
        if self.fields is not None:
            d["NB_FIELDS"] = self.fields
        if self.conntrack:
            d["NB_CONNTRACK"] = 1
        if self.lb:
            d["NB_LB"] = 1
            d["NB_LB_RING_CAP"] = self.lb_ring_cap
        if self.shared_pin is not None:
            d["NB_SHARED_PIN"] = f'"{self.shared_pin}"'
        return d

    def tail_calls(self) -> dict[str, str]:
        """Tail-call slot ([0] of the jump map) -> the program loaded beside the firewall."""
        calls = {abi.NB_MAP_REJ_JUMP: REJECT_ENTRY[self.prog_type]}
        if self.lb and self.hook == "xdp":
            calls[abi.NB_MAP_LB_JUMP] = LB_ENTRY
        return calls

    def functions(self) -> dict[str, str]:
        """The programs to load from the source: the firewall and its tail-call targets."""
        fns = {self.func: self.prog_type}
        fns.update({f: self.prog_type for f in self.tail_calls().values()})
        return fns

    def hash(self) -> str:
        """Tells a running program apart from the one this spec builds (source, headers and
        shape; not where shared maps are pinned)."""
        h = hashlib.sha256(self.source.read_bytes())
        for hdr in sorted((abi.BPF_DIR / "include").glob("*.h")):
            h.update(hdr.name.encode() + hdr.read_bytes())
        h.update(f"words={self.words} classes={self.class_cap} chunks={self.chunks} "
                 f"ct={int(self.conntrack)} "
                 f"lb={self.lb_ring_cap} fields={self.fields or 0:#x}".encode())
        return h.hexdigest()[:16]
