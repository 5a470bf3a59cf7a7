"""Both firewall programs under hostile packets through BPF_PROG_TEST_RUN: random bytes, every
frame of tests/cases/firewall.py cut at every length, and mutated headers.

What must hold for every packet: the verdict is a defined one (XDP_PASS/XDP_DROP for nb_fw_xdp,
TC_ACT_UNSPEC/TC_ACT_SHOT for nb_fw_tc_eg; never XDP_ABORTED or a kernel error) and the counters
add up (pass + drop totals == packets run; the drop total == drops seen; every packet is
accounted once as non_ip, malformed, a terminal rule or the default; bytes too).
Not the exact verdict of each behaviour (tests/bpf/test_firewall.py does that).
NETBPF_SOAK=1 runs ten times as many hypothesis examples.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, _IPv6ExtHdr
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from cases.firewall import CASES, eth, v4, v6
from unit.fw_builders import direction, ip_set, rule

from netbpf import abi
from netbpf.kernel.testrun import (TC_ACT_UNSPEC, TC_ACT_SHOT, XDP_DROP, XDP_PASS,
                                   tc_verdict_name, xdp_verdict_name)
from netbpf.kernel.testrun import test_run as run_prog

from fwprog import FwProg

SOAK = os.environ.get("NETBPF_SOAK") == "1"
FUZZ = settings(max_examples=20000 if SOAK else 2000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

SETS = {"bl": ip_set("bl", "192.0.2.0/24", "2001:db8:bad::/48"),
        "srv": ip_set("srv", "10.0.0.1/32", "fd00::1/128")}
# Every match field, both families, both set sides, count, both rate_limit flavours, default drop.
RICH = direction(
    rule("cnt-udp", "count", proto=17),
    rule("blk-src", "drop", src="@bl"),
    rule("ssh-web-syn", "allow", dst="@srv", proto=6, dport=[22, (8000, 8999)],
         tcp_flags=(0x12, 0x02)),
    rule("ntp-dns", "drop", src="10.0.0.0/24", dst="10.0.0.1/32", proto=17, sport=123,
         dport=53),
    rule("ping6", "drop", src="fd00::/64", proto=58, icmp_type=128),
    rule("unreach-port", "drop", proto=1, icmp_type=3, icmp_code=3),
    rule("mdns", "rate_limit", proto=17, dport=5353, rate_pps=1, rate_burst=3, rate_per="src"),
    rule("web", "rate_limit", proto=6, dport=80, rate_pps=1, rate_burst=2, rate_per="rule"),
    rule("cnt-v6", "count", src="::/0"),
    rule("gre", "drop", proto=47),
    rule("udp6-hi", "allow", dst="fd00::1/128", proto=17, dport=(1000, 2000)),
    rule("udp-any", "allow", proto=17),
    rule("tcp-any", "allow", proto=6, sport=(1, 65535)),
    rule("icmp-any", "allow", proto=1),
    default="drop")

# Frames of every kind the case table has, plus a few the rich policy matches (deduplicated).
FRAMES = list(dict.fromkeys(
    [c.packet for c in CASES] + [
        eth(v4(TCP(dport=8080, flags="S"), dst="10.0.0.1")),
        eth(v4(UDP(sport=123, dport=53))),
        eth(v4(UDP(dport=5353))),
        eth(v6(UDP(dport=1500))),
        eth(v4(TCP(dport=80, flags="PA") / b"GET / HTTP/1.0\r\n\r\n")),
        eth(v4(UDP(dport=53)), Dot1AD(vlan=1), Dot1Q(vlan=2)),
    ]))


def TcProg(words: int, class_cap: int) -> FwProg:
    """FwProg for the TC egress program: same maps and install, run as SCHED_CLS."""
    return FwProg(words, class_cap, direction="egress", hook="tc")


def _skb_refused(frame: bytes) -> bool:
    """The kernel's skb test run refuses (EINVAL) an IPv4/IPv6 Ethertype without a whole
    IP header after it; the stack never hands TC such an skb either."""
    et = int.from_bytes(frame[12:14], "big")
    return (et == 0x0800 and len(frame) < 14 + 20) or (et == 0x86DD and len(frame) < 14 + 40)


class Checker:
    """Runs packets through one program and checks verdicts and counter deltas per batch."""

    def __init__(self, prog: FwProg, allowed: dict[int, str], drop_code: int, name: str):
        self.prog, self.allowed, self.drop_code, self.name = prog, allowed, drop_code, name

    def install(self, d=RICH, sets=SETS) -> None:
        self.prog.install(d, sets)
        self.terminal = {self.prog.slots[r.name] for r in self.prog.compiled.rules}
        self.counting = {self.prog.slots[r.name] for r in self.prog.compiled.count_rules}

    def _snapshot(self):
        t = self.prog.tables
        return t.read_counters("nb_fw_cnt"), t.read_counters("nb_fw_stats")

    def run(self, frames: list[bytes]) -> list[int]:
        before_cnt, before_tot = self._snapshot()
        verdicts, ran = [], []
        for f in frames:
            if self.drop_code == TC_ACT_SHOT and _skb_refused(f):
                continue
            code = run_prog(self.prog.fd, f).retval
            assert code in self.allowed, (
                f"{self.name}: verdict {self._label(code)} for {f.hex()}")
            verdicts.append(code)
            ran.append(f)
        after_cnt, after_tot = self._snapshot()
        if ran:
            self._check(ran, verdicts, before_cnt, after_cnt, before_tot, after_tot)
        return verdicts

    def _label(self, code: int) -> str:
        return xdp_verdict_name(code) if self.drop_code == XDP_DROP else tc_verdict_name(code)

    def _check(self, frames, verdicts, bc, ac, bt, at) -> None:
        def delta(before, after, key, i=0):
            return after.get(key, (0, 0, 0))[i] - before.get(key, (0, 0, 0))[i]

        n, nbytes = len(frames), sum(len(f) for f in frames)
        tot = {name: delta(bt, at, idx) for idx, name in abi.STAT_NAMES.items()}
        tot_b = {name: delta(bt, at, idx, 1) for idx, name in abi.STAT_NAMES.items()}
        drops = sum(1 for v in verdicts if v == self.drop_code)
        where = f"{self.name} on {n} packets (first {frames[0].hex()})"
        assert tot["pass"] + tot["drop"] == n, f"{where}: pass+drop totals {tot}"
        assert tot_b["pass"] + tot_b["drop"] == nbytes, f"{where}: pass+drop bytes {tot_b}"
        assert tot["drop"] == drops, f"{where}: drop total {tot['drop']} != {drops} drops seen"
        ruled = sum(delta(bc, ac, s) for s in self.terminal)
        accounted = tot["non_ip"] + tot["malformed"] + tot["default"] + ruled
        assert accounted == n, f"{where}: {accounted} accounted ({tot}, {ruled} by rules)"
        over = sum(delta(bc, ac, s, 2) for s in self.terminal)
        assert tot["rate_limited"] == over, f"{where}: rate_limited {tot} vs rules {over}"
        for s in self.counting:
            assert 0 <= delta(bc, ac, s) <= n - tot["non_ip"] - tot["malformed"], where


@pytest.fixture(scope="module")
def xdp():
    c = Checker(FwProg(words=4, class_cap=256), {XDP_PASS: "pass", XDP_DROP: "drop"},
                XDP_DROP, "nb_fw_xdp")
    c.install()
    return c


@pytest.fixture(scope="module")
def tc():
    c = Checker(TcProg(words=4, class_cap=256), {TC_ACT_UNSPEC: "next", TC_ACT_SHOT: "shot"},
                TC_ACT_SHOT, "nb_fw_tc_eg")
    c.install()
    return c


# ---- truncation: every frame of the case table cut at every length >= 14 ----

def headers_end(frame: bytes) -> int | None:
    """Where the last header the parser must read ends (None: not IP, never parsed).
    VLAN tags, IP(v6) and extension headers, then TCP 20, UDP 8, ICMP/ICMPv6 4 bytes."""
    pkt = Ether(frame)
    end, is_ip, layer = 14, False, pkt.payload
    while layer is not None and layer.__class__.__name__ != "NoPayload":
        off = len(frame) - len(bytes(layer))
        if isinstance(layer, (Dot1Q, Dot1AD)):
            end = off + 4
        elif isinstance(layer, IP):
            end, is_ip = off + layer.ihl * 4, True
        elif isinstance(layer, IPv6):
            end, is_ip = off + 40, True
        elif isinstance(layer, IPv6ExtHdrFragment):
            end = off + 8
        elif isinstance(layer, _IPv6ExtHdr):
            end = off + (layer.len + 1) * 8
        elif isinstance(layer, TCP):
            end = off + 20
            break
        elif isinstance(layer, UDP):
            end = off + 8
            break
        elif isinstance(layer, ICMP) or layer.__class__.__name__.startswith("ICMPv6"):
            end = off + 4
            break
        else:
            break
        layer = layer.payload
    return end if is_ip else None


WHOLE = [c for c in CASES if not c.id.startswith("malformed-")]


@pytest.mark.parametrize("prog", ["xdp", "tc"])
def test_every_case_frame_cut_at_every_length_gets_a_defined_verdict(request, prog):
    """A cut inside the headers the parser reads is malformed (XDP drops it, TC egress passes
    it); a cut after them leaves the verdict of the whole frame (length fields are not
    trusted, so nothing reads past the cut)."""
    chk: Checker = request.getfixturevalue(prog)
    try:
        for case in WHOLE:
            chk.install(case.policy, case.sets)
            end = headers_end(case.packet)
            cuts = [case.packet[:n] for n in range(14, len(case.packet) + 1)]
            if prog == "tc":
                cuts = [c for c in cuts if not _skb_refused(c)]
            got = chk.run(cuts)
            whole = chk.drop_code if case.verdict == "drop" else (
                XDP_PASS if prog == "xdp" else TC_ACT_UNSPEC)
            short = chk.drop_code if prog == "xdp" else TC_ACT_UNSPEC
            for cut, code in zip(cuts, got):
                if end is None:
                    want = whole          # not IP: never parsed past the Ethertype
                elif len(cut) < end:
                    want = short
                else:
                    want = whole
                assert code == want, (f"{case.id} cut at {len(cut)} of {len(case.packet)} "
                                      f"(headers end at {end}): {chk._label(code)}")
        # and every other frame, under the rich policy, at every length
        chk.install()
        for f in FRAMES:
            chk.run([f[:n] for n in range(14, len(f) + 1)])
    finally:
        chk.install()


# ---- hypothesis: random frames and mutated headers ----

ETHERTYPES = [0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806]
random_frames = st.one_of(
    st.binary(min_size=14, max_size=200),
    st.builds(lambda mac, et, body: mac + et.to_bytes(2, "big") + body,
              st.binary(min_size=12, max_size=12), st.sampled_from(ETHERTYPES),
              st.binary(max_size=160)),
    # two VLAN tags then IP: the deepest path through the Ethernet parser
    st.builds(lambda et, body: bytes(12) + b"\x88\xa8\x00\x01\x81\x00\x00\x02" +
              et.to_bytes(2, "big") + body, st.sampled_from([0x0800, 0x86DD]),
              st.binary(max_size=160)),
)


@st.composite
def mutated_frames(draw) -> bytes:
    """A real frame with a few header bytes replaced (and maybe cut): version/IHL/length
    fields, next-header chains, VLAN tags and L4 offsets go wrong in every way."""
    f = bytearray(draw(st.sampled_from(FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(12, min(len(f), 96) - 1))
        f[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(14, len(f)))
    return bytes(f[:cut])


@FUZZ
@given(frames=st.lists(random_frames, min_size=1, max_size=6))
def test_random_frames_get_defined_verdicts_and_consistent_counters(xdp, tc, frames):
    xdp.run(frames)
    tc.run(frames)


@FUZZ
@given(frames=st.lists(mutated_frames(), min_size=1, max_size=6))
def test_mutated_headers_get_defined_verdicts_and_consistent_counters(xdp, tc, frames):
    xdp.run(frames)
    tc.run(frames)


def test_large_frames_and_many_repeats_keep_counters_consistent(xdp, tc):
    """Full-MTU frames, and one frame run 1000 times in the kernel (repeat=): totals move by
    exactly the repeat count."""
    big = [eth(v4(UDP(dport=9) / (b"x" * 1400))), eth(v6(TCP(dport=8080) / (b"y" * 1400)))]
    xdp.run(big)
    tc.run(big)
    for chk in (xdp, tc):
        before = chk.prog.tables.read_counters("nb_fw_stats")
        run_prog(chk.prog.fd, big[0], repeat=1000)
        after = chk.prog.tables.read_counters("nb_fw_stats")
        moved = sum(after.get(i, (0,))[0] - before.get(i, (0,))[0]
                    for i in (abi.NB_STAT_PASS, abi.NB_STAT_DROP))
        assert moved == 1000, chk.name
