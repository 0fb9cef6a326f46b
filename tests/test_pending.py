"""The pending-free queue as pure logic (``percpu._pending``), against a model.

Words live in a bytearray; the arena is ``_model.FakeHeap``, a bump allocator that records
what it gave and got back. A small inline capacity makes the spill table grow (and move)
within a few pushes.
"""

from __future__ import annotations

import pytest
from _model import FakeHeap
from hypothesis import given, settings
from hypothesis import strategies as st

import percpu._pending as pending_mod
from percpu._layout import D_PENDING, D_SPILL, D_SPILL_N, HEADER_WORDS, PENDING_WORDS
from percpu._pending import PendingQueue

CAP = 4  # inline entries in these tests
BASE = HEADER_WORDS  # the inline part's first word in the fake root


def make(heap: FakeHeap) -> PendingQueue:
    root = heap.view[: BASE * 8 + CAP * PENDING_WORDS * 8].cast("Q")
    return PendingQueue(root, heap.view, BASE, heap.alloc, heap.free)


@pytest.fixture(autouse=True)
def small_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pending_mod, "PENDING_CAP", CAP)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("push"), st.integers(0, 50)),
                          st.tuples(st.just("take"), st.integers(0, 60))), max_size=60))
def test_the_queue_holds_exactly_what_the_model_holds(ops: list[tuple[str, int]]) -> None:
    heap = FakeHeap()
    q = make(heap)
    model: list[tuple[int, int]] = []
    epoch = 0
    for op, n in ops:
        if op == "push":
            epoch += 1
            q.push(1000 + n, epoch)
            model.append((1000 + n, epoch))
        else:
            keep = {1000 + n}
            due = q.take_due(n, keep)
            expect = [e for e in model if e[1] <= n and e[0] not in keep]
            assert sorted(due) == sorted(ref for ref, _ in expect)
            for e in expect:
                model.remove(e)
        assert sorted(q.entries()) == sorted(model)
        assert q.count() == len(model)
        assert q.problem(len(heap.mem)) is None
    assert len(heap.live) <= 1  # a grown table gave the old one back


def test_the_spill_table_doubles_and_a_failed_reserve_changes_nothing() -> None:
    big = FakeHeap()
    q = make(big)
    caps = []
    for i in range(CAP + 7 * CAP):
        q.push(i, i + 1)
        caps.append(len(q.parts()[-1][0]) // PENDING_WORDS if len(q.parts()) > 1 else 0)
    assert sorted(set(caps)) == [0, CAP, 2 * CAP, 4 * CAP, 8 * CAP]  # doubling
    assert sorted(ref for ref, _ in q.entries()) == list(range(8 * CAP))
    heap = FakeHeap(size=4096 + CAP * PENDING_WORDS * 8 + 100)  # room for the first table only
    q = make(heap)
    for i in range(CAP + CAP):  # inline part full, then the first spill table (CAP entries)
        q.push(i, i + 1)
    root = q.parts()[0][0]
    before = bytes(heap.mem)
    with pytest.raises(AssertionError):  # the fake arena's "DomainFull"
        q.push(99, 99)
    assert bytes(heap.mem) == before  # nothing was written
    assert (root[D_PENDING], root[D_SPILL_N]) == (CAP, CAP) and root[D_SPILL]


def test_damaged_counts_are_reported() -> None:
    heap = FakeHeap()
    q = make(heap)
    root = q.parts()[0][0]
    root[D_PENDING] = CAP + 1
    assert q.problem(len(heap.mem)) is not None
    root[D_PENDING] = 0
    root[D_SPILL_N] = 1  # a spill count without a spill table
    assert q.problem(len(heap.mem)) is not None
