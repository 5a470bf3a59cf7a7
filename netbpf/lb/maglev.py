"""Maglev lookup table (after Eisenbud et al., NSDI 2016): backends + weights -> a backend index
per slot. Pure and deterministic (same backends and weights, same table bytes, in any process):
no kernel, no map layout, no flow hashing; the compile layer turns indexes into backend ids.

Each backend walks its own permutation of the slots, built from its identity (family|address|port)
by independent keyed blake2b hashes. Two changes to the paper, each measured at 65537 slots with
one of 100 equal backends removed (issue 6 allows 1.5/N of the table to move):

- Fill. The paper gives backends turns, each claiming the backend's next free slot; a gained or
  lost claim re-times all later claims of that backend, and 1.49-1.74/N moved (mean 1.58/N).
  Here a backend has a quota (its weighted share, largest remainder: exact to one slot) and
  proposes its list positions in lockstep: position k of a weight-w backend at virtual time
  (k+1)/w, in time order, ties to the lower identity rank; a free slot goes to its proposer and a
  backend stops at its quota. Mean 1.30/N.
- Permutation. The paper's offset + k*skip lists are affine, so two backends whose skips are in
  a small ratio (1/2, 1/3 mod size: likely among 100) walk related lists, and one inherits a large
  part of a removed partner's slots (one case moved 1.55/N). Lists here are
  offset + mult * (start + k)^e mod size, with e coprime to size-1 (x^e permutes the slots):
  no linear relation between backends. Both together: mean 1.31/N, max 1.39/N over 800 removals
  (8 backend sets); 1.02/N and 1.14/N mean for N = 10 and 50.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
from array import array
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

DEFAULT_SIZE = 65537
# Entry of a table with no live backend (no backends, or all draining): lb.bpf.c must treat it
# as "no backend" for new flows. All ones, so it can never be a backend index.
NO_BACKEND = 0xFFFF_FFFF
# Proposal order compares (k+1) / w as floats: with k < size <= 2**24 and w < 2**16, different
# fractions differ by at least 2**-40 relative, far above float rounding (2**-53), and equal
# fractions round to equal floats, so the float order is the exact order.
MAX_WEIGHT = 65535
MAX_SIZE = 1 << 24

# 'I' is 4 bytes on every platform we build for; the BPF map value is a __u32.
_TYPECODE = "I" if array("I").itemsize == 4 else "L"
# Window ends are exact fractions n / _DEN of virtual time, so a proposal exactly on a window end
# is always in the same window as its equal-time rivals.
_DEN = 1 << 20
# Proposals sorted per window: enough to amortise the per-window work, few enough that little is
# generated past a backend's quota.
_WINDOW = 4096


class BackendKey(NamedTuple):
    """A backend's identity, which is all Maglev hashes. addr: int or text; port: 0-65535."""
    family: int
    addr: int | str
    port: int


def backend_identity(backend: BackendKey | tuple) -> bytes:
    """The canonical key hashed for a backend, e.g. b'4|10.0.0.1|80', b'6|2001:db8::1|443'.

    Normalised through ipaddress so 167772161 and '10.0.0.1' hash alike: the table follows the
    backend, not how the policy spelled it.
    """
    family, addr, port = backend
    if family == 4:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(addr)
    elif family == 6:
        ip = ipaddress.IPv6Address(addr)
    else:
        raise ValueError(f"backend {tuple(backend)!r}: family must be 4 or 6 (got {family!r})")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"backend {ip}: port must be 0-65535 (got {port!r})")
    return f"{family}|{ip}|{port}".encode()


def backend_key(lb: str, family: int, addr: int, port: int) -> str:
    """A backend's key in the state and health files: its load balancer, then Maglev's
    identity of it without the family (maglev.backend_identity), e.g. 'web|10.0.0.1|80'. The
    same backend in two load balancers is two backends (ids, counters, health)."""
    return f"{lb}|{backend_identity((family, addr, port)).decode().partition('|')[2]}"


def is_prime(n: int) -> bool:
    """Trial division by 6k +/- 1: at most ~700 steps for sizes up to 2**24."""
    if n < 4:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def power_exponent(size: int) -> int:
    """The smallest odd e > 1 coprime to size-1, so that x -> x^e mod size permutes the slots
    (3 for 65537). One exists below 25 for every size up to 2**24."""
    e = 3
    while math.gcd(e, size - 1) != 1:
        e += 2
    return e


@functools.lru_cache(maxsize=8)
def _power_map(size: int) -> array:
    # One table per size, shared by all backends: a list lookup per proposal instead of a pow().
    e = power_exponent(size)
    return array(_TYPECODE, [pow(x, e, size) for x in range(size)])


def permutation_params(identity: bytes, size: int) -> tuple[int, int, int]:
    """(offset, mult, start): backend list position k is slot offset + mult*(start+k)^e mod size."""
    # Distinct personalisation strings make the three independent hashes. Never Python's hash():
    # it is salted per process and would reshuffle every flow on a controller restart.
    def h(person: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(identity, digest_size=8, person=person).digest(),
                              "little")
    # mult in 1..size-1: multiplying by a non-zero residue keeps the list a permutation.
    return (h(b"nb-maglev-offset") % size, h(b"nb-maglev-mult") % (size - 1) + 1,
            h(b"nb-maglev-start") % size)


def _quotas(weights: list[int], size: int) -> list[int]:
    # Largest remainder: floor shares, then one more slot to the biggest remainders (ties to the
    # lower rank), so every backend is within one slot of size * w / sum(w).
    total = sum(weights)
    quotas = [size * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda r: -(size * weights[r] % total))
    for r in by_remainder[:size - sum(quotas)]:
        quotas[r] += 1
    return quotas


def _check(backends: Sequence, weights: Sequence[int], size: int) -> list[bytes]:
    if isinstance(size, bool) or not isinstance(size, int) or size > MAX_SIZE \
            or not is_prime(size):
        raise ValueError(f"Maglev table size must be a prime number up to {MAX_SIZE} "
                         f"(got {size!r})")
    if len(weights) != len(backends):
        raise ValueError(f"{len(backends)} backends but {len(weights)} weights")
    identities = [backend_identity(b) for b in backends]
    seen: dict[bytes, int] = {}
    for i, (ident, w) in enumerate(zip(identities, weights)):
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"backend {ident.decode()}: weight must be 0-{MAX_WEIGHT} "
                             f"(got {w!r})")
        if ident in seen:
            raise ValueError(f"backend {ident.decode()} is listed twice "
                             f"(backends[{seen[ident]}] and backends[{i}])")
        seen[ident] = i
    return identities


def maglev_table(backends: Sequence[BackendKey | tuple], weights: Sequence[int],
                 size: int = DEFAULT_SIZE) -> array:
    """The lookup table: array('I') of `size` entries, each an index into `backends`.

    A backend of weight w holds size * w / sum(weights) slots, rounded up or down. Weight 0
    drains a backend (no slot); with no backend of weight > 0 every entry is NO_BACKEND.
    Raises ValueError for a non-prime size, a weight outside 0-65535, a bad family, address or
    port, or a backend listed twice.
    """
    identities = _check(backends, weights, size)
    live = sorted((ident, i) for i, ident in enumerate(identities) if weights[i] > 0)
    table = array(_TYPECODE, [NO_BACKEND]) * size
    if not live:
        return table

    index = [i for _, i in live]            # rank -> caller's index
    weight = [weights[i] for i in index]
    quota = _quotas(weight, size)
    params = [permutation_params(ident, size) for ident, _ in live]
    power = _power_map(size)
    proposed = [0] * len(live)              # list positions proposed (or queued) so far
    claimed = [0] * len(live)
    taken = bytearray(size)                 # a bytearray test is the cheapest per-probe check

    # Proposals go in windows of virtual time (0, end]; a stable sort by time of each window's
    # rank-major lists is the exact global order, ties included.
    active = [r for r in range(len(live)) if quota[r] > 0]
    end = 0
    while active:
        end += max(1, _WINDOW * _DEN // sum(weight[r] for r in active))
        times: list[float] = []
        owners: list[int] = []
        slots: list[int] = []
        for r in active:
            w = weight[r]
            first, last = proposed[r], end * w // _DEN   # positions k in [first, last) are due
            if last > first:
                offset, mult, start = params[r]
                times.extend([k / w for k in range(first + 1, last + 1)])
                owners.extend([r] * (last - first))
                slots.extend([(offset + mult * power[(start + k) % size]) % size
                              for k in range(first, last)])
                proposed[r] = last
        for j in sorted(range(len(times)), key=times.__getitem__):
            r = owners[j]
            if claimed[r] == quota[r]:
                continue
            s = slots[j]
            if not taken[s]:
                taken[s] = 1
                table[s] = index[r]
                claimed[r] += 1
        active = [r for r in active if claimed[r] < quota[r]]
    return table


def table_shares(table: Sequence[int], n: int) -> list[float]:
    """Fraction of all slots held by each backend index 0..n-1 (NO_BACKEND slots count for none)."""
    counts = Counter(table)
    size = len(table)
    return [counts[i] / size for i in range(n)] if size else [0.0] * n
