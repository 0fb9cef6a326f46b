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
cleanly. Choosing the id is pure logic over a ``try_lock`` callable (:func:`choose_lowest`),
so it is tested against a model without processes.

Invariant: at any instant each id ``0 <= k < max_vcpus`` has at most one live holder, and a
holder only ever takes ``k`` after failing to take every id below it at that moment.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class LeasePath(Enum):
    """How an id was obtained (seed 001's schedstat-style path counters)."""

    FRESH = "fresh"  #: never leased before in this domain
    REUSED = "reused"  #: released cleanly before; its slots' values carry on
    RECLAIMED = "reclaimed"  #: its last holder died holding it
    OVERFLOW = "overflow"  #: every id is taken: share the overflow id under a lock


def choose_lowest(max_vcpus: int, try_lock: Callable[[int], bool]) -> int | None:
    """Take the lowest id whose lock ``try_lock`` obtains; None when all ``max_vcpus`` are held."""
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
