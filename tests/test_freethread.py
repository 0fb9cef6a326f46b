"""Per-thread leases (``percpu._lease.ThreadLeases``): the mode a free-threaded build runs in.

Every test here runs on both builds: on a GIL build the mode is forced through the test hook
``Lease.per_thread`` (the GIL then adds nothing the protocol relies on), on a free-threaded
build it is the default. What is checked: one id per thread, taken on first use and given
back when the thread ends; ids ever used stay at the peak concurrency through 1,000 short
threads; totals are exact; the order detach -> stop the world -> acknowledge of a grace
period (forced: the stop is replaced by a probe that looks at the state it finds); removal,
release and compaction while threads count.
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import percpu
from percpu import Domain, MetricRemoved, _grace, _lease
from percpu._bindings import REMOVED_CLASSES, UNBOUND_CLASSES
from percpu._handles import ThreadCounter, _Handle
from percpu._layout import D_MV_GEN, L_ACK, MS_DONE, lease_base, move_state_base

SIZE = 8 << 20


@pytest.fixture(autouse=True)
def per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lease.Lease, "per_thread", True)


@pytest.fixture
def dom() -> Iterator[Domain]:
    d = Domain(SIZE, max_vcpus=16, lock=False)
    try:
        yield d
    finally:
        d.close()


def run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def private_of(c: Any) -> Any:
    return c._tl.h


def threads_of(d: Domain) -> _lease.ThreadLeases:
    threads = d._lease.threads
    assert threads is not None
    return threads


def sparse_counters(d: Domain, seed: int) -> list[Any]:
    """40 counters left of 600 (560 removed at random), the grace period over: sparse
    pagesets, so that a compaction has slots to move."""
    cs = {i: d.counter("c", {"i": str(i)}) for i in range(600)}
    for i in random.Random(seed).sample(range(600), 560):
        d.remove("c", {"i": str(i)})
        del cs[i]
    assert d.synchronize(5)
    return list(cs.values())


def test_each_thread_gets_its_own_id_and_view(dom: Domain) -> None:
    c = dom.counter("requests_total")
    assert type(c) is ThreadCounter
    barrier = threading.Barrier(4)
    seen: list[tuple[int, int]] = []

    def worker(i: int) -> None:
        for _ in range(1000):
            c.inc()
        p = private_of(c)
        seen.append((threads_of(dom).local.anchor.state.vcpu, id(p._cells)))
        barrier.wait()  # all four hold their ids at once here
        if i == 0:
            assert dom.stats().holders_now == 4  # four threads: one borrows the process's
        barrier.wait()

    run_threads(4, worker)
    ids = {k for k, _v in seen}
    assert len(ids) == 4 and dom._lease.vcpu in ids  # the process's id is lent to one
    assert len({v for _k, v in seen}) == 4  # one memoryview per thread
    assert c.value == 4000


def test_a_thread_that_ends_gives_its_id_back(dom: Domain) -> None:
    c = dom.counter("requests_total")
    both = threading.Barrier(2)  # two threads alive at once: one borrows the process's id

    def worker(i: int) -> None:
        c.inc()
        both.wait()

    run_threads(2, worker)
    dom._quiesce()  # or the next thread's lease: the ended thread's id goes back first
    s = dom.stats()
    assert s.holders_now == 1 and c.value == 2 and threads_of(dom).borrower is None
    run_threads(2, worker)
    assert dom.stats().reused_ids >= 1 and c.value == 4


def test_the_first_thread_borrows_the_process_id(dom: Domain) -> None:
    c = dom.counter("requests_total")
    c.inc()  # the main thread borrows the process's id: one id, as on a GIL build
    st = threads_of(dom).local.anchor.state
    assert st.lent and st.vcpu == dom._lease.vcpu and dom.stats().ids_ever_used == 1
    run_threads(1, lambda i: c.inc())  # the borrower is alive: this thread takes its own
    assert dom.stats().ids_ever_used == 2 and c.value == 2


def test_1000_short_lived_threads_4_at_a_time_stay_at_the_peak(dom: Domain) -> None:
    c = dom.counter("requests_total")
    g = dom.gauge("busy")
    together = threading.Barrier(4)  # the 4 of a round are alive at once: the peak is 4

    def worker(i: int) -> None:
        for _ in range(10):
            c.inc()
        g.inc()
        together.wait()
        g.dec()

    for _ in range(250):
        run_threads(4, worker)
    s = dom.stats()
    assert s.ids_ever_used == 4  # the 4 threads alive at once (one borrows the process's id)
    assert s.overflow_holders == 0
    assert s.fresh_ids + s.reused_ids == 1 + 750  # a round's first thread borrows, the rest lease
    assert c.value == 10_000 and g.value == 0


def test_a_grace_period_detaches_then_stops_the_world_then_acknowledges(
        monkeypatch: pytest.MonkeyPatch, no_quiescer: None) -> None:
    """Forces the interleaving the stop guards: a thread bound to a slot, parked (not inside
    a statement), the slot removed. The probe runs where the world would be stopped and
    finds the private handle already detached and the thread's id not yet acknowledged."""
    with Domain(SIZE, max_vcpus=16, lock=False) as d:
        c = d.counter("requests_total")
        bound, go = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        def worker(_i: int) -> None:
            c.inc()
            box["p"] = private_of(c)
            box["k"] = threads_of(d).local.anchor.state.vcpu
            bound.set()
            go.wait()
            with pytest.raises(MetricRemoved):
                c.inc()

        t = threading.Thread(target=worker, args=(0,))
        t.start()
        bound.wait()
        probes: list[tuple[bool, int, int]] = []

        def probe() -> None:
            r = d._root
            probes.append((type(box["p"]) in REMOVED_CLASSES,
                           int(r[lease_base(d._max, box["k"]) + L_ACK]), int(d._grace.epoch())))

        monkeypatch.setattr(_grace, "stop_the_world", probe)
        assert d.remove("requests_total")
        d._quiesce()
        assert len(probes) == 1
        detached, ack_then, epoch = probes[0]
        assert detached and ack_then < epoch
        assert int(d._root[lease_base(d._max, box["k"]) + L_ACK]) == epoch  # after the stop
        go.set()
        t.join()
        d._quiesce()
        assert d.synchronize(5)


def test_no_stop_when_nothing_changed(monkeypatch: pytest.MonkeyPatch, dom: Domain) -> None:
    c = dom.counter("requests_total")
    calls: list[int] = []
    monkeypatch.setattr(_grace, "stop_the_world", lambda: calls.append(1))
    run_threads(2, lambda i: c.inc())
    dom.counter("other_total").inc()
    dom._quiesce()
    assert calls == []  # no private handle was detached: nothing to wait for


def test_removal_and_slot_reuse_while_threads_count(dom: Domain) -> None:
    """Threads count on handles that are removed and whose slots are reused by the next
    metric: each metric ends with exactly the updates made on it (a late store on a reused
    slot would add to the new metric)."""
    stop = threading.Event()
    current: list[Any] = [dom.counter("m0_total")]
    done: dict[int, int] = {}
    lock = threading.Lock()

    def worker(_i: int) -> None:
        mine: dict[int, int] = {}
        while not stop.is_set():
            h = current[-1]
            try:
                for _ in range(50):
                    h.inc()
                    mine[id(h)] = mine.get(id(h), 0) + 1
            except MetricRemoved:
                pass
        with lock:
            for k, v in mine.items():
                done[k] = done.get(k, 0) + v

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    try:
        for n in range(1, 40):
            old = current[-1]
            dom.remove(old.name)
            assert dom.synchronize(5)
            current.append(dom.counter(f"m{n}_total"))  # the reclaimed slot, zeroed
    finally:
        stop.set()
        for t in ts:
            t.join()
    last = current[-1]
    assert last.value == done.get(id(last), 0)
    assert dom.check().ok


def test_release_while_threads_count(dom: Domain) -> None:
    c = dom.counter("requests_total")
    stop = threading.Event()
    counts = [0, 0]

    def worker(i: int) -> None:
        while not stop.is_set():
            c.inc()
            counts[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for _ in range(5):
        dom.release()
    stop.set()
    for t in ts:
        t.join()
    assert c.value == sum(counts)


def test_compaction_while_threads_count(dom: Domain) -> None:
    keep = sparse_counters(dom, 3)
    stop = threading.Event()
    made = [0, 0]

    def worker(i: int) -> None:
        while not stop.is_set():
            for h in keep:
                h.inc()
            made[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        while min(made) == 0 and all(t.is_alive() for t in ts):
            time.sleep(0.001)  # both threads hold an id and pages: there is something to move
        r = dom.compact(timeout=10)
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert r.pending_moves == 0 and r.moved > 0
    assert all(h.value == sum(made) for h in keep)
    assert dom.check().ok


def test_a_lent_id_is_copied_after_the_stop_not_before(
        monkeypatch: pytest.MonkeyPatch, dom: Domain) -> None:
    """The process's id, lent to a thread, is copied by compaction as a thread's id: only
    once the borrower's private handles are detached and the world stopped. The probe runs
    where the world would be stopped: the borrower's handle is unbound and its id's copy not
    made yet (a copy in ``Moves.sync`` under ``_plock`` alone would be made before it, racing
    the borrower's statement on a free-threaded build)."""
    keep = sparse_counters(dom, 5)
    bound, go = threading.Event(), threading.Event()

    def borrower(_i: int) -> None:
        for h in keep:
            h.inc()
        assert threads_of(dom).local.anchor.state.lent
        bound.set()
        go.wait()
        for h in keep:
            h.inc()

    t = threading.Thread(target=borrower, args=(0,))
    t.start()
    bound.wait()
    k, st = dom._lease.vcpu, threads_of(dom).borrower
    assert k is not None and st is not None and st.vcpu == k and len(st.handles) == len(keep)
    probes: list[tuple[bool, bool]] = []

    def probe() -> None:  # runs in the quiescer: an exception would be swallowed there
        gen = int(dom._root[D_MV_GEN])
        done = int(dom._root[move_state_base(dom._max, k) + MS_DONE]) == gen
        probes.append((any(type(p) in UNBOUND_CLASSES for p in st.handles), done))

    real = _lease.stop_the_world

    def probe_then_stop() -> None:
        probe()
        real()

    monkeypatch.setattr(_grace, "stop_the_world", probe_then_stop)
    try:
        r = dom.compact(timeout=10)
    finally:
        go.set()
        t.join()
    assert r.moved > 0 and r.pending_moves == 0
    assert probes and probes[0] == (True, False)
    assert all(h.value == 2 for h in keep)
    assert dom.check().ok


def test_a_borrower_that_ends_drops_out_of_live_gauges(dom: Domain) -> None:
    """The process keeps its id when the thread it was lent to ends; that thread's part of a
    live-mode gauge goes (as a thread's own id's does when given back), a sum gauge's stays."""
    live, total = dom.gauge("inflight", mode="livesum"), dom.gauge("sum_of_parts")

    def borrower(_i: int) -> None:
        live.inc()
        total.inc()
        assert threads_of(dom).local.anchor.state.lent

    run_threads(1, borrower)
    dom._quiesce()
    assert threads_of(dom).borrower is None and dom._lease.vcpu is not None
    assert (live.value, total.value) == (0, 1)
    live.inc()  # the next borrower starts from zero
    assert (live.value, total.value) == (1, 1)


def test_every_kind_counts_per_thread(dom: Domain) -> None:
    c, g = dom.counter("a_total"), dom.gauge("g")
    mx, s = dom.gauge("m", mode="max"), dom.summary("s")
    h = dom.histogram("h", buckets=(1.0, 2.0))
    together = threading.Barrier(3)  # set() sets an id's part: three ids at once

    def worker(i: int) -> None:
        c.add(2)
        g.add(3)
        g.sub(1)
        together.wait()
        g.set(i)  # this thread's part
        together.wait()
        mx.set(10 + i)
        s.observe(0.5)
        h.observe(1.5)

    run_threads(3, worker)
    assert c.value == 6 and g.value == 0 + 1 + 2
    assert mx.value == 12 and s.value == (3, 1.5)
    assert h.value[1] == 3


def test_close_while_a_thread_counts_counts_or_raises() -> None:
    d = Domain(SIZE, max_vcpus=16, lock=False)
    c = d.counter("requests_total")
    started = threading.Event()
    outcome: list[str] = []

    def worker(_i: int) -> None:
        try:
            while True:
                c.inc()
                started.set()
        except percpu.DomainClosed:
            outcome.append("closed")
        except MetricRemoved:
            outcome.append("removed")

    t = threading.Thread(target=worker, args=(0,))
    t.start()
    started.wait()
    d.close()
    t.join()
    assert outcome and outcome[0] in ("closed", "removed")


def test_unbound_then_rebound_private_handles(dom: Domain) -> None:
    c = dom.counter("requests_total")
    c.inc()
    p = private_of(c)
    dom.release()
    assert type(p) in UNBOUND_CLASSES
    c.inc()
    assert private_of(c) is p and type(p) not in UNBOUND_CLASSES and c.value == 2


def test_the_stop_waits_for_a_thread_running_in_c() -> None:
    """``stop_the_world`` returns only once every other thread reached a safe point: a thread
    inside one long C call (a ``deque`` draining a ``map`` of ``list.append`` over five
    million items: C calling C, no eval-breaker check, never detached) is stopped after it,
    never inside it. The call is seen to have begun (the list's length, read without
    stopping anything) before the stop is asked for; once the stop returns, the list is
    full. A stop that did not wait finds it part filled."""
    n = 5_000_000
    for _ in range(3):
        out: list[None] = []

        def fill(out: list[None] = out) -> None:
            collections.deque(map(out.append, itertools.repeat(None, n)), maxlen=0)

        t = threading.Thread(target=fill)
        t.start()
        while not out and t.is_alive():
            pass  # the call has begun once the list has an item
        _lease.stop_the_world()
        seen = len(out)
        t.join()
        assert seen == n, seen


def test_a_metric_removed_before_a_thread_first_updates_it_is_gone_for_every_thread(
        shared: tuple[str, list[Domain]]) -> None:
    """Another holder removes a metric this process registered but no thread of it updated
    yet. The first update finds it removed (MetricRemoved), and so does every later use of
    the handle, a read included, in every thread (found by the domain state machine on
    3.13t: the read of the handle users hold still answered)."""
    path, holders = shared
    a = holders[0]
    c = a.counter("a")
    b = Domain.open(path)
    holders.append(b)
    assert b.remove("a")
    with pytest.raises(MetricRemoved):
        c.inc()
    with pytest.raises(MetricRemoved):
        c.value  # noqa: B018
    errors: list[BaseException] = []

    def other() -> None:
        try:
            c.inc()
        except MetricRemoved as exc:
            errors.append(exc)

    run_threads(1, lambda i: other())
    assert len(errors) == 1


def test_a_reuse_of_the_slot_an_unbound_private_handle_left_does_not_retire_it(
        shared: tuple[str, list[Domain]]) -> None:
    """Compaction moves a metric: a thread's private handle of it is unbound and keeps the
    old ref until its next update. Another metric that gets that old slot and is removed
    must not retire it (found by the compaction state machine on 3.13t: a live metric's next
    update raised MetricRemoved)."""
    _path, holders = shared
    d = holders[0]
    cs = [d.counter("c", {"i": str(i)}) for i in range(600)]
    for c in cs:
        c.add(1)  # every pageset has this thread's page
    x = cs[599]
    x.add(4)
    p = private_of(x)
    old = p._ref
    for c in cs[100:599]:
        d.remove("c", dict(c.labels))
    d._quiesce()
    assert d.compact(timeout=10).pending_moves == 0
    assert x._ref != old and type(p) in UNBOUND_CLASSES  # moved; the thread's copy unbound
    again = next((n for n in (d.counter("n", {"i": str(i)}) for i in range(2000))
                  if n._ref == old), None)
    assert again is not None  # a new metric in the old slot
    d.remove("n", dict(again.labels))
    d._quiesce()
    x.add(1)
    assert x.value == 6


def test_for_thread_gives_the_threads_own_handle(dom: Domain) -> None:
    """``for_thread()`` is the handle the calling thread's updates go through: its own id
    and view; updates through it count like the shared handle's, and it follows removal."""
    c = dom.counter("requests_total")
    g = dom.gauge("g", mode="livesum")
    seen: list[tuple[Any, Any]] = []
    both = threading.Barrier(2)

    def worker(_i: int) -> None:
        mine = c.for_thread()
        assert mine is c.for_thread() and mine is private_of(c)  # made once, kept
        for _ in range(1000):
            mine.inc()
        g.for_thread().add(2)
        seen.append((mine._cells, threads_of(dom).local.anchor.state.vcpu))
        both.wait()

    run_threads(2, worker)
    dom._quiesce()  # the ended threads' ids go back (or at the next lease taken)
    assert c.value == 2000 and g.value == 0  # both threads ended: live parts dropped
    (cells_a, id_a), (cells_b, id_b) = seen
    assert cells_a is not cells_b and id_a != id_b
    mine = c.for_thread()
    dom.remove("requests_total")
    with pytest.raises(MetricRemoved):
        mine.inc()


def test_for_thread_is_the_handle_itself_with_one_lease_per_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lease.Lease, "per_thread", False)
    with Domain(SIZE, max_vcpus=4, lock=False) as d:
        for h in (d.counter("c"), d.gauge("g"), d.summary("s"), d.histogram("h", buckets=[1])):
            assert h.for_thread() is h


def test_the_overflow_id_is_copied_only_once_every_holder_has_acknowledged(
        no_quiescer: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A thread may share the overflow id while its process holds an id of its own; its
    private handles follow a batch at its process's acknowledgement. Another holder's
    compaction must wait for that acknowledgement before it copies the overflow id: copied
    earlier (as the first version did: the process held no overflow acknowledgement lock,
    and the copy waited only for those), the thread's updates land in the old slot until its
    process acknowledges, and are lost when the batch ends. Forced: the process does not
    acknowledge while the other holder compacts (no quiescer), then its overflow thread
    counts, then it acknowledges and the batch completes."""
    path = str(tmp_path_factory.mktemp("overflow-copy", numbered=True) / "domain")
    d = Domain.create(path, SIZE, max_vcpus=1)  # id 0 and the overflow id
    e = Domain.open(path)  # another holder (its own descriptor and locks): the compactor
    try:
        keep = sparse_counters(d, 7)
        lent, shared, go, done = (threading.Event() for _ in range(4))
        states: dict[str, Any] = {}

        def borrower() -> None:  # takes the process's id 0 (lent): the next thread overflows
            for h in keep:
                h.inc()
            states["lent"] = threads_of(d).local.anchor.state
            lent.set()
            done.wait(10)

        def on_overflow() -> None:
            lent.wait(10)
            for h in keep:
                h.inc()
            states["shared"] = threads_of(d).local.anchor.state
            shared.set()
            go.wait(10)
            for h in keep:
                h.inc()  # bound to the old slots still: d has not acknowledged the batch

        ts = [threading.Thread(target=borrower), threading.Thread(target=on_overflow)]
        for t in ts:
            t.start()
        try:
            assert shared.wait(10)
            assert states["lent"].lent and states["shared"].vcpu == d._max
            assert d._lease.vcpu == 0
            first = e.compact(timeout=0.3)  # d never acknowledges meanwhile
            assert first.pending_moves > 0
            go.set()
            ts[1].join(10)
        finally:
            go.set()
            done.set()
            for t in ts:
                t.join(10)
        assert d.synchronize(5)  # d acknowledges: its overflow thread's handles follow
        final = e.compact(timeout=5)
        assert final.pending_moves == 0 and first.moved + final.moved > 0
        assert [h.value for h in keep] == [3] * len(keep)  # 1 + 2 incs, none lost
        assert d.check().ok
    finally:
        e.close()
        d.close()


def test_a_thread_on_the_overflow_id_makes_its_process_an_overflow_holder(
        no_quiescer: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """While one of its threads shares the overflow id, a process holds an overflow
    acknowledgement lock as a process on the overflow id does, even though its own lease is
    on an id of its own: every other holder then sees the overflow id live (a live-mode
    gauge counts that thread's part) and waits for its acknowledgement. Once no holder of
    the process shares it any more, the lock goes."""
    path = str(tmp_path_factory.mktemp("overflow-live", numbered=True) / "domain")
    d = Domain.create(path, SIZE, max_vcpus=1)
    e = Domain.open(path)
    try:
        g = d.gauge("inflight", mode="livesum")
        lent, shared, done = threading.Event(), threading.Event(), threading.Event()

        def borrower() -> None:
            g.inc()
            lent.set()
            done.wait(10)

        def on_overflow() -> None:
            lent.wait(10)
            g.inc()
            shared.set()
            done.wait(10)

        ts = [threading.Thread(target=borrower), threading.Thread(target=on_overflow)]
        for t in ts:
            t.start()
        try:
            assert shared.wait(10)
            assert g.value == 2  # the overflow part counts, here and in the other holder
            assert [m.value for m in e.snapshot() if m.name == "inflight"] == [2]
            assert e._lease.vcpu is None  # (e holds no lease: it is not on the overflow id)
            assert d._lease.vcpu == 0 and d._holder.ack_byte is not None
            assert e._holder.other_overflow_holders(e._grace.epoch())
        finally:
            done.set()
            for t in ts:
                t.join(10)
        d._quiesce()  # the ended threads are reaped: nobody of d shares the overflow id
        assert d._holder.ack_byte is None
        assert not e._holder.other_overflow_holders(e._grace.epoch())
    finally:
        e.close()
        d.close()


def test_an_update_blocked_loading_its_index_finds_its_handle_detached(
        monkeypatch: pytest.MonkeyPatch, dom: Domain) -> None:
    """An attribute load may block on a free-threaded build (a type-cache miss takes a lock,
    and a thread detaches while it waits: a stop of the world counts it as stopped). So an
    update loads ``_index`` before the view: blocked there, it has loaded nothing a grace
    period could make stale. Forced: ``_index`` becomes a property that blocks the counting
    thread once, while this thread compacts (detach, stop, copy, completion); the update
    then stores. Loading the view first (the first version) stores into the freed old slot:
    that add is lost."""
    keep = sparse_counters(dom, 11)
    member = _Handle.__dict__["_index"]
    armed, blocked, go = threading.Event(), threading.Event(), threading.Event()
    counter_thread: list[threading.Thread] = []

    def load(h: _Handle) -> int:
        if armed.is_set() and threading.current_thread() is counter_thread[0]:
            armed.clear()
            blocked.set()
            go.wait(10)  # blocked in C (a lock), as a type-cache miss may leave it
        value: int = member.__get__(h, type(h))
        return value

    def count() -> None:
        for h in keep:
            h.inc()
        armed.set()
        keep[0].inc()  # blocks loading its index, once
        for h in keep[1:]:
            h.inc()

    monkeypatch.setattr(_Handle, "_index", property(load, member.__set__))
    t = threading.Thread(target=count)
    counter_thread.append(t)
    t.start()
    try:
        assert blocked.wait(10)
        r = dom.compact(timeout=10)
    finally:
        go.set()
        t.join(10)
    assert r.moved > 0 and r.pending_moves == 0
    assert [h.value for h in keep] == [2] * len(keep)
    assert dom.check().ok


def test_an_unbound_private_handle_goes_with_its_removed_metric(dom: Domain) -> None:
    """A thread's private handle left unbound (a release) by a metric removed meanwhile is
    forgotten at the next grace period, not kept until its thread ends (a thread that lives
    long and sees many metrics come and go would keep one per metric)."""
    cs = [dom.counter("gone", {"i": str(i)}) for i in range(50)]
    keep = dom.counter("kept")
    counted, done = threading.Event(), threading.Event()

    def worker() -> None:
        for c in cs:
            c.inc()
        keep.inc()
        counted.set()
        done.wait(10)
        keep.inc()  # the thread lives on, and counts again

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert counted.wait(10)
        privates = dom._bindings.private
        assert len(privates) == 51
        dom.release()  # every private handle unbound
        for c in cs:
            dom.remove("gone", dict(c.labels))
        dom._quiesce()
        assert len(privates) == 1  # the kept metric's
    finally:
        done.set()
        t.join(10)
    assert keep.value == 2
    with pytest.raises(MetricRemoved):
        cs[0].inc()
