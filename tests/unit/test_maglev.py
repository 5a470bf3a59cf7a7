"""netbpf.lb.maglev: shares follow weights, removing a backend moves little, the table is a pure
function of the backend set, and the windowed fill equals a plain one-proposal-at-a-time model.

No kernel here; what lb.bpf.c does with the table is tested in tests/bpf and tests/netns.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import struct
import time
from fractions import Fraction
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netbpf.lb import maglev
from netbpf.lb.maglev import (NO_BACKEND, BackendKey, backend_identity, is_prime, maglev_table,
                           table_shares)

SIZE = 65537


def v4_backends(n: int, first: int = 0x0A000001, port: int = 8080) -> list[BackendKey]:
    return [BackendKey(4, first + i, port) for i in range(n)]


def identities(table, backends) -> list:
    """The table as backend identities: tables built from different lists compare this way."""
    return [None if e == NO_BACKEND else backends[e] for e in table]


def moved_fraction(table_a, backends_a, table_b, backends_b) -> float:
    """Fraction of ALL slots whose backend identity differs between the two tables."""
    a = identities(table_a, backends_a)
    b = identities(table_b, backends_b)
    return sum(x != y for x, y in zip(a, b)) / len(a)


def without(seq, i):
    return list(seq[:i]) + list(seq[i + 1:])


def reference_table(backends, weights, size):
    """The fill as documented, one proposal at a time with exact fractions and pow() (slow)."""
    live = sorted((backend_identity(b), i) for i, b in enumerate(backends) if weights[i] > 0)
    table = [NO_BACKEND] * size
    if not live:
        return table
    total = sum(weights[i] for _, i in live)
    exact = [Fraction(size * weights[i], total) for _, i in live]
    quota = [int(q) for q in exact]
    spare = size - sum(quota)
    for r in sorted(range(len(live)), key=lambda r: (-(exact[r] - quota[r]), r))[:spare]:
        quota[r] += 1
    e = 3
    while math.gcd(e, size - 1) != 1:
        e += 2
    params = [maglev.permutation_params(ident, size) for ident, _ in live]
    claimed = [0] * len(live)
    # (virtual time, rank, list position): position k of weight w is proposed at (k+1)/w.
    heap = [(Fraction(1, weights[i]), r, 0) for r, (_, i) in enumerate(live) if quota[r]]
    heapq.heapify(heap)
    while heap:
        _, r, k = heapq.heappop(heap)
        offset, mult, start = params[r]
        slot = (offset + mult * pow(start + k, e, size)) % size
        if table[slot] == NO_BACKEND:
            table[slot] = live[r][1]
            claimed[r] += 1
        if claimed[r] < quota[r]:
            heapq.heappush(heap, (Fraction(k + 2, weights[live[r][1]]), r, k + 1))
    return table


# -- shares ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [[1], [1, 2, 3]], ids=["equal", "mixed_1_2_3"])
def test_shares_of_100_backends_are_within_1_percent_of_weights(pattern):
    backends = v4_backends(100)
    weights = [pattern[i % len(pattern)] for i in range(100)]
    table = maglev_table(backends, weights, SIZE)
    total = sum(weights)
    for i, share in enumerate(table_shares(table, 100)):
        want = weights[i] / total
        assert abs(share - want) <= 0.01 * want, (i, share, want)
        # Quotas are exact: within one slot of the weighted share.
        assert abs(share * SIZE - want * SIZE) < 1


def test_weight_0_backend_gets_no_slots():
    backends = v4_backends(10)
    weights = [1] * 10
    weights[3] = 0
    table = maglev_table(backends, weights, SIZE)
    shares = table_shares(table, 10)
    assert shares[3] == 0
    assert NO_BACKEND not in table
    assert all(abs(s - 1 / 9) < 1 / SIZE for i, s in enumerate(shares) if i != 3)


@pytest.mark.parametrize("weights", [[0, 0, 0], []], ids=["all_draining", "no_backends"])
def test_table_without_live_backends_is_all_no_backend(weights):
    table = maglev_table(v4_backends(len(weights)), weights, 251)
    assert len(table) == 251
    assert set(table) == {NO_BACKEND}
    assert table.itemsize == 4


# -- disruption ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [10, 50, 100])
def test_removing_one_of_n_equal_backends_moves_at_most_1_5_over_n_of_all_slots(n):
    # Measured: the fraction of ALL slots whose backend identity changes. The removed backend's
    # own 1/N must move; the bound leaves 0.5/N for slots of other backends that move too.
    backends = v4_backends(n)
    weights = [1] * n
    full = maglev_table(backends, weights, SIZE)
    for gone in (0, n // 2, n - 1):
        rest = without(backends, gone)
        smaller = maglev_table(rest, without(weights, gone), SIZE)
        moved = moved_fraction(full, backends, smaller, rest)
        assert moved <= 1.5 / n, f"removing backends[{gone}] of {n} moved {moved * n:.3f}/N"


def test_removing_a_weighted_backend_moves_its_share_plus_at_most_half_over_n():
    # With weights, the removed backend's own share (w / sum) must move; the rest is bounded as
    # with equal weights.
    n = 50
    backends = v4_backends(n)
    weights = [1 + i % 3 for i in range(n)]
    full = maglev_table(backends, weights, SIZE)
    for gone in (0, 1, 2):
        rest = without(backends, gone)
        smaller = maglev_table(rest, without(weights, gone), SIZE)
        moved = moved_fraction(full, backends, smaller, rest)
        assert moved <= weights[gone] / sum(weights) + 0.5 / n


def test_adding_a_removed_backend_back_restores_the_table_exactly():
    backends = v4_backends(50)
    weights = [1 + i % 3 for i in range(50)]
    full = maglev_table(backends, weights, SIZE)
    rest, rest_w = without(backends, 17), without(weights, 17)
    maglev_table(rest, rest_w, SIZE)
    # Back at the end of the list, not where it was: identity, not position, decides.
    again = maglev_table(rest + [backends[17]], rest_w + [weights[17]], SIZE)
    assert identities(again, rest + [backends[17]]) == identities(full, backends)


def test_backend_order_in_the_list_does_not_change_the_table():
    backends = v4_backends(30)
    weights = [1 + i % 4 for i in range(30)]
    table = maglev_table(backends, weights, 1009)
    order = list(range(30))[::7] + [i for i in range(30) if i % 7]
    shuffled = [backends[i] for i in order]
    other = maglev_table(shuffled, [weights[i] for i in order], 1009)
    assert identities(other, shuffled) == identities(table, backends)


def test_draining_a_backend_gives_the_table_of_removing_it():
    # Weight 0 only stops new flows; the flow table keeps its established ones (lb.bpf.c).
    backends = v4_backends(20)
    weights = [1] * 20
    drained = maglev_table(backends, [0 if i == 5 else 1 for i in range(20)], SIZE)
    removed = maglev_table(without(backends, 5), without(weights, 5), SIZE)
    assert identities(drained, backends) == identities(removed, without(backends, 5))


# -- determinism and identity ----------------------------------------------------------------

EXPECTED_SMALL_TABLE_SHA256 = "9a048d2e53a7694e97ecc68298f4658ba18efff5bc861943372c65f5cccaed33"


def test_table_bytes_are_fixed_across_processes_and_releases():
    # A change here reshuffles every flow of every VIP on upgrade: only on purpose, and noted.
    backends = [BackendKey(4, "10.0.0.1", 80), BackendKey(4, "10.0.0.2", 80),
                BackendKey(6, "2001:db8::1", 80), BackendKey(4, "10.0.0.3", 8080),
                BackendKey(4, "10.0.0.4", 80)]
    table = maglev_table(backends, [1, 2, 3, 0, 1], 1009)
    digest = hashlib.sha256(struct.pack(f"<{len(table)}I", *table)).hexdigest()
    assert digest == EXPECTED_SMALL_TABLE_SHA256



def test_address_spellings_of_one_backend_hash_alike():
    assert backend_identity(BackendKey(4, 0x0A000001, 80)) == b"4|10.0.0.1|80"
    assert backend_identity((6, "2001:0db8:0000::0001", 443)) == b"6|2001:db8::1|443"
    a = maglev_table([BackendKey(4, "10.0.0.1", 80), BackendKey(4, "10.0.0.2", 80)], [1, 1], 101)
    b = maglev_table([BackendKey(4, 0x0A000001, 80), BackendKey(4, 0x0A000002, 80)], [1, 1], 101)
    assert a == b


# -- input errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [65536, 1, 0, 9, 65535])
def test_non_prime_size_is_refused_naming_the_size(size):
    with pytest.raises(ValueError, match=rf"prime.*\(got {size}\)"):
        maglev_table(v4_backends(3), [1, 1, 1], size)


@pytest.mark.parametrize("backends,weights,message", [
    ([BackendKey(4, "10.0.0.1", 80)] * 2, [1, 1], r"10\.0\.0\.1\|80 is listed twice"),
    (v4_backends(2), [1], r"2 backends but 1 weights"),
    (v4_backends(1), [-1], r"weight must be 0-65535 \(got -1\)"),
    (v4_backends(1), [70000], r"weight must be 0-65535 \(got 70000\)"),
    ([BackendKey(5, 1, 80)], [1], r"family must be 4 or 6"),
    ([BackendKey(4, 1, 70000)], [1], r"port must be 0-65535"),
])
def test_bad_backends_and_weights_are_refused(backends, weights, message):
    with pytest.raises(ValueError, match=message):
        maglev_table(backends, weights, 101)


def test_is_prime_matches_a_sieve():
    sieve = bytearray([1]) * 5000
    sieve[0] = sieve[1] = 0
    for i in range(2, 71):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    assert [n for n in range(5000) if is_prime(n)] == [n for n in range(5000) if sieve[n]]
    assert is_prime(65537) and is_prime(16_777_213) and not is_prime(16_777_215)


def test_power_map_permutes_the_slots_for_every_prime_size():
    for size in [n for n in range(2, 3000) if is_prime(n)] + [65537]:
        e = maglev.power_exponent(size)
        assert len({pow(x, e, size) for x in range(size)}) == size, (size, e)


# -- the fill equals its plain model ---------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 12),
       weights=st.lists(st.sampled_from([0, 1, 1, 2, 3, 7, 65535]), min_size=12, max_size=12),
       size=st.sampled_from([2, 3, 5, 7, 13, 101, 257, 1009]),
       window=st.sampled_from([1, 5, 64, maglev._WINDOW]))
def test_table_equals_the_one_proposal_at_a_time_model(n, weights, size, window):
    # Small windows put many proposals on window boundaries, where an off-by-one would show.
    backends = v4_backends(n, first=0x0A000001 + 3 * n)
    weights = weights[:n]
    with mock.patch.object(maglev, "_WINDOW", window):
        table = maglev_table(backends, weights, size)
    assert list(table) == reference_table(backends, weights, size)
    total = sum(weights)
    if total:
        for i, share in enumerate(table_shares(table, n)):
            assert abs(share * size - size * weights[i] / total) < 1


# -- performance (printed, not asserted: issue 6's target is under 1 s) ----------------------

def test_build_time_for_1000_backends_is_printed():
    backends = v4_backends(1000)
    for label, weights in [("equal", [1] * 1000), ("1/2/3", [1 + i % 3 for i in range(1000)])]:
        start = time.perf_counter()
        table = maglev_table(backends, weights, SIZE)
        took = time.perf_counter() - start
        print(f"maglev_table: 1000 backends ({label} weights), {SIZE} slots: {took * 1000:.0f} ms")
        assert NO_BACKEND not in table
