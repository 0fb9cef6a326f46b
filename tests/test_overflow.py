"""More holders than ids (issue 17): an overflow holder is handed a freed id at its next
quiescent point, its handles are bound again to the new id, and no update is lost or counted
twice, the one in flight on a cached bound method included.

Several holders in one process are several ``Domain.open()`` of one shared file (each its own
OFD locks, hence its own vcpu id); a holder "dies" through ``Domain._abandon()``. The
background quiescer is off (``shared`` fixture) wherever the test says when the quiescent
point comes (``_quiesce``); the interleaving of an update with a hand-over is forced by a
process lock that reports when another thread waits for it. No assertion depends on timing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import shm_dir

from percpu import Domain
from percpu._handles import Counter, SharedCounter
from percpu._lease import Lease
from percpu._lease_records import LeasePath

SIZE = 4 << 20
HANG_GUARD = 60.0  # seconds: the longest a test waits for a thread before failing


@pytest.fixture(autouse=True)
def process_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lease per process (the GIL build's mode) on either build: these tests pin the
    hand-over of a process's lease; ``test_a_thread_on_the_overflow_id_is_handed_a_freed_id``
    pins a thread's (the free-threaded build's mode). Their updates from a second thread take
    the locked path, which needs no GIL."""
    monkeypatch.setattr(Lease, "per_thread", False)


def open_holder(path: str, holders: list[Domain]) -> Domain:
    d = Domain.open(path)
    holders.append(d)
    d.vcpu_id()
    return d


def metrics(d: Domain) -> dict[str, Any]:
    return {"c": d.counter("c"), "g": d.gauge("g"), "s": d.summary("s"),
            "h": d.histogram("h", buckets=[1.0, 2.0]), "m": d.gauge("m", mode="max")}


def update(ms: dict[str, Any], n: int) -> None:
    for _ in range(n):
        ms["c"].inc()
        ms["g"].add(2)
        ms["g"].dec()
        ms["s"].observe(0.5)
        ms["h"].observe(1.5)
    ms["m"].set(n)


def values(d: Domain) -> tuple[Any, ...]:
    ms = metrics(d)
    h = ms["h"]
    return (ms["c"].value, ms["g"].value, ms["s"].value, h.value, ms["m"].value)


def expected(n: int) -> tuple[Any, ...]:
    return (n, n, (n, n * 0.5), ([(1.0, 0), (2.0, n), (float("inf"), n)], n, n * 1.5), n)


@pytest.mark.parametrize("how", ["release", "die"])
def test_an_overflow_holder_is_handed_the_freed_id(
        shared: tuple[str, list[Domain]], how: str) -> None:
    path, holders = shared
    a = holders[0]
    a.vcpu_id()
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    assert (a.vcpu_id(), b.vcpu_id(), o.vcpu_id()) == (0, 1, 2)  # o: the overflow id
    ma, mb, mo = metrics(a), metrics(b), metrics(o)
    update(ma, 3)
    update(mb, 5)
    update(mo, 7)
    ops = a.stats().shared_id_operations
    assert ops == 7 * 5 + 1  # every operation of o took the locked path
    o._quiesce()
    assert o._lease.vcpu == 2 and a.stats().handed_over == 0  # no id is free yet
    if how == "release":
        b.release()
    else:
        holders.remove(b)
        b._abandon()
    o._quiesce()
    s = a.stats()
    assert o._lease.vcpu == 1 and s.handed_over == 1
    assert o.last_lease_path is (LeasePath.REUSED if how == "release" else LeasePath.RECLAIMED)
    assert type(mo["c"]) is Counter  # bound to id 1's view: the lock-free statement
    update(mo, 11)
    assert a.stats().shared_id_operations == ops  # none of these took the locked path
    n = 3 + 5 + 7 + 11
    c, g, sm, h, _m = values(a)
    assert (c, g, sm, h) == expected(n)[:4]  # the overflow id's values stayed, counted once
    o._quiesce()
    assert a.stats().handed_over == 1  # handed over once
    assert a.check().ok


def test_a_holder_stays_on_the_overflow_id_while_every_id_is_held(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    holders[0].vcpu_id()
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    p = open_holder(path, holders)
    assert (o.vcpu_id(), p.vcpu_id()) == (2, 2)
    b.release()
    o._quiesce()
    p._quiesce()  # o took id 1: nothing left for p
    assert (o._lease.vcpu, p._lease.vcpu) == (1, 2)
    s = o.stats()
    assert s.handed_over == 1 and s.overflow_holders == 2
    pc = p.counter("c")
    pc.inc()
    assert type(pc) is SharedCounter and o.stats().shared_id_operations == 1


def test_an_update_waiting_for_the_process_lock_lands_on_the_new_id(
        shared: tuple[str, list[Domain]]) -> None:
    """The interleaving forced: a thread's update through a cached bound method of a handle on
    the overflow id waits for the process lock while the quiescent point hands the id over;
    it is then counted once, on the new id."""
    path, holders = shared
    a = holders[0]
    a.vcpu_id()
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    c = o.counter("c")
    c.add(10)
    inc = c.inc  # a bound method of SharedCounter, cached before the hand-over
    ovf_index = c._index
    waiting = threading.Event()
    real: Any = o._plock

    class Reporting:
        """The process lock, reporting when a thread other than its owner waits for it."""

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            if not real._is_owned():
                waiting.set()
            return bool(real.acquire(blocking, timeout))

        def release(self) -> None:
            real.release()

        def __enter__(self) -> bool:
            return self.acquire()

        def __exit__(self, *exc: object) -> None:
            real.release()

        def _is_owned(self) -> bool:
            return bool(real._is_owned())

    o._plock = Reporting()  # type: ignore[assignment]
    try:
        with o._plock:
            t = threading.Thread(target=inc)
            t.start()
            assert waiting.wait(HANG_GUARD)  # t is inside slow_update, waiting for _plock
            b.release()
            o._quiesce()  # the quiescent point: o takes id 1, c is bound to it
            assert o._lease.vcpu == 1 and type(c) is Counter
        t.join(HANG_GUARD)
        assert not t.is_alive()
    finally:
        o._plock = real
    assert c.value == 11
    assert a._q[ovf_index] == 10  # the overflow id kept what was added there
    assert a._q[c._index] == 1  # the update in flight went to the new id, once
    assert a.stats().shared_id_operations == 1  # only the add(10)


def test_a_thread_on_the_overflow_id_is_handed_a_freed_id(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-thread mode (run under the GIL here): a thread that found every id taken shares
    the overflow id until an id is freed, then updates its own id through its own view."""
    path, holders = shared
    a = holders[0]
    a.vcpu_id()
    monkeypatch.setattr(Lease, "per_thread", True)
    o = open_holder(path, holders)  # its process lease: id 1
    assert (a.vcpu_id(), o.vcpu_id()) == (0, 1)
    c = o.counter("c")
    c.inc()  # the main thread borrows the process's id 1 (ThreadLeases T3)
    go, step, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        c.add(3)  # the thread's first update: every id is taken, the overflow id
        seen.append(c._tl.h._index)
        go.set()
        assert step.wait(HANG_GUARD)
        c.inc()
        c.add(4)
        seen.append(c._tl.h._index)

    t = threading.Thread(target=worker)
    t.start()
    assert go.wait(HANG_GUARD)
    assert o._lease.threads is not None
    st = o._lease.threads.states
    assert [(s.vcpu, s.lent) for s in st] == [(1, True), (2, False)]
    assert a.stats().shared_id_operations == 1
    a.release()
    o._quiesce()
    assert [s.vcpu for s in st] == [1, 0] and a.stats().handed_over == 1
    step.set()
    t.join(HANG_GUARD)
    assert not t.is_alive()
    assert c.value == 9
    assert o.stats().shared_id_operations == 1  # the inc and add(4): on id 0, lock-free
    assert seen[0] != seen[1] and o._q[seen[0]] == 3 and o._q[seen[1]] == 5


def test_a_borrower_of_the_overflow_id_follows_the_process_lease(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-thread mode: a process whose lease shares the overflow id lends it to its first
    thread (one holder, not two: ``overflow_holders`` counts 1); when the process's lease is
    handed a freed id, the borrower follows it there, its updates lock-free again."""
    path, holders = shared
    a = holders[0]
    a.vcpu_id()
    b = open_holder(path, holders)
    monkeypatch.setattr(Lease, "per_thread", True)
    o = open_holder(path, holders)
    assert (a.vcpu_id(), b.vcpu_id(), o.vcpu_id()) == (0, 1, 2)  # o shares the overflow id
    ms = metrics(o)
    update(ms, 3)
    threads = o._lease.threads
    assert threads is not None and threads.borrower is not None
    assert threads.borrower.vcpu == 2 and len(threads.states) == 1
    assert o.stats().overflow_holders == 1
    shared_ops = o.stats().shared_id_operations
    b.release()
    o._quiesce()
    assert o._lease.vcpu == 1 and threads.borrower.vcpu == 1 and o.stats().handed_over == 1
    update(ms, 4)
    assert o.stats().shared_id_operations == shared_ops  # on id 1 now, lock-free
    assert values(o) == (*expected(7)[:4], 4)  # the max gauge: the last set, 4


def test_a_holder_with_raw_objects_keeps_the_overflow_id(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    holders[0].vcpu_id()
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    obj = o.alloc(8)
    b.release()
    o._quiesce()
    assert o._lease.vcpu == 2 and o.stats().handed_over == 0
    obj.free()
    o._quiesce()
    assert o._lease.vcpu == 1 and o.stats().handed_over == 1


def test_a_live_gauge_starts_from_zero_on_a_reclaimed_id(
        shared: tuple[str, list[Domain]]) -> None:
    """The hand-over takes a dead holder's id like any lease: the dead holder's part of a
    live-mode gauge drops out and does not come back under the new holder's."""
    path, holders = shared
    a = holders[0]
    a.vcpu_id()
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    b.gauge("busy", mode="livesum").add(5)
    og = o.gauge("busy", mode="livesum")
    assert a.gauge("busy", mode="livesum").value == 5
    holders.remove(b)
    b._abandon()
    o._quiesce()
    assert o._lease.vcpu == 1
    og.add(2)
    assert a.gauge("busy", mode="livesum").value == 2


@pytest.fixture
def quiesced_file() -> Iterator[tuple[str, list[Domain]]]:
    """A shared file with the background quiescer on (the default)."""
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_overflow-")
    path = os.path.join(tmp, "domain")
    holders = [Domain.create(path, SIZE, max_vcpus=1)]
    try:
        yield path, holders
    finally:
        for d in holders:
            d.close()
        shutil.rmtree(tmp)


def test_the_quiescer_hands_the_freed_id_over(quiesced_file: tuple[str, list[Domain]]) -> None:
    path, holders = quiesced_file
    a = holders[0]
    a.vcpu_id()
    o = open_holder(path, holders)
    assert (a.vcpu_id(), o.vcpu_id()) == (0, 1)
    c = o.counter("c")
    c.inc()
    a.release()
    deadline = time.monotonic() + HANG_GUARD  # a hang guard: the tick comes in milliseconds
    while o._lease.vcpu != 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert o._lease.vcpu == 0 and o.stats().handed_over == 1
    c.inc()
    assert c.value == 2 and o.stats().shared_id_operations == 1
