"""Handle bindings: which slot copy each handle of this process updates, and every change.

The handles of this process are in two tables: ``local`` (kind, key) -> the named handle the
process hands out for a metric, and ``by_ref`` ref -> every handle on that slot (the grace
periods and compaction find handles by ref). Every change of a handle's state goes through
the store functions of ``_handles`` (``bind_view``, ``bind_shared``, ``detach``), next to the
rule that makes them safe; this module decides *when* and *where to*.

Invariants
----------
1. A handle is bound only under the process lock and the domain lock, to the id this process
   holds at that moment (checked again under the locks), after following the compaction
   batch in flight and, for a handle that was unbound, checking that the registry still names
   its slot: no bind falls between a lease change, a retirement or a publish.
2. An update that does not run the lock-free statement (:meth:`Bindings.slow_update`) is
   counted where the handle is bound once the process lock is held, or raises: never dropped.
3. A retired handle is out of ``local`` (a new registration of its name gets a new handle).
4. Per-thread mode (``_lease.ThreadLeases``): the handles the process hands out are bound by
   ``bind_thread`` and write nothing themselves; each thread updates through a *private*
   handle of its own (``private``), bound like any other handle, to the thread's id and
   views, under the same locks and checks (invariant 1). Private handles are not in
   ``by_ref``: compaction's rebinding (``_moves``) must not give them the process's index;
   ``quiesce_private`` retires or unbinds them, and the world is stopped before their id
   is acknowledged or copied (``Grace.acknowledge``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._handles import (
    REMOVED_VARIANT,
    SHARED_VARIANT,
    UNBOUND_VARIANT,
    Counter,
    Gauge,
    Histogram,
    PerCpu,
    StampedGauge,
    Summary,
    _Handle,
    _Unbound,
    base_of,
    bind_shared,
    bind_thread,
    bind_view,
    detach,
)
from ._layout import (
    KIND_COUNTER,
    KIND_HISTOGRAM,
    KIND_SUMMARY,
    class_index,
    histogram_size,
    split_ref,
)
from ._names import encode_key

H = TypeVar("H", bound=_Handle)
_CLASS_KIND: dict[type, int] = {Counter: KIND_COUNTER, Summary: KIND_SUMMARY,
                                Histogram: KIND_HISTOGRAM}


def kind_of(h: _Handle) -> int | None:
    """The registry kind of a named handle (None: a raw object)."""
    base = base_of(type(h))
    if base is Gauge or base is StampedGauge:
        return int(h._kind)  # type: ignore[attr-defined]
    return _CLASS_KIND.get(base)


_NAMED_CLASS = class_index(16)  # counters, gauges, summaries


def slot_class(h: _Handle) -> int | None:
    """The size class ``h``'s slot must be of (its kind's: a pageset word saying otherwise is
    damage, and binding by it would write another metric's words); None for a raw object,
    whose class is its pageset's."""
    base = base_of(type(h))
    if base is PerCpu:
        return None
    if base is Histogram:
        return class_index(histogram_size(h._nb))  # type: ignore[attr-defined]
    return _NAMED_CLASS


REMOVED_CLASSES = frozenset(REMOVED_VARIANT.values())
UNBOUND_CLASSES = frozenset(c for c in UNBOUND_VARIANT.values() if c not in REMOVED_CLASSES)
SHARED_CLASSES = frozenset(SHARED_VARIANT[c] for c in (Counter, Gauge, StampedGauge, Summary,
                                                        Histogram))


def _add(q: Any, d: Any, i: int, n: int, x: float | None) -> None:
    if x is not None:
        d[i + 1] += x
    if n:
        q[i] += n


class Host(Protocol):
    """What bindings read of the domain they belong to (``Domain`` implements it)."""

    _q: memoryview[int]
    _d: memoryview[float]
    _max: int
    _lock: Any
    _plock: Any  # a threading.RLock, replaced in a forked child
    _lease: Any
    _pagesets: Any
    _registry: Any
    _moves: Any
    _grace: Any

    def vcpu_id(self) -> int: ...

    def _check_open(self) -> None: ...

    def _retire(self, h: _Handle, /) -> None: ...


class Bindings:
    """The handle tables of one process of a domain, and the binding rules."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom
        self.local: dict[tuple[int, bytes], _Handle] = {}  #: (kind, key) -> named handle
        self.by_ref: dict[int, list[_Handle]] = {}  #: ref -> this process's handles on it
        #: id(private handle) -> (it, its thread's state, the handle it serves for that
        #: thread, whose slot it follows): per-thread mode (invariant 4)
        self.private: dict[int, tuple[_Handle, Any, _Handle]] = {}

    def bind(self, h: _Handle) -> None:
        """Point ``h`` at this holder's copy of its slot, allocating the page if needed
        (invariant 1: the lease is read again under the locks; a retired handle stays
        retired; a handle whose metric was removed while unbound is retired)."""
        dom = self._dom
        if id(h) in self.private:
            return self.bind_private(h)
        while True:
            vcpu = dom.vcpu_id()
            with dom._plock:
                dom._check_open()  # close() unmaps under _plock: from here the fd is ours
                with dom._lock:
                    if dom._lease.vcpu != vcpu:
                        continue  # released meanwhile: take a lease again
                    if type(h) in REMOVED_CLASSES:
                        return  # retired meanwhile: its next use raises MetricRemoved
                    dom._moves.follow(h)  # compaction: bind to where the metric lives now
                    if isinstance(h, _Unbound) and not self.still_registered(h):
                        # Removed while this process held no lease (released, or a forked
                        # child): its slot may be reused already, so the registry decides.
                        self.drop(h)
                        return
                    _e, slot, size = dom._pagesets.check_ref(h._ref, slot_class(h))
                    if dom._lease.threads is not None and not isinstance(h, PerCpu):
                        return bind_thread(h)  # its threads' private handles count
                    page = dom._pagesets.page(split_ref(h._ref)[0], vcpu)
                    if isinstance(h, PerCpu):
                        h._offset = page + slot * size  # a 4-byte class slot: not 8-aligned
                    if vcpu == dom._max:
                        bind_shared(h, (page + slot * size) // 8)
                    else:
                        bind_view(h, (page + slot * size) // 8, dom._q, dom._d)
                    return

    def bind_private(self, h: _Handle) -> None:
        """Bind the private handle ``h`` to the calling thread's id (invariants 1 and 4); a
        thread whose id has a compaction copy due gets it first (``Grace.acknowledge``), so
        no thread adds to a new slot before its old value is copied there."""
        dom = self._dom
        with dom._plock:
            dom._check_open()
            st = dom._lease.threads.state()
            disp = self.private[id(h)][2]
            self.private[id(h)] = (h, st, disp)
            if h not in st.handles:
                st.handles.append(h)
            with dom._lock:
                if type(h) in REMOVED_CLASSES:
                    return
                if type(disp) in REMOVED_CLASSES:
                    return self.forget_private(h, REMOVED_VARIANT)
                if dom._grace.copy_due(st.vcpu):
                    dom._grace.acknowledge()
                dom._moves.follow(disp)
                h._ref = disp._ref  # it follows its handle's slot (moves rebind ``by_ref``)
                if isinstance(h, _Unbound) and not self.still_registered(h):
                    # Removed while unbound: the handle users hold goes too (every thread's
                    # next use and every read raise MetricRemoved, as for a GIL build's).
                    self.drop(disp)
                    return self.forget_private(h, REMOVED_VARIANT)
                _e, slot, size = dom._pagesets.check_ref(h._ref, slot_class(h))
                page = dom._pagesets.page(split_ref(h._ref)[0], st.vcpu)
                if st.vcpu == dom._max:
                    bind_shared(h, (page + slot * size) // 8)
                else:
                    bind_view(h, (page + slot * size) // 8, st.q, st.d)

    def private_for(self, h: _Handle) -> _Handle:
        """The calling thread's private handle of ``h`` (``Domain._private``): made, bound
        and stored in ``h``'s ``threading.local`` on the thread's first update."""
        dom = self._dom
        with dom._plock:
            cls = self.bound_class(h)
            mine: _Handle | None = getattr(h._tl, "h", None)
            if mine is not None:
                return mine
            base = base_of(cls)
            p: _Handle = object.__new__(base)
            for attr in ("_domain", "_ref", "name", "labels", "_kind", "_bounds", "_nb"):
                if hasattr(h, attr):
                    setattr(p, attr, getattr(h, attr))
            p._index = 0
            detach(p, UNBOUND_VARIANT)
            self.private[id(p)] = (p, None, h)
            self.bind_private(p)
            h._tl.h = p
            return p

    def forget_private(self, h: _Handle, variant: dict[type, type] = UNBOUND_VARIANT) -> None:
        """Detach the private handle ``h`` (``variant``: unbound, its thread binds it again on
        its next update; removed: it is gone); a removed one is forgotten. ``_plock`` held."""
        detach(h, variant)
        if variant is REMOVED_VARIANT:
            st = self.private.pop(id(h), (h, None, h))[1]
            if st is not None and h in st.handles:
                st.handles.remove(h)

    def drop_thread(self, st: Any) -> None:
        """Forget the private handles of a thread that ended. ``_plock`` held."""
        for h in st.handles:
            detach(h, REMOVED_VARIANT)
            self.private.pop(id(h), None)
        st.handles = []

    def quiesce_private(self, gone: set[int]) -> int:
        """Retire the private handles of the slots in ``gone`` (pending since our last
        acknowledgement) and unbind those whose metric a compaction batch moved; the count
        changed: the caller stops the world before it acknowledges or copies (invariant 4).
        ``_plock`` and the domain lock held."""
        changed = 0
        moves = self._dom._moves
        for h, _st, disp in list(self.private.values()):
            cls = type(h)
            if cls in REMOVED_CLASSES or cls in UNBOUND_CLASSES:
                # An unbound one writes nothing, and its ``_ref`` may be a slot a compaction
                # moved it from and another metric reused since: it binds again from its
                # handle's current slot, which its handle's retirement covers (bind_private).
                # Its handle retired, it is forgotten now rather than when its thread ends.
                if cls in UNBOUND_CLASSES and type(disp) in REMOVED_CLASSES:
                    self.forget_private(h, REMOVED_VARIANT)
                continue
            if h._ref in gone:
                self.forget_private(h, REMOVED_VARIANT)
                changed += 1
            elif moves.current(h._ref) != h._ref:
                detach(h, UNBOUND_VARIANT)  # binds again to its handle's new slot
                changed += 1
        return changed

    def rebind_shared(self) -> int:
        """Bind every handle bound to the overflow id to the id this process holds now (a
        hand-over, ``Lease.hand_over``); how many. ``_plock`` and the domain lock held."""
        moved = 0
        for handles in list(self.by_ref.values()):
            for h in list(handles):
                if type(h) in SHARED_CLASSES:
                    self.bind(h)
                    moved += 1
        return moved

    def bound_class(self, h: _Handle) -> type:
        """``h``'s class once it is bound: an unbound handle is bound first (taking a lease if
        we hold none; it may find its metric removed), a retired one raises
        (``MetricRemoved``, ``DomainClosed``). ``_plock`` held."""
        dom = self._dom
        while True:
            dom._check_open()
            cls = type(h)
            if cls in REMOVED_CLASSES:
                h._gone()  # type: ignore[attr-defined]  # raises
            if cls not in UNBOUND_CLASSES:
                return cls
            self.bind(h)

    def slow_update(self, h: _Handle, n: int, x: float | None) -> None:
        """Add ``n`` to ``h``'s int word (and ``x`` to its float word) where ``h`` is bound
        once the process lock is held (invariant 2): ``slow_store`` with an addition."""
        self.slow_store(h, lambda q, d, i: _add(q, d, i, n, x))

    def slow_store(self, h: _Handle, op: Callable[[Any, Any, int], None]) -> None:
        """``op(int words, float words, h's word)`` where ``h`` is bound once the process lock
        is held, binding it first if it is unbound (invariant 2); under the overflow lock for
        the overflow id. For the updates that are not one ``+=`` (``set``, a histogram's
        bucket, a stamped gauge's time)."""
        dom = self._dom
        with dom._plock:
            cls = self.bound_class(h)
            if cls in SHARED_CLASSES:
                lease = dom._lease
                lease.overflow_enter()
                try:
                    op(dom._q, dom._d, h._index)
                finally:
                    lease.overflow_exit()
            else:
                op(dom._q, dom._d, h._index)

    def make(self, owner: Any, cls_: type[H], ref: int, name: str,
             labels: tuple[tuple[str, str], ...], kind: int = 0,
             buckets: tuple[float, ...] = ()) -> H:
        """A new handle of class ``cls_`` on slot ``ref``, bound and in ``by_ref`` (``kind``:
        a gauge's; ``buckets``: a histogram's bounds)."""
        h = object.__new__(cls_)
        h._domain = owner
        h._ref = ref
        h._index = 0
        if self._dom._lease.threads is not None:
            h._tl = threading.local()  # per-thread mode: each thread's private handle
        h.name = name
        h.labels = labels
        if isinstance(h, Gauge):
            h._kind = kind
        elif isinstance(h, Histogram):
            h._bounds = buckets
            h._nb = len(buckets)
        if isinstance(h, PerCpu):
            h._cells = self._dom._q  # never updated through _cells: its copy is ``local``
        else:
            detach(h, UNBOUND_VARIANT)  # bind() binds it (or retires it)
        self.bind(h)
        self.by_ref.setdefault(h._ref, []).append(h)  # bind() may follow a move
        return h

    def retire(self, h: _Handle) -> None:
        """Make every later use of ``h`` raise, even a call already dispatched or a bound
        method the caller cached (invariant 3). Process lock held."""
        kind = kind_of(h)
        detach(h, REMOVED_VARIANT)
        if kind is not None:
            k = (kind, encode_key(h.name, h.labels))
            if self.local.get(k) is h:  # not a newer registration of the same name
                del self.local[k]

    def drop(self, h: _Handle) -> None:
        """Retire ``h`` and forget it (its metric is gone). Process lock held."""
        handles = self.by_ref.get(h._ref)
        if handles is not None and h in handles:
            handles.remove(h)
            if not handles:
                del self.by_ref[h._ref]
        self._dom._retire(h)

    def still_registered(self, h: _Handle) -> bool:
        """True when ``h``'s name and labels still map to ``h``'s slot and kind."""
        kind = kind_of(h)
        if kind is None:
            return True  # a raw object: not in the registry
        dom = self._dom
        with dom._lock:
            idx, _ = dom._registry.lookup(encode_key(h.name, h.labels))
            if idx < 0:
                return False
            found, ref = dom._registry.kind_ref(idx)
            return bool(dom._moves.current(ref) == h._ref and found == kind)  # may lag a move

    def after_fork(self) -> None:
        """In a forked child: every handle unbound (its first use takes a lease and checks the
        registry). A named handle that a thread of the parent had taken out of ``by_ref`` (to
        retire or rebind it) when the fork came is still in ``local``: it is put back first.
        Only possible when the fork did not get the process lock in time."""
        tabled = {id(h) for hs in self.by_ref.values() for h in hs}
        for h, _st, _disp in self.private.values():
            detach(h, REMOVED_VARIANT)  # the parent's threads' (none runs here)
        self.private.clear()
        for hs in self.by_ref.values():
            for h in hs:
                h._tl = threading.local()
        for h in self.local.values():
            if id(h) not in tabled:
                self.by_ref.setdefault(h._ref, []).append(h)
        self.unbind_all()

    def unbind_all(self) -> None:
        """Unbind every handle (release, fork): each takes a lease and rebinds on its next
        use; raw objects are forgotten (they belong to the binding they were made under)."""
        for ref, handles in list(self.by_ref.items()):
            keep = []
            for h in handles:
                detach(h, UNBOUND_VARIANT)
                if not isinstance(h, PerCpu):
                    keep.append(h)
            if keep:
                self.by_ref[ref] = keep
            else:
                del self.by_ref[ref]
