"""Pageset compaction (issue 5): the pure planner and per-id copy, then the domain's batches.

The first half needs no OS: the planner on hypothetical pagesets, the copy and its crash journal
on a bytearray. The second half runs in one process: several *holders* are several
``Domain.open()`` of one shared file (each its own OFD locks, hence its own vcpu id); a holder
"dies" through ``Domain._abandon()``. Background quiescer threads are off where a test needs to
say when a holder reaches its quiescent point (``Domain._background_quiescer``). Real processes,
SIGKILL and SIGSTOP are in ``test_compact_torture.py``.
"""

from __future__ import annotations

import contextlib
import dis
import math
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _writer import writer
from conftest import SharedDomainMachine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

import percpu._moves as moves_module
from arena import Arena
from percpu import Counter, Domain, InvalidArgument, InvalidType, MetricRemoved
from percpu import _membarrier as mb
from percpu._compact import (
    IDLE,
    IN_FLIGHT,
    CompactResult,
    MoveBatch,
    PagesetInfo,
    check_plan,
    copy_moves,
    finish_interrupted,
    ideal_pages,
    next_phase,
    occupancy,
    phase,
    plan_compaction,
    should_compact,
)
from percpu._layout import (
    D_MV_GEN,
    L_SEQ,
    MOVE_CAP,
    MOVE_SOURCES_CAP,
    MS_DONE,
    MS_STEP,
    MS_WORDS,
    lease_base,
    make_ref,
    move_state_base,
    slots_per_page,
    split_ref,
)
from percpu._moves import Moves
from percpu._pagesets import Pagesets
from percpu._registry import Registry

SIZE = 4 << 20  # bytes of arena: room for a few thousand metrics and their pagesets


# -- the planner (pure) ------------------------------------------------------------------


@st.composite
def pageset_infos(draw: st.DrawFn, pins: bool = True, ids: bool = True) -> list[PagesetInfo]:
    """Up to 10 pagesets of the metric classes (8 and 16 bytes) and a raw class (64 bytes),
    mostly sparse, with live, cached, pinned and free slots at random places."""
    infos = []
    for ps in range(draw(st.integers(0, 10))):
        cls = draw(st.sampled_from([1, 1, 2, 4]))
        per_page = slots_per_page(cls)
        live = draw(st.one_of(st.integers(0, 6), st.integers(0, per_page)))
        cached = draw(st.integers(0, min(8, per_page - live))) if pins else 0
        pinned = draw(st.integers(0, min(2, per_page - live - cached))) if pins else 0
        order = list(range(per_page))
        random.Random(draw(st.integers(0, 2**32))).shuffle(order)
        lv = tuple(sorted(order[:live]))
        ca = tuple(sorted(order[live : live + cached]))
        free = tuple(sorted(order[live + cached + pinned :]))
        page_ids = frozenset(draw(st.sets(st.integers(0, 3), min_size=1))) if ids else \
            frozenset({0})
        infos.append(PagesetInfo(ps, cls, lv, ca, pinned, free, page_ids))
    return infos


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pageset_infos(), st.integers(1, MOVE_CAP), st.integers(1, MOVE_SOURCES_CAP))
def test_a_plan_moves_live_source_slots_to_free_target_slots(
        infos: list[PagesetInfo], max_moves: int, max_sources: int) -> None:
    plan = plan_compaction(infos, max_moves, max_sources)
    check_plan(plan, infos)
    assert len(plan.moves) <= max_moves and len(plan.sources) <= max_sources
    assert plan.empty or plan.pages_after < plan.pages_before
    assert plan.ideal_pages == ideal_pages(infos)
    # Applying it keeps every live metric (one slot each) and frees every source's pages.
    by_ps = {i.ps: i for i in infos}
    moved = {m.old: m.new for m in plan.moves}
    after = {moved.get(make_ref(i.ps, s), make_ref(i.ps, s)) for i in infos for s in i.live}
    assert len(after) == sum(len(i.live) for i in infos)
    assert not {split_ref(ref)[0] for ref in after} & set(plan.sources)
    for t in plan.targets:
        gained = {k for m in plan.moves if split_ref(m.new)[0] == t
                  for k in by_ps[split_ref(m.old)[0]].page_ids}
        assert {(t, k) for k in gained - by_ps[t].page_ids} <= set(plan.new_pages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pageset_infos(pins=False, ids=False))
def test_without_pins_a_plan_reaches_the_ideal(infos: list[PagesetInfo]) -> None:
    """No cached or pinned slot and every pageset on the same id: each class keeps exactly
    ceil(live / slots per page) pagesets, so pages after = the ideal."""
    plan = plan_compaction(infos, MOVE_CAP * 10, MOVE_SOURCES_CAP)
    check_plan(plan, infos)
    if plan.empty:
        assert plan.pages_before == plan.ideal_pages
        return
    assert plan.pages_after == plan.ideal_pages
    for cls in {i.cls for i in infos}:
        group = [i for i in infos if i.cls == cls]
        kept = [i for i in group if i.ps not in plan.sources]
        live = sum(len(i.live) for i in group)
        assert len(kept) == math.ceil(live / slots_per_page(cls))


def test_a_plan_prefers_cheap_sources_within_its_budget() -> None:
    full = PagesetInfo(0, 1, tuple(range(400)), free=tuple(range(400, 512)),
                       page_ids=frozenset({0, 1}))
    one = PagesetInfo(1, 1, (7,), free=tuple(s for s in range(512) if s != 7),
                      page_ids=frozenset({0, 1}))
    many = PagesetInfo(2, 1, tuple(range(50)), free=tuple(range(50, 512)),
                       page_ids=frozenset({0, 1}))
    plan = plan_compaction([full, one, many], max_moves=10)
    check_plan(plan, [full, one, many])
    assert plan.sources == (1,) and plan.targets == (0,) and len(plan.moves) == 1
    assert plan.pages_before == 6 and plan.pages_after == 4
    plan = plan_compaction([full, one, many])
    assert set(plan.sources) == {1, 2} and plan.pages_after == 2 == plan.ideal_pages


def test_a_pinned_pageset_is_kept_and_used_as_a_target() -> None:
    pinned = PagesetInfo(0, 1, (1, 2), pinned=1, free=tuple(range(3, 512)),
                         page_ids=frozenset({0}))
    sparse = PagesetInfo(1, 1, (5,), free=tuple(s for s in range(512) if s != 5),
                         page_ids=frozenset({0}))
    plan = plan_compaction([sparse, pinned])
    assert plan.sources == (1,) and plan.moves[0].new >> 16 == 0
    only_pinned = plan_compaction([PagesetInfo(0, 1, (), pinned=3, free=tuple(range(3, 512)),
                                               page_ids=frozenset({0}))])
    assert only_pinned.empty


def test_a_plan_with_nothing_to_give_back_is_empty() -> None:
    assert plan_compaction([]).empty
    full = PagesetInfo(0, 1, tuple(range(512)), page_ids=frozenset({0}))
    assert plan_compaction([full]).empty
    # Moving would cost as many new pages as it frees: no gain.
    a = PagesetInfo(0, 1, tuple(range(300)), free=tuple(range(300, 512)),
                    page_ids=frozenset({0}))
    b = PagesetInfo(1, 1, (0,), free=tuple(range(1, 512)), page_ids=frozenset({1}))
    assert plan_compaction([a, b]).empty


def test_ideal_occupancy_and_the_policy_test() -> None:
    infos = [PagesetInfo(0, 1, tuple(range(600 // 2)), page_ids=frozenset({0, 1})),
             PagesetInfo(1, 1, tuple(range(300)), page_ids=frozenset({0})),
             PagesetInfo(2, 2, (1,), page_ids=frozenset({3}))]
    assert ideal_pages(infos) == math.ceil(600 / 512) * 2 + 1
    assert occupancy([]) == 1.0
    assert occupancy([(1, 256, True), (1, 0, True), (2, 0, False)]) == 0.25
    assert should_compact(0.2, 0.5) and not should_compact(0.6, 0.5)
    assert not should_compact(0.0, None)


def test_batch_phases_follow_the_transition_table() -> None:
    assert phase(0) == IDLE and phase(1) == IN_FLIGHT and phase(2) == IDLE
    assert next_phase(IDLE, "publish") == IN_FLIGHT
    assert next_phase(IN_FLIGHT, "copy") == IN_FLIGHT
    assert next_phase(IN_FLIGHT, "complete") == IDLE
    with pytest.raises(ValueError):
        next_phase(IDLE, "complete")
    with pytest.raises(ValueError):
        next_phase(IN_FLIGHT, "publish")


def test_a_batch_decodes_from_its_words() -> None:
    batch = MoveBatch.decode(3, [make_ref(1, 2), make_ref(0, 9), 1, 5, 6, 3], [1, 4])
    assert batch.moves == ((make_ref(1, 2), make_ref(0, 9), 1), (5, 6, 3))
    assert batch.pairs[make_ref(1, 2)] == batch.pairs[make_ref(0, 9)] == (make_ref(1, 2),
                                                                           make_ref(0, 9))
    assert batch.current(make_ref(1, 2)) == make_ref(0, 9)
    assert batch.current(make_ref(0, 9)) == make_ref(0, 9) and batch.current(77) == 77
    assert batch.sources == frozenset({1, 4})
    assert MoveBatch.decode(4, [1, 2, 3], [1]).moves == ()


# -- the per-id copy and its journal (pure, on a bytearray) ---------------------------------

STATE, SEQ = 0, MS_WORDS  # word of the move state and of the sequence count in the test memory


class Killed(Exception):
    """The copier was SIGKILLed (no further store happens)."""


class Dying:
    """Words that accept ``budget[0]`` more stores, then 'kill' the copier."""

    def __init__(self, view: memoryview, budget: list[int]) -> None:
        self.view, self.budget = view, budget

    def __getitem__(self, i: int) -> Any:
        return self.view[i]

    def __setitem__(self, i: int, value: Any) -> None:
        if self.budget[0] == 0:
            raise Killed
        self.budget[0] -= 1
        self.view[i] = value


def memory(values: list[tuple[int, int, float, float]]) -> tuple[Any, Any, list[Any]]:
    """A region with the move state, the sequence count, then per move four words (old count,
    old sum, new count, new sum); returns the int and float views and the pairs."""
    words = MS_WORDS + 1 + 4 * len(values)
    buf = bytearray(8 * words)
    q, d = memoryview(buf).cast("q"), memoryview(buf).cast("d")
    pairs: list[Any] = []
    for j, (oc, nc, of, nf) in enumerate(values):
        o = MS_WORDS + 1 + 4 * j
        q[o], d[o + 1], q[o + 2], d[o + 3] = oc, of, nc, nf
        pairs.append((o, o + 2, True) if of or nf else (o, o + 2, False))
    return q, d, pairs


moves_values = st.lists(st.tuples(st.integers(-2**40, 2**40), st.integers(-2**40, 2**40),
                                  st.sampled_from([0.0, 0.5, 2.0, -1.25]),
                                  st.sampled_from([0.0, 1.5, 4.0])), max_size=6)


@settings(max_examples=100, deadline=None)
@given(moves_values)
def test_a_copy_moves_each_value_once(values: list[tuple[int, int, float, float]]) -> None:
    q, d, pairs = memory(values)
    moved = copy_moves(q, d, STATE, SEQ, 7, pairs)
    assert moved == sum(1 for (_o, _n, summary), (oc, _nc, of, _nf) in zip(pairs, values,
                                                                          strict=True)
                        if oc or (summary and of))
    for (o, n, summary), (oc, nc, of, nf) in zip(pairs, values, strict=True):
        assert q[o] == 0 and q[n] == oc + nc
        if summary:
            assert d[o + 1] == 0.0 and d[n + 1] == of + nf
    assert q[SEQ] == 2 and q[STATE + MS_DONE] == 7 and q[STATE + MS_STEP] == 0


@settings(max_examples=60, deadline=None)
@given(moves_values, st.data())
def test_a_copy_killed_anywhere_is_finished_exactly_by_the_next_owner(
        values: list[tuple[int, int, float, float]], data: st.DataObject) -> None:
    q0, d0, pairs = memory(values)
    stores = 3 + 9 * len(values)  # an upper bound on the stores of one copy
    budget = [data.draw(st.integers(0, stores), label="stores before the kill")]
    with contextlib.suppress(Killed):
        copy_moves(Dying(q0, budget), Dying(d0, budget), STATE, SEQ, 5, pairs)
    # The next owner (lease taker, try_lock of the id, overflow lock) runs the same copy.
    copy_moves(q0, d0, STATE, SEQ, 5, pairs)
    for (o, n, summary), (oc, nc, of, nf) in zip(pairs, values, strict=True):
        assert q0[o] == 0 and q0[n] == oc + nc, "a value was lost or counted twice"
        if summary:
            assert d0[o + 1] == 0.0 and d0[n + 1] == of + nf
    assert q0[SEQ] % 2 == 0 and q0[STATE + MS_DONE] == 5 and q0[STATE + MS_STEP] == 0


def test_the_owners_adds_between_moves_are_kept() -> None:
    """Between two moves (the loop's backward jump) other threads of the owner may run and add
    to new copies already rebound; those adds survive."""
    q, d, pairs = memory([(5, 0, 0.0, 0.0), (7, 1, 0.0, 0.0), (9, 0, 0.0, 0.0)])

    class Interleaved(list[Any]):
        def __iter__(self) -> Iterator[Any]:
            for pair in list.__iter__(self):
                yield pair
                q[pair[1]] += 100  # a thread switch at the backward jump: an add to new

    copy_moves(q, d, STATE, SEQ, 1, Interleaved(pairs))
    assert [q[n] for _o, n, _s in pairs] == [105, 108, 109]
    assert [q[o] for o, _n, _s in pairs] == [0, 0, 0]


def test_finish_interrupted_redoes_the_journalled_step() -> None:
    q, d, pairs = memory([(5, 10, 0.0, 0.0)])
    o, n, _s = pairs[0]
    # The copier journalled (old 5, new 10), stored new = 15, and died before old = 0.
    q[STATE + 2], q[STATE + 3], q[STATE + MS_STEP] = 5, 10, 1
    q[n] = 15
    assert finish_interrupted(q, d, STATE, pairs)
    assert (q[o], q[n], q[STATE + MS_STEP]) == (0, 15, 0)
    assert not finish_interrupted(q, d, STATE, pairs)
    q[STATE + MS_STEP] = 1
    with pytest.raises(ValueError):
        finish_interrupted(q, d, STATE, [None])


# -- membarrier --------------------------------------------------------------------------


def test_the_fence_strategy() -> None:
    assert mb.choose_strategy("x86_64", None, False) == "tso"
    assert mb.choose_strategy("aarch64", None, False) == "lock"
    every = mb.MEMBARRIER_CMD_GLOBAL | mb.MEMBARRIER_CMD_GLOBAL_EXPEDITED
    assert mb.choose_strategy("aarch64", every, True) == "global-expedited"
    assert mb.choose_strategy("aarch64", every, False) == "global"
    assert mb.choose_strategy("ppc64le", mb.MEMBARRIER_CMD_PRIVATE_EXPEDITED, True) == "lock"
    assert mb.STRATEGY in mb.STRATEGIES
    assert (mb.STRATEGY == "lock") == mb.READ_UNDER_LOCK
    mb.fence()  # whatever the strategy, it returns
    assert mb.register()


@pytest.mark.skipif(mb.query() is None, reason="membarrier is not available here")
def test_membarrier_commands_work_here() -> None:
    supported = mb.query()
    assert supported is not None
    if supported & mb.MEMBARRIER_CMD_GLOBAL:
        mb.membarrier(mb.MEMBARRIER_CMD_GLOBAL)
    if supported & mb.MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED:
        mb.membarrier(mb.MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED)
        mb.membarrier(mb.MEMBARRIER_CMD_GLOBAL_EXPEDITED)
    with pytest.raises(OSError):
        mb.membarrier(1 << 30)


# -- the domain, one holder ----------------------------------------------------------------


def churn(d: Domain, n: int, keep: float, seed: int = 1) -> dict[int, Counter]:
    """Register ``n`` counters (counter i = i), then remove all but a ``keep`` fraction."""
    cs = {i: d.counter("c", {"i": str(i)}) for i in range(n)}
    for i, c in cs.items():
        c.add(i)
    rng = random.Random(seed)
    for i in rng.sample(range(n), n - int(n * keep)):
        d.remove("c", {"i": str(i)})
        del cs[i]
    return cs


def test_compact_gives_pages_back_and_keeps_every_value() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        cs = churn(d, 3000, 0.1)
        g, s = d.gauge("g"), d.summary("s")
        g.add(-7)
        s.observe(2.5)
        before = d.stats()
        r = d.compact()
        after = d.stats()
        assert isinstance(r, CompactResult) and r.pending_moves == 0 and r.batches >= 1
        assert r.pages_before == before.pages and r.pages_after == after.pages
        assert r.pages_after <= r.ideal_pages + 1 < before.pages
        assert r.reclaimed_pages == before.pages - after.pages == after.compacted_pages
        assert r.moved == after.moved_slots > 0 and after.compaction_batches == r.batches
        assert after.arena_used_bytes < before.arena_used_bytes
        assert after.arena_pages_used == -(-after.arena_used_bytes // 4096)
        assert after.pending_moves == 0 and after.pending_move_seconds == 0.0
        assert len(r.grace_seconds) == r.batches
        for i, c in cs.items():
            assert c.value == i
            c.inc()
            assert c.value == i + 1
        assert g.value == -7 and s.value == (1, 2.5)
        snap = {(m.name, m.labels): m.value for m in d.snapshot()}
        assert all(snap[("c", (("i", str(i)),))] == i + 1 for i in cs)
        assert d.check().ok
        again = d.compact()
        assert again.batches == 0 and again.moved == 0 and again.pages_after == after.pages


def test_a_raw_object_pins_its_pageset() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        cs = churn(d, 1200, 0.05)
        raw = d.alloc(8)  # lands in a sparse pageset (the cache refills from the densest)
        raw.local[:] = b"12345678"
        ps = split_ref(raw._ref)[0]
        d.compact()
        assert d._pagesets.entry(ps)[0] != 0  # still a pageset
        assert bytes(raw.local) == b"12345678" and split_ref(raw._ref)[0] == ps
        assert all(c.value == i for i, c in cs.items())
        raw.free()
        assert d.check().ok


def test_compact_refuses_bad_arguments_and_changes_nothing() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        churn(d, 700, 0.1)
        pages = d.stats().pages
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(InvalidArgument):
                d.compact(bad)
        for wrong in ("1", True):  # a wrong type is InvalidType, as everywhere
            with pytest.raises(InvalidType):
                d.compact(wrong)  # type: ignore[arg-type]
        for bad_moves in (0, MOVE_CAP + 1):
            with pytest.raises(InvalidArgument):
                d.compact(max_moves=bad_moves)
        for wrong_moves in (1.5, None):
            with pytest.raises(InvalidType):
                d.compact(max_moves=wrong_moves)  # type: ignore[arg-type]
        for bad_threshold in (0, 1.5, -0.1):
            with pytest.raises(InvalidArgument):
                d.set_compaction(bad_threshold)
        with pytest.raises(InvalidType):
            d.set_compaction("0.5")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            d.set_compaction(0.5, interval=0)
        with pytest.raises(InvalidArgument):
            d.set_compaction(0.5, timeout=float("inf"))
        assert d.stats().pages == pages and d.stats().moved_slots == 0
        assert d._moves.policy is None


def test_the_batch_size_limit_runs_several_batches() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        cs = churn(d, 2600, 0.08)  # about 40 live a pageset
        r = d.compact(max_moves=50)  # one source a batch
        assert r.batches > 1 and all(c.value == i for i, c in cs.items())
        assert r.pages_after <= r.ideal_pages + 1
        assert d.check().ok


def test_the_policy_compacts_in_the_background() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        cs = churn(d, 1500, 0.1)
        d.set_compaction(0.9, interval=0.01, timeout=1.0)
        deadline = time.monotonic() + 10
        while d.stats().compaction_batches == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        d.set_compaction(None)
        assert d._moves.policy is None and d._moves.policy_runs >= 1
        assert d.stats().compaction_batches >= 1
        assert all(c.value == i for i, c in cs.items())
        d.set_compaction(0.5, interval=10.0)  # left running: close() stops it
    assert d._moves.policy is None


def test_the_hot_path_reads_nothing_but_cells_and_index() -> None:
    """Compaction adds no check per update: the statement loads two attributes (and a float
    amount's branch ``_floats``, rebound with ``_cells`` and ``_index``)."""
    for fn in (Counter.inc, Counter.add):
        loads = {i.argval for i in dis.get_instructions(fn)
                 if i.opname in ("LOAD_ATTR", "LOAD_METHOD")}
        assert loads <= {"_cells", "_index", "_floats", "_store_failed", "__class__"}, loads


def scattered(d: Domain, hot: int, tag: str, n: int = 1500) -> list[Counter]:
    """``hot`` counters spread over the pagesets of ``n`` registrations (the rest removed):
    compaction has to move all but one pageset's worth of them."""
    step = n // hot
    chosen = set(range(step // 2, n, step)[:hot])
    out = []
    for j in range(n):
        c = d.counter(f"s{tag}", {"j": str(j)})
        if j in chosen:
            out.append(c)
    for j in range(n):
        if j not in chosen:
            d.remove(f"s{tag}", {"j": str(j)})
    return out


def test_threads_lose_no_update_while_the_compactor_rebinds() -> None:
    """The compacting thread rebinds and copies (holding the GIL) while others increment."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with Domain(SIZE, max_vcpus=2, lock=False) as d:
            for round_ in range(3):
                hot = scattered(d, 4, str(round_))
                refs = [c._ref for c in hot]
                stop = threading.Event()
                done = [0] * 4

                def work(k: int, c: Counter, stop: threading.Event = stop,
                         done: list[int] = done) -> None:
                    while not stop.is_set():
                        for _ in range(100):
                            c.inc()
                        done[k] += 100

                threads = [threading.Thread(target=work, args=(k, hot[k])) for k in range(4)]
                for t in threads:
                    t.start()
                try:
                    while min(done) == 0 and all(t.is_alive() for t in threads):
                        time.sleep(0.001)  # every thread counts: each id's pages exist
                    r = d.compact()
                    time.sleep(0.02)
                finally:
                    stop.set()
                    for t in threads:
                        t.join()
                assert r.moved >= 2 and [c._ref for c in hot] != refs
                assert [c.value for c in hot] == done
    finally:
        sys.setswitchinterval(old)


def test_a_value_read_through_a_ref_loaded_before_the_move_is_forwarded() -> None:
    """A reader thread loads ``_ref`` and is switched out; another thread of the same process
    compacts, syncs this process and gives the old pages back. The read that resumes must
    follow the move, although this process has seen the new generation already."""
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        hot = scattered(d, 3, "fwd")
        for k, c in enumerate(hot):
            c.add(1000 + k)
        stale = [c._ref for c in hot]  # what the reader had loaded
        assert d.compact().moved >= 2
        assert [c._ref for c in hot] != stale
        assert [d._read_sum(ref, 8) for ref in stale] == [1000, 1001, 1002]
        assert [c.value for c in hot] == [1000, 1001, 1002]


def test_readers_in_threads_never_see_a_counter_go_backwards() -> None:
    with Domain(SIZE, max_vcpus=2, lock=False) as d:
        problems: list[str] = []
        for round_ in range(3):
            hot = scattered(d, 3, str(round_))
            stop = threading.Event()

            def write(hot: list[Counter] = hot, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    for c in hot:
                        c.inc()

            def read(hot: list[Counter] = hot, stop: threading.Event = stop,
                     name: str = f"s{round_}") -> None:
                last = [0] * 3
                while not stop.is_set():
                    now = [c.value for c in hot]
                    snap = {m.labels: m.value for m in d.snapshot() if m.name == name}
                    for i, c in enumerate(hot):
                        seen = int(snap[c.labels])
                        if now[i] < last[i] or seen < now[i]:
                            problems.append(f"{i}: {last[i]} -> {now[i]} (snapshot {seen})")
                        last[i] = seen

            threads = [threading.Thread(target=write), threading.Thread(target=read)]
            for t in threads:
                t.start()
            try:
                time.sleep(0.02)
                assert d.compact().moved >= 2
                time.sleep(0.02)
            finally:
                stop.set()
                for t in threads:
                    t.join()
        assert problems == []


# -- the domain, several holders in one process ----------------------------------------------




def open_holder(path: str, holders: list[Domain]) -> Domain:
    d = Domain.open(path)
    holders.append(d)
    d.vcpu_id()
    return d


def in_flight(d: Domain) -> bool:
    return bool(int(d._root[D_MV_GEN]) & 1)


def test_a_holder_that_never_quiesces_delays_reclamation_not_correctness(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    bc = {i: b.counter("c", {"i": str(i)}) for i in cs}
    for c in bc.values():
        c.add(1000)
    old_index = {i: writer(c)._index for i, c in bc.items()}
    r = a.compact(timeout=0.05)
    assert r.pending_moves > 0 and r.batches == 0 and in_flight(a)
    st_ = a.stats()
    assert st_.pending_moves == r.pending_moves and st_.pending_move_seconds > 0
    # b has not rebound: it still writes its old copy, and every reader counts it.
    moved = [i for i, c in bc.items() if writer(c)._index == old_index[i]]
    assert moved
    for i, c in bc.items():
        c.inc()
        assert c.value == cs[i].value == i + 1001
    snap = {m.labels: m.value for m in b.snapshot()}
    assert all(snap[(("i", str(i)),)] == i + 1001 for i in cs)
    assert a.check().ok
    b._quiesce()  # b's quiescent point: rebinds, copies its values, acknowledges
    for c in bc.values():
        c.add(0)  # per-thread mode: the quiescent point unbound the thread's handles
    assert any(writer(c)._index != old_index[i] for i, c in bc.items())
    r = a.compact(timeout=5)
    assert r.pending_moves == 0 and not in_flight(a) and r.reclaimed_pages > 0
    for i, c in bc.items():
        c.inc()
        assert c.value == cs[i].value == i + 1002
    assert a.check().ok


def test_a_dead_holders_values_are_moved_by_whoever_takes_its_lease_byte(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    for i in cs:
        b.counter("c", {"i": str(i)}).add(500)
    b._abandon()  # SIGKILL: its lease goes, its copies stay
    holders.remove(b)
    r = a.compact(timeout=5)
    assert r.pending_moves == 0 and r.reclaimed_pages > 0
    assert all(c.value == i + 500 for i, c in cs.items())
    c2 = open_holder(path, holders)  # takes the dead id over, values and all
    assert c2.last_lease_path is not None and c2.last_lease_path.value == "reclaimed"
    for i in cs:
        h = c2.counter("c", {"i": str(i)})
        h.inc()
        assert h.value == i + 501
    assert a.check().ok


def test_a_new_holder_of_a_dead_id_moves_its_values_before_binding(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    for i in cs:
        b.counter("c", {"i": str(i)}).add(300)
    vcpu_b = b._lease.vcpu
    assert vcpu_b is not None
    a.compact(timeout=0)  # published; b has not acknowledged
    assert in_flight(a)
    b._abandon()
    holders.remove(b)
    c2 = open_holder(path, holders)
    assert c2._lease.vcpu == vcpu_b
    gen = int(a._root[D_MV_GEN])
    assert int(a._root[move_state_base(2, vcpu_b) + MS_DONE]) == gen  # adopted at lease time
    for i in cs:
        h = c2.counter("c", {"i": str(i)})
        h.add(2)
        assert h.value == i + 302
    r = a.compact(timeout=5)
    assert r.pending_moves == 0 and all(c.value == i + 302 for i, c in cs.items())
    assert a.check().ok


def test_a_released_holder_follows_a_whole_batch_from_the_registry(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    bc = {i: b.counter("c", {"i": str(i)}) for i in cs}
    for c in bc.values():
        c.add(10)
    b.release()  # unbound handles, no lease: b does not hold the grace period back
    r = a.compact(timeout=5)
    assert r.pending_moves == 0 and r.moved > 0
    for i, c in bc.items():
        assert c.value == i + 10  # a stale _ref is followed, not read from a reused slot
        c.inc()  # takes a lease again, binds where the metric lives now
        assert c.value == cs[i].value == i + 11
    assert a.check().ok


def test_a_removal_during_a_batch_waits_for_it(shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    bc = {i: b.counter("c", {"i": str(i)}) for i in cs}
    a.compact(timeout=0)
    assert in_flight(a)
    victim = next(i for i in cs if cs[i]._ref != bc[i]._ref)  # moved; b not rebound yet
    a.remove("c", {"i": str(victim)})
    b._quiesce()
    with pytest.raises(MetricRemoved):
        bc[victim].inc()
    assert a.compact(timeout=5).pending_moves == 0
    assert a.synchronize(timeout=5)
    again = a.counter("c", {"i": str(victim)})
    assert again.value == 0
    assert all(c.value == i for i, c in cs.items() if i != victim)
    assert a.check().ok


def test_an_overflow_holder_is_moved_under_the_overflow_lock(
        shared: tuple[str, list[Domain]]) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    o = open_holder(path, holders)
    assert o._lease.vcpu == 2  # every id taken: the overflow id
    oc = {i: o.counter("c", {"i": str(i)}) for i in cs}
    for c in oc.values():
        c.add(40)
    a.compact(timeout=0)
    assert in_flight(a)
    for c in oc.values():
        c.inc()  # still on the old slot: counted
    b._quiesce()
    assert a.compact(timeout=0.05).pending_moves > 0  # o has not acknowledged
    o._quiesce()
    r = a.compact(timeout=5)
    assert r.pending_moves == 0
    for i, c in oc.items():
        c.inc()
        assert c.value == i + 42
    assert a.check().ok


@dataclass
class Crash:
    """Kill the copier after ``stores`` stores into the shared words (copy_moves' q and d)."""

    stores: int
    budget: list[int] = field(default_factory=list)

    def copy(self, q: Any, d: Any, *args: Any, **kw: Any) -> int:
        self.budget = [self.stores]
        return copy_moves(Dying(q, self.budget), Dying(d, self.budget), *args, **kw)


@pytest.mark.parametrize("stores", [0, 1, 5, 6, 9, 40])
def test_a_copier_killed_mid_copy_is_finished_under_the_lock(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch, stores: int) -> None:
    path, holders = shared
    a = holders[0]
    cs = churn(a, 1200, 0.05)
    b = open_holder(path, holders)
    for i in cs:
        b.counter("c", {"i": str(i)}).add(7)
    vcpu_b = b._lease.vcpu
    assert vcpu_b is not None
    a.compact(timeout=0)
    crash = Crash(stores)
    monkeypatch.setattr(moves_module, "copy_moves", crash.copy)
    with pytest.raises(Killed):
        b._quiesce()  # b is killed inside its copy
    monkeypatch.undo()
    b._abandon()
    holders.remove(b)
    seq = int(a._root[lease_base(2, vcpu_b) + L_SEQ])
    assert seq % 2 == (1 if stores else 0)  # left odd by a copier that died inside
    # A reader retries, then reads under the lock after finishing the copy.
    assert all(c.value == i + 7 for i, c in cs.items())
    assert int(a._root[lease_base(2, vcpu_b) + L_SEQ]) % 2 == 0
    assert a.compact(timeout=5).pending_moves == 0
    assert all(c.value == i + 7 for i, c in cs.items())
    assert a.check().ok


@pytest.mark.parametrize("when", ["registry", "completion", "pages"])
def test_a_compactor_killed_mid_batch_leaves_work_the_next_one_finishes(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    path, holders = shared
    a = holders[0]
    b = open_holder(path, holders)
    cs = churn(b, 1200, 0.05)
    for i in cs:
        a.counter("c", {"i": str(i)}).add(3)
    b._quiesce()
    inside = [False]
    calls = [0]

    def during(method: str) -> None:
        real = getattr(Moves, method)

        def wrapped(self: Moves, *args: Any) -> Any:
            inside[0] = True
            try:
                return real(self, *args)
            finally:
                inside[0] = False

        monkeypatch.setattr(Moves, method, wrapped)

    def dies_on(method: str, at: int, owner: type = Domain) -> None:
        real = getattr(owner, method)

        def wrapped(self: Any, *args: Any) -> Any:
            if inside[0]:
                calls[0] += 1
                if calls[0] == at:
                    raise Killed
            return real(self, *args)

        monkeypatch.setattr(owner, method, wrapped)

    if when == "registry":  # after the commit, before the registry points at the new refs
        during("publish")
        dies_on("set_ref", 1, Registry)
        with pytest.raises(Killed):
            a.compact(timeout=0)
    else:  # some old slots returned (or some pages freed), then killed
        a.compact(timeout=0)
        b._quiesce()
        during("complete")
        if when == "completion":  # the fifth old slot given back
            dies_on("give_back", 5, Pagesets)
        else:  # the first emptied page freed, killed freeing the second
            dies_on("free", 2, Arena)
        with pytest.raises(Killed):
            a.compact(timeout=1)
    monkeypatch.undo()
    assert in_flight(b)
    a._abandon()
    holders.remove(a)
    assert all(c.value == i + 3 for i, c in cs.items())
    r = b.compact(timeout=5)
    assert r.pending_moves == 0 and not in_flight(b)
    assert all(c.value == i + 3 for i, c in cs.items())
    report = b.check(reclaim=True)
    assert not report.problems, report


# -- a state machine over holders, metrics, removals and compaction ----------------------------

Key = tuple[str, int]  # (metric name, label i): "m_counter", "m_gauge", "m_summary", "filler"
KIND_OF = {"m_counter": "counter", "m_gauge": "gauge", "m_summary": "summary",
           "filler": "counter", "sfiller": "summary"}
FILLERS = ("filler", "sfiller")


@dataclass
class Holder:
    dom: Domain
    handles: dict[Key, Any] = field(default_factory=dict)


class CompactMachine(SharedDomainMachine):
    """Holders (two ids and the overflow id) add, register, remove, churn, release and die;
    compaction batches are published, acknowledged and driven step by step. Every read, by
    every holder, must equal the model after every step."""

    tmp_prefix = "test_compact_sm-"

    def __init__(self) -> None:
        super().__init__()
        self.holders: list[Holder] = []
        self.model: dict[Key, Any] = {}  # value, or [count, sum] for a summary
        self.fillers = 0

    @initialize()
    def create(self) -> None:
        self.holders.append(Holder(Domain.create(self.path, SIZE, max_vcpus=2)))

    def pick(self, data: st.DataObject) -> Holder:
        return data.draw(st.sampled_from(self.holders), label="holder")

    def handle(self, h: Holder, key: Key) -> Any:
        name, i = key
        found = h.handles.get(key)
        if found is None:
            found = h.handles[key] = getattr(h.dom, KIND_OF[name])(name, {"i": str(i)})
        return found

    def add_to(self, h: Holder, key: Key, n: int) -> None:
        c = self.handle(h, key)
        if KIND_OF[key[0]] == "summary":
            c.observe(n)
            value = self.model.setdefault(key, [0, 0.0])
            value[0] += 1
            value[1] += n
        else:
            c.add(n)
            self.model[key] = self.model.get(key, 0) + n

    def quiesce_all(self) -> None:
        for h in self.holders:
            h.dom._quiesce()

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.holders) < 3)
    @rule()
    def open_holder(self) -> None:
        h = Holder(Domain.open(self.path))
        h.dom.vcpu_id()
        self.holders.append(h)

    @precondition(lambda self: len(self.holders) > 1)
    @rule(data=st.data(), kill=st.booleans())
    def close_holder(self, data: st.DataObject, kill: bool) -> None:
        h = self.pick(data)
        h.dom._abandon() if kill else h.dom.close()
        self.holders.remove(h)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.pick(data).dom.release()

    @rule(data=st.data(), name=st.sampled_from(["m_counter", "m_gauge", "m_summary"]),
          i=st.integers(0, 5), n=st.integers(0, 1000))
    def add(self, data: st.DataObject, name: str, i: int, n: int) -> None:
        self.add_to(self.pick(data), (name, i), n if name != "m_gauge" else n - 500)

    @precondition(lambda self: any(k[0] in FILLERS for k in self.model))
    @rule(data=st.data())
    def add_to_a_filler(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k in self.model if k[0] in FILLERS)))
        self.add_to(self.pick(data), key, data.draw(st.integers(0, 100)))

    @rule(data=st.data(), name=st.sampled_from(["m_counter", "m_gauge", "m_summary"]),
          i=st.integers(0, 5))
    def remove(self, data: st.DataObject, name: str, i: int) -> None:
        h = self.pick(data)
        key = (name, i)
        assert h.dom.remove(name, {"i": str(i)}) == (key in self.model)
        self.model.pop(key, None)
        self.quiesce_all()  # every holder retires its handles of it now
        for other in self.holders:
            other.handles.pop(key, None)

    @rule(data=st.data(), name=st.sampled_from(FILLERS), n=st.integers(600, 1200),
          keep=st.integers(1, 6))
    def churn(self, data: st.DataObject, name: str, n: int, keep: int) -> None:
        """Many short-lived metrics, a few kept (with values): sparse pagesets whose live
        metrics compaction must move (summaries: half as many, 256 a page)."""
        h = self.pick(data)
        n = n // 2 if name == "sfiller" else n
        base = self.fillers
        self.fillers += n
        for j in range(base, base + n):
            self.handle(h, (name, j))
        for j in range(base, base + n):
            if (j - base) % 97 < keep:
                self.add_to(h, (name, j), j + 1)
            else:
                h.dom.remove(name, {"i": str(j)})
                h.handles.pop((name, j))
        self.quiesce_all()  # the removed slots are free again: pagesets are now sparse

    @rule(data=st.data())
    def compact_start(self, data: st.DataObject) -> None:
        self.pick(data).dom.compact(timeout=0, max_moves=data.draw(st.integers(1, 300)))

    @rule(data=st.data())
    def quiesce(self, data: st.DataObject) -> None:
        self.pick(data).dom._quiesce()

    @rule(data=st.data())
    def drive(self, data: st.DataObject) -> None:
        self.pick(data).dom._moves.tick()

    @rule(data=st.data())
    def compact_fully(self, data: st.DataObject) -> None:
        d = self.pick(data).dom
        for _ in range(50):
            self.quiesce_all()
            if d.compact(timeout=0).pending_moves == 0 and not in_flight(d):
                break
        assert not in_flight(d)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def reads_match_the_model(self) -> None:
        for h in self.holders:
            snap = {(m.name, m.labels): m for m in h.dom.snapshot()}
            assert len(snap) == len(self.model)
            for (name, i), value in self.model.items():
                m = snap[(name, (("i", str(i)),))]
                if KIND_OF[name] == "summary":
                    assert (m.count, m.value) == (value[0], value[1])
                else:
                    assert m.value == value
            for key, c in h.handles.items():
                got = c.value
                assert (list(got) if KIND_OF[key[0]] == "summary" else got) == self.model[key]

    @invariant()
    def structures_are_consistent(self) -> None:
        d = self.holders[0].dom
        report = d.check()
        assert not report.problems, report.problems
        if not in_flight(d):
            assert d.stats().pending_moves == 0


CompactMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCompactMachine = CompactMachine.TestCase


def test_machine_temp_files_are_cleaned_up() -> None:
    """Only this process's: another test session may be running beside this one."""
    made = [d for d in SharedDomainMachine.made if Path(d).name.startswith("test_compact_sm-")]
    assert not [d for d in made if Path(d).exists()]
