"""Property: for random rule lists and random packets, the compiled tables (run through
simulate(), the model of the BPF classifier) decide exactly what the plain rule loop decides.

Domains are small on purpose (nested prefixes around 10.0.0.0/8 and 2001:db8::/32, a few ports
and their neighbours, four protocols) so rules overlap and packets hit them often.
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fw_builders import check_table_invariants, make_pkt, prefix
from netbpf.fw.compile import compile_direction, reference_match, simulate
from netbpf.policy.ir import AddrMatch, DirectionIR, Prefix, RuleIR, SetIR

V4_NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25",
           "10.1.2.3/32", "10.2.0.0/16", "192.168.0.0/16"]
V6_NETS = ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::1/128", "2001:db8:2::/48",
           "fd00::/8"]
V4_HOSTS = ["10.1.2.3", "10.1.2.4", "10.1.2.200", "10.1.9.9", "10.2.3.4", "10.9.9.9",
            "192.168.1.1", "8.8.8.8"]
V6_HOSTS = ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::5", "2001:db8:3::1", "fd00::1",
            "2001::1"]
PORTS = [0, 1, 21, 22, 23, 53, 79, 80, 81, 443, 1023, 1024, 8080, 65534, 65535]
PROTOS = [1, 6, 17, 58]
ICMP_TYPES = [0, 3, 8, 11, 128, 135]
ICMP_CODES = [0, 1, 3]
SET_NAMES = ["blk", "ok"]


def _int(host: str) -> int:
    return int(ipaddress.ip_address(host))


# A prefix from the pool, or a host from the pool cut at a random length (more nesting shapes).
prefixes = st.one_of(
    st.sampled_from(V4_NETS + V6_NETS).map(prefix),
    st.builds(lambda h, n: Prefix(4, _int(h) >> (32 - n) << (32 - n), n),
              st.sampled_from(V4_HOSTS), st.integers(0, 32)),
    st.builds(lambda h, n: Prefix(6, _int(h) >> (128 - n) << (128 - n), n),
              st.sampled_from(V6_HOSTS), st.integers(0, 128)),
)


def mostly_open(constraint, odds: int):
    """None (the field is left open) `odds` times out of odds+1, so several rules match a packet."""
    return st.integers(0, odds).flatmap(lambda i: constraint if i == 0 else st.none())


addr_constraints = st.one_of(
    st.lists(prefixes, min_size=1, max_size=3).map(lambda ps: AddrMatch(prefixes=tuple(ps))),
    st.sampled_from(SET_NAMES).map(lambda n: AddrMatch(set_name=n)),
)
# mostly pool ports, so range ends coincide (touching, nested) and packets land on them
port_values = st.integers(0, 3).flatmap(
    lambda i: st.integers(0, 65535) if i == 0 else st.sampled_from(PORTS))
port_ranges = st.tuples(port_values, port_values).map(lambda t: (min(t), max(t)))
port_constraints = st.lists(port_ranges, min_size=0, max_size=3).map(tuple)
flag_constraints = st.one_of(
    st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda mv: (mv[0], mv[1] & mv[0])),
    st.tuples(st.integers(0, 255), st.integers(0, 255)),     # value outside mask: never matches
)


@st.composite
def rules(draw, name: str, count_heavy: bool, odds: int) -> RuleIR:
    terminal = ["allow", "drop", "rate_limit"]
    action = draw(st.sampled_from(["count"] * (6 if count_heavy else 1) + terminal))
    return RuleIR(
        name=name, action=action,
        src=draw(mostly_open(addr_constraints, odds)),
        dst=draw(mostly_open(addr_constraints, odds)),
        proto=draw(mostly_open(st.sampled_from(PROTOS), odds - 1)),
        sport=draw(mostly_open(port_constraints, odds)),
        dport=draw(mostly_open(port_constraints, odds)),
        icmp_type=draw(mostly_open(st.sampled_from(ICMP_TYPES), odds)),
        icmp_code=draw(mostly_open(st.sampled_from(ICMP_CODES), odds)),
        tcp_flags=draw(mostly_open(flag_constraints, odds + 2)),
        rate_pps=10 if action == "rate_limit" else 0,
        rate_per=draw(st.sampled_from(["src", "rule"])))


@st.composite
def directions(draw, min_rules: int = 0, max_rules: int = 12) -> DirectionIR:
    n = draw(st.integers(min_rules, max_rules))
    # Per list: mostly count rules or not, tight or loose constraints; loose lists of count
    # rules are what make several count rules match before the first terminal match.
    count_heavy = draw(st.booleans())
    odds = draw(st.sampled_from([2, 4, 8]))
    rs = [draw(rules(f"r{i}", count_heavy, odds)) for i in range(n)]
    # keep within NB_MAX_COUNT_RULES: demote surplus count rules to allow
    seen = 0
    for i, r in enumerate(rs):
        if r.action == "count":
            seen += 1
            if seen > 64:
                rs[i] = RuleIR(r.name, "allow", r.src, r.dst, r.proto, r.sport, r.dport)
    return DirectionIR(default=draw(st.sampled_from(["allow", "drop"])), rules=tuple(rs))


@st.composite
def set_tables(draw) -> dict[str, SetIR]:
    out = {}
    for name in SET_NAMES:
        ps = draw(st.lists(prefixes, max_size=4))
        out[name] = SetIR(name, v4=tuple((p.addr, p.plen) for p in ps if p.family == 4),
                          v6=tuple((p.addr, p.plen) for p in ps if p.family == 6))
    return out


@st.composite
def packets(draw):
    family = draw(st.sampled_from([4, 6]))
    hosts = V4_HOSTS if family == 4 else V6_HOSTS
    return make_pkt(
        family, _int(draw(st.sampled_from(hosts))), _int(draw(st.sampled_from(hosts))),
        proto=draw(st.sampled_from(PROTOS + [47])),
        sport=draw(port_values), dport=draw(port_values),
        icmp_type=draw(st.sampled_from(ICMP_TYPES + [255])),
        icmp_code=draw(st.sampled_from(ICMP_CODES + [2, 255])),
        tcp_flags=draw(st.one_of(st.sampled_from([0x02, 0x12, 0x10, 0x11, 0x04, 0x18]),
                                 st.integers(0, 255))),
        fragment=draw(st.integers(0, 5)) == 0)         # non-first fragment: no L4 fields


def _agree(d, sets, pkts, **kw):
    c = compile_direction(d, sets, **kw)
    check_table_invariants(c)
    for p in pkts:
        assert simulate(c, sets, p) == reference_match(d, sets, p), p
    return c


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directions(), set_tables(), st.lists(packets(), min_size=10, max_size=25))
def test_compiled_tables_decide_like_the_rule_loop(d, sets, pkts):
    _agree(d, sets, pkts)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(directions(min_rules=60, max_rules=200), set_tables(),
       st.lists(packets(), min_size=20, max_size=40))
def test_many_rules_across_vector_words_decide_like_the_rule_loop(d, sets, pkts):
    _agree(d, sets, pkts)


def _padded(d: DirectionIR, n: int = 280) -> DirectionIR:
    """d's rules, then n terminal rules on source, destination and port that no drawn packet
    is likely to hit: past 256 rules, so pair tables can be built over d's rules too."""
    pad = tuple(RuleIR(f"pad{i}", "drop", src=AddrMatch((Prefix(4, 0xC6120000 | i << 8, 24),)),
                       dst=AddrMatch((Prefix(4, 0xC6130000 | i << 8, 24),)), proto=6,
                       dport=((1000 + i, 1000 + i),)) for i in range(n))
    return DirectionIR(default=d.default, rules=d.rules + pad)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(directions(max_rules=30), set_tables(), st.lists(packets(), min_size=10, max_size=25),
       st.sampled_from([(4, 2), (64, 16)]))
def test_policies_with_pair_tables_decide_like_the_rule_loop(d, sets, pkts, cells):
    """Past 256 rules the pair tables filter the scan (pairs.py): exact, and grouped into a
    few cells (a coarse superset), the verdicts and counted rules stay the rule loop's."""
    d = _padded(d)
    c = _agree(d, sets, pkts, pair_density=0)     # the pads alone are sparse: built anyway
    assert c.pairs[0] is not None and c.pairs[1] is not None
    _agree(d, sets, pkts, pair_cells=cells, pair_density=0)
    assert _agree(d, sets, pkts).pairs == (None, None)   # sparse: not worth building


@settings(max_examples=50, deadline=None)
@given(directions(), set_tables())
def test_compilation_is_deterministic(d, sets):
    assert compile_direction(d, sets) == compile_direction(d, sets)


# ---- ClassBench-like rule sets (bench/classbench.py): nested prefixes clustered under shared
# /16s and /24s, port ranges, wildcards, the acl/fw/ipc shapes; headers inside rules' fields,
# at prefix edges (first, last, one past the last address) and at random.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import classbench  # noqa: E402


def _edges(d: DirectionIR, family: int, pick: list[int]) -> list:
    width = 32 if family == 4 else 128
    out = []
    for i in pick:
        r = d.rules[i % len(d.rules)]
        for m in (r.src, r.dst):
            if m is None:
                continue
            p = m.prefixes[0]
            last = p.addr | ((1 << (width - p.plen)) - 1)
            for a in (p.addr, last, (last + 1) % (1 << width), p.addr - 1):
                other = classbench.trace(d, 1, family, seed=i)[0]
                out.append(other.__class__(family, a if m is r.src else other.src,
                                           a if m is r.dst else other.dst, other.proto,
                                           other.sport, other.dport, other.icmp_type,
                                           other.icmp_code, other.tcp_flags))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(classbench.KINDS)), st.sampled_from([4, 6]),
       st.integers(20, 400), st.integers(0, 1 << 16), st.integers(0, 3),
       st.lists(st.integers(0, 1 << 16), min_size=3, max_size=8))
def test_classbench_like_sets_decide_like_the_rule_loop(kind, family, n, seed, counting, pick):
    d = classbench.ruleset(kind, n, family, seed=seed, count_rules=counting,
                           default="drop" if seed & 1 else "allow")
    pkts = classbench.trace(d, 60, family, seed=seed) + _edges(d, family, pick)
    pkts.append(classbench.miss(family))
    c = _agree(d, {}, pkts)
    if n > 256:                 # the pair tables are in use; grouped into few cells too
        assert c.pairs[0] is not None
        _agree(d, {}, pkts, pair_cells=(8, 4))
    # validate's chunk count (netbpf/policy/checks.py) is the compiler's, exactly
    width = 32 if family == 4 else 128
    nodes = {(f, d_, p.addr >> (width - d_)) for r in d.rules
             for f, m in (("src", r.src), ("dst", r.dst)) if m is not None
             for p in m.prefixes for d_ in range(16, p.plen, 8)}
    assert len(nodes) == len(compile_direction(d).dir.chunks)
