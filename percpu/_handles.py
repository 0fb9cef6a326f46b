"""User handles on per-cpu objects: Counter, Gauge, Summary and raw PerCpu objects.

The hot path
------------
``Counter.inc`` is one statement, ``self._cells[self._index] += 1``: ``_cells`` is a memoryview
(format ``'q'``) over the domain's whole arena, ``_index`` the word of this holder's copy. No
lock, no syscall, no allocation (small ints are cached; the memoryview store writes in place),
nothing that can page-fault (the arena is prefaulted and locked).

Atomicity on a GIL build: CPython 3.11 checks for a thread switch only at function entry,
backward jumps and calls. The statement loads two attributes, indexes a memoryview (C), adds
two ints (C) and stores (C): no check inside it, so no other thread of this process runs
between the load and the store of the slot. Other processes never write this slot: it belongs
to this process's vcpu id. On a free-threaded build that argument fails; the domain then gives
every handle the locked variant (see ``_shared_variant``).

Rebinding without cost on the hot path: a handle's slot changes (removal, fork, a move by
compaction, overflow) only by assigning ``_index`` or ``__class__`` from a thread that holds the
GIL. A single attribute store is atomic, so an ``inc`` uses the old slot or the new one, never a
mix. The domain does it at a quiescent point (see ``_domain``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import InvalidArgument, InvalidType, MetricRemoved

if TYPE_CHECKING:
    from ._domain import Domain


class _Handle:
    """Common state of every handle: the domain, the slot (ref) and this holder's word."""

    __slots__ = ("__weakref__", "_cells", "_domain", "_index", "_ref", "labels", "name")

    _cells: memoryview
    _index: int
    _domain: Domain
    _ref: int
    name: str
    labels: tuple[tuple[str, str], ...]

    def __init__(self) -> None:
        raise TypeError("handles are made by a Domain (counter(), gauge(), summary(), alloc())")

    def __repr__(self) -> str:
        labels = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"<{type(self).__name__} {self.name}{{{labels}}}>"


class Counter(_Handle):
    """A monotonic int64 counter whose value is the sum of one slot per vcpu id."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one (the hot path: one straight-line statement)."""
        self._cells[self._index] += 1

    def add(self, n: int) -> None:
        """Add ``n >= 0``. A negative or non-int ``n`` raises and changes nothing."""
        if n < 0:
            raise InvalidArgument(f"a Counter only goes up: add({n}) is negative; use a Gauge")
        try:
            self._cells[self._index] += n
        except TypeError:
            raise InvalidType(f"Counter.add takes an int, got {type(n).__name__}") from None

    @property
    def value(self) -> int:
        """The sum over every id's slot (never decreases between two reads)."""
        return int(self._domain._read_sum(self._ref, 8))


class Gauge(_Handle):
    """A signed int64 whose value is the sum of one slot per vcpu id (add/sub, never set)."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one."""
        self._cells[self._index] += 1

    def dec(self) -> None:
        """Subtract one."""
        self._cells[self._index] -= 1

    def add(self, n: int) -> None:
        """Add ``n`` (any sign). A non-int raises and changes nothing."""
        try:
            self._cells[self._index] += n
        except TypeError:
            raise InvalidType(f"Gauge.add takes an int, got {type(n).__name__}") from None

    def sub(self, n: int) -> None:
        """Subtract ``n``."""
        try:
            self._cells[self._index] -= n
        except TypeError:
            raise InvalidType(f"Gauge.sub takes an int, got {type(n).__name__}") from None

    @property
    def value(self) -> int:
        """The sum over every id's slot."""
        return int(self._domain._read_sum(self._ref, 8))


class Summary(_Handle):
    """Count and sum of observations (16 bytes a slot: an int64 count, a float64 sum)."""

    __slots__ = ("_floats",)

    _floats: memoryview[float]

    def observe(self, x: float) -> None:
        """Record one observation ``x`` (an int or a float)."""
        try:
            self._floats[self._index + 1] += x
        except TypeError:
            raise InvalidType(f"Summary.observe takes a number, got {type(x).__name__}") from None
        self._cells[self._index] += 1

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


class PerCpu(_Handle):
    """A raw per-cpu object of ``size`` bytes (from ``Domain.alloc``).

    ``local`` is a zero-copy view of this holder's copy; ``copies()`` gives every id's copy.
    It belongs to the process that allocated it; ``free()`` returns its slot.
    """

    __slots__ = ("size",)

    size: int

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
    """Methods of a handle whose metric was removed: every use raises MetricRemoved."""

    __slots__ = ()

    def _gone(self, *args: Any) -> Any:
        raise MetricRemoved(f"{self!r} was removed from its domain; register it again to count")

    inc = dec = add = sub = observe = free = _gone
    value = local = count = sum = property(_gone)

    def copies(self) -> Any:
        return self._gone()


class RemovedCounter(_Removed, Counter):
    """A Counter after ``Domain.remove``."""

    __slots__ = ()


class RemovedGauge(_Removed, Gauge):
    """A Gauge after ``Domain.remove``."""

    __slots__ = ()


class RemovedSummary(_Removed, Summary):
    """A Summary after ``Domain.remove``."""

    __slots__ = ()


class RemovedPerCpu(_Removed, PerCpu):
    """A PerCpu object after ``free`` (or in a forked child: it belongs to its parent)."""

    __slots__ = ()


REMOVED_VARIANT: dict[type, type] = {
    Counter: RemovedCounter, Gauge: RemovedGauge, Summary: RemovedSummary, PerCpu: RemovedPerCpu,
}


class SharedCounter(Counter):
    """A Counter of a holder without an id of its own: each operation takes the overflow lock."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one under the overflow lock (the counted slow path)."""
        with self._domain._overflow_op():
            self._cells[self._index] += 1

    def add(self, n: int) -> None:
        """Add ``n >= 0`` under the overflow lock."""
        if n < 0:
            raise InvalidArgument(f"a Counter only goes up: add({n}) is negative; use a Gauge")
        with self._domain._overflow_op():
            try:
                self._cells[self._index] += n
            except TypeError:
                raise InvalidType(f"Counter.add takes an int, got {type(n).__name__}") from None


class SharedGauge(Gauge):
    """A Gauge of a holder without an id of its own."""

    __slots__ = ()

    def inc(self) -> None:
        """Add one under the overflow lock."""
        self.add(1)

    def dec(self) -> None:
        """Subtract one under the overflow lock."""
        self.add(-1)

    def add(self, n: int) -> None:
        """Add ``n`` under the overflow lock."""
        with self._domain._overflow_op():
            try:
                self._cells[self._index] += n
            except TypeError:
                raise InvalidType(f"Gauge.add takes an int, got {type(n).__name__}") from None

    def sub(self, n: int) -> None:
        """Subtract ``n`` under the overflow lock."""
        if n.__class__ is not int and not isinstance(n, int):
            raise InvalidType(f"Gauge.sub takes an int, got {type(n).__name__}")
        self.add(-n)


class SharedSummary(Summary):
    """A Summary of a holder without an id of its own."""

    __slots__ = ()

    def observe(self, x: float) -> None:
        """Record ``x`` under the overflow lock."""
        with self._domain._overflow_op():
            Summary.observe(self, x)


class _Unbound:
    """Methods of a handle with no slot of this holder yet (after ``release`` or ``fork``):
    the first use takes a lease, binds the handle, then does the operation."""

    __slots__ = ()

    def inc(self) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.inc()

    def dec(self) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.dec()

    def add(self, n: int) -> None:
        self._domain._bind(self)  # type: ignore[attr-defined]
        self.add(n)

    def sub(self, n: int) -> None:
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


class UnboundSummary(_Unbound, Summary):
    """A Summary waiting for its holder's next lease."""

    __slots__ = ()


BASE_KINDS = (Counter, Gauge, Summary, PerCpu)
SHARED_VARIANT: dict[type, type] = {
    Counter: SharedCounter, Gauge: SharedGauge, Summary: SharedSummary, PerCpu: PerCpu,
}
UNBOUND_VARIANT: dict[type, type] = {
    Counter: UnboundCounter, Gauge: UnboundGauge, Summary: UnboundSummary,
    PerCpu: RemovedPerCpu,  # a raw object belongs to the binding it was made under
}


def base_of(cls: type) -> type:
    """The user-facing class (Counter, Gauge, Summary, PerCpu) behind any variant."""
    for base in BASE_KINDS:
        if issubclass(cls, base):
            return base
    raise TypeError(f"{cls.__name__} is not a handle class")
