"""vcpu-id leases: a compact id per holder, lowest free first, released by the kernel on death.

The kernel's mm_cid gives a running thread the lowest id not used by another running thread of
its memory space, so per-cpu data is sized by concurrency, not by CPU count. Python cannot see
context switches, so a *lease* lasts as long as its holder (a process on a GIL build: its
threads share the lease, the GIL serialising them like the kernel's hand-over between threads
of one mm). Ids come lowest-first, so the highest id ever used tracks the peak number of live
holders, not the number of processes ever started.

Mechanism: holding id ``k`` means holding an OFD write lock on byte ``LEASE_LOCK_BASE + k`` of
the domain's file. The kernel drops it when the holder dies, even by SIGKILL; the holder's pid
stays in the lease record, which is how the next holder tells a reclaimed id from one released
cleanly. Everything in this module is pure: the choice of an id works over a ``try_lock``
callable and the bookkeeping over a sequence of words (the domain's root block, or a list in
the tests), so the whole protocol is tested against a model without processes
(``tests/test_leases.py``); ``_domain`` supplies the OFD locks and the domain lock.

Rules (the domain lock is held for every word written here):

1. A holder probes ids ``0, 1, ...`` with ``try_lock`` and keeps the first it gets
   (:func:`choose_lowest`); then it writes its pid and counts the path (:func:`record_lease`).
2. A clean release writes pid 0 *before* the lock is dropped (:func:`record_release`), so the
   next holder sees 0 and counts the id as reused; a holder killed after taking the lock but
   before writing its pid left the record as it was, so nothing is counted twice.
3. A live id is one whose record has a pid and whose lock is held (:func:`live_ids`): a pid
   without a lock is a dead holder, a lock without a pid a holder still between rules 1 and 2.
4. A holder that finds every id taken gets the overflow id ``max_vcpus``, which any number of
   holders share; each of its operations takes the overflow lock and is counted
   (``D_SHARED_OPS``). Python cannot see a context switch at which to hand it a freed id, so
   it is *handed over* one at its next quiescent point (the quiescer's tick): it takes the id
   by rules 1 and 2 like any holder (the id's path counter counts it too) and the hand-over is
   counted in the overflow id's record (:func:`record_hand_over`). Its values stay on the
   overflow id, where every reader sums them: nothing moves, so no grace period is needed.
5. Grace periods count overflow holders too. With no record to write an acknowledged epoch
   in, an overflow holder holds a read lock on byte ``OVERFLOW_ACK_BASE + epoch``, and a
   reclaimer finds the oldest such byte with lock queries (:func:`oldest_mark`). The kernel
   drops the lock of a dead holder, as for leases.

Invariant: at any instant each id ``0 <= k < max_vcpus`` has at most one live holder, and a
holder only ever takes ``k`` after failing to take every id below it at that moment. Hence the
ids ever used are ``0 .. highest``, and ``highest + 1`` never exceeds the peak number of holders
(with those still probing) alive at once.

Alternatives weighed: a bitmap of ids in the shared root under the domain lock is as compact but
needs a recovery pass after a SIGKILL (the bit stays set); a pid-liveness check (``kill(pid,
0)``) is fooled by pid reuse and by pid namespaces. The OFD lock is both the bit and the
liveness test, maintained by the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Protocol

from ._layout import (
    D_FRESH,
    D_HIGHEST,
    D_OVERFLOW_HOLDERS,
    D_RECLAIMED,
    D_REUSED,
    L_LEASES,
    L_PID,
    bump,
    lease_base,
)


class Words(Protocol):
    """The u64 words a lease table lives in: a ``memoryview`` cast to ``'Q'``, or a list."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class LeasePath(Enum):
    """How an id was obtained (seed 001's schedstat-style path counters)."""

    FRESH = "fresh"  #: never leased before in this domain
    REUSED = "reused"  #: released cleanly before; its slots' values carry on
    RECLAIMED = "reclaimed"  #: its last holder died holding it; its slots' values carry on
    OVERFLOW = "overflow"  #: every id is taken: share the overflow id under a lock


#: The header word each path increments.
PATH_COUNTER = {
    LeasePath.FRESH: D_FRESH,
    LeasePath.REUSED: D_REUSED,
    LeasePath.RECLAIMED: D_RECLAIMED,
    LeasePath.OVERFLOW: D_OVERFLOW_HOLDERS,
}


def choose_lowest(max_vcpus: int, try_lock: Callable[[int], bool]) -> int | None:
    """Take the lowest id whose lock ``try_lock`` obtains; None when all ``max_vcpus`` are held.

    ``try_lock(k)`` must not wait: it takes the lock of id ``k`` and says whether it got it.
    """
    for k in range(max_vcpus):
        if try_lock(k):
            return k
    return None


def classify(times_leased: int, recorded_pid: int) -> LeasePath:
    """The path of an id just taken, from its lease record before we wrote to it."""
    if times_leased == 0:
        return LeasePath.FRESH
    if recorded_pid != 0:
        return LeasePath.RECLAIMED
    return LeasePath.REUSED


def record_lease(root: Words, max_vcpus: int, vcpu: int | None, pid: int) -> LeasePath:
    """Write the lease of ``pid`` on ``vcpu`` (None: it got no id) and count its path.

    The caller holds id ``vcpu``'s lock and the domain lock. Returns the path taken; an
    overflow holder's id is ``max_vcpus``.
    """
    if vcpu is None:
        path = LeasePath.OVERFLOW
    else:
        if not 0 <= vcpu < max_vcpus:
            raise ValueError(f"vcpu id {vcpu} is outside 0..{max_vcpus - 1}")
        base = lease_base(max_vcpus, vcpu)
        path = classify(root[base + L_LEASES], root[base + L_PID])
        root[base + L_PID] = pid
        bump(root, base + L_LEASES)
        if vcpu + 1 > root[D_HIGHEST]:
            root[D_HIGHEST] = vcpu + 1
    bump(root, PATH_COUNTER[path])
    return path


def record_release(root: Words, max_vcpus: int, vcpu: int) -> None:
    """Mark id ``vcpu`` released cleanly (pid 0). The caller still holds its lock and the
    domain lock, and drops the id's lock only after this. The overflow id has no record."""
    if vcpu < max_vcpus:
        root[lease_base(max_vcpus, vcpu) + L_PID] = 0


def live_ids(root: Words, max_vcpus: int, is_held: Callable[[int], bool]) -> list[int]:
    """Ids whose holder is alive: a pid recorded and the lock held (``is_held(k)``).

    The caller holds the domain lock, so no record changes meanwhile.
    """
    return [k for k in range(max_vcpus)
            if root[lease_base(max_vcpus, k) + L_PID] and is_held(k)]


def record_hand_over(root: Words, max_vcpus: int) -> None:
    """Count one overflow holder handed a freed id (rule 4). The overflow id has no lease of
    its own, so its record's lease count is this count. Domain lock held."""
    bump(root, lease_base(max_vcpus, max_vcpus) + L_LEASES)


def handed_over(root: Words, max_vcpus: int) -> int:
    """Overflow holders handed a freed id, ever (:func:`record_hand_over`)."""
    return root[lease_base(max_vcpus, max_vcpus) + L_LEASES]


def vacancy_hint(root: Words, max_vcpus: int) -> bool:
    """True when some id's record has no pid: never leased, or released cleanly (rule 2).
    Read without any lock, so only a hint (a holder between rules 1 and 2 looks free, a dead
    holder's id looks taken): the lock probe of rule 1 decides."""
    return any(not root[lease_base(max_vcpus, k) + L_PID] for k in range(max_vcpus))


def ids_ever_used(root: Words) -> int:
    """How many ids were ever leased in the domain: ids go lowest first, so they are
    ``0 .. ids_ever_used - 1``, and the highest id ever used is ``ids_ever_used - 1``."""
    return root[D_HIGHEST]


def oldest_mark(limit: int, any_below: Callable[[int], bool]) -> int:
    """``min(limit, lowest mark)``, where ``any_below(n)`` (``n >= 1``) says whether a mark lies
    below ``n``; a binary search, about ``log2(limit)`` calls.

    How a reclaimer finds the oldest epoch acknowledged by the holders sharing the overflow id:
    each holds a read lock on byte ``OVERFLOW_ACK_BASE + its epoch`` (they have no lease record
    to write it in), and ``any_below(n)`` is one lock query over the first ``n`` bytes.
    """
    if limit <= 0 or not any_below(limit):
        return limit
    lo, hi = 0, limit  # invariant: no mark below lo, a mark below hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if any_below(mid):
            hi = mid
        else:
            lo = mid
    return lo
