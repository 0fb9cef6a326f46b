"""User handles on per-cpu objects: Counter, Gauge, Summary and raw PerCpu objects.

The hot path
------------
``Counter.inc`` is ``i = self._index``, then one statement, ``self._cells[i] += 1``: ``_cells``
is a memoryview (format ``'q'``) over the domain's whole arena, ``_index`` the word of this
holder's copy. No
lock, no syscall, no arena allocation, nothing that can page-fault (the arena is prefaulted and
locked). The int objects it makes for values above 256 come from CPython's small-object
allocator, which reuses the block the previous value just gave back: no new memory after the
first few calls (``tests/test_counters_processes.py`` counts the page faults).

``Counter.add(n)`` adds one test before that statement: ``n.__class__ is not int or n < 0``.
Exact ints go straight through; everything else takes the slow path (:func:`_count`), which
accepts objects with ``__index__`` (numpy integers, IntEnum members) by converting them to a
plain int, and refuses the rest. ``bool`` is refused on purpose: a Counter counts events, and
``add(True)`` is almost always a flag passed by mistake. Exactness is also what makes the
statement atomic (below): an int *subclass* could run Python code (``__radd__``) in the middle
of the read-modify-write.

Atomicity on a GIL build: CPython 3.11 checks for a thread switch only at function entry,
backward jumps and calls. The update loads two attributes, indexes a memoryview (C), adds
two exact ints (C) and stores (C): no check inside it, so no other thread of this process runs
between the load and the store of the slot. Other processes never write this slot: it belongs
to this process's vcpu id.

On a free-threaded build each thread updates a private handle of its own (``THREAD_VARIANT``,
``_lease.ThreadLeases``), which other threads only ever detach, and a grace period stops the
world after detaching (``_grace``): a thread is stopped at an eval-breaker check, or counted
as stopped while it is detached, blocked in C. An attribute load can block: 3.13t looks
attributes up in a type cache, and a miss takes a lock that a waiting thread detaches for.
So every update loads the view last, after ``_index`` and any other attribute (a method that
stores two views loads ``_floats`` before ``_cells`` and tests ``_cells`` alone: detaching
stores ``_cells`` first), and nothing but C (memoryview indexing, int or float arithmetic)
runs between that load and the last store. A thread that blocks before the load finds the
handle detached; one past it holds no lock and reaches no eval-breaker check before its
store, so the stop waits for it.

Failure leaves the slot as it was: a refused argument raises before the statement, and a store
that would leave int64 raises ``ValueError`` inside the memoryview before writing anything; it
is reported as :class:`~percpu.InvalidArgument`.

Handle states, and the rule that makes rebinding safe
---------------------------------------------------
A handle is in one of four states, told by its class and its ``_cells``:

* *bound* to a leased id: the base class, ``_cells`` the arena view, ``_index`` this id's word;
* *bound* to the overflow id: a ``Shared*`` class; ``_cells`` is a :class:`SlowCells`;
* *unbound* (after ``release`` or a fork): an ``Unbound*`` class, ``_cells`` a ``SlowCells``;
* *retired* (removed, freed, domain closed): a ``Removed*`` class, ``_cells`` a ``SlowCells``.

Only the bound-to-a-leased-id state writes arena words on the hot path. In every other state
an update, even one through a bound method the caller cached (``inc = c.inc``), or one
dispatched before the state changed, reaches :class:`SlowCells`, whose ``__setitem__`` hands
the amount to the domain (``Bindings.slow_update``): under the process lock it raises for a
retired handle, binds an unbound one (taking a lease) and adds where the handle now points,
under the overflow lock for the overflow id. So no update is ever dropped silently: it counts,
or it raises (``MetricRemoved``, ``DomainClosed``).

Every store to a handle's state is made by the functions at the end of this module
(:func:`bind_view`, :func:`bind_shared`, :func:`detach`), from a thread that holds the
domain's process lock and the GIL. Each makes its stores consecutively with no call between
them, ``_cells`` first when leaving the bound state and last when entering it, so that a
thread of this process that runs in between (at a call or a backward jump elsewhere) sees
either the old binding, whose id this process still holds, or a ``SlowCells``, which waits
for the process lock. Leaving the bound state therefore needs no wait: once :func:`detach`
returned for every handle, no update in flight can still land on the id, and the lease may go.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, Self

from ._errors import DomainClosed, InvalidArgument, InvalidType, MetricRemoved, PercpuError
from ._layout import KIND_GAUGE, MODE_OF, split_ref
from ._timing import Block, CountExceptions

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_bisect_left = bisect.bisect_left
_time_ns = time.time_ns


class Owner(Protocol):
    """What a handle asks of the domain that made it (``Domain`` implements it): handles
    depend on this, not on ``Domain``, so the two modules import one way."""

    _closed: bool
    _closing: bool

    def _read_sum(self, ref: int, size: int, /) -> int | float: ...

    def _read_summary(self, ref: int, /) -> tuple[int, float]: ...

    def _local_view(self, h: PerCpu, /) -> memoryview: ...

    def _copies(self, ref: int, size: int, /) -> dict[int, memoryview]: ...

    def _free_object(self, h: PerCpu, /) -> None: ...

    def _bind(self, h: _Handle, /) -> None: ...

    def _slow_update(self, h: _Handle, n: int, x: float | None, /) -> None: ...

    def _slow_store(self, h: _Handle, op: Callable[[Any, Any, int], None], /) -> None: ...

    def _private(self, h: _Handle, /) -> Any: ...

    def _read_gauge(self, ref: int, kind: int, /) -> int | float: ...

    def _read_histogram(self, ref: int, buckets: int, /) -> tuple[list[int], float]: ...


class Cells(Protocol):
    """What a handle updates: the arena's words (a memoryview) or a :class:`SlowCells`."""

    def __getitem__(self, index: int, /) -> Any: ...

    def __setitem__(self, index: int, value: Any, /) -> None: ...


def _count(n: Any, what: str, signed: bool) -> int:
    """The slow path of ``add``/``sub``: ``n`` as a plain int, or a clear error.

    Accepts ints and objects with ``__index__`` other than bools; a Counter also refuses a
    negative value. Raises before anything is written.
    """
    if n.__class__ is not int:
        if isinstance(n, bool):
            raise InvalidType(f"{what} takes an int count, got the bool {n!r}; "
                              f"pass int({n!r}) if you mean {int(n)}")
        try:
            n = operator.index(n)
        except TypeError:
            raise InvalidType(f"{what} takes an int, got {type(n).__name__} {n!r:.60}") from None
    assert isinstance(n, int)
    if not signed and n < 0:
        raise InvalidArgument(f"a Counter only goes up: {what}({n}) is negative; use a Gauge")
    if not INT64_MIN <= n <= INT64_MAX:
        raise InvalidArgument(f"{what}({n}) is outside int64")
    return n


def _observation(x: object, what: str = "Summary.observe") -> float:
    """The slow path of ``observe`` (and of float amounts): ``x`` as a finite float, or a
    clear error."""
    if isinstance(x, bool) or not hasattr(type(x), "__float__"):
        raise InvalidType(f"{what} takes an int or a float, got {type(x).__name__} "
                          f"{x!r:.60}")
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{what}({x!r:.60}): not a finite float ({exc})") from None
    if not math.isfinite(f):
        raise InvalidArgument(f"{what}({x!r:.60}): NaN and infinities would poison the "
                              "sum for good; they are refused")
    return f


def _amount(n: Any, what: str, signed: bool) -> tuple[int, float]:
    """An amount as (int part, float part): ints (and ``__index__`` objects) exact, floats
    finite (a Counter's also >= 0). Raises before anything is written."""
    if n.__class__ is float or (not isinstance(n, int) and not hasattr(type(n), "__index__")
                                and hasattr(type(n), "__float__")):
        x = _observation(n, what)
        if not signed and x < 0:
            raise InvalidArgument(f"a Counter only goes up: {what}({n}) is negative; use a Gauge")
        return 0, x
    return _count(n, what, signed), 0.0


class _Handle:
    """Common state of every handle: the domain, the slot (ref) and this holder's word."""

    __slots__ = ("__weakref__", "_cells", "_domain", "_floats", "_index", "_ref", "_tl",
                 "labels", "name")

    _cells: Cells
    _floats: Cells  #: the same words as float64 (a slot's float part), or a SlowCells
    _index: int
    _tl: Any  #: per-thread mode: a ``threading.local`` whose ``h`` is this thread's handle
    _domain: Owner
    _ref: int
    name: str
    labels: tuple[tuple[str, str], ...]

    def __init__(self) -> None:
        raise InvalidType("handles are made by a Domain (counter(), gauge(), summary(), "
                          "histogram(), alloc())")

    def __repr__(self) -> str:
        labels = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"<{type(self).__name__} {self.name}{{{labels}}}>"

    def for_thread(self) -> Self:
        """The handle of this metric that the calling thread updates: on a free-threaded
        build (one lease per thread) the thread's own handle, bound to the thread's id and
        view, so a hot loop skips the per-thread lookup and touches no object that another
        thread touches; on a GIL build (one lease per process) this handle itself. Use it
        only in the thread that asked for it (another thread's updates through it would land
        on this thread's id); it follows removal, release and compaction like any handle,
        and raises MetricRemoved once its thread has ended."""
        return self

    def _store_failed(self, what: str, n: int) -> NoReturn:
        """A store raised ValueError (nothing was written): say why. Called from the
        ``except ValueError`` of an update, which also catches the slow path's own errors
        (``DomainClosed`` and ``InvalidArgument`` are ValueErrors): those pass unchanged."""
        exc = sys.exc_info()[1]
        if isinstance(exc, PercpuError):
            raise exc
        if self._domain._closed or self._domain._closing:
            raise DomainClosed(f"{self!r}: the domain is closed") from None
        raise InvalidArgument(f"{what}({n}) would take this holder's copy of {self!r} "
                              "outside int64; nothing was added") from None


class Counter(_Handle):
    """A monotonic counter whose value is the sum of one slot per vcpu id: an int64 part
    (``inc``, ``add`` of an int: exact) and a float64 part (``add`` of a float, such as
    seconds or bytes with a fraction)."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one (the hot path: one straight-line statement)."""
        i = self._index  # before _cells: nothing but C between loading the view and the store
        try:
            self._cells[i] += 1
        except ValueError:
            self._store_failed("Counter.inc", 1)

    def add(self, n: int | float) -> None:
        """Add ``n >= 0``: an int (not a bool), or a finite float. Anything else raises and
        changes nothing."""
        i = self._index  # before the views (module docstring)
        if n.__class__ is not int or n < 0:
            n, x = _amount(n, "Counter.add", signed=False)
            if x:
                self._floats[i + 1] += x
                return
        try:
            self._cells[i] += n
        except ValueError:
            self._store_failed("Counter.add", n)

    def count_exceptions(self, exception: type[BaseException] | tuple[type[BaseException], ...]
                         = Exception) -> CountExceptions:
        """A context manager and decorator that adds one when its block (or the decorated
        call) raises ``exception``; the exception goes on."""
        return CountExceptions(self, exception)

    @property
    def value(self) -> int | float:
        """The sum over every id's slot (never decreases between two reads): an int while
        every amount was an int."""
        return self._domain._read_sum(self._ref, 16)


class Gauge(_Handle):
    """A gauge whose value is the sum of one slot per vcpu id (mode ``sum``; mode ``livesum``
    counts only the ids whose holder is alive). Each id's part is an int64 (int amounts,
    exact) plus a float64 (float amounts); ``set`` sets this holder's part."""

    __slots__ = ("_kind",)

    _kind: int  #: the gauge kind (``KIND_GAUGE`` for mode sum), set by the domain

    def inc(self) -> None:
        """Add one."""
        i = self._index
        try:
            self._cells[i] += 1
        except ValueError:
            self._store_failed("Gauge.inc", 1)

    def dec(self) -> None:
        """Subtract one."""
        i = self._index
        try:
            self._cells[i] -= 1
        except ValueError:
            self._store_failed("Gauge.dec", -1)

    def add(self, n: int | float) -> None:
        """Add ``n``: an int of any sign (not a bool) or a finite float."""
        i = self._index  # before the views (module docstring)
        if n.__class__ is not int:
            n, x = _amount(n, "Gauge.add", signed=True)
            if x:
                self._floats[i + 1] += x
                return
        try:
            self._cells[i] += n
        except ValueError:
            self._store_failed("Gauge.add", n)

    def sub(self, n: int | float) -> None:
        """Subtract ``n``: an int of any sign (not a bool) or a finite float."""
        i = self._index  # before the views (module docstring)
        if n.__class__ is not int:
            n, x = _amount(n, "Gauge.sub", signed=True)
            if x:
                self._floats[i + 1] -= x
                return
        try:
            self._cells[i] -= n
        except ValueError:
            self._store_failed("Gauge.sub", n)

    def set(self, v: int | float) -> None:
        """Set this holder's part to ``v`` (an int, exact, or a finite float); the value is
        still the sum of every holder's part."""
        cls = v.__class__
        n: int
        x: float
        if cls is float and not v - v:  # finite: the common cases, checked inline
            n, x = 0, v
        elif cls is int and INT64_MIN <= v <= INT64_MAX:
            n, x = v, 0.0  # type: ignore[assignment]
        else:
            n, x = _amount(v, "Gauge.set", signed=True)
            if not INT64_MIN <= n <= INT64_MAX:
                raise InvalidArgument(f"Gauge.set({n}) is outside int64")
        i, f, c = self._index, self._floats, self._cells  # _cells last (module docstring)
        if c.__class__ is SlowCells:
            self._domain._slow_store(self, lambda q, d, i: _store_pair(q, d, i, n, x))
            return
        f[i + 1] = x
        c[i] = n

    def set_to_current_time(self) -> None:
        """``set(time.time())``."""
        self.set(time.time())

    def track_inprogress(self) -> Block:
        """A context manager and decorator: ``inc()`` on entry, ``dec()`` on exit (with mode
        ``livesum``, a holder that dies inside drops out of the value)."""
        return Block(lambda _s: self.dec(), self.inc)

    def time(self) -> Block:
        """A context manager and decorator that sets the gauge to the block's duration (s)."""
        return Block(self.set)

    @property
    def mode(self) -> str:
        """The gauge mode (``sum``, ``livesum``, ``max``, ... see ``Domain.gauge``)."""
        return MODE_OF[self._kind]

    @property
    def value(self) -> int | float:
        """The sum over every id's part (``livesum``: over the ids with a live holder)."""
        kind = self._kind
        if kind != KIND_GAUGE:
            return self._domain._read_gauge(self._ref, kind)
        return self._domain._read_sum(self._ref, 16)


def _store_pair(q: Any, d: Any, i: int, n: int, x: float) -> None:
    d[i + 1] = x
    q[i] = n


class StampedGauge(Gauge):
    """A gauge of mode ``max``, ``min``, ``mostrecent`` (or their ``live`` variants): each
    id holds the value its holder set last (float64) and when (int64 ns since the epoch), and
    the value is the largest, smallest or latest of them. ``inc``/``add`` change this
    holder's value (and its time)."""

    __slots__ = ()

    def set(self, v: int | float) -> None:
        """Set this holder's value to ``v`` (a finite int or float), stamped now."""
        x = v if v.__class__ is float and not v - v else _observation(v, "Gauge.set")
        stamp = _time_ns()
        i, f, c = self._index, self._floats, self._cells  # _cells last (module docstring)
        if c.__class__ is SlowCells:
            self._domain._slow_store(self, lambda q, d, i: _store_pair(q, d, i, stamp, x))
            return
        f[i + 1] = x
        c[i] = stamp

    def add(self, n: int | float) -> None:
        """Add ``n`` to this holder's value, stamped now."""
        x = n if n.__class__ is float and not n - n else _observation(n, "Gauge.add")
        stamp = _time_ns()
        i, f, c = self._index, self._floats, self._cells  # _cells last (module docstring)
        if c.__class__ is SlowCells:
            self._domain._slow_store(self, lambda q, d, i: _add_stamped(q, d, i, stamp, x))
            return
        f[i + 1] += x
        c[i] = stamp

    def sub(self, n: int | float) -> None:
        """Subtract ``n`` from this holder's value, stamped now."""
        self.add(-_observation(n, "Gauge.sub"))

    def inc(self) -> None:
        """Add one to this holder's value."""
        self.add(1)

    def dec(self) -> None:
        """Subtract one from this holder's value."""
        self.add(-1)

    @property
    def value(self) -> int | float:
        """The largest, smallest or latest holder's value (see the mode); 0.0 when no holder
        counted has set one."""
        return self._domain._read_gauge(self._ref, self._kind)


def _add_stamped(q: Any, d: Any, i: int, stamp: int, x: float) -> None:
    d[i + 1] += x
    q[i] = stamp


class Summary(_Handle):
    """Count and sum of observations (16 bytes a slot: an int64 count, a float64 sum).

    ``observe`` updates the sum, then the count (two stores): a reader in another process may
    see the sum of an observation before its count, never a count without its sum.
    """

    __slots__ = ()

    def observe(self, x: float) -> None:
        """Record one observation ``x``: a finite float or an int (not a bool, NaN or inf)."""
        cls = x.__class__
        if cls is not float or x - x:  # x - x is NaN (truthy) for NaN and infinities
            x = _observation(x)
        i, f, c = self._index, self._floats, self._cells  # _cells last (module docstring)
        if c.__class__ is SlowCells:
            self._domain._slow_update(self, 1, x)  # sum and count, where it is bound
            return
        f[i + 1] += x
        c[i] += 1

    def time(self) -> Block:
        """A context manager and decorator that observes the block's duration in seconds."""
        return Block(self.observe)

    @property
    def value(self) -> tuple[int, float]:
        """(count, sum) over every id."""
        return self._domain._read_summary(self._ref)

    @property
    def count(self) -> int:
        """Observations recorded."""
        return self.value[0]

    @property
    def sum(self) -> float:
        """Sum of the observations."""
        return self.value[1]


class Histogram(_Handle):
    """Observations counted in buckets (``le`` bounds: ``buckets``, then +Inf), with their sum.

    Each id's slot holds one int64 count per bucket (not cumulative) and the float64 sum; a
    reader sums them over ids and accumulates. The count is the sum of the bucket counts *of
    the same read*, so it is never below a bucket and the +Inf bucket always equals it; the sum
    may lag or lead the counts by the observations in flight (as in client_golang).
    """

    __slots__ = ("_bounds", "_nb")

    _bounds: tuple[float, ...]  #: the finite bucket bounds, increasing
    _nb: int  #: their number (the +Inf bucket is word ``_nb``, the sum word ``_nb + 1``)

    def observe(self, x: float) -> None:
        """Record one observation ``x``: a finite float or an int (not a bool, NaN or inf)."""
        if x.__class__ is not float or x - x:
            x = _observation(x, "Histogram.observe")
        # The bucket (``le = bounds[b]``, or +Inf) is found before the words are loaded: a
        # thread switch may follow a call, never the loads and the stores below.
        b = _bisect_left(self._bounds, x)
        i, nb, f, c = self._index, self._nb, self._floats, self._cells  # _cells last
        if c.__class__ is SlowCells:
            self._domain._slow_store(self, lambda q, d, i: _observe(q, d, i, b, nb, x))
            return
        c[i + b] += 1
        f[i + nb + 1] += x

    def time(self) -> Block:
        """A context manager and decorator that observes the block's duration in seconds."""
        return Block(self.observe)

    @property
    def buckets(self) -> tuple[float, ...]:
        """The finite bucket bounds (the +Inf bucket is implicit)."""
        return self._bounds

    @property
    def value(self) -> tuple[list[tuple[float, int]], int, float]:
        """(cumulative ``(le, count)`` per bucket, +Inf last; count; sum) over every id."""
        counts, total = self._domain._read_histogram(self._ref, self._nb)
        cumulative = list(itertools.accumulate(counts))
        return (list(zip((*self._bounds, math.inf), cumulative, strict=True)),
                cumulative[-1], total)

    @property
    def count(self) -> int:
        """Observations recorded."""
        return self.value[1]

    @property
    def sum(self) -> float:
        """Sum of the observations."""
        return self.value[2]


def _observe(q: Any, d: Any, i: int, b: int, nb: int, x: float) -> None:
    q[i + b] += 1
    d[i + nb + 1] += x


class PerCpu(_Handle):
    """A raw per-cpu object of ``size`` bytes (from ``Domain.alloc``).

    ``local`` is a zero-copy view of this holder's copy; ``copies()`` gives every id's copy.
    It belongs to the process that allocated it; ``free()`` returns its slot (every copy is
    zeroed first), and so does ``Domain.release``/``close``. A forked child cannot use its
    parent's objects (they raise :class:`~percpu.MetricRemoved` there).
    """

    __slots__ = ("_offset", "size")

    size: int
    _offset: int  #: byte offset (in the arena heap) of this holder's copy

    def __repr__(self) -> str:
        ps, slot = split_ref(self._ref)
        return f"<{type(self).__name__} {getattr(self, 'size', '?')} bytes, slot {slot} of " \
               f"pageset {ps}>"

    @property
    def local(self) -> memoryview:
        """Zero-copy view of this holder's copy (``size`` bytes)."""
        return self._domain._local_view(self)

    def copies(self) -> dict[int, memoryview]:
        """Every id's copy that exists, by vcpu id (ids that never touched it have none)."""
        return self._domain._copies(self._ref, self.size)

    def free(self) -> None:
        """Return the slot to this holder's cache. The handle is unusable afterwards."""
        self._domain._free_object(self)


class _Removed:
    """Methods of a handle whose metric was removed (or object freed, or domain closed):
    every use raises."""

    __slots__ = ()

    def _gone(self, *args: Any) -> Any:
        domain = getattr(self, "_domain", None)
        if domain is not None and domain._closed:
            raise DomainClosed(f"{self!r}: its domain is closed")
        if isinstance(self, PerCpu):
            raise MetricRemoved(f"{self!r} was freed (or belongs to the process that allocated "
                                "it, before a fork or a release); allocate a new one")
        raise MetricRemoved(f"{self!r} was removed from its domain; register it again to count")

    inc = dec = add = sub = observe = free = set = set_to_current_time = _gone
    track_inprogress = time = count_exceptions = _gone
    value = local = count = sum = property(_gone)

    def copies(self) -> Any:
        return self._gone()


class RemovedCounter(_Removed, Counter):
    """A Counter after ``Domain.remove``."""

    __slots__ = ()


class RemovedGauge(_Removed, Gauge):
    """A Gauge after ``Domain.remove``."""

    __slots__ = ()


class RemovedStampedGauge(_Removed, StampedGauge):
    """A max/min/mostrecent Gauge after ``Domain.remove``."""

    __slots__ = ()


class RemovedSummary(_Removed, Summary):
    """A Summary after ``Domain.remove``."""

    __slots__ = ()


class RemovedHistogram(_Removed, Histogram):
    """A Histogram after ``Domain.remove``."""

    __slots__ = ()


class RemovedPerCpu(_Removed, PerCpu):
    """A PerCpu object after ``free`` (or in a forked child: it belongs to its parent)."""

    __slots__ = ()


REMOVED_VARIANT: dict[type, type] = {
    Counter: RemovedCounter, Gauge: RemovedGauge, StampedGauge: RemovedStampedGauge,
    Summary: RemovedSummary, Histogram: RemovedHistogram, PerCpu: RemovedPerCpu,
}


class SharedCounter(Counter):
    """A Counter of a holder without an id of its own: each operation takes the overflow lock."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one under the overflow lock (the counted slow path)."""
        self.add(1)

    def add(self, n: int | float) -> None:
        """Add ``n >= 0`` under the overflow lock."""
        x = 0.0
        if n.__class__ is not int or n < 0:
            n, x = _amount(n, "Counter.add", signed=False)
        try:
            self._domain._slow_update(self, n, x or None)
        except ValueError:
            self._store_failed("Counter.add", n)


class SharedGauge(Gauge):
    """A Gauge of a holder without an id of its own."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one under the overflow lock."""
        self.add(1)

    def dec(self) -> None:
        """Subtract one under the overflow lock."""
        self.add(-1)

    def add(self, n: int | float) -> None:
        """Add ``n`` under the overflow lock."""
        x = 0.0
        if n.__class__ is not int:
            n, x = _amount(n, "Gauge.add", signed=True)
        try:
            self._domain._slow_update(self, n, x or None)
        except ValueError:
            self._store_failed("Gauge.add", n)

    def sub(self, n: int | float) -> None:
        """Subtract ``n`` under the overflow lock."""
        x = 0.0
        if n.__class__ is not int:
            n, x = _amount(n, "Gauge.sub", signed=True)
        try:
            self._domain._slow_update(self, -n, -x or None)
        except ValueError:
            self._store_failed("Gauge.sub", n)


class SharedStampedGauge(StampedGauge):
    """A max/min/mostrecent Gauge of a holder without an id of its own (its methods find
    ``SlowCells`` and take the locked path)."""

    __slots__ = ()


class SharedSummary(Summary):
    """A Summary of a holder without an id of its own."""

    __slots__ = ()

    def observe(self, x: float) -> None:
        """Record ``x`` under the overflow lock."""
        if x.__class__ is not float or x - x:
            x = _observation(x)
        self._domain._slow_update(self, 1, x)


class SharedHistogram(Histogram):
    """A Histogram of a holder without an id of its own (``observe`` takes the locked path)."""

    __slots__ = ()


class _Unbound:
    """Methods of a handle with no slot of this holder yet (after ``release`` or ``fork``):
    the first use takes a lease, binds the handle (or finds its metric removed meanwhile,
    which retires it), then does the operation."""

    __slots__ = ()

    def inc(self) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.inc()

    def dec(self) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.dec()

    def add(self, n: int | float) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.add(n)

    def sub(self, n: int | float) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.sub(n)

    def observe(self, x: float) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.observe(x)


class UnboundCounter(_Unbound, Counter):
    """A Counter waiting for its holder's next lease."""

    __slots__ = ()


class UnboundGauge(_Unbound, Gauge):
    """A Gauge waiting for its holder's next lease."""

    __slots__ = ()


class UnboundStampedGauge(_Unbound, StampedGauge):
    """A max/min/mostrecent Gauge waiting for its holder's next lease."""

    __slots__ = ()


class UnboundSummary(_Unbound, Summary):
    """A Summary waiting for its holder's next lease."""

    __slots__ = ()


class UnboundHistogram(_Unbound, Histogram):
    """A Histogram waiting for its holder's next lease."""

    __slots__ = ()


def _mine(h: _Handle) -> Any:
    """The calling thread's private handle of ``h`` (per-thread mode), made on first use."""
    try:
        return h._tl.h
    except AttributeError:
        return h._domain._private(h)


class _PerThread:
    """What every per-thread-mode handle class adds: :meth:`_Handle.for_thread` gives the
    calling thread's private handle."""

    __slots__ = ()

    def for_thread(self) -> Any:
        return _mine(self)  # type: ignore[arg-type]


class ThreadCounter(_PerThread, Counter):
    """A Counter in per-thread mode: each thread updates its own private handle, bound to
    the thread's own id and view, found in the handle's ``threading.local`` (no lock)."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one to this thread's copy (one lookup, then the hot-path statement)."""
        try:
            p = self._tl.h
        except AttributeError:
            p = self._domain._private(self)
        i = p._index
        try:
            p._cells[i] += 1
        except ValueError:
            p._store_failed("Counter.inc", 1)

    def add(self, n: int | float) -> None:
        """Add ``n >= 0`` to this thread's copy."""
        _mine(self).add(n)


class ThreadGauge(_PerThread, Gauge):
    """A Gauge in per-thread mode (see :class:`ThreadCounter`)."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one to this thread's part."""
        try:
            p = self._tl.h
        except AttributeError:
            p = self._domain._private(self)
        i = p._index
        try:
            p._cells[i] += 1
        except ValueError:
            p._store_failed("Gauge.inc", 1)

    def dec(self) -> None:
        """Subtract one from this thread's part."""
        try:
            p = self._tl.h
        except AttributeError:
            p = self._domain._private(self)
        i = p._index
        try:
            p._cells[i] -= 1
        except ValueError:
            p._store_failed("Gauge.dec", -1)

    def add(self, n: int | float) -> None:
        """Add ``n`` to this thread's part."""
        _mine(self).add(n)

    def sub(self, n: int | float) -> None:
        """Subtract ``n`` from this thread's part."""
        _mine(self).sub(n)

    def set(self, v: int | float) -> None:
        """Set this thread's part (the value is the sum of every holder's part)."""
        _mine(self).set(v)


class ThreadStampedGauge(_PerThread, StampedGauge):
    """A max/min/mostrecent Gauge in per-thread mode: each thread is a holder."""

    __slots__ = ()

    def set(self, v: int | float) -> None:
        """Set this thread's value, stamped now."""
        _mine(self).set(v)

    def add(self, n: int | float) -> None:
        """Add ``n`` to this thread's value, stamped now."""
        _mine(self).add(n)


class ThreadSummary(_PerThread, Summary):
    """A Summary in per-thread mode."""

    __slots__ = ()

    def observe(self, x: float) -> None:
        """Record ``x`` in this thread's copy."""
        _mine(self).observe(x)


class ThreadHistogram(_PerThread, Histogram):
    """A Histogram in per-thread mode."""

    __slots__ = ()

    def observe(self, x: float) -> None:
        """Record ``x`` in this thread's copy."""
        _mine(self).observe(x)


BASE_KINDS = (Counter, StampedGauge, Gauge, Summary, Histogram, PerCpu)  # subclasses first
SHARED_VARIANT: dict[type, type] = {
    Counter: SharedCounter, Gauge: SharedGauge, StampedGauge: SharedStampedGauge,
    Summary: SharedSummary, Histogram: SharedHistogram, PerCpu: PerCpu,
}
THREAD_VARIANT: dict[type, type] = {
    Counter: ThreadCounter, Gauge: ThreadGauge, StampedGauge: ThreadStampedGauge,
    Summary: ThreadSummary, Histogram: ThreadHistogram, PerCpu: PerCpu,
}
UNBOUND_VARIANT: dict[type, type] = {
    Counter: UnboundCounter, Gauge: UnboundGauge, StampedGauge: UnboundStampedGauge,
    Summary: UnboundSummary, Histogram: UnboundHistogram,
    PerCpu: RemovedPerCpu,  # a raw object belongs to the binding it was made under
}


def base_of(cls: type) -> type:
    """The user-facing class (Counter, Gauge, Summary, PerCpu) behind any variant."""
    for base in BASE_KINDS:
        if issubclass(cls, base):
            return base
    raise TypeError(f"{cls.__name__} is not a handle class")


_REMOVED_TYPES = frozenset(REMOVED_VARIANT.values())


class _Amount:
    """What reading a :class:`SlowCells` word gives: the amount a ``+=``/``-=`` adds to it."""

    __slots__ = ("amount",)

    amount: Any  # an int for the int words, a float for a Summary's sum

    def __init__(self, amount: int | float) -> None:
        self.amount = amount

    def __add__(self, n: int | float) -> _Amount:
        return _Amount(self.amount + n)

    def __sub__(self, n: int | float) -> _Amount:
        return _Amount(self.amount - n)


_NOTHING = _Amount(0)


class SlowCells:
    """Stands in for the arena's words in a handle that is not bound to a leased id.

    ``cells[i] += n`` on it reads an :class:`_Amount` (raising at once for a retired handle)
    and stores ``_Amount(n)``, which hands ``n`` to ``Bindings.slow_update``: the update is
    counted where the handle points once the process lock is held, or raises. ``floats``:
    this stands for the float words (a Summary's sum) rather than the int words.
    """

    __slots__ = ("_floats", "_handle")

    def __init__(self, handle: _Handle, floats: bool) -> None:
        self._handle = handle
        self._floats = floats

    def __getitem__(self, index: int) -> _Amount:
        h = self._handle
        if type(h) in _REMOVED_TYPES:
            h._gone()  # type: ignore[attr-defined]  # raises MetricRemoved or DomainClosed
        return _NOTHING

    def __setitem__(self, index: int, value: _Amount) -> None:
        if value.__class__ is not _Amount:
            raise TypeError("SlowCells only takes updates made by a handle's += or -=")
        h = self._handle
        if self._floats:
            h._domain._slow_update(h, 0, value.amount)
        else:
            h._domain._slow_update(h, value.amount, None)


# -- every store to a handle's state (see "Handle states" in the module docstring) ----------


def bind_view(h: _Handle, index: int, q: memoryview[int], d: memoryview[float]) -> None:
    """Bind ``h`` to a leased id's word ``index`` of the arena views ``q`` (int64) and ``d``
    (float64). ``_cells`` is stored last: until then an update takes the slow path."""
    base = base_of(type(h))
    h._index = index
    if base is not PerCpu:
        h._floats = d
    h._cells = q
    h.__class__ = base


def _point_slow(h: _Handle, base: type) -> None:
    """Store ``SlowCells`` in ``h``'s ``_cells`` (and a Summary's ``_floats``): both made
    first, then stored with no call between, so no thread runs between the two stores."""
    cells = SlowCells(h, False)
    floats = SlowCells(h, True) if base is not PerCpu else None
    h._cells = cells
    if floats is not None:
        h._floats = floats


def bind_shared(h: _Handle, index: int) -> None:
    """Bind ``h`` to the overflow id's word ``index``: every update takes the locked path."""
    base = base_of(type(h))
    _point_slow(h, base)
    h._index = index
    h.__class__ = SHARED_VARIANT[base]


def bind_thread(h: _Handle) -> None:
    """Per-thread mode: make ``h`` the handle every thread shares, whose updates go to the
    calling thread's private handle (``THREAD_VARIANT``). Its own words are never written:
    ``_cells`` stays a ``SlowCells``."""
    base = base_of(type(h))
    _point_slow(h, base)
    h.__class__ = THREAD_VARIANT[base]


def detach(h: _Handle, variant: dict[type, type]) -> None:
    """Leave the bound state for ``variant`` (``UNBOUND_VARIANT`` or ``REMOVED_VARIANT``).
    ``_cells`` is stored first: from then on no update of this process writes the old id."""
    base = base_of(type(h))
    _point_slow(h, base)
    h.__class__ = variant[base]
