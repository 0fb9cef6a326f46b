"""This process's lease on a vcpu id: taking it, giving it back, the overflow id's slow path,
and what a forked child inherits of it.

``_lease_records`` keeps the lease records (pure bookkeeping), ``_holder`` the OFD locks that
make an id ours; this module puts them together with the parts a lease change touches.

Invariants
----------
1. ``vcpu`` changes only under the process lock (``_plock``). It names an id whose lease lock
   this process holds, the overflow id (``max_vcpus``: every id was taken), or None.
2. A new lease is recorded under the domain lock together with the acknowledgement of the
   current epoch, the id's compaction moves and the retirement of the handles of every slot
   that went pending since this process last acknowledged: a new holder never binds to a
   slot about to be reused or moved.
3. A process writes an id's slots only while it holds the id: :meth:`Lease.release` unbinds
   every handle before the lease record and the lock go, so the next holder of the id is its
   only writer.
4. Every operation on the overflow id holds the overflow lock (:meth:`Lease.overflow_op`); it
   never acknowledges an epoch itself (the quiescer does, under ``_plock``), so no
   retirement of the handle in use can fall inside one.
6. A holder that takes an id over (its previous holder released it or died) starts every
   live-mode gauge (``livesum``, ``livemax``...) of that id from zero, before it binds a
   handle: the previous holder's part dropped out of the value when it left, and must not
   come back on top of the new holder's.
5. A forked child holds none of its parent's locks (the arena reopened its file): it starts
   with no id and every handle unbound; a private domain's copy is the child's alone.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from ._caches import Caches
from ._holder import HolderLocks
from ._layout import D_RECOVERED_SLOTS, D_SHARED_OPS, L_ACK, LIVE_KINDS, bump, lease_base
from ._lease_records import LeasePath, record_lease, record_release

# No GIL: the hot path is not atomic, so every operation takes the overflow lock (issue: a
# lease per thread on free-threaded builds).
_GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()


class Host(Protocol):
    """What the lease reads of the domain it belongs to (``Domain`` implements it)."""

    arena: Any
    _root: memoryview[int]
    _max: int
    _q: memoryview[int]
    _lock: Any
    _plock: Any  # a threading.RLock, replaced in a forked child
    _holder: HolderLocks
    _caches: Caches
    _moves: Any
    _grace: Any
    _bindings: Any
    _raw: Any
    _registry: Any
    _pagesets: Any
    _closed: bool

    def _check_open(self) -> None: ...


class Lease:
    """This process's vcpu id in one domain (see the module docstring)."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom
        self.vcpu: int | None = None  #: the id we hold (invariant 1)
        self.last_path: LeasePath | None = None  #: how the current or last lease was taken

    def take(self) -> int:
        """Our id, taking a lease if we hold none: the lowest id whose lock we get, else the
        overflow id (invariant 2)."""
        dom = self._dom
        with dom._plock:
            if self.vcpu is not None:
                return self.vcpu
            dom._check_open()
            holder, r, bound = dom._holder, dom._root, dom._max
            vcpu = holder.choose() if _GIL_ENABLED else None
            try:
                with dom._lock:
                    path = record_lease(r, bound, vcpu, os.getpid())
                    epoch = dom._grace.epoch()
                    if vcpu is None:
                        vcpu = bound
                        holder.set_ack(epoch)
                    else:
                        if path is LeasePath.RECLAIMED:
                            bump(r, D_RECOVERED_SLOTS, dom._caches.count(vcpu))
                        r[lease_base(bound, vcpu) + L_ACK] = epoch
                        dom._moves.adopt(vcpu)  # the id's moves, before any bind
                        if path is not LeasePath.FRESH:
                            self._zero_live(vcpu)
                    dom._grace.acknowledge()
            except BaseException:
                if vcpu is not None:
                    holder.drop(vcpu)
                raise
            self.last_path = path
            self.vcpu = vcpu
            if dom.arena.fd is not None:  # overflow holders acknowledge epochs like the rest
                dom._grace.start()
            return vcpu

    def _zero_live(self, vcpu: int) -> None:
        """Zero id ``vcpu``'s copy of every live-mode gauge (invariant 6). Domain lock held,
        the id ours, nothing bound to it yet."""
        dom = self._dom
        pairs = dom._moves.pairs_in_flight()
        for kind, _cls, ref, _key in dom._registry.entries_at()[1]:
            if kind in LIVE_KINDS:
                for r in {ref, *pairs.get(ref, ())}:
                    dom._pagesets.zero_copy(r, vcpu)

    def release(self) -> threading.Thread | None:
        """Give our id back (invariant 3); raw objects are freed first, while the id is still
        ours. Returns the quiescer to join once ``_plock`` is released (it may be waiting for
        ``_plock``, and would never see the stop). ``_plock`` held."""
        dom = self._dom
        vcpu = self.vcpu
        if vcpu is None or dom._closed:
            return None
        dom._raw.free_all()
        quiescer: threading.Thread | None = dom._grace.detach()
        dom._bindings.unbind_all()
        self.vcpu = None
        with dom._lock:
            record_release(dom._root, dom._max, vcpu)  # pid 0 before the lock goes
        dom._holder.drop(vcpu)
        return quiescer

    @contextmanager
    def overflow_op(self) -> Iterator[None]:
        """One operation on the overflow id: under the overflow lock, counted (invariant 4).
        Lock order: ``_plock``, then the overflow lock."""
        dom = self._dom
        with dom._plock:
            dom._holder.lock_overflow()
            try:
                bump(dom._root, D_SHARED_OPS)
                if dom._q[dom._moves.ovf_step]:  # compaction: a copier died mid-copy (rare)
                    dom._moves.finish_overflow()
                yield
            finally:
                dom._holder.unlock_overflow()

    def cache_pop(self, cls: int) -> int:
        """A free ref of class ``cls`` from our id's cache. The id is read under ``_plock``, so
        no other thread of ours releases it between choosing the cache and writing it (after
        a release another process may own that cache)."""
        with self._dom._plock:
            return self._dom._caches.pop(self.take(), cls)

    def cache_push(self, cls: int, ref: int) -> None:
        """Return a zeroed ref to our id's cache (``_plock``: as in :meth:`cache_pop`)."""
        with self._dom._plock:
            self._dom._caches.push(self.take(), cls, ref)

    def after_fork(self) -> None:
        """In a forked child (invariant 5)."""
        dom = self._dom
        inherited, self.vcpu = self.vcpu, None
        if dom.arena.fd is None:
            self.vcpu = inherited  # a private copy: the child owns all of it
            return
        dom._holder.ack_byte = None  # the parent keeps its lease and acknowledgement locks
        self.last_path = None
        dom._bindings.after_fork()
