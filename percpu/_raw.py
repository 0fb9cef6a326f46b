"""Raw per-cpu objects (``Domain.alloc``): slots of 1..64 bytes that belong to one process.

Invariants
----------
1. A raw object's slot is taken from this holder's id cache and goes back to it zeroed: only
   this process ever wrote it (it is never in the registry, never moved by compaction, and
   its pageset is kept while it lives).
2. A raw object lives as long as the binding it was made under: releasing the lease frees
   every raw object first, while the id is still ours; a forked child never inherits them
   (their handles raise there).
3. Between the cache and the handle table the slot is only ever under ``_plock``, which
   ``check`` takes too: ``check`` never mistakes it for a leak.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._errors import DomainClosed, InvalidArgument, InvalidType
from ._handles import REMOVED_VARIANT, PerCpu, detach
from ._layout import MAX_OBJECT_SIZE, class_index
from ._pagesets import Pagesets


class Host(Protocol):
    """What raw objects read of the domain they belong to (``Domain`` implements it)."""

    _bytes: memoryview
    _plock: Any  # a threading.RLock, replaced in a forked child
    _pagesets: Pagesets
    _bindings: Any
    _lease: Any
    _closed: bool

    def _check_open(self) -> None: ...


class RawObjects:
    """The raw per-cpu objects of one process of a domain (see the module docstring)."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom

    def alloc(self, size: int) -> PerCpu:
        """A new raw object of ``size`` bytes, from the smallest class that fits."""
        if size.__class__ is not int:
            raise InvalidType(f"size must be an int, got {type(size).__name__}")
        if not 1 <= size <= MAX_OBJECT_SIZE:
            raise InvalidArgument(f"size must be in 1..{MAX_OBJECT_SIZE} bytes, got {size}")
        dom = self._dom
        dom._check_open()
        cls = class_index(size)
        with dom._plock:  # invariant 3
            ref = dom._lease.cache_pop(cls)
            try:
                h: PerCpu = dom._bindings.make(dom, PerCpu, ref, "", ())
            except BaseException:  # e.g. DomainFull for this id's page: the slot goes back
                dom._lease.cache_push(cls, ref)
                raise
            h.size = size
            return h

    def view(self, h: PerCpu) -> memoryview:
        """This holder's copy of ``h``."""
        self._dom._check_open()
        off = h._offset
        return self._dom._bytes[off : off + h.size]

    def copies(self, ref: int, size: int) -> dict[int, memoryview]:
        """Every id's copy of the slot ``ref`` (its first ``size`` bytes), by id."""
        dom = self._dom
        dom._check_open()
        e, slot, csize = dom._pagesets.check_ref(ref)
        return {k: dom._bytes[page + slot * csize : page + slot * csize + size]
                for k, page in dom._pagesets.id_pages(e)}

    def free(self, h: PerCpu) -> None:
        """Zero ``h``'s slot and return it to our id's cache (invariant 1)."""
        dom = self._dom
        with dom._plock:
            if dom._closed:
                raise DomainClosed("the domain is closed")
            by_ref = dom._bindings.by_ref
            handles = by_ref.get(h._ref)
            if not handles or h not in handles:
                raise InvalidArgument(f"{h!r} was already freed")
            by_ref.pop(h._ref)
            detach(h, REMOVED_VARIANT)
            dom._pagesets.zero(h._ref)  # only this process ever wrote it
            dom._lease.cache_push(class_index(h.size), h._ref)

    def live(self) -> list[PerCpu]:
        """This process's raw objects."""
        return [h for hs in self._dom._bindings.by_ref.values() for h in hs
                if isinstance(h, PerCpu)]

    def free_all(self) -> None:
        """Free every raw object of this process (invariant 2). ``_plock`` held."""
        for h in self.live():
            self.free(h)
