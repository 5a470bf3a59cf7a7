"""What the kernel enforces on an interface, read back from its pinned maps, and a private copy
of an attached program to run test packets through (explain, selftest).

Rules, sets, defaults and sampling come from the maps (fwtables.read_generation decoded by
compile.decompile); only names (the kernel keeps counter slots), the program shape and the XDP
mode come from the state file. The copy is the same program built again without shared pins,
filled from the live maps: test packets never touch the live counters, rate-limit buckets,
connection table or event ring. Not the CLI; no policy files written.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from netbpf import abi
from netbpf.fw.compile import decompile, merge_prefixes, rule_digest
from netbpf.errors import NetbpfError
from netbpf.fw.fwtables import FwTables
from netbpf.kernel import testrun
from netbpf.policy.ir import AddrMatch, DirectionIR, InterfaceIR, PolicyIR, RuleIR, SetIR
from netbpf.store.state import InterfaceState, PartState, load_state, pin_dir


def interface_state(key: str) -> InterfaceState:
    st = load_state(key)
    if st is None:
        raise NetbpfError(f"{key}: netbpf manages nothing there (see 'netbpf status')")
    return st


def open_tables(st: InterfaceState, direction: str) -> FwTables:
    part = st.parts[direction]
    return FwTables.from_pins(pin_dir(st.key) / direction, part.words, part.class_cap)


def _decode_part(st: InterfaceState, part: PartState, sets: dict[str, SetIR]) -> DirectionIR:
    tables = open_tables(st, part.direction)
    try:
        img = tables.read_generation(tables.active_gen())
        by_slot = {r.slot: r.name for r in part.rules}
        tag_names = {s.tag: s.name for s in part.sets}
        c = img.compiled
        for ref in c.setrefs:
            tag = int(ref.set_name[3:])
            name = tag_names.get(tag, ref.set_name)
            if name not in sets:
                s = tables.read_set(tag)
                sets[name] = SetIR(name, s.v4, s.v6, source="kernel")
        c.setrefs = [type(r)(tag_names.get(int(r.set_name[3:]), r.set_name), r.field,
                             r.member_id, r.nonmember_id) for r in c.setrefs]
        names = [by_slot.get(s, f"slot{s}") for s in img.rule_slots]
        count_names = [by_slot.get(s, f"slot{s}") for s in img.count_slots]
        rules = decompile(c, names, count_names)
    finally:
        tables.close()
    samples = dict(zip(names, img.samples))
    # the kernel holds each rule's effective sampling: the direction's is 'inherited'
    rules = [r if r.action == "count" else
             _with_sample(r, 0 if samples[r.name] == img.default_sample else samples[r.name])
             for r in rules]
    default = "drop" if c.default_action == abi.NB_ACT_DROP else "allow"
    return DirectionIR(default, tuple(rules), sample=img.default_sample, hook=part.hook)


def _with_sample(r: RuleIR, sample: int) -> RuleIR:
    return RuleIR(**{**r.__dict__, "sample": sample})


def read_enforced(key: str) -> PolicyIR:
    """The policy the kernel enforces on key now, as IR (one interface, its sets)."""
    st = interface_state(key)
    sets: dict[str, SetIR] = {}
    dirs = {d: _decode_part(st, part, sets) for d, part in st.parts.items()}
    iface = InterfaceIR(name=st.ifname, xdp_mode=st.requested_mode, conntrack=st.conntrack,
                        ct_timeouts=tuple(sorted(st.ct_timeouts.items())),
                        ingress=dirs.get("ingress"), egress=dirs.get("egress"))
    return PolicyIR(interfaces={st.ifname: iface}, sets=dict(sorted(sets.items())))


# ---- comparing with the file ----

def _canon_set(s: SetIR) -> tuple:
    def norm(entries, width):
        return tuple(sorted({(a >> (width - p) << (width - p) if p else 0, p)
                             for a, p in entries}))
    return norm(s.v4, 32), norm(s.v6, 128)


def _canon_rule(r: RuleIR, direction_sample: int) -> str:
    """Equal for rules that match the same packets the same way: sampling against the
    direction's, and address lists as the fewest prefixes (the kernel keeps no other form)."""
    sample = 0 if r.action == "count" or r.sample == direction_sample else r.sample
    merged = {k: AddrMatch(prefixes=merge_prefixes(m.prefixes))
              for k in ("src", "dst") if (m := getattr(r, k)) is not None and m.prefixes}
    return rule_digest(replace(_with_sample(r, sample), **merged))


def differences(enforced: PolicyIR, applied: PolicyIR, ifname: str) -> list[str]:
    """What the kernel enforces and the file does not say (or the other way), per item."""
    from netbpf.policy.render import rule_values

    out = []
    now, was = enforced.interfaces[ifname], applied.interfaces.get(ifname)
    if was is None:
        return [f"{ifname} is not in the applied file"]
    for d in ("ingress", "egress"):
        k, f = getattr(now, d), getattr(was, d)
        if f is None and k is not None and not k.rules and k.default == "allow":
            continue                     # an implicit allow-all egress part
        if (k is None) != (f is None):
            out.append(f"{d}: {'absent' if k is None else 'present'} in the kernel, "
                       f"{'absent' if f is None else 'present'} in the file")
            continue
        if k is None:
            continue
        for attr in ("default", "sample", "hook"):
            if getattr(k, attr) != getattr(f, attr):
                out.append(f"{d} {attr}: kernel {getattr(k, attr)}, file {getattr(f, attr)}")
        kr, fr = {r.name: r for r in k.rules}, {r.name: r for r in f.rules}
        if [r.name for r in k.rules] != [r.name for r in f.rules]:
            out.append(f"{d} rule order: kernel {[r.name for r in k.rules]}, "
                       f"file {[r.name for r in f.rules]}")
        for name, r in fr.items():
            if name not in kr:
                continue
            if _canon_rule(kr[name], k.sample) != _canon_rule(r, f.sample):
                a, b = rule_values(kr[name]), rule_values(r)
                what = "; ".join(f"{x} kernel {a[x]}, file {b[x]}" for x in a if a[x] != b[x])
                out.append(f"{d} rule '{name}': {what or 'differs'}")
    for name, s in enforced.sets.items():
        f = applied.sets.get(name)
        if f is None or _canon_set(s) != _canon_set(f):
            ks, fs = _canon_set(s), _canon_set(f) if f else ((), ())
            extra = sum(len(set(a) - set(b)) for a, b in zip(ks, fs))
            missing = sum(len(set(b) - set(a)) for a, b in zip(ks, fs))
            out.append(f"set {name}: {extra} entries only in the kernel, {missing} only in "
                       f"the file")
    return out


# ---- a private copy of an attached program ----

# a program's return value -> what it did (the reply builder's XDP_TX / redirect: 'reject');
# TC codes not listed pass the packet on
_VERDICTS = {"xdp": {testrun.XDP_DROP: "drop", testrun.XDP_PASS: "pass", testrun.XDP_TX: "reject"},
             "sched_cls": {testrun.TC_ACT_SHOT: "drop", testrun.TC_ACT_REDIRECT: "reject"}}


@dataclass
class ProgramCopy:
    """The program of one part, loaded again and filled from the live maps."""
    st: InterfaceState
    direction: str
    lb: bool = False             # built with the balancer, its maps copied (ingress only)
    loaded: object = None
    tables: FwTables | None = None
    lb_tables: object = None
    slot_names: dict[int, str] = field(default_factory=dict)
    runner: object = None

    def __post_init__(self):
        part = self.st.parts[self.direction]
        built = self.compile(self.st, self.direction, self.lb)
        self.func, self.prog_type = built.spec.func, built.spec.prog_type
        self.loaded = built.loaded
        try:
            self.tables = built.tables
            if self.lb:
                self._copy_lb()
            live = open_tables(self.st, self.direction)
            try:
                live.copy_to(self.tables, live.active_gen(), [s.tag for s in part.sets])
            finally:
                live.close()
            self.tables.zero_slots(list(range(abi.slot_cap(part.words))))
        except BaseException:
            self.loaded = None
            raise
        self.slot_names = {r.slot: r.name for r in part.rules}

    def _copy_lb(self) -> None:
        from netbpf.lb.lbtables import LbTables
        from netbpf.lb.pick import copy_maps

        self.lb_tables = LbTables.from_loaded(self.loaded)
        live = LbTables.from_pins(pin_dir(self.st.key) / "ingress")
        try:
            copy_maps(live, self.lb_tables)
        finally:
            live.close()

    @staticmethod
    def compile(st: InterfaceState, direction: str, lb: bool = False):
        """The part's program (fw/program.py's Program), compiled once per process: explain/
        selftest of many interfaces compile each shape once, and every copy rewrites the
        generation, sets and counters it uses. Safe on a worker thread: bcc compiles outside
        the GIL, so selftest builds its probes meanwhile. lb: built with the balancer, whose
        flow, NAT and counter maps are its own (no shared pins)."""
        from netbpf.fw.program import build_program
        from netbpf.lb.lbtables import LbState
        from netbpf.store.progspec import ProgramSpec

        # conntrack: its own, empty connection table
        spec = ProgramSpec.recorded(st, direction,
                                    LbState.from_json(st.lb).ring_cap if lb else 0)
        return build_program(spec, cache=True, stored=True)

    @property
    def fd(self) -> int:
        return self.loaded.prog_fd(self.func)

    def verdict(self, frame: bytes) -> str:
        """'pass', 'drop' or 'reject' (an answer sent back) for one frame."""
        if self.runner is None:
            self.runner = testrun.VerdictRunner(self.fd)
        ret = self.runner.retval(frame)
        return _VERDICTS[self.prog_type].get(ret) or \
            (f"xdp verdict {ret}" if self.prog_type == "xdp" else "pass")

    def counters(self) -> dict[int, int]:
        return {s: v[0] for s, v in self.tables.read_counters().items()}

    def close(self) -> None:
        """The cached program stays loaded for the next copy (loader.clear_cache frees it)."""
        self.loaded = self.runner = None

    def __enter__(self) -> "ProgramCopy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def same_verdict(model: str, program: str) -> bool:
    """A rate limit may pass or drop; a reject drops the packet and answers unless the
    packet gets no answer (a RST, an ICMP error, multicast) or the answer budget is spent."""
    return model == program or model == "rate_limit" or \
        (model == "reject" and program == "drop")

