"""Per-cpu counters and raw per-cpu objects on size-class caches and pagesets (issue 4).

Everything here runs in one process. Several *holders* are several ``Domain.open()`` of one
shared file: each has its own open file description, hence its own OFD locks, hence its own
vcpu id (the third one, with ``max_vcpus=2``, shares the overflow id). A holder "dies" through
``Domain._abandon()``: its descriptor closes (the kernel drops its locks, as on SIGKILL) and it
writes nothing shared. Background quiescer threads are switched off
(``Domain._background_quiescer``) so that grace periods happen only where the test says so,
and every run is deterministic. Real processes and real SIGKILLs are in
``test_counters_processes.py``.
"""

from __future__ import annotations

import dis
import math
import operator
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SharedDomainMachine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from percpu import (
    Counter,
    Domain,
    DomainClosed,
    Gauge,
    InvalidArgument,
    InvalidType,
    KindMismatch,
    MetricRemoved,
    PerCpu,
    Summary,
)
from percpu._layout import P_CLASS, SIZE_CLASSES, class_index, split_ref

SIZE = 1 << 20  # bytes of arena: a root block for a few ids and some pagesets




def class_of(d: Domain, h: Any) -> int:
    """Size in bytes of the class of the slot behind ``h`` (white box)."""
    ps, _slot = split_ref(h._ref)
    return SIZE_CLASSES[int(d._pagesets.entry(ps)[P_CLASS]) - 1]


def assert_clean(d: Domain, unreferenced: int = 0) -> None:
    report = d.check()
    assert report.problems == ()
    assert report.unreferenced_slots == unreferenced
    assert report.arena.ok


# ------------------------------------------------------------------------------------------
# Size classes, slots, raw objects


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33, 63, 64])
def test_alloc_takes_the_smallest_class_that_fits(size: int) -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        obj = d.alloc(size)
        assert class_of(d, obj) == min(c for c in SIZE_CLASSES if c >= size)
        assert class_of(d, obj) == SIZE_CLASSES[class_index(size)]
        assert len(obj.local) == size == obj.size
        assert bytes(obj.local) == bytes(size)


@pytest.mark.parametrize("bad", [0, 65, -1, 1 << 70])
def test_alloc_refuses_sizes_outside_the_classes(bad: int) -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        with pytest.raises(InvalidArgument, match=r"1\.\.64"):
            d.alloc(bad)
        assert_clean(d)


@pytest.mark.parametrize("bad", [8.0, "8", None, True])
def test_alloc_refuses_a_size_that_is_not_an_int(bad: object) -> None:
    with Domain(SIZE, max_vcpus=2) as d, pytest.raises(InvalidType):
        d.alloc(bad)  # type: ignore[arg-type]


def test_small_objects_do_not_overlap() -> None:
    """4-byte objects share 8-byte words: each view must start at its own slot."""
    with Domain(SIZE, max_vcpus=2) as d:
        objs = [d.alloc(4) for _ in range(40)]
        for i, obj in enumerate(objs):
            obj.local[:] = bytes([i + 1]) * 4
        assert [bytes(o.local) for o in objs] == [bytes([i + 1]) * 4 for i in range(40)]


def test_local_is_a_zero_copy_view_of_this_ids_copy() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        obj = d.alloc(16)
        view = obj.local
        view[:] = b"0123456789abcdef"
        copies = obj.copies()
        assert list(copies) == [d.vcpu_id()]
        assert bytes(copies[d.vcpu_id()]) == b"0123456789abcdef"
        copies[d.vcpu_id()][0:1] = b"X"  # the same memory, not a copy
        assert bytes(view[:2]) == b"X1"


def test_slot_k_is_the_same_object_in_every_ids_page(shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    holders.append(Domain.open(path))
    b = holders[1]
    ca, cb = a.counter("hits"), b.counter("hits")
    assert ca._ref == cb._ref and a.vcpu_id() != b.vcpu_id()
    ca.add(3)
    cb.add(40)
    copies = a._copies(ca._ref, 8)  # every id's copy of the one slot
    assert {k: int.from_bytes(v, "little") for k, v in copies.items()} == {
        a.vcpu_id(): 3, b.vcpu_id(): 40}
    assert ca.value == cb.value == 43


def test_free_returns_the_slot_and_the_handle_dies() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        obj = d.alloc(8)
        obj.local[:] = b"\xff" * 8
        ref = obj._ref
        obj.free()
        with pytest.raises(MetricRemoved, match="freed"):
            obj.local  # noqa: B018
        with pytest.raises(MetricRemoved):
            obj.free()
        again = d.alloc(8)  # LIFO cache: the slot just freed, zeroed
        assert again._ref == ref
        assert bytes(again.local) == bytes(8)
        assert_clean(d)


def test_caches_refill_and_drain_in_bulk_and_memory_stays_flat() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        objs = [d.alloc(8) for _ in range(600)]  # more than one page of 8-byte slots
        pages = d.stats().pages
        assert pages == 2
        for obj in objs:
            obj.free()
        assert_clean(d)
        for _ in range(3):
            objs = [d.alloc(8) for _ in range(600)]
            for obj in objs:
                obj.free()
        assert d.stats().pages == pages
        assert_clean(d)


def test_release_frees_raw_objects_and_keeps_named_handles(
        shared: tuple[str, list[Domain]]) -> None:
    _path, (d,) = shared
    c = d.counter("c")
    c.add(5)
    obj = d.alloc(8)
    d.release()
    with pytest.raises(MetricRemoved):
        obj.local  # noqa: B018
    c.inc()  # takes a lease again and rebinds
    assert c.value == 6
    assert_clean(d)


# ------------------------------------------------------------------------------------------
# Counter, Gauge, Summary


class Index:
    """Not an int, but has __index__ (like numpy integers)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __index__(self) -> int:
        return self.n


class SneakyInt(int):
    """An int subclass whose __radd__ would run Python code inside the read-modify-write."""

    def __radd__(self, other: object) -> int:
        raise AssertionError("must never be called")


def test_counter_inc_add_value() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        c = d.counter("requests", {"path": "/"})
        c.inc()
        c.add(0)
        c.add(41)
        c.add(Index(100))  # type: ignore[arg-type]
        c.add(SneakyInt(1000))  # converted to a plain int first
        assert c.value == 1142
        assert d.counter("requests", {"path": "/"}) is c


@pytest.mark.parametrize(("bad", "error"), [
    (-1, InvalidArgument), (Index(-5), InvalidArgument), (-0.5, InvalidArgument),
    (float("nan"), InvalidArgument), (float("inf"), InvalidArgument),
    (True, InvalidType), (False, InvalidType), ("1", InvalidType), (None, InvalidType),
    (1 << 63, InvalidArgument),
])
def test_counter_refuses_bad_adds_and_changes_nothing(bad: object, error: type) -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        c = d.counter("c")
        c.add(7)
        with pytest.raises(error):
            c.add(bad)  # type: ignore[arg-type]
        assert c.value == 7


def test_counter_refuses_to_leave_int64_and_changes_nothing() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        c = d.counter("c")
        c.add((1 << 63) - 2)
        c.inc()
        with pytest.raises(InvalidArgument, match="int64"):
            c.inc()
        with pytest.raises(InvalidArgument, match="int64"):
            c.add(5)
        assert c.value == (1 << 63) - 1


def test_gauge_goes_both_ways() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        g = d.gauge("in_flight")
        g.inc()
        g.inc()
        g.dec()
        g.add(10)
        g.sub(25)
        g.add(-1)
        g.sub(Index(-2))  # type: ignore[arg-type]
        assert g.value == -13
        for bad in (True, "2", None):
            with pytest.raises(InvalidType):
                g.add(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidType):
                g.sub(bad)  # type: ignore[arg-type]
        for nonfinite in (float("nan"), float("-inf")):
            with pytest.raises(InvalidArgument):
                g.add(nonfinite)
        assert g.value == -13


def test_summary_counts_and_sums() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        s = d.summary("latency_seconds")
        for x in (0.25, 1, 2.5, -0.75, 10**3):
            s.observe(x)
        assert s.value == (5, 1003.0)
        assert (s.count, s.sum) == (5, 1003.0)
        assert class_of(d, s) == 16
        for bad, error in ((math.nan, InvalidArgument), (math.inf, InvalidArgument),
                           (-math.inf, InvalidArgument), (10**400, InvalidArgument),
                           (True, InvalidType), ("1", InvalidType), (None, InvalidType),
                           (1j, InvalidType)):
            with pytest.raises(error):
                s.observe(bad)  # type: ignore[arg-type]
        assert s.value == (5, 1003.0)


def test_same_name_and_labels_is_one_metric_and_kinds_do_not_mix() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        a = d.counter("x", {"a": "1", "b": "2"})
        b = d.counter("x", {"b": "2", "a": "1"})
        assert a is b
        other = d.counter("x", {"a": "1"})
        assert other is not a and other._ref != a._ref
        with pytest.raises(KindMismatch):
            d.gauge("x", {"a": "1", "b": "2"})
        with pytest.raises(KindMismatch):
            d.summary("x", {"a": "1"})
        assert d.stats().metrics == 2
        assert_clean(d)


def test_hot_path_is_one_straight_line_statement() -> None:
    """Counter.inc makes no call (no lock, no syscall, no thread switch inside it)."""
    ops = {i.opname for i in dis.get_instructions(Counter.inc)}
    fast = [i for i in dis.get_instructions(Counter.inc) if i.opname == "STORE_SUBSCR"]
    assert len(fast) == 1
    before_except = []
    for i in dis.get_instructions(Counter.inc):
        if i.opname == "STORE_SUBSCR":
            break
        before_except.append(i.opname)
    assert not [op for op in before_except if "CALL" in op or "JUMP" in op], before_except
    assert "LOAD_GLOBAL" not in before_except
    assert ops  # (the except branch, after the store, may call)


def test_threads_lose_no_update(no_quiescer: None) -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        c, g = d.counter("c"), d.gauge("g")
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            def work() -> None:
                for _ in range(20_000):
                    c.inc()
                    c.add(2)
                    g.dec()
            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        assert c.value == 4 * 20_000 * 3
        assert g.value == -4 * 20_000


def test_late_update_of_a_removed_counter_never_lands_in_a_reused_slot(
        no_quiescer: None) -> None:
    """A thread switched out at the entry of ``add`` (already dispatched to the live class)
    resumes after the metric was removed, its slot zeroed and freed: its update goes to
    private scratch (``_retire``), so every free slot stays zero (check() verifies it)."""
    with Domain(SIZE, max_vcpus=2) as d:
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for round_ in range(30):
                c = d.counter("victim", {"round": str(round_)})
                stop = threading.Event()

                def hammer(c: Counter = c, stop: threading.Event = stop) -> None:
                    try:
                        while not stop.is_set():
                            c.add(1)
                    except MetricRemoved:
                        pass
                t = threading.Thread(target=hammer)
                t.start()
                while c.value < 100:
                    pass
                assert d.remove("victim", {"round": str(round_)})
                stop.set()
                t.join()
                assert d.stats().pending_frees == 0
                report = d.check()
                assert report.problems == (), report.problems
        finally:
            sys.setswitchinterval(old)


# ------------------------------------------------------------------------------------------
# remove, snapshot, close


def test_remove_then_register_again_counts_from_zero() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        c = d.counter("c", {"k": "v"})
        c.add(10)
        assert d.remove("c", {"k": "v"})
        assert not d.remove("c", {"k": "v"})
        with pytest.raises(MetricRemoved, match="removed"):
            c.inc()
        with pytest.raises(MetricRemoved):
            c.value  # noqa: B018
        again = d.counter("c", {"k": "v"})
        assert again is not c and again.value == 0
        again.inc()
        assert [(m.name, m.labels, m.value) for m in d.snapshot()] == [("c", (("k", "v"),), 1)]
        assert_clean(d)


def test_remove_reaches_other_holders_at_their_quiescent_point(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    holders.append(Domain.open(path))
    b = holders[1]
    ca, cb = a.counter("c"), b.counter("c")
    cb.add(5)
    assert a.remove("c")
    assert a.stats().pending_frees == 1  # b has not acknowledged: the slot waits
    cb.inc()  # b has not reached a quiescent point yet: harmless, into the pending slot
    with pytest.raises(MetricRemoved):
        ca.inc()
    b._quiesce()  # what b's quiescer thread does within milliseconds
    with pytest.raises(MetricRemoved):
        cb.inc()
    assert a.stats().pending_frees == 0
    assert b.counter("c").value == 0  # a new counter of the same name, from zero
    assert_clean(a)


def test_asking_again_after_a_remove_elsewhere_gives_the_new_counter(
        shared: tuple[str, list[Domain]]) -> None:
    """counter() never hands out the stale handle, even before the quiescer ran."""
    path, holders = shared
    a = holders[0]
    holders.append(Domain.open(path))
    b = holders[1]
    old = b.counter("c")
    old.add(5)
    a.remove("c")
    new_a = a.counter("c")
    new_a.add(2)
    new_b = b.counter("c")
    assert new_b is not old and new_b._ref == new_a._ref
    new_b.add(3)
    assert new_a.value == new_b.value == 5
    with pytest.raises(MetricRemoved):
        old.inc()


def test_a_removal_while_released_is_seen_on_rebind(shared: tuple[str, list[Domain]]) -> None:
    """The slot was reclaimed (this holder was not live, so nobody waited for it) and may
    be reused: the unbound handle must check the registry, not the pending queue."""
    path, holders = shared
    a = holders[0]
    holders.append(Domain.open(path))
    b = holders[1]
    cb = b.counter("c")
    cb.add(5)
    b.release()
    assert a.remove("c")
    assert a.stats().pending_frees == 0  # nobody else is live: reclaimed at once
    other = a.counter("other")  # may well reuse the slot
    other.add(7)
    with pytest.raises(MetricRemoved):
        cb.inc()
    assert other.value == 7
    assert_clean(a)


def test_snapshot_reads_every_metric() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        d.counter("c", {"x": "1"}).add(3)
        d.gauge("g").sub(4)
        d.summary("s").observe(1.5)
        d.summary("s").observe(2)
        got = {(m.name, m.labels): (m.kind, m.value, m.count) for m in d.snapshot()}
        assert got == {("c", (("x", "1"),)): ("counter", 3, 0), ("g", ()): ("gauge", -4, 0),
                       ("s", ()): ("summary", 3.5, 2)}


def test_many_metrics_grow_the_registry_and_stay_shared(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    for i in range(300):
        a.counter("n", {"i": str(i)}).add(i)
    holders.append(Domain.open(path))
    b = holders[1]
    for i in range(300):
        assert b.counter("n", {"i": str(i)}).value == i
    assert len(b.snapshot()) == 300
    for i in range(0, 300, 2):
        assert b.remove("n", {"i": str(i)})
    a._quiesce()
    b._quiesce()
    assert sorted(m.value for m in a.snapshot()) == list(range(1, 300, 2))
    assert_clean(a)


def test_close_makes_handles_raise_domain_closed() -> None:
    d = Domain(SIZE, max_vcpus=2)
    c, obj = d.counter("c"), d.alloc(8)
    d.close()
    with pytest.raises(DomainClosed):
        c.inc()
    with pytest.raises(DomainClosed):
        obj.local  # noqa: B018
    with pytest.raises(DomainClosed):
        d.counter("c")
    d.close()  # idempotent


def test_a_dead_holders_cache_goes_to_the_next_holder_of_its_id(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    holders.append(Domain.open(path))
    b = holders[1]
    objs = [b.alloc(8) for _ in range(5)]
    objs[0].free()
    vcpu, cached = b.vcpu_id(), b._caches.count(b.vcpu_id())
    assert cached > 0
    before = a.stats().recovered_cache_slots
    b._abandon()  # dies: 4 raw objects leak, its cache stays with its id
    holders.remove(b)
    assert_clean(a, unreferenced=4)  # the raw objects only: cached slots are accounted for
    holders.append(Domain.open(path))
    c = holders[-1]
    assert c.vcpu_id() == vcpu and c.last_lease_path is not None
    assert c.last_lease_path.value == "reclaimed"
    assert c.stats().recovered_cache_slots - before == cached
    pages = c.stats().pages
    for _ in range(cached):
        c.alloc(8)  # served from the inherited cache: no new page
    assert c.stats().pages == pages
    # a is not alone (c is live): nothing is reclaimed; then c leaves and a reclaims.
    assert a.check(reclaim=True).reclaimed_slots == 0
    c.close()
    holders.remove(c)
    report = a.check(reclaim=True)
    assert report.reclaimed_slots == 4 and report.problems == ()
    assert_clean(a)


# ------------------------------------------------------------------------------------------
# The state machine: several holders of one shared domain against a model


NAMES = ("a", "b", "c")
LABELS: tuple[tuple[tuple[str, str], ...], ...] = ((), (("k", "1"),))
KINDS = ("counter", "gauge", "summary")
Key = tuple[str, tuple[tuple[str, str], ...]]

# Handle states in the model:
#   live  - counts into the registered metric of its key;
#   stale - its metric was removed while its holder held a lease: it counts harmlessly into the
#           pending slot until its holder's next quiescent point, then raises;
#   limbo - removed while its holder held no lease (or the holder released since): its next use
#           either raises or, if the name was registered again on the very same slot, binds to
#           the new metric (both are correct; the model follows what happened);
#   dead  - raises MetricRemoved.


@dataclass
class Raw:
    obj: PerCpu
    data: bytes


@dataclass
class Holder:
    dom: Domain
    handles: dict[Key, list[Any]] = field(default_factory=dict)  # key -> [handle, state]
    raws: list[Raw] = field(default_factory=list)

    def leased(self) -> bool:
        return self.dom._lease.vcpu is not None


@dataclass
class Metric:
    kind: str
    value: Any  # int, or [count, sum] for a summary


NOARG = object()  # inc()/dec(): no argument


def kwargs(key: Key) -> dict[str, Any]:
    return {"labels": dict(key[1]) or None}


class DomainMachine(SharedDomainMachine):
    tmp_prefix = "test_counters_sm-"

    def __init__(self) -> None:
        super().__init__()
        self.holders: list[Holder] = []
        self.metrics: dict[Key, Metric] = {}
        self.family_kinds: dict[str, str] = {}
        self.leaked = 0  # raw objects of dead holders: taken slots nobody refers to
        self.dead_caches: dict[int, int] = {}  # id of a dead holder -> slots in its caches

    @initialize()
    def create(self) -> None:
        self.holders.append(Holder(Domain.create(self.path, SIZE, max_vcpus=2)))

    # -- helpers ---------------------------------------------------------------------------

    def pick(self, data: st.DataObject) -> Holder:
        return data.draw(st.sampled_from(self.holders), label="holder")

    def quiesced(self, h: Holder) -> None:
        """``h`` passed a quiescent point with its lease held: stale handles die."""
        for entry in h.handles.values():
            if entry[1] == "stale":
                entry[1] = "dead"

    def current_ref(self, key: Key) -> int | None:
        d = self.holders[0].dom
        for _kind, _cls, ref, raw in d._metrics.entries():
            from percpu._names import decode_key
            if decode_key(raw) == key:
                return ref
        return None

    def use(self, h: Holder, key: Key, op: str, arg: Any, good: bool) -> None:
        """Run ``op(arg)`` on ``h``'s handle of ``key`` and hold the model to it."""
        handle, state = h.handles[key]
        metric = self.metrics.get(key)
        call = getattr(handle, op)
        if state == "dead":
            with pytest.raises(MetricRemoved):
                call() if arg is NOARG else call(arg)
            return
        if not good:
            with pytest.raises((InvalidArgument, InvalidType, MetricRemoved)):
                call() if arg is NOARG else call(arg)
            return
        try:
            call() if arg is NOARG else call(arg)
        except MetricRemoved:
            assert state in ("stale", "limbo"), f"a live {key} raised"
            h.handles[key][1] = "dead"
            return
        if state == "stale":
            return  # into the pending slot: lost with the removed metric
        if state == "limbo":
            if metric is None or handle._ref != self.current_ref(key):
                return
            h.handles[key][1] = state = "live"  # bound again, to the metric now registered
        assert metric is not None and state == "live"
        if metric.kind == "summary":
            metric.value[0] += 1
            metric.value[1] += arg
        elif op in ("inc",):
            metric.value += 1
        elif op == "dec":
            metric.value -= 1
        elif op == "sub":
            metric.value -= arg if type(arg) is float else operator.index(arg)
        else:
            metric.value += arg if type(arg) is float else operator.index(arg)

    # -- holders ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.holders) < 3)
    @rule()
    def open_holder(self) -> None:
        h = Holder(Domain.open(self.path))
        self.holders.append(h)
        before = self.holders[0].dom.stats().recovered_cache_slots
        vcpu = h.dom.vcpu_id()
        path = h.dom.last_lease_path
        assert path is not None
        if path.value == "reclaimed":
            assert h.dom.stats().recovered_cache_slots - before == self.dead_caches.pop(vcpu)
        else:
            self.dead_caches.pop(vcpu, None)

    @precondition(lambda self: len(self.holders) > 1)
    @rule(data=st.data(), kill=st.booleans())
    def close_holder(self, data: st.DataObject, kill: bool) -> None:
        h = self.pick(data)
        vcpu = h.dom._lease.vcpu
        if kill:
            if vcpu is not None and vcpu < h.dom.max_vcpus:
                self.dead_caches[vcpu] = h.dom._caches.count(vcpu)
            h.dom._abandon()
            self.leaked += len(h.raws)
        else:
            h.dom.close()
        self.holders.remove(h)
        for handle, _state in h.handles.values():
            with pytest.raises(DomainClosed):
                handle.value  # noqa: B018

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        h = self.pick(data)
        h.dom.release()
        for raw in h.raws:
            with pytest.raises(MetricRemoved):
                raw.obj.local  # noqa: B018
        h.raws.clear()
        for entry in h.handles.values():
            if entry[1] == "stale":
                entry[1] = "limbo"

    @rule(data=st.data())
    def quiesce(self, data: st.DataObject) -> None:
        h = self.pick(data)
        h.dom._quiesce()
        if h.leased():
            self.quiesced(h)

    # -- named metrics ---------------------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(NAMES), labels=st.sampled_from(LABELS),
          kind=st.sampled_from(KINDS))
    def register(self, data: st.DataObject, name: str, labels: tuple[tuple[str, str], ...],
                 kind: str) -> None:
        h = self.pick(data)
        key = (name, labels)
        known = self.metrics.get(key)
        family = self.family_kinds.get(name)  # one kind a name, kept after its removal
        try:
            handle = getattr(h.dom, kind)(name, **kwargs(key))
        except KindMismatch:
            assert family is not None and family != kind
            self.quiesced(h)
            return
        self.quiesced(h)  # counter() passed a quiescent point first
        assert family is None or family == kind
        self.family_kinds[name] = kind
        assert known is None or known.kind == kind
        if known is None:
            self.metrics[key] = Metric(kind, [0, 0.0] if kind == "summary" else 0)
        assert isinstance(handle, {"counter": Counter, "gauge": Gauge, "summary": Summary}[kind])
        prev = h.handles.get(key)
        if prev is not None and prev[1] == "live" and known is not None:
            assert handle is prev[0]
        h.handles[key] = [handle, "live"]

    def handle_keys(self, h: Holder) -> list[Key]:
        return sorted(h.handles)

    @precondition(lambda self: any(h.handles for h in self.holders))
    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from([h for h in self.holders if h.handles]), label="holder")
        key = data.draw(st.sampled_from(self.handle_keys(h)), label="key")
        handle = h.handles[key][0]
        if isinstance(handle, Summary):
            x = data.draw(st.one_of(st.integers(-4000, 4000).map(lambda i: i / 4),
                                    st.sampled_from([math.nan, math.inf, True, "1"])))
            self.use(h, key, "observe", x, isinstance(x, float) and math.isfinite(x))
        elif isinstance(handle, Gauge):
            op = data.draw(st.sampled_from(["inc", "dec", "add", "sub"]))
            # Quarters: float amounts whose sums stay exact, so the model compares with ==.
            n = NOARG if op in ("inc", "dec") else data.draw(st.one_of(
                st.integers(-10**6, 10**6), st.integers(-4000, 4000).map(lambda i: i / 4),
                st.sampled_from([math.nan, math.inf, True, "2", None])))
            self.use(h, key, op, n, op in ("inc", "dec") or type(n) is int
                     or (type(n) is float and math.isfinite(n)))
        else:
            op = data.draw(st.sampled_from(["inc", "add"]))
            n = NOARG if op == "inc" else data.draw(st.one_of(
                st.integers(0, 10**6), st.integers(0, 4000).map(lambda i: i / 4),
                st.sampled_from([-1, -0.5, math.nan, True, "2", None])))
            self.use(h, key, op, n, op == "inc" or (isinstance(n, int | float)
                                                    and type(n) is not bool and n >= 0
                                                    and math.isfinite(n)))

    @precondition(lambda self: any(h.handles for h in self.holders))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from([h for h in self.holders if h.handles]), label="holder")
        key = data.draw(st.sampled_from(self.handle_keys(h)), label="key")
        handle, state = h.handles[key]
        if state == "dead":
            with pytest.raises(MetricRemoved):
                handle.value  # noqa: B018
        elif state == "live":
            value = handle.value
            expected = self.metrics[key].value
            assert (list(value) if isinstance(handle, Summary) else value) == expected

    @rule(data=st.data(), name=st.sampled_from(NAMES), labels=st.sampled_from(LABELS))
    def remove(self, data: st.DataObject, name: str,
               labels: tuple[tuple[str, str], ...]) -> None:
        h = self.pick(data)
        key = (name, labels)
        assert h.dom.remove(name, **kwargs(key)) == (key in self.metrics)
        if key not in self.metrics:
            return
        self.quiesced(h)  # a removal acknowledges its own epoch in the remover
        del self.metrics[key]
        for other in self.holders:
            entry = other.handles.get(key)
            if entry is None or entry[1] == "dead":
                continue
            if other is h:
                entry[1] = "dead"
            elif entry[1] == "live":
                entry[1] = "stale" if other.leased() else "limbo"

    # -- raw objects -----------------------------------------------------------------------

    @rule(data=st.data(), size=st.integers(1, 64))
    def alloc(self, data: st.DataObject, size: int) -> None:
        h = self.pick(data)
        obj = h.dom.alloc(size)
        assert obj.size == size and len(obj.local) == size
        for copy in obj.copies().values():  # a new object is zero in every id's copy
            assert bytes(copy) == bytes(size)
        h.raws.append(Raw(obj, bytes(size)))

    @precondition(lambda self: any(h.raws for h in self.holders))
    @rule(data=st.data())
    def write_raw(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from([h for h in self.holders if h.raws]), label="holder")
        raw = data.draw(st.sampled_from(h.raws), label="raw")
        value = data.draw(st.binary(min_size=raw.obj.size, max_size=raw.obj.size))
        raw.obj.local[:] = value
        raw.data = value
        assert bytes(raw.obj.copies()[h.dom.vcpu_id()]) == value

    @precondition(lambda self: any(h.raws for h in self.holders))
    @rule(data=st.data())
    def free_raw(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from([h for h in self.holders if h.raws]), label="holder")
        raw = data.draw(st.sampled_from(h.raws), label="raw")
        raw.obj.free()
        h.raws.remove(raw)
        with pytest.raises(MetricRemoved):
            raw.obj.free()

    @rule(data=st.data())
    def check_and_reclaim(self, data: st.DataObject) -> None:
        h = self.pick(data)
        report = h.dom.check(reclaim=True)
        assert report.problems == ()
        if not any(o.leased() for o in self.holders if o is not h):  # a released one has
            # given its raw objects back and holds no id: it does not count as alive
            assert report.reclaimed_slots == self.leaked
            self.leaked = 0
        else:
            assert report.reclaimed_slots == 0

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def raw_objects_keep_their_bytes(self) -> None:
        for h in self.holders:
            for raw in h.raws:
                assert bytes(raw.obj.local) == raw.data

    @invariant()
    def snapshot_matches_the_model(self) -> None:
        if not self.holders:
            return
        got = {(m.name, m.labels): m for m in self.holders[0].dom.snapshot()}
        assert set(got) == set(self.metrics)
        for key, metric in self.metrics.items():
            m = got[key]
            assert m.kind == metric.kind
            if metric.kind == "summary":
                assert [m.count, m.value] == metric.value
            else:
                assert m.value == metric.value

    @invariant()
    def every_slot_is_accounted_for(self) -> None:
        if not self.holders:
            return
        first = self.holders[0]
        report = first.dom.check()
        assert report.problems == (), report.problems
        others = sum(len(h.raws) for h in self.holders if h is not first)
        assert report.unreferenced_slots == others + self.leaked


TestDomainMachine = DomainMachine.TestCase
TestDomainMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_machine_temp_files_are_cleaned_up() -> None:
    """Only this process's: another test session may be running beside this one."""
    made = [d for d in SharedDomainMachine.made if Path(d).name.startswith("test_counters_sm-")]
    assert not [d for d in made if Path(d).exists()]
