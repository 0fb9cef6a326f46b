"""Tests for arena._pool: the preallocated pool and its delayed replenisher.

The replenisher is driven by an injected clock and ``replenish_due`` (``start=False``) wherever
the test is about logic; real threads appear only where the test is about threads or fork, and
then they wait for an event with a generous deadline, never for a measured duration.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _children import run_in_child
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from arena._arena import Arena, Block
from arena._errors import (
    ArenaClosed,
    ArenaExhausted,
    DoubleFree,
    ForeignBlock,
    InvalidArgument,
    InvalidType,
    PoolEmpty,
    PoolForkError,
)
from arena._pool import Pool, PoolStats

fork_warning = pytest.mark.filterwarnings(
    "ignore:.*multi-threaded.*fork.*:DeprecationWarning")  # Python 3.12+ warns; we test it


# ------------------------------------------------------------------------------------------
# Helpers


class Thing:
    """A pooled object that is deliberately unhashable (the pool tracks identity)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.dirty = False
        self.poisoned = False

    def __eq__(self, other: object) -> bool:  # equal to every other Thing: identity matters
        return isinstance(other, Thing)

    def __repr__(self) -> str:
        return f"<Thing {self.serial}>"


class Maker:
    """A factory that logs what it makes, and a release/reset that log what they see."""

    def __init__(self) -> None:
        self.made: list[Thing] = []
        self.released: list[Thing] = []
        self.resets: list[Thing] = []
        self.fail_next = 0  # the next N calls raise

    def __call__(self) -> Thing:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("factory failed on purpose")
        thing = Thing(len(self.made))
        self.made.append(thing)
        return thing

    def release(self, thing: Thing) -> None:
        self.released.append(thing)

    def reset(self, thing: Thing) -> None:
        self.resets.append(thing)
        if thing.poisoned:
            raise ValueError("cannot reset a poisoned thing")
        thing.dirty = False


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], bool], deadline_s: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds or the (generous, liveness-only) deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


@pytest.fixture
def maker() -> Maker:
    return Maker()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def private_arena() -> Iterator[Arena]:
    a = Arena(1 << 16, block_size=64, lock=False)
    yield a
    a.close()


@pytest.fixture
def shared_arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena.create(tmp_path / "pool.arena", 1 << 16, block_size=64, lock=False)
    yield a
    a.close()


# ------------------------------------------------------------------------------------------
# Filling, get, put, the watermark and the delayed refill (deterministic, no thread)


def test_filled_at_creation(maker: Maker) -> None:
    pool = Pool(maker, size=5, start=False)
    assert len(maker.made) == 5
    st_ = pool.stats()
    assert (st_.ready, st_.handed_out, st_.created, st_.capacity) == (5, 0, 5, 5)
    assert st_.lowest_ready == 5
    assert not st_.replenisher_running
    pool.check_invariants()


def test_get_hands_out_ready_items_without_making_any(maker: Maker) -> None:
    pool = Pool(maker, size=4, start=False)
    got = [pool.get() for _ in range(4)]
    assert len(maker.made) == 4  # nothing made on demand
    assert {id(x) for x in got} == {id(x) for x in maker.made}
    st_ = pool.stats()
    assert (st_.fast_gets, st_.slow_gets, st_.ready, st_.handed_out) == (4, 0, 0, 4)
    assert st_.lowest_ready == 0


def test_put_makes_the_item_ready_again_warm_first(maker: Maker) -> None:
    pool = Pool(maker, size=3, start=False)
    a = pool.get()
    pool.put(a)
    assert pool.get() is a  # the most recently returned item goes out first
    pool.put(a)
    assert pool.stats().puts == 2
    pool.check_invariants()


def test_empty_pool_creates_on_the_spot_and_counts_it(maker: Maker) -> None:
    pool = Pool(maker, size=2, low_watermark=0, start=False)
    pool.get()
    pool.get()
    extra = pool.get()
    assert extra is maker.made[-1] and len(maker.made) == 3
    st_ = pool.stats()
    assert (st_.fast_gets, st_.slow_gets, st_.created, st_.handed_out) == (2, 1, 3, 3)
    pool.check_invariants()


def test_empty_pool_raises_when_asked_to(maker: Maker) -> None:
    pool = Pool(maker, size=1, on_empty="raise", start=False)
    pool.get()
    with pytest.raises(PoolEmpty):
        pool.get()
    with pytest.raises(LookupError):  # PoolEmpty is a LookupError too
        pool.get()
    st_ = pool.stats()
    assert (st_.empty_raises, st_.slow_gets, st_.created) == (2, 0, 1)


def test_put_into_a_full_pool_releases_the_item(maker: Maker) -> None:
    pool = Pool(maker, size=2, low_watermark=0, release=maker.release, start=False)
    a, b, c = pool.get(), pool.get(), pool.get()  # c is made on the spot
    pool.put(a)
    pool.put(b)
    pool.put(c)  # two are ready already: c is released
    assert maker.released == [c]
    st_ = pool.stats()
    assert (st_.ready, st_.dropped, st_.puts) == (2, 1, 3)
    pool.check_invariants()


def test_refill_waits_for_the_delay_after_crossing_the_watermark(
        maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=8, low_watermark=4, refill_delay=2.0, batch=3, clock=clock,
                start=False)
    for _ in range(4):
        pool.get()
    assert pool.replenish_due() == 0  # 4 ready: not below the watermark
    pool.get()  # 3 ready < 4: a refill is due at now + 2
    clock.now += 1.999
    assert pool.replenish_due() == 0
    clock.now += 0.001
    assert pool.replenish_due() == 5  # back to 8, in batches of 3 + 2
    st_ = pool.stats()
    assert (st_.ready, st_.refills, st_.items_refilled, st_.created) == (8, 2, 5, 13)
    assert st_.lowest_ready == 3
    assert pool.replenish_due() == 0  # done: nothing due any more
    pool.check_invariants()


def test_refill_due_time_is_from_the_first_crossing(maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=4, low_watermark=4, refill_delay=1.0, clock=clock, start=False)
    pool.get()  # due at +1
    clock.now += 0.5
    pool.get()  # still due at +1: a burst does not push the refill back
    clock.now += 0.5
    assert pool.replenish_due() == 2


def test_replenish_due_accepts_an_explicit_now(maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=2, refill_delay=5.0, clock=clock, start=False)
    pool.get()
    pool.get()
    assert pool.replenish_due(clock.now + 4.9) == 0
    assert pool.replenish_due(clock.now + 5.0) == 2


def test_refill_time_is_measured_by_the_pool_clock(clock: FakeClock) -> None:
    def slow_factory() -> object:
        clock.now += 0.25  # each item "takes" a quarter of a second
        return object()

    pool = Pool(slow_factory, size=4, refill_delay=0.0, clock=clock, start=False)
    for _ in range(4):
        pool.get()
    assert pool.replenish_due() == 4
    assert pool.stats().refill_seconds == pytest.approx(1.0)


def test_low_watermark_zero_never_refills_like_mempool(maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=2, low_watermark=0, refill_delay=0.0, clock=clock, start=False)
    a, b, _ = pool.get(), pool.get(), pool.get()
    clock.now += 100
    assert pool.replenish_due() == 0
    pool.put(a)
    pool.put(b)  # refilled by put() only
    assert len(pool) == 2


def test_low_watermark_equal_to_size_refills_after_every_get(
        maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=3, low_watermark=3, refill_delay=0.0, clock=clock, start=False)
    pool.get()
    assert pool.replenish_due() == 1


def test_a_failing_factory_during_refill_is_counted_and_retried(
        maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=4, refill_delay=1.0, batch=2, clock=clock, start=False)
    for _ in range(4):
        pool.get()
    clock.now += 1
    maker.fail_next = 1
    assert pool.replenish_due() == 0
    st_ = pool.stats()
    assert (st_.refill_failures, st_.ready) == (1, 0)
    assert isinstance(pool.last_refill_error, RuntimeError)
    assert pool.replenish_due() == 0  # rescheduled refill_delay later, not now
    clock.now += 1
    assert pool.replenish_due() == 4
    pool.check_invariants()


def test_a_failure_mid_batch_keeps_what_was_made(maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=4, refill_delay=0.0, batch=4, clock=clock, start=False)
    for _ in range(4):
        pool.get()
    good = Maker()
    calls = 0

    def flaky() -> Thing:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("third call fails")
        return good()

    pool._factory = flaky
    assert pool.replenish_due() == 2
    assert len(pool) == 2 and pool.stats().refill_failures == 1
    pool.check_invariants()


def test_reset_runs_on_put(maker: Maker) -> None:
    pool = Pool(maker, size=2, reset=maker.reset, start=False)
    a = pool.get()
    a.dirty = True
    pool.put(a)
    assert maker.resets == [a] and not a.dirty


def test_a_failing_reset_releases_the_item_and_propagates(maker: Maker) -> None:
    pool = Pool(maker, size=2, reset=maker.reset, release=maker.release, start=False)
    a = pool.get()
    a.poisoned = True
    with pytest.raises(ValueError, match="poisoned"):
        pool.put(a)
    assert maker.released == [a]
    st_ = pool.stats()
    assert (st_.ready, st_.handed_out, st_.dropped) == (1, 0, 1)
    with pytest.raises(ForeignBlock):  # the pool has let go of it
        pool.put(a)
    pool.check_invariants()


def test_a_failing_factory_at_creation_releases_what_was_made(maker: Maker) -> None:
    maker.fail_next = 0
    calls = 0

    def third_fails() -> Thing:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("no more")
        return maker()

    with pytest.raises(RuntimeError, match="no more"):
        Pool(third_fails, size=5, release=maker.release, start=False)
    assert maker.released == maker.made and len(maker.made) == 2


def test_slow_path_factory_error_changes_nothing(maker: Maker) -> None:
    pool = Pool(maker, size=1, low_watermark=0, start=False)
    pool.get()
    before = pool.stats()
    maker.fail_next = 1
    with pytest.raises(RuntimeError):
        pool.get()
    assert pool.stats() == before


# ------------------------------------------------------------------------------------------
# Close and the context manager


def test_close_releases_ready_items_and_refuses_use(maker: Maker) -> None:
    pool = Pool(maker, size=3, release=maker.release, start=False)
    a = pool.get()
    pool.close()
    assert len(maker.released) == 2 and all(x is not a for x in maker.released)
    assert pool.closed and len(pool) == 0
    with pytest.raises(ArenaClosed):
        pool.get()
    with pytest.raises(ArenaClosed):
        pool.replenish_due()
    with pytest.raises(ArenaClosed):
        pool.start()
    with pytest.raises(ArenaClosed), pool:
        pass
    pool.close()  # idempotent
    st_ = pool.stats()
    assert st_.closed and st_.handed_out == 1
    pool.check_invariants()


def test_put_after_close_releases_the_item(maker: Maker) -> None:
    pool = Pool(maker, size=2, release=maker.release, start=False)
    a = pool.get()
    pool.close()
    pool.put(a)
    assert maker.released[-1] is a
    st_ = pool.stats()
    assert (st_.handed_out, st_.dropped, st_.created) == (0, 2, 2)
    with pytest.raises(ForeignBlock):
        pool.put(a)
    pool.check_invariants()


def test_context_manager_closes(maker: Maker) -> None:
    with Pool(maker, size=2, release=maker.release) as pool:
        assert pool.stats().replenisher_running
        thread = pool._thread
    assert pool.closed and len(maker.released) == 2
    assert thread is not None and not thread.is_alive()


def test_close_raises_the_first_release_error_after_releasing_all(maker: Maker) -> None:
    seen: list[Thing] = []

    def picky(thing: Thing) -> None:
        seen.append(thing)
        if len(seen) == 1:
            raise OSError("first release fails")

    pool = Pool(maker, size=3, release=picky, start=False)
    with pytest.raises(OSError, match="first release"):
        pool.close()
    assert len(seen) == 3 and pool.closed


# ------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing changed


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size": 0}, InvalidArgument),
        ({"size": -3}, InvalidArgument),
        ({"size": 2.0}, InvalidType),
        ({"size": "4"}, InvalidType),
        ({"size": True}, InvalidType),
        ({"size": 4, "low_watermark": -1}, InvalidArgument),
        ({"size": 4, "low_watermark": 5}, InvalidArgument),
        ({"size": 4, "low_watermark": 1.5}, InvalidType),
        ({"size": 4, "refill_delay": -0.1}, InvalidArgument),
        ({"size": 4, "refill_delay": math.nan}, InvalidArgument),
        ({"size": 4, "refill_delay": math.inf}, InvalidArgument),
        ({"size": 4, "refill_delay": "1"}, InvalidType),
        ({"size": 4, "refill_delay": None}, InvalidType),
        ({"size": 4, "batch": 0}, InvalidArgument),
        ({"size": 4, "batch": -1}, InvalidArgument),
        ({"size": 4, "batch": 2.5}, InvalidType),
        ({"size": 4, "on_empty": "block"}, InvalidArgument),
        ({"size": 4, "on_empty": None}, InvalidType),
        ({"size": 4, "after_fork": "share"}, InvalidArgument),
        ({"size": 4, "reset": 3}, InvalidType),
        ({"size": 4, "release": "free"}, InvalidType),
        ({"size": 4, "clock": 0.0}, InvalidType),
        ({"size": 4, "start": 1}, InvalidType),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_made(
        maker: Maker, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Pool(maker, **kwargs)
    assert maker.made == []
    assert str(info.value)  # a message naming the problem
    name = next(k for k in kwargs if k != "size") if len(kwargs) > 1 else "size"
    assert name in str(info.value)


def test_errors_are_the_builtin_kinds_too(maker: Maker) -> None:
    with pytest.raises(ValueError):
        Pool(maker, size=0)
    with pytest.raises(TypeError):
        Pool(maker, size="1")  # type: ignore[arg-type]


def test_factory_must_be_callable() -> None:
    with pytest.raises(InvalidType, match="factory"):
        Pool(42, size=1)  # type: ignore[arg-type]


def test_bad_block_arguments_take_nothing_from_the_arena(private_arena: Arena) -> None:
    before = private_arena.stats().free_bytes
    with pytest.raises(InvalidArgument):
        Pool.of_blocks(private_arena, 0, size=2)
    with pytest.raises(InvalidType):
        Pool.of_blocks(private_arena, 64.0, size=2)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Pool.of_blocks(private_arena, 64, size=2, low_watermark=3)
    with pytest.raises(InvalidArgument):  # the arena refuses the alignment on the first alloc
        Pool.of_blocks(private_arena, 64, align=3, size=2)
    assert private_arena.stats().free_bytes == before


def test_putting_back_twice_or_a_foreign_item_changes_nothing(maker: Maker) -> None:
    pool = Pool(maker, size=3, release=maker.release, start=False)
    handed = pool.get()
    returned = pool.get()
    pool.put(returned)
    other_pool = Pool(Maker(), size=1, start=False)
    from_other = other_pool.get()
    before = pool.stats()
    refusals: list[tuple[object, type[Exception]]] = [
        (returned, DoubleFree),
        (Thing(-1), ForeignBlock),  # never handed out
        ("not a thing", ForeignBlock),
        (from_other, ForeignBlock),  # another pool's
    ]
    for item, error in refusals:
        with pytest.raises(error):
            pool.put(item)  # type: ignore[arg-type]
        assert pool.stats() == before, item
    assert maker.released == []
    pool.put(handed)  # the real one is still accepted
    pool.check_invariants()


def test_double_put_of_a_block_and_foreign_blocks_change_nothing(
        private_arena: Arena, shared_arena: Arena) -> None:
    pool = Pool.of_blocks(private_arena, 128, size=2, start=False)
    other = Pool.of_blocks(shared_arena, 128, size=1, start=False)
    mine = pool.get()
    pool.put(mine)
    stray = private_arena.alloc(128)  # same arena, but not the pool's
    theirs = other.get()  # another arena's pool
    before, arena_before = pool.stats(), private_arena.stats().free_bytes
    for item, error in [(mine, DoubleFree), (stray, ForeignBlock), (theirs, ForeignBlock),
                        (b"bytes", InvalidType)]:
        with pytest.raises(error):
            pool.put(item)  # type: ignore[arg-type]
        assert pool.stats() == before
        assert private_arena.stats().free_bytes == arena_before
    with pytest.raises(ForeignBlock, match="another arena"):
        pool.put(theirs)
    other.put(theirs)
    other.close()
    private_arena.free(stray)
    pool.close()


def test_bad_now_changes_nothing(maker: Maker, clock: FakeClock) -> None:
    pool = Pool(maker, size=2, refill_delay=0.0, clock=clock, start=False)
    pool.get()
    pool.get()
    before = pool.stats()
    with pytest.raises(InvalidType):
        pool.replenish_due("later")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        pool.replenish_due(math.nan)
    assert pool.stats() == before and len(maker.made) == 2


# ------------------------------------------------------------------------------------------
# The model: a hypothesis state machine of get / put / replenish / close


class PoolMachine(RuleBasedStateMachine):
    """The pool against a plain model: dicts of ready and handed-out items by identity."""

    handed = Bundle("handed")
    returned = Bundle("returned")

    def __init__(self) -> None:
        super().__init__()
        self.pool: Pool[Any] | None = None

    @initialize(size=st.integers(1, 6), data=st.data())
    def make_pool(self, size: int, data: st.DataObject) -> None:
        self.size = size
        self.low = data.draw(st.integers(0, size), label="low_watermark")
        self.batch = data.draw(st.integers(1, size + 2), label="batch")
        self.delay = data.draw(st.sampled_from([0.0, 0.5, 2.0]), label="refill_delay")
        self.raise_on_empty = data.draw(st.booleans(), label="raise_on_empty")
        self.blocks = data.draw(st.booleans(), label="blocks")
        self.use_reset = not self.blocks and data.draw(st.booleans(), label="reset")
        self.now = 0.0
        self.made: list[Any] = []
        self.released: list[Any] = []
        self.arena: Arena | None = None
        on_empty = "raise" if self.raise_on_empty else "create"
        common: dict[str, Any] = dict(
            size=size, low_watermark=self.low, refill_delay=self.delay, batch=self.batch,
            on_empty=on_empty, clock=lambda: self.now, start=False)
        if self.blocks:
            self.arena = Arena(1 << 16, block_size=64, lock=False)
            self.arena_free = self.arena.stats().free_bytes
            self.pool = Pool.of_blocks(_Recorder(self.arena, self.made, self.released), 64,
                                       **common)
        else:
            self.maker = Maker()
            self.made = self.maker.made
            self.released = self.maker.released
            self.pool = Pool(self.maker, release=self.maker.release,
                             reset=self.maker.reset if self.use_reset else None, **common)
        self.ready: dict[int, Any] = {id(x): x for x in self.made}
        self.out: dict[int, Any] = {}
        self.closed = False
        self.due: float | None = None
        self.counts = dict(fast_gets=0, slow_gets=0, empty_raises=0, puts=0, refills=0,
                           items_refilled=0, dropped=0)
        self.lowest = size

    def _note_low(self) -> None:
        if len(self.ready) < self.low and self.due is None:
            self.due = self.now + self.delay

    @rule(target=handed)
    def get(self) -> Any:
        assert self.pool is not None
        if self.closed:
            with pytest.raises(ArenaClosed):
                self.pool.get()
            return multiple()
        if self.ready:
            item = self.pool.get()
            assert self.ready.get(id(item)) is item, "handed out an item that was not ready"
            del self.ready[id(item)]
            self.out[id(item)] = item
            self.counts["fast_gets"] += 1
            self.lowest = min(self.lowest, len(self.ready))
            self._note_low()
            return item
        self.lowest = 0
        self._note_low()
        if self.raise_on_empty:
            with pytest.raises(PoolEmpty):
                self.pool.get()
            self.counts["empty_raises"] += 1
            return multiple()
        n = len(self.made)
        item = self.pool.get()
        assert len(self.made) == n + 1 and self.made[-1] is item
        self.out[id(item)] = item
        self.counts["slow_gets"] += 1
        return item

    def _expect_put(self, item: Any) -> None:
        del self.out[id(item)]
        self.counts["puts"] += 1
        if self.closed or len(self.ready) >= self.size:
            self.counts["dropped"] += 1
            assert self.released[-1] is item
        else:
            self.ready[id(item)] = item

    @rule(target=returned, item=consumes(handed))
    def put(self, item: Any) -> Any:
        assert self.pool is not None
        resets = len(self.maker.resets) if self.use_reset else 0
        self.pool.put(item)
        if self.use_reset:
            assert self.maker.resets[resets:] == [item]
        self._expect_put(item)
        return item

    @precondition(lambda self: self.use_reset)
    @rule(target=returned, item=consumes(handed))
    def put_poisoned(self, item: Any) -> Any:
        assert self.pool is not None
        item.poisoned = True
        with pytest.raises(ValueError):
            self.pool.put(item)
        del self.out[id(item)]
        self.counts["puts"] += 1
        self.counts["dropped"] += 1
        assert self.released[-1] is item
        return item

    @rule(item=returned)
    def put_again(self, item: Any) -> None:
        assert self.pool is not None
        if self.out.get(id(item)) is item:
            return  # handed out again since: putting it is legitimate, not tested here
        before = self.pool.stats()
        expected = DoubleFree if self.ready.get(id(item)) is item else ForeignBlock
        with pytest.raises(expected):
            self.pool.put(item)
        assert self.pool.stats() == before

    @rule()
    def put_foreign(self) -> None:
        assert self.pool is not None
        before = self.pool.stats()
        stranger = self.arena.alloc(64) if self.arena is not None else Thing(-1)
        with pytest.raises(ForeignBlock):
            self.pool.put(stranger)
        assert self.pool.stats() == before
        if self.arena is not None:
            self.arena.free(cast(Block, stranger))

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def replenish(self) -> None:
        assert self.pool is not None
        if self.closed:
            with pytest.raises(ArenaClosed):
                self.pool.replenish_due()
            return
        n_made = len(self.made)
        got = self.pool.replenish_due()
        expected = 0
        if self.due is not None and self.now >= self.due:
            self.due = None
            expected = self.size - len(self.ready)
            if expected:
                self.counts["refills"] += math.ceil(expected / self.batch)
                self.counts["items_refilled"] += expected
        assert got == expected
        assert len(self.made) == n_made + expected
        for item in self.made[n_made:]:
            self.ready[id(item)] = item

    @rule()
    def close(self) -> None:
        assert self.pool is not None
        n_released = len(self.released)
        self.pool.close()
        if not self.closed:
            assert {id(x) for x in self.released[n_released:]} == set(self.ready)
            self.counts["dropped"] += len(self.ready)
            self.ready.clear()
            self.closed = True
            self.due = None
        else:
            assert len(self.released) == n_released

    @invariant()
    def agrees_with_model(self) -> None:
        if self.pool is None:
            return
        self.pool.check_invariants()
        s = self.pool.stats()
        assert s.ready == len(self.ready) == len(self.pool)
        assert s.handed_out == len(self.out)
        assert s.created == len(self.made)
        assert s.dropped == len(self.released)
        assert len({id(x) for x in self.released}) == len(self.released)  # once each
        assert s.lowest_ready == self.lowest
        assert s.closed == self.closed
        for name, value in self.counts.items():
            assert getattr(s, name) == value, name

    def teardown(self) -> None:
        if self.pool is None:
            return
        self.pool.close()
        for item in list(self.out.values()):
            self.pool.put(item)  # after close: released
        made_ids = {id(x) for x in self.made}
        assert {id(x) for x in self.released} == made_ids
        self.pool.check_invariants()
        if self.arena is not None:
            assert self.arena.stats().free_bytes == self.arena_free
            self.arena.close()


class _Recorder:
    """An arena wrapper that logs the blocks it allocates and frees (for the model)."""

    def __init__(self, arena: Arena, made: list[Any], freed: list[Any]) -> None:
        self.arena, self.made, self.freed = arena, made, freed
        self.shared = arena.shared

    def alloc(self, size: int, align: int | None = None) -> Block:
        block = self.arena.alloc(size, align)
        self.made.append(block)
        return block

    def free(self, block: Block) -> None:
        self.arena.free(block)
        self.freed.append(block)


PoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase


# ------------------------------------------------------------------------------------------
# Threads: the real replenisher under a burst


def test_many_threads_never_share_an_item_and_lose_none() -> None:
    maker = Maker()
    released: list[Thing] = []
    pool = Pool(maker, size=16, low_watermark=8, refill_delay=0.0, batch=4,
                release=released.append, name="hammer")
    held: set[int] = set()
    held_lock = threading.Lock()
    problems: list[str] = []
    leftovers: list[Thing] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[Thing] = []
        start.wait()
        for _ in range(2500):
            if mine and (len(mine) >= 5 or rng.random() < 0.5):
                item = mine.pop(rng.randrange(len(mine)))
                with held_lock:
                    held.remove(id(item))
                pool.put(item)
            else:
                item = pool.get()
                with held_lock:
                    if id(item) in held:
                        problems.append(f"{item!r} handed out twice at once")
                    held.add(id(item))
                mine.append(item)
        with held_lock:
            leftovers.extend(mine)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, to interleave get/put/refill
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert problems == []
    st_ = pool.stats()
    assert st_.replenisher_running
    assert st_.refills > 0 and st_.fast_gets > 0
    pool.close()
    st_ = pool.stats()
    assert not st_.replenisher_running
    assert st_.handed_out == len(leftovers)
    assert st_.ready + st_.handed_out == st_.created - st_.dropped
    assert st_.created == len(maker.made)
    assert st_.dropped == len(released)
    assert st_.fast_gets + st_.slow_gets == st_.puts + len(leftovers)
    # Every item made is either released exactly once or still held by a worker.
    ids = [id(x) for x in released] + [id(x) for x in leftovers]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(x) for x in maker.made}
    pool.check_invariants()


def test_a_get_below_the_watermark_wakes_the_thread() -> None:
    maker = Maker()
    pool = Pool(maker, size=4, low_watermark=2, refill_delay=0.0, batch=1)
    try:
        for _ in range(3):
            pool.get()
        assert wait_until(lambda: pool.stats().ready == 4)
        st_ = pool.stats()
        assert (st_.refills, st_.items_refilled) == (3, 3)
    finally:
        pool.close()


def test_close_stops_a_thread_waiting_out_a_long_delay(maker: Maker) -> None:
    pool = Pool(maker, size=2, refill_delay=3600.0)
    pool.get()
    pool.get()  # a refill is due in an hour
    thread = pool._thread
    pool.close()  # must not wait for the hour
    assert thread is not None and not thread.is_alive()
    assert pool.stats().refills == 0


def test_a_dropped_pool_ends_its_thread() -> None:
    pool = Pool(Maker(), size=2, refill_delay=0.0)
    thread = pool._thread
    assert thread is not None and thread.is_alive()
    del pool
    gc.collect()
    thread.join(timeout=20)
    assert not thread.is_alive()


def test_start_later(maker: Maker) -> None:
    pool = Pool(maker, size=2, refill_delay=0.0, start=False)
    pool.get()
    pool.get()  # due now, but no thread
    assert not pool.stats().replenisher_running
    pool.start()
    pool.start()  # idempotent
    try:
        assert wait_until(lambda: len(pool) == 2)
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------
# Blocks from a real arena


@pytest.mark.parametrize("kind", ["private", "shared"])
def test_blocks_come_from_the_arena_and_go_back_on_close(
        kind: str, private_arena: Arena, shared_arena: Arena) -> None:
    arena = private_arena if kind == "private" else shared_arena
    start = arena.stats().free_bytes
    pool = Pool.of_blocks(arena, 256, align=256, size=8, start=False)
    assert arena.stats().free_bytes == start - 8 * 256
    assert pool.after_fork == ("discard" if kind == "shared" else "keep")
    got = [pool.get() for _ in range(8)]
    assert all(isinstance(b, Block) and b.arena is arena and b.size == 256 for b in got)
    assert all(b.offset % 256 == 0 for b in got)
    assert len({b.offset for b in got}) == 8
    got[0].view[:5] = b"hello"
    extra = pool.get()  # slow path: straight from the arena
    assert arena.stats().free_bytes == start - 9 * 256
    for b in got:
        pool.put(b)
    pool.put(extra)  # the pool is full: extra goes back to the arena
    assert arena.stats().free_bytes == start - 8 * 256
    pool.close()
    assert arena.stats().free_bytes == start
    assert all(b.freed for b in got)


def test_puts_during_a_refill_batch_never_leave_more_than_size_ready() -> None:
    """Forces the interleaving a free-threaded build makes common: the replenisher is inside
    its batch (computed for an empty deque) while every handed-out item is put back (each put
    sees room). Publishing the batch then overfills the deque; the surplus goes, counted."""
    making, go = threading.Event(), threading.Event()
    block = [False]

    def factory() -> object:
        if block[0]:
            block[0] = False
            making.set()
            assert go.wait(10)
        return object()

    pool = Pool(factory, size=2, refill_delay=0.0, start=False)
    a, b = pool.get(), pool.get()
    block[0] = True
    t = threading.Thread(target=pool._replenish, args=(time.monotonic() + 1, True))
    t.start()
    assert making.wait(10)  # the batch of 2 is being made
    pool.put(a)
    pool.put(b)  # both saw room: 2 ready
    go.set()
    t.join(10)
    assert len(pool) == 2
    st_ = pool.stats()
    assert st_.dropped == 2 and st_.created == 4
    pool.check_invariants()
    pool.close()


def test_block_pool_refills_from_the_arena(private_arena: Arena, clock: FakeClock) -> None:
    start = private_arena.stats().free_bytes
    pool = Pool.of_blocks(private_arena, 64, size=4, refill_delay=1.0, clock=clock,
                          start=False)
    held = [pool.get() for _ in range(4)]
    clock.now += 1
    assert pool.replenish_due() == 4
    assert private_arena.stats().free_bytes == start - 8 * 64
    for b in held:
        pool.put(b)  # full: freed
    pool.close()
    assert private_arena.stats().free_bytes == start


def test_exhausted_arena_at_creation_gives_everything_back() -> None:
    with Arena(4096, block_size=64, lock=False) as small:
        start = small.stats().free_bytes
        with pytest.raises(ArenaExhausted):
            Pool.of_blocks(small, 1024, size=5, start=False)
        assert small.stats().free_bytes == start


def test_exhausted_arena_during_refill_is_counted(clock: FakeClock) -> None:
    with Arena(4096, block_size=64, lock=False) as small:
        pool = Pool.of_blocks(small, 1024, size=4, refill_delay=0.0, clock=clock, start=False)
        held = [pool.get() for _ in range(4)]
        assert pool.replenish_due() == 0
        assert pool.stats().refill_failures == 1
        assert isinstance(pool.last_refill_error, ArenaExhausted)
        for b in held:
            pool.put(b)
        pool.close()
        assert small.stats().free_bytes == small.size


# ------------------------------------------------------------------------------------------
# Fork


@fork_warning
def test_child_pool_works_and_its_replenisher_runs_again() -> None:
    maker = Maker()
    pool = Pool(maker, size=4, low_watermark=4, refill_delay=0.0, batch=1)
    try:
        held = pool.get()
        assert wait_until(lambda: len(pool) == 4)
        parent_thread = pool._thread

        def child() -> int:
            st_ = pool.stats()
            if not st_.replenisher_running or pool._thread is parent_thread:
                return 2
            if st_.fast_gets or st_.created != 5 or st_.handed_out != 1:
                return 3  # statistics restart; inherited items are the initial stock
            got = [pool.get() for _ in range(3)]
            if not wait_until(lambda: pool.stats().refills >= 3 and len(pool) == 4):
                return 4
            for x in [*got, held]:
                pool.put(x)  # "keep": the child's copies are its own
            pool.check_invariants()
            pool.close()
            return 0

        assert run_in_child(child) == 0
        assert pool.stats().handed_out == 1 and len(pool) == 4  # the parent is unaffected
        pool.put(held)
    finally:
        pool.close()


@fork_warning
def test_shared_arena_child_never_hands_out_the_parents_blocks(shared_arena: Arena) -> None:
    start = shared_arena.stats().free_bytes
    pool = Pool.of_blocks(shared_arena, 64, size=4, refill_delay=0.0)
    try:
        lent = pool.get()
        ready = [pool.get() for _ in range(3)]
        parent_offsets = {b.offset for b in [lent, *ready]}
        for b in ready:
            pool.put(b)
        assert wait_until(lambda: len(pool) == 4)  # the replenisher topped it up
        parent_offsets |= {b.offset for b in pool._ready}

        def child() -> int:
            if pool.after_fork != "discard" or not pool.stats().replenisher_running:
                return 2
            if not wait_until(lambda: len(pool) == 4):  # refilled at once, from the arena
                return 3
            got = [pool.get() for _ in range(4)]
            if {b.offset for b in got} & parent_offsets:
                return 4  # would hand the parent's memory out twice
            try:
                pool.put(lent)
            except PoolForkError:
                pass
            else:
                return 5
            for b in got:
                pool.put(b)
            with pool._refill_lock:  # no refill batch in flight (3.13t runs one in parallel)
                pool.check_invariants()
            pool.close()  # frees the child's blocks in the shared arena
            return 0

        assert run_in_child(child) == 0
        # The child's blocks are back in the shared arena; the parent's are untouched.
        assert shared_arena.stats().free_bytes == start - len(parent_offsets) * 64
        again = [pool.get() for _ in range(4)]
        assert {b.offset for b in again} <= parent_offsets
        for b in [*again, lent]:
            pool.put(b)
    finally:
        pool.close()
    assert shared_arena.stats().free_bytes == start


# ------------------------------------------------------------------------------------------
# Small things


def test_stats_is_a_frozen_snapshot(maker: Maker) -> None:
    pool = Pool(maker, size=2, start=False)
    s = pool.stats()
    assert isinstance(s, PoolStats)
    with pytest.raises(AttributeError):
        s.ready = 0  # type: ignore[misc]
    pool.get()
    assert s.ready == 2 and pool.stats().ready == 1


def test_check_invariants_catches_corruption(maker: Maker) -> None:
    pool = Pool(maker, size=2, start=False)
    pool.check_invariants()
    item = pool.get()
    pool._ready.append(item)
    with pytest.raises(AssertionError, match="both ready and handed out"):
        pool.check_invariants()


def test_repr_and_properties(maker: Maker) -> None:
    pool = Pool(maker, size=3, low_watermark=1, refill_delay=0.5, batch=2, on_empty="raise",
                start=False, name="conns")
    assert "conns" in repr(pool) and "ready=3/3" in repr(pool)
    assert (pool.size, pool.low_watermark, pool.refill_delay, pool.batch, pool.on_empty,
            pool.after_fork) == (3, 1, 0.5, 2, "raise", "keep")
    pool.close()
    assert "closed" in repr(pool)
