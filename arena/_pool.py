"""Pools of ready things, made at start-up and topped up by a delayed background replenisher.

A :class:`Pool` keeps up to ``size`` items ready: blocks of one size from an arena
(:meth:`Pool.of_blocks`) or objects made by a factory. ``get()`` hands one out without taking
any lock the replenisher holds while it works, so a burst of requests never queues behind the
slow creation path (an arena's cross-process lock, a connect, a large allocation). When a
``get()`` leaves fewer than ``low_watermark`` items ready, it wakes the replenisher, a daemon
thread that waits ``refill_delay`` seconds (so that refilling does not compete with the burst
that emptied the pool) and then makes items in batches of ``batch`` until ``size`` are ready
again. An empty pool either makes one item on the spot (``on_empty="create"``, the counted
slow path) or raises :class:`~arena.PoolEmpty` (``on_empty="raise"``).

The idea is Yi Tao's cgroup pool RFC (LKML, 2021): cgroups made in advance so that starting
hundreds of containers at once does not serialise on ``cgroup_mutex``; a delayed work item
refills the pool; an empty pool falls back to the ordinary path; the administrator sets the pool
size and the delay. Linux's ``mempool_t`` is the other anchor: a reserve of ``min_nr`` elements
that is refilled only when elements are freed. ``low_watermark=0`` gives that behaviour here:
the replenisher never runs and the pool is refilled only by ``put()``.

Invariant
---------
Every item the pool ever made (or received from ``Arena.alloc``) is in exactly one of three
places: the *ready* deque, the *handed-out* table (``get()`` returned it and no ``put()`` has
taken it back), or *released* (given back to the arena / dropped: by ``close()``, by a ``put()``
into a full pool, by a failing ``reset``, by a ``put()`` after ``close()``). Items are tracked
by identity: ``_out`` and ``_owned`` are dicts keyed by ``id(item)`` whose values are the items
themselves, so objects need not be hashable and an id cannot be recycled while the pool holds
the object. ``_owned`` is ready + handed out; it only serves to tell a double ``put()``
(:class:`~arena.DoubleFree`) from a foreign item (:class:`~arena.ForeignBlock`). Counted:
``created - dropped == ready + handed_out`` whenever no operation is in flight.
:meth:`Pool.check_invariants` verifies all of it.

Threads: the GIL assumption
---------------------------
``get()`` and ``put()`` take no lock at all. They rely on each of these being atomic with
respect to other Python threads: ``deque.pop``, ``deque.append``, ``deque.popleft``,
``deque.extendleft(list)``, ``len(deque)``, ``dict.get``, ``dict.pop``, ``dict[k] = v`` with
``int`` keys. Under the GIL each is one C call that runs no Python code (``int`` keys hash and
compare in C; this is one reason the tables are keyed by ``id()``) and does not release the
GIL, so no other thread can observe it half done. This is the reasoning of trio's
``_thread_cache.py`` and of ``queue.SimpleQueue``. The protocol built on them:

* ``get()``: ``pop()`` claims an item (two threads can never pop the same one), then records
  it in ``_out``.
* ``put()``: ``_out.pop(id(item))`` claims the return (two concurrent ``put()`` of one item:
  exactly one wins, the other gets ``DoubleFree``), then ``append``; if that made the deque
  longer than ``size``, one item is popped and released, so overshoot is transient.
* The replenisher makes a batch with no pool lock held beyond its own ``_refill_lock`` (which
  ``get``/``put`` never touch), then ``extendleft`` publishes the whole batch at once, at the
  cold end of the deque (``get`` pops the end that ``put`` appends to: the most recently used,
  cache-warm item goes out first). Puts that ran while the batch was being made may each
  have seen room, so after publishing the replenisher lets the surplus go (``_trim``, counted
  as dropped): overshoot is transient here too.
* Statistics are per thread: each thread increments only its own list of counters (found by
  ``threading.get_ident()``), so there is no lost update even without the GIL; ``stats()`` sums
  them. Refill figures are written only under ``_refill_lock``. A ``stats()`` taken while other
  threads work is a close, not an atomic, snapshot.

On a free-threaded build (PEP 703, ``python3.13t``) ``deque`` and ``dict`` methods lock the
object they act on, so every step above stays atomic and the protocol stays correct; the
counters stay exact because each list has one writer. What changes is cost and fairness:
``get()`` calls on several cores contend on the deque's lock instead of taking turns on the
GIL, and ``len()`` checks (watermark, capacity) are read without ordering, so the capacity may
be overshot by the number of concurrent ``put()`` calls until they trim (as it already may be
under the GIL between two of their steps).

Fork
----
``os.register_at_fork(after_in_child=...)`` visits every live pool (a ``WeakSet``) in the child:
it replaces the replenisher's locks and events (a parent thread may have held them at the
fork), resets the statistics (the child counts from its own start, with the items it inherited
as its initial stock) and starts a new replenisher thread if the pool had one. ``after_fork``
says what happens to the inherited items:

* ``"keep"`` (objects, and blocks of a private arena, whose memory the child has its own copy
  of): the child keeps its copies of the ready and handed-out items. A batch that the parent's
  replenisher was making at the instant of the fork is lost to the child (at most ``batch``
  items; for a private arena those blocks stay allocated in the child's copy).
* ``"discard"`` (blocks of a shared arena, since the parent's ready blocks are the very same
  memory; also right for objects such as connections that must not be shared): the child
  forgets them without releasing them (they are the parent's), starts empty and refills at once
  from the arena. Putting back in the child an item handed out before the fork raises
  :class:`~arena.PoolForkError`.

A fork that bypasses Python's at-fork hooks (a C extension calling ``fork()``) is caught on the
slow path (the pool checks ``os.getpid()`` when it wakes the replenisher or goes empty), not on
the fast path, which would cost a system call per ``get()``.

Alternatives weighed
--------------------
* One ``threading.Lock`` around a list: simplest, but ``get()`` would then queue behind the
  replenisher (it appends under the same lock) and behind a thread preempted while holding it,
  which is the tail the pool exists to remove.
* ``queue.Queue``: a lock and two conditions per operation, built for blocking hand-off; a pool
  never blocks a ``get()``.
* ``queue.SimpleQueue``: atomic and fast, but it cannot report its length cheaply enough for the
  watermark, nor release from the cold end.
* Refilling synchronously inside the ``get()`` that crossed the watermark (what
  ``mempool_alloc`` does on its slow path): puts refill latency on a caller, exactly the tail
  the RFC measured; the delayed thread moves it off the request path.
* Refill only on ``put()`` (``mempool_t``): available as ``low_watermark=0``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Literal, Protocol, TypeAlias, TypeVar, cast

from ._errors import (
    ArenaClosed,
    DoubleFree,
    ForeignBlock,
    InvalidArgument,
    InvalidType,
    PoolEmpty,
    PoolForkError,
)

__all__ = ["BlockSource", "OnEmpty", "AfterFork", "Pool", "PoolStats"]

T = TypeVar("T")
B = TypeVar("B")

OnEmpty: TypeAlias = Literal["create", "raise"]
AfterFork: TypeAlias = Literal["keep", "discard"]

DEFAULT_REFILL_DELAY: Final = 0.05  # seconds: long enough for a burst to pass, short to refill
DEFAULT_MAX_BATCH: Final = 32

# Indexes of a thread's tally (a list[int] written only by that thread).
_FAST, _SLOW, _EMPTY, _PUTS, _DROPPED, _LOWEST = range(6)
_TALLY_WIDTH = 6

_MISSING: Final = object()


class BlockSource(Protocol[B]):
    """What :meth:`Pool.of_blocks` needs from an arena: ``alloc`` and ``free``.

    :class:`arena.Arena` is one. An optional boolean attribute ``shared`` (True when the memory
    is shared with other processes) chooses the default ``after_fork`` policy.
    """

    def alloc(self, size: int, align: int | None = None) -> B:
        """A new block of at least ``size`` bytes aligned to ``align``."""
        ...

    def free(self, block: B) -> None:
        """Give ``block`` back."""
        ...


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's figures (see :meth:`Pool.stats`).

    Counts are since the pool was made, or since the fork in a child process.
    """

    capacity: int  #: ``size``: the most items kept ready
    low_watermark: int  #: fewer ready items than this wakes the replenisher
    ready: int  #: items ready now
    handed_out: int  #: items returned by ``get()`` and not yet put back
    lowest_ready: int  #: fewest ready items seen right after a ``get()``
    fast_gets: int  #: ``get()`` calls served from the ready items
    slow_gets: int  #: ``get()`` calls that found the pool empty and made an item on the spot
    empty_raises: int  #: ``get()`` calls that found the pool empty and raised PoolEmpty
    puts: int  #: items taken back by ``put()`` (kept or released)
    refills: int  #: batches made by the replenisher
    items_refilled: int  #: items made by the replenisher
    refill_seconds: float  #: time spent refilling, by the pool's clock
    refill_failures: int  #: batches cut short because the factory / ``alloc`` raised
    created: int  #: items made: initial fill + refilled + slow gets
    dropped: int  #: items released: full pool, failing reset, ``close()``
    replenisher_running: bool  #: the background thread is alive
    closed: bool  #: ``close()`` was called

    @property
    def gets(self) -> int:
        """Successful ``get()`` calls (fast and slow)."""
        return self.fast_gets + self.slow_gets


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; InvalidType / InvalidArgument otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidType(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidArgument(f"{name} must be {accepted}, got {value}")
    return int(value)


def _check_seconds(name: str, value: object) -> float:
    """``value`` as a finite, non-negative number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidType(f"{name} must be a number of seconds, got {type(value).__name__} "
                          f"{value!r}")
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _check_callable(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if not callable(value):
        what = "a callable or None" if optional else "a callable"
        raise InvalidType(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise InvalidType(f"{name} must be one of {choices}, got {type(value).__name__} "
                          f"{value!r}")
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {choices}, got {value!r}")


class Pool(Generic[T]):
    """A pool of ready items, filled at creation and refilled in the background.

    ``Pool(factory, size=n, ...)`` calls ``factory()`` ``n`` times before returning (the cost is
    paid at start-up; if a call raises, the items already made are released and the error
    propagates). :meth:`of_blocks` builds a pool of arena blocks.

    Arguments (keyword-only after ``factory``):

    ``size``
        Items kept ready (an int >= 1). More may be handed out; a ``put()`` into a pool that
        already holds ``size`` ready items releases the item instead of keeping it.
    ``low_watermark``
        The replenisher is woken when a ``get()`` leaves fewer ready items than this (an int in
        [0, size]; default ``ceil(size / 2)``). 0 means never: the pool is refilled only by
        ``put()``, like the kernel's ``mempool_t``.
    ``refill_delay``
        Seconds the replenisher waits after being woken before it refills (finite, >= 0;
        default 0.05), so that refilling does not compete with the burst that drained the pool.
    ``batch``
        Items made per refill batch (an int >= 1; default ``min(size, 32)``). Between batches
        the replenisher lets other threads run and checks for ``close()``.
    ``on_empty``
        ``"create"`` (default): an empty pool makes the item on the spot (counted as a slow
        get). ``"raise"``: it raises :class:`~arena.PoolEmpty`.
    ``reset``
        Called as ``reset(item)`` by ``put()`` before the item is made ready again (outside any
        lock). If it raises, the item is released (never kept in an unknown state) and the
        error propagates.
    ``release``
        Called as ``release(item)`` when the pool lets go of an item it made: ``close()``, a
        ``put()`` into a full pool, a failing ``reset``. None (default): the pool just drops
        its reference. For blocks it is the arena's ``free``.
    ``after_fork``
        What a child process does with the inherited items: ``"keep"`` (default) or
        ``"discard"`` (see the module documentation, Fork).
    ``clock``
        Monotonic seconds, ``time.monotonic`` by default. Tests inject a fake one and drive
        :meth:`replenish_due` themselves.
    ``start``
        Start the replenisher thread now (default). ``start=False``: no thread until
        :meth:`start`; refills happen only through :meth:`replenish_due`.
    ``name``
        Shown in ``repr`` and in the replenisher thread's name.

    Bad arguments raise :class:`~arena.InvalidType` / :class:`~arena.InvalidArgument` before
    anything is made. A pool is a context manager that closes on exit; all methods are
    thread-safe.
    """

    __slots__ = (
        "__weakref__",
        "_after_fork",
        "_batch",
        "_clock",
        "_closed",
        "_delay",
        "_due_at",
        "_factory",
        "_inherited",
        "_initial",
        "_item_type",
        "_last_refill_error",
        "_low",
        "_name",
        "_on_empty_raise",
        "_out",
        "_owned",
        "_pid",
        "_ready",
        "_refill_failures",
        "_refill_lock",
        "_refill_seconds",
        "_refilled",
        "_refills",
        "_release",
        "_reset",
        "_size",
        "_source",
        "_stop",
        "_tallies",
        "_thread",
        "_wake",
        "_want_thread",
    )

    def __init__(
        self,
        factory: Callable[[], T],
        *,
        size: int,
        low_watermark: int | None = None,
        refill_delay: float = DEFAULT_REFILL_DELAY,
        batch: int | None = None,
        on_empty: OnEmpty = "create",
        reset: Callable[[T], object] | None = None,
        release: Callable[[T], object] | None = None,
        after_fork: AfterFork = "keep",
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
        name: str | None = None,
    ) -> None:
        self._setup(factory, size=size, low_watermark=low_watermark, refill_delay=refill_delay,
                    batch=batch, on_empty=on_empty, reset=reset, release=release,
                    after_fork=after_fork, clock=clock, start=start, name=name, source=None)

    @classmethod
    def of_blocks(
        cls,
        arena: BlockSource[B],
        block_size: int,
        *,
        align: int | None = None,
        size: int,
        low_watermark: int | None = None,
        refill_delay: float = DEFAULT_REFILL_DELAY,
        batch: int | None = None,
        on_empty: OnEmpty = "create",
        reset: Callable[[B], object] | None = None,
        after_fork: AfterFork | None = None,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
        name: str | None = None,
    ) -> Pool[B]:
        """A pool of ``size`` blocks of ``block_size`` bytes (aligned to ``align``) from ``arena``.

        Items are made by ``arena.alloc(block_size, align)`` and released by ``arena.free``, so
        ``close()`` gives every ready block back to the arena. On a shared arena file each
        ``alloc`` takes the arena's cross-process lock; the pool takes it at start-up and in the
        replenisher, not in ``get()``. :class:`~arena.ArenaExhausted` from the initial fill
        propagates (with every block already taken given back); during a refill it is counted in
        ``refill_failures`` and retried after ``refill_delay``.

        ``after_fork`` defaults to ``"discard"`` when ``arena.shared`` is true (the child must
        not hand out the parent's blocks) and to ``"keep"`` otherwise. ``put()`` refuses a block
        of another arena, or one the pool did not hand out, with :class:`~arena.ForeignBlock`.
        The other arguments are those of :class:`Pool`.
        """
        _check_int("block_size", block_size, 1)
        if align is not None:
            _check_int("align", align, 1)
        if after_fork is None:
            after_fork = "discard" if getattr(arena, "shared", False) is True else "keep"
        alloc = arena.alloc

        def make_block() -> B:
            return alloc(block_size, align)

        pool = cast("Pool[B]", object.__new__(cls))
        pool._setup(make_block, size=size, low_watermark=low_watermark,
                    refill_delay=refill_delay, batch=batch, on_empty=on_empty, reset=reset,
                    release=arena.free, after_fork=after_fork, clock=clock, start=start,
                    name=name, source=arena)
        return pool

    def _setup(
        self,
        factory: Callable[[], T],
        *,
        size: int,
        low_watermark: int | None,
        refill_delay: float,
        batch: int | None,
        on_empty: OnEmpty,
        reset: Callable[[T], object] | None,
        release: Callable[[T], object] | None,
        after_fork: AfterFork,
        clock: Callable[[], float],
        start: bool,
        name: str | None,
        source: object,
    ) -> None:
        # Validate everything before making anything.
        _check_callable("factory", factory, optional=False)
        size = _check_int("size", size, 1)
        if low_watermark is None:
            low_watermark = (size + 1) // 2
        low_watermark = _check_int("low_watermark", low_watermark, 0, size)
        delay = _check_seconds("refill_delay", refill_delay)
        if batch is None:
            batch = min(size, DEFAULT_MAX_BATCH)
        batch = _check_int("batch", batch, 1)
        _check_choice("on_empty", on_empty, ("create", "raise"))
        _check_callable("reset", reset, optional=True)
        _check_callable("release", release, optional=True)
        _check_choice("after_fork", after_fork, ("keep", "discard"))
        _check_callable("clock", clock, optional=False)
        if not isinstance(start, bool):
            raise InvalidType(f"start must be a bool, got {type(start).__name__} {start!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidType(f"name must be a str or None, got {type(name).__name__}")

        self._factory = factory
        self._size = size
        self._low = low_watermark
        self._delay = delay
        self._batch = batch
        self._on_empty_raise = on_empty == "raise"
        self._reset = reset
        self._release = release
        self._after_fork: AfterFork = after_fork
        self._clock = clock
        self._name = name
        self._source = source
        self._item_type: type | None = None
        self._closed = False
        self._pid = os.getpid()
        self._ready: deque[T] = deque()
        self._out: dict[int, T] = {}
        self._owned: dict[int, T] = {}
        self._inherited: dict[int, T] = {}
        self._tallies: dict[int, list[int]] = {}
        self._due_at: float | None = None
        self._refill_lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._want_thread = False
        self._refills = 0
        self._refilled = 0
        self._refill_failures = 0
        self._refill_seconds = 0.0
        self._last_refill_error: BaseException | None = None

        made: list[T] = []
        try:
            for _ in range(size):
                made.append(factory())
        except BaseException:
            for item in made:
                if release is not None:
                    release(item)
            raise
        if source is not None and made:
            self._item_type = type(made[0])
        for item in made:
            self._owned[id(item)] = item
        self._ready.extend(made)
        self._initial = len(made)
        _pools.add(self)
        if start:
            self.start()

    # -- read-only configuration --------------------------------------------------------

    @property
    def size(self) -> int:
        """Items kept ready when the pool is full (its capacity)."""
        return self._size

    @property
    def low_watermark(self) -> int:
        """Fewer ready items than this after a ``get()`` wakes the replenisher."""
        return self._low

    @property
    def refill_delay(self) -> float:
        """Seconds the replenisher waits, once woken, before it refills."""
        return self._delay

    @property
    def clock(self) -> Callable[[], float]:
        """The pool's clock (monotonic seconds)."""
        return self._clock

    @property
    def batch(self) -> int:
        """Items made per refill batch."""
        return self._batch

    @property
    def on_empty(self) -> OnEmpty:
        """``"create"`` or ``"raise"``: what ``get()`` does on an empty pool."""
        return "raise" if self._on_empty_raise else "create"

    @property
    def after_fork(self) -> AfterFork:
        """``"keep"`` or ``"discard"``: what a child does with the inherited items."""
        return self._after_fork

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def last_refill_error(self) -> BaseException | None:
        """The exception that last cut a refill batch short (None if none has)."""
        return self._last_refill_error

    def __len__(self) -> int:
        """Items ready now."""
        return len(self._ready)

    def __repr__(self) -> str:
        name = f" {self._name!r}" if self._name else ""
        state = "closed" if self._closed else f"ready={len(self._ready)}/{self._size}"
        return f"<Pool{name} {state} handed_out={len(self._out)}>"

    # -- the fast path ------------------------------------------------------------------

    def _tally(self) -> list[int]:
        """This thread's counters (made on first use; only this thread writes them)."""
        ident = threading.get_ident()
        mine = self._tallies.get(ident)
        if mine is None:
            fresh = [0] * _TALLY_WIDTH
            fresh[_LOWEST] = self._size
            mine = self._tallies.setdefault(ident, fresh)
        return mine

    def get(self) -> T:
        """An item: a ready one in O(1), without taking a lock the replenisher holds.

        If that leaves fewer than ``low_watermark`` ready, the replenisher is woken (it refills
        after ``refill_delay``). On an empty pool: made on the spot with the factory (the slow
        path, counted in ``slow_gets``), or :class:`~arena.PoolEmpty` with
        ``on_empty="raise"``. Raises :class:`~arena.ArenaClosed` after :meth:`close`.
        """
        if self._closed:
            raise ArenaClosed("the pool is closed")
        ready = self._ready
        try:
            item = ready.pop()
        except IndexError:
            return self._get_empty()
        self._out[id(item)] = item
        left = len(ready)
        mine = self._tallies.get(threading.get_ident()) or self._tally()
        mine[_FAST] += 1
        if left < mine[_LOWEST]:
            mine[_LOWEST] = left
        if left < self._low and self._due_at is None:
            self._schedule()
        return item

    def _get_empty(self) -> T:
        """The slow path: the pool was empty."""
        mine = self._tally()
        mine[_LOWEST] = 0
        if self._low > 0 and self._due_at is None:
            self._schedule()
        if self._on_empty_raise:
            mine[_EMPTY] += 1
            raise PoolEmpty(
                f"{self!r} is empty (size {self._size}, refill_delay {self._delay} s); "
                "raise the size, lower the delay, or use on_empty='create'")
        if self._closed:
            raise ArenaClosed("the pool is closed")
        item = self._factory()  # an exception propagates; nothing was changed
        if self._item_type is not None and type(item) is not self._item_type:
            self._item_type = None  # the source returns several types: stop checking
        self._owned[id(item)] = item
        self._out[id(item)] = item
        mine[_SLOW] += 1
        return item

    def _schedule(self) -> None:
        """Ask for a refill ``refill_delay`` from now and wake the replenisher."""
        if os.getpid() != self._pid:  # forked without Python's at-fork hooks
            self._after_fork_in_child()
        if self._due_at is None:
            self._due_at = self._clock() + self._delay
        self._wake.set()

    def put(self, item: T) -> None:
        """Give back an item that :meth:`get` handed out.

        Calls ``reset(item)`` if the pool has one, then makes the item ready again, or releases
        it when the pool already holds ``size`` ready items or is closed (so returning items
        after :meth:`close` is always allowed and gives them back to their arena). Refuses,
        changing nothing: an item already put back (:class:`~arena.DoubleFree`), one this pool
        did not hand out or a block of another arena (:class:`~arena.ForeignBlock`), a
        non-block given to a block pool (:class:`~arena.InvalidType`), and in a child process an
        item handed out before the fork by a ``"discard"`` pool (:class:`~arena.PoolForkError`).
        """
        claimed = self._out.pop(id(item), _MISSING)
        if claimed is _MISSING:
            raise self._refusal(item)
        mine = self._tallies.get(threading.get_ident()) or self._tally()
        mine[_PUTS] += 1
        if self._reset is not None:
            try:
                self._reset(item)
            except BaseException:
                mine[_DROPPED] += 1
                self._let_go(item)
                raise
        if self._closed:
            mine[_DROPPED] += 1
            self._let_go(item)
            return
        ready = self._ready
        ready.append(item)
        if len(ready) > self._size:
            try:
                extra = ready.pop()  # this very item unless another thread moved in between
            except IndexError:
                pass
            else:
                mine[_DROPPED] += 1
                self._let_go(extra)
        if self._closed:  # close() drained the deque between our check and our append
            self._drain()

    def _refusal(self, item: object) -> Exception:
        """The error for a put() of an item that is not handed out (nothing is changed)."""
        key = id(item)
        if self._item_type is not None and not isinstance(item, self._item_type):
            return InvalidType(f"put() takes a {self._item_type.__name__} of this pool, got "
                               f"{type(item).__name__}")
        if self._owned.get(key) is item:
            return DoubleFree(f"{_describe(item)} was already put back into {self!r}")
        if self._inherited.get(key) is item:
            return PoolForkError(
                f"{_describe(item)} was handed out before fork by the parent's pool, which this "
                "child discarded (after_fork='discard'); it is the parent's to put back")
        if self._source is not None:
            owner = getattr(item, "arena", None)
            if owner is not None and owner is not self._source:
                return ForeignBlock(f"{_describe(item)} belongs to another arena, not to "
                                    f"{self!r}")
        return ForeignBlock(f"{_describe(item)} is not handed out by {self!r} (never handed "
                            "out, or already put back and released)")

    def _trim(self) -> None:
        """Puts that ran while a batch was being made filled the deque past ``size`` once
        the batch was published (each put saw room, then the batch came): let the surplus go
        from the batch's end, counted as dropped, so at most ``size`` stay ready. Called by
        the replenisher, ``_refill_lock`` held."""
        ready, mine = self._ready, self._tally()
        while len(ready) > self._size:
            try:
                extra = ready.popleft()
            except IndexError:
                break
            mine[_DROPPED] += 1
            self._let_go(extra)

    def _let_go(self, item: T) -> None:
        """Forget ``item`` and release it (to its arena, or to the garbage collector)."""
        self._owned.pop(id(item), None)
        if self._release is not None:
            self._release(item)

    def _drain(self) -> None:
        """Release every ready item (close). Raises the first release error, after all."""
        ready = self._ready
        mine = self._tally()
        first: BaseException | None = None
        while True:
            try:
                item = ready.pop()
            except IndexError:
                break
            mine[_DROPPED] += 1
            try:
                self._let_go(item)
            except Exception as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first

    # -- the replenisher ----------------------------------------------------------------

    def start(self) -> None:
        """Start the replenisher thread (a daemon) if it is not running. Idempotent."""
        if self._closed:
            raise ArenaClosed("the pool is closed")
        self._want_thread = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        wake, stop = self._wake, self._stop

        def on_collect(_: object) -> None:
            stop.set()
            wake.set()

        ref = weakref.ref(self, on_collect)
        label = f"[{self._name}]" if self._name else f"-{id(self):x}"
        thread = threading.Thread(target=_replenisher_main, args=(ref, wake, stop),
                                  name=f"arena-pool-replenisher{label}", daemon=True)
        self._thread = thread
        thread.start()
        if self._due_at is not None:
            wake.set()

    def replenish_due(self, now: float | None = None) -> int:
        """Refill if a refill is due at ``now`` (default: the pool's clock); return items made.

        A refill is due once a ``get()`` has left fewer than ``low_watermark`` items ready and
        ``refill_delay`` has passed since. It makes items in batches of ``batch`` until ``size``
        are ready (at most ``size`` items per call). The replenisher thread calls this; tests
        call it with ``start=False`` and a fake clock. A factory error ends the refill early:
        it is counted in ``refill_failures``, kept in :attr:`last_refill_error`, and another
        refill is scheduled ``refill_delay`` later. Returns 0 when nothing was due, or when
        another thread is refilling. Raises :class:`~arena.ArenaClosed` after :meth:`close`.
        """
        now = self._clock() if now is None else _check_seconds_any("now", now)
        if self._closed:
            raise ArenaClosed("the pool is closed")
        return self._replenish(now, in_thread=False)

    def _seconds_until_due(self) -> float | None:
        due = self._due_at
        if due is None:
            return None
        return due - self._clock()

    def _replenish(self, now: float, in_thread: bool) -> int:
        # The thread waits for a refill another caller is doing; a direct caller does not.
        if not self._refill_lock.acquire(blocking=in_thread):
            return 0
        try:
            due = self._due_at
            if self._closed or due is None or now < due:
                return 0
            self._due_at = None
            return self._refill(in_thread)
        finally:
            self._refill_lock.release()

    def _refill(self, in_thread: bool) -> int:
        """Make items until ``size`` are ready; called with ``_refill_lock`` held."""
        clock = self._clock
        factory = self._factory
        ready = self._ready
        owned = self._owned
        started = clock()
        made_total = 0
        try:
            while not self._closed:
                want = min(self._batch, self._size - len(ready), self._size - made_total)
                if want <= 0:
                    break
                items: list[T] = []
                failure: BaseException | None = None
                try:
                    for _ in range(want):
                        items.append(factory())
                except BaseException as exc:
                    failure = exc
                for item in items:
                    owned[id(item)] = item
                ready.extendleft(items)  # one atomic step publishes the batch
                if items:
                    self._refills += 1
                    self._refilled += len(items)
                    made_total += len(items)
                if len(ready) > self._size:
                    self._trim()
                if self._closed:
                    self._drain()
                if failure is not None:
                    self._refill_failures += 1
                    self._last_refill_error = failure
                    if not isinstance(failure, Exception):
                        raise failure
                    if self._due_at is None:
                        self._due_at = clock() + self._delay
                    break
                if in_thread:
                    time.sleep(0)  # let the threads of the burst run between batches
        finally:
            self._refill_seconds += max(0.0, clock() - started)
        return made_total

    # -- state --------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """The pool's figures now (see :class:`PoolStats`). Works after ``close()`` too."""
        tallies = list(self._tallies.values())
        sums = [0] * _TALLY_WIDTH
        lowest = self._size
        for t in tallies:
            for i in range(_LOWEST):
                sums[i] += t[i]
            lowest = min(lowest, t[_LOWEST])
        thread = self._thread
        return PoolStats(
            capacity=self._size,
            low_watermark=self._low,
            ready=len(self._ready),
            handed_out=len(self._out),
            lowest_ready=lowest,
            fast_gets=sums[_FAST],
            slow_gets=sums[_SLOW],
            empty_raises=sums[_EMPTY],
            puts=sums[_PUTS],
            refills=self._refills,
            items_refilled=self._refilled,
            refill_seconds=self._refill_seconds,
            refill_failures=self._refill_failures,
            created=self._initial + self._refilled + sums[_SLOW],
            dropped=sums[_DROPPED],
            replenisher_running=thread is not None and thread.is_alive(),
            closed=self._closed,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent; otherwise do nothing.

        Verifies the module's invariant: ready and handed-out items are disjoint, each appears
        once, together they are exactly the owned items, and ``created - dropped`` equals their
        number; at most ``size`` are ready; a closed pool has none ready and no thread. Meant
        for tests: call it while no other thread uses the pool. Costs O(items).
        """
        ready = list(self._ready)
        out = dict(self._out)
        owned = dict(self._owned)
        problems: list[str] = []
        ready_ids = {id(x) for x in ready}
        if len(ready_ids) != len(ready):
            problems.append(f"an item is in the ready deque twice ({len(ready)} entries, "
                            f"{len(ready_ids)} distinct)")
        both = ready_ids & out.keys()
        if both:
            problems.append(f"{len(both)} item(s) both ready and handed out")
        for key, item in out.items():
            if id(item) != key:
                problems.append(f"handed-out table entry {key} holds an item with id {id(item)}")
        if ready_ids | out.keys() != owned.keys():
            problems.append(f"owned table ({len(owned)}) is not ready ({len(ready_ids)}) + "
                            f"handed out ({len(out)})")
        for key, item in owned.items():
            if id(item) != key:
                problems.append(f"owned table entry {key} holds an item with id {id(item)}")
        strays = sum(1 for x in ready if owned.get(id(x)) is not x)
        if strays:
            problems.append(f"{strays} ready item(s) missing from the owned table")
        if len(ready) > self._size:
            problems.append(f"{len(ready)} items ready, more than size {self._size}")
        st = self.stats()
        if st.created - st.dropped != len(ready) + len(out):
            problems.append(f"created {st.created} - dropped {st.dropped} != ready {len(ready)} "
                            f"+ handed out {len(out)}")
        if not 0 <= st.lowest_ready <= self._size:
            problems.append(f"lowest_ready {st.lowest_ready} outside [0, {self._size}]")
        if self._closed:
            if ready:
                problems.append(f"closed pool still holds {len(ready)} ready items")
            if st.replenisher_running:
                problems.append("closed pool's replenisher is still running")
        if problems:
            raise AssertionError(f"{self!r}: " + "; ".join(problems))

    # -- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the replenisher and release every ready item (blocks go back to the arena).

        Idempotent. Afterwards ``get()``, ``replenish_due()`` and ``start()`` raise
        :class:`~arena.ArenaClosed`; ``put()`` of an item handed out earlier still works and
        releases it; ``stats()`` still works. Waits for a refill batch in progress to end.
        Close a pool before its arena. If ``release`` raises, every other item is still
        released and the first error is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        self._want_thread = False
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._refill_lock:
            self._due_at = None
            self._drain()

    def __enter__(self) -> Pool[T]:
        if self._closed:
            raise ArenaClosed("the pool is closed")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        """In a child process: new locks and thread, fresh statistics, inherited items kept or
        discarded according to ``after_fork``."""
        self._pid = os.getpid()
        self._refill_lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._tallies = {}
        self._refills = self._refilled = self._refill_failures = 0
        self._refill_seconds = 0.0
        self._due_at = None
        if self._closed:
            self._initial = len(self._out)
            return
        if self._after_fork == "discard":
            # The parent's items are not ours to hand out or release: forget them.
            self._inherited = dict(self._out)
            self._out = {}
            self._owned = {}
            self._ready = deque()
            self._initial = 0
            self._due_at = self._clock()  # refill at once, without waiting for a get()
        else:
            # A batch the parent was making at the fork never reached the deque here.
            ready = list(self._ready)
            self._owned = {id(x): x for x in ready}
            self._owned.update(self._out)
            self._initial = len(ready) + len(self._out)
        if self._want_thread:
            self.start()


def _describe(item: object) -> str:
    """A short description of ``item`` for an error message (its repr may be huge or fail)."""
    try:
        text = repr(item)
    except Exception:
        text = f"<{type(item).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_seconds_any(name: str, value: object) -> float:
    """A clock reading: any finite number (it may be negative for a fake clock)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidType(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be finite, got {value!r}")
    return float(value)


def _replenisher_main(ref: weakref.ref[Pool[Any]], wake: threading.Event,
                      stop: threading.Event) -> None:
    """The replenisher thread: sleep until woken, wait out the delay, refill; until closed.

    Holds the pool only through a weak reference between steps, so a pool that is dropped
    without ``close()`` is collected and its thread ends.
    """
    while not stop.is_set():
        wake.wait()
        wake.clear()  # before reading _due_at: a get() scheduling after this wakes us again
        while not stop.is_set():
            pool = ref()
            if pool is None:
                return
            remaining = pool._seconds_until_due()
            if remaining is None:
                break
            if remaining > 0:
                del pool
                stop.wait(remaining)
                continue
            try:
                pool._replenish(pool._clock(), in_thread=True)
            except Exception as exc:  # a bug, not a factory error: keep the thread alive
                pool._last_refill_error = exc
                pool._refill_failures += 1
                if pool._due_at is None:
                    pool._due_at = pool._clock() + max(pool._delay, 0.001)
            del pool


_pools: weakref.WeakSet[Pool[Any]] = weakref.WeakSet()  # every pool, for the fork handler


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

