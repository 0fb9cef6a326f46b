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
4. Every operation on the overflow id holds the overflow lock (:meth:`Lease.overflow_enter`); it
   never acknowledges an epoch itself (the quiescer does, under ``_plock``), so no
   retirement of the handle in use can fall inside one.
7. An overflow holder (the process's lease, or a thread's in per-thread mode) is handed a
   freed id at a quiescent point (:meth:`Lease.hand_over`, from ``Grace.acknowledge``: the
   process lock and the domain lock held): the new lease is recorded as any other
   (invariant 2, its epoch acknowledged) before the overflow acknowledgement goes, then every
   handle bound to the overflow id is bound again to the new id. The overflow id's values
   stay where they are (every reader sums that id too): an update is counted on one id or the
   other, never both, because overflow updates run under ``_plock`` (no update of this
   process is inside one while the handles change) and one that waits for ``_plock`` reads
   the handle's binding again once it has it (``Bindings.slow_update``). A process with raw
   objects on the overflow id keeps it (they belong to the binding they were made under).
6. A holder that takes an id over (its previous holder released it or died) starts every
   live-mode gauge (``livesum``, ``livemax``...) of that id from zero, before it binds a
   handle: the previous holder's part dropped out of the value when it left, and must not
   come back on top of the new holder's.
8. This process holds an overflow acknowledgement lock (``HolderLocks.set_ack``) exactly
   while one of its holders shares the overflow id: its lease or, in per-thread mode, a
   thread's, even when the process's own lease is on an id of its own. Every other holder
   then sees the overflow id live (live-mode gauges count its part) and waits for this
   process's acknowledgement before it copies that id's values in a compaction (the
   thread's private handles follow a batch at this process's quiescent point).
5. A forked child holds none of its parent's locks (the arena reopened its file): it starts
   with no id and every handle unbound; a private domain's copy is the child's alone.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Protocol

from ._caches import Caches
from ._holder import HolderLocks
from ._layout import D_RECOVERED_SLOTS, D_SHARED_OPS, L_ACK, LIVE_KINDS, bump, lease_base
from ._lease_records import LeasePath, record_hand_over, record_lease, record_release

_GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()
#: One lease per thread (``ThreadLeases``) where no GIL makes a process's threads take turns;
#: a test may set ``Lease.per_thread`` before making a domain to run that mode under a GIL.
PER_THREAD = not _GIL_ENABLED


class Host(Protocol):
    """What the lease reads of the domain it belongs to (``Domain`` implements it)."""

    arena: Any
    _root: memoryview[int]
    _max: int
    _q: memoryview[int]
    _d: memoryview[float]
    _lease: Any
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

    per_thread = PER_THREAD  #: read once per domain, when it is made

    def __init__(self, dom: Host) -> None:
        self._dom = dom
        self.vcpu: int | None = None  #: the id we hold (invariant 1)
        self.last_path: LeasePath | None = None  #: how the current or last lease was taken
        #: Per-thread mode: the threads' own leases (None: the process's lease is the only one).
        self.threads: ThreadLeases | None = ThreadLeases(self) if self.per_thread else None
        self._handing = False  #: a hand-over is recording its lease (no nested one)

    def take(self) -> int:
        """Our id, taking a lease if we hold none: the lowest id whose lock we get, else the
        overflow id (invariant 2)."""
        dom = self._dom
        with dom._plock:
            if self.vcpu is not None:
                return self.vcpu
            dom._check_open()
            vcpu, path = self.record(dom._holder.choose(), thread=False)
            self.last_path = path
            self.vcpu = vcpu
            if dom.arena.fd is not None or self.threads is not None:
                dom._grace.start()  # overflow holders and threads acknowledge like the rest
            return vcpu

    def record(self, vcpu: int | None, thread: bool) -> tuple[int, LeasePath]:
        """Record the lease of the id just chosen (None: every id was taken, the overflow id)
        with the acknowledgement of the current epoch (invariant 2). ``_plock`` held; the
        caller stores the id it returns. ``thread``: a thread's own lease (``ThreadLeases``)."""
        dom = self._dom
        holder, r, bound = dom._holder, dom._root, dom._max
        try:
            with dom._lock:
                path = record_lease(r, bound, vcpu, os.getpid())
                epoch = dom._grace.epoch()
                if vcpu is None:
                    vcpu = bound
                    if not thread or holder.ack_byte is None:
                        holder.set_ack(epoch)  # invariant 8 (acknowledge() follows at once)
                else:
                    if thread:
                        holder.threads.add(vcpu)
                    if path is LeasePath.RECLAIMED:
                        bump(r, D_RECOVERED_SLOTS, dom._caches.count(vcpu))
                    r[lease_base(bound, vcpu) + L_ACK] = epoch
                    dom._moves.adopt(vcpu)  # the id's moves, before any bind
                    if path is not LeasePath.FRESH:
                        self._zero_live(vcpu)
                dom._grace.acknowledge()
        except BaseException:
            if vcpu is not None and vcpu < bound:
                holder.threads.discard(vcpu)
                holder.unlock_lease(vcpu)
            elif vcpu is not None:
                self.drop_overflow_ack()
            raise
        return vcpu, path

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
        if self.threads is not None and not dom._closed:
            self.threads.release_all()
        if vcpu is None or dom._closed:
            return None
        dom._raw.free_all()
        quiescer: threading.Thread | None = dom._grace.detach()
        dom._bindings.unbind_all()
        self.vcpu = None
        with dom._lock:
            record_release(dom._root, dom._max, vcpu)  # pid 0 before the lock goes
        if vcpu < dom._max:
            dom._holder.unlock_lease(vcpu)
        self.drop_overflow_ack()
        return quiescer

    def lent(self) -> bool:
        """True when the process's id is lent to one of its threads (``ThreadLeases`` T3):
        its compaction copy is then a thread's, made after the world was stopped."""
        return self.threads is not None and self.threads.borrower is not None

    def drop_overflow_ack(self) -> None:
        """Give up the overflow acknowledgement lock once no holder of this process (its
        lease, a thread's) shares the overflow id any more (invariant 8)."""
        if not self.on_overflow():
            self._dom._holder.clear_ack()

    def on_overflow(self) -> bool:
        """True when this process's lease or one of its threads' shares the overflow id (a
        hint without ``_plock``)."""
        bound = self._dom._max
        return self.vcpu == bound or (self.threads is not None and any(
            st.vcpu == bound for st in list(self.threads.states)))

    def hand_over(self) -> int:
        """Move every overflow holder of this process (its own lease, its threads') to a
        freed id if the lock probe finds one (invariant 7); how many moved. ``_plock`` and the
        domain lock held (``Grace.acknowledge``)."""
        dom = self._dom
        bound = dom._max
        if self._handing or dom._closed:
            return 0
        moved = 0
        self._handing = True
        try:
            if self.vcpu == bound and not dom._raw.live():
                k = dom._holder.choose()
                if k is None:
                    return 0
                _k, self.last_path = self.record(k, thread=False)
                record_hand_over(dom._root, bound)
                self.vcpu = k
                dom._bindings.rebind_shared()
                if self.threads is not None:
                    self.threads.follow_lease(k)
                moved += 1
            if self.threads is not None:
                moved += self.threads.hand_over()
            if moved:
                self.drop_overflow_ack()  # after the new ids' acknowledgements (record)
        finally:
            self._handing = False
        return moved

    def overflow_enter(self) -> None:
        """Begin one operation on the overflow id (invariant 4): take the overflow lock and
        count the operation; :meth:`overflow_exit` ends it. ``_plock`` held (the caller's
        ``try``/``finally`` calls ``overflow_exit``; this drops the lock itself if it raises).
        Lock order: ``_plock``, then the overflow lock (then the domain lock, to finish a
        dead copier's copy)."""
        dom = self._dom
        holder = dom._holder
        holder.lock_overflow()
        try:
            bump(dom._root, D_SHARED_OPS)
            if dom._q[dom._moves.ovf_step]:  # compaction: a copier died mid-copy (rare)
                dom._moves.finish_overflow()
        except BaseException:
            holder.unlock_overflow()
            raise

    def overflow_exit(self) -> None:
        """End the operation :meth:`overflow_enter` began."""
        self._dom._holder.unlock_overflow()

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
        if self.threads is not None:
            self.threads.after_fork()
        dom._bindings.after_fork()


# -- per-thread leases ---------------------------------------------------------------------


def stop_the_world() -> None:
    """Return only after every other thread of the process has been stopped at a safe point
    once since the call began (see ``docs/free-threading.md``, "Quiescent states").

    On a free-threaded CPython 3.13 ``sys._current_frames()`` stops the world to read every
    thread's frame (``_PyThread_CurrentFrames`` calls ``_PyEval_StopTheWorldAll``): every
    attached thread parks at its next eval-breaker check (function entry, backward jump,
    the end of a call) or is detached (blocked in C with its thread state released), and the
    call returns once all have. It costs microseconds whatever the heap (a garbage
    collection, which stops the world too, cost 47 ms at a million objects and made a
    removal cost milliseconds); ``tests/test_freethread.py`` checks that it waits for a thread
    running in C. On a GIL build the GIL is the stronger guarantee already.
    """
    sys._current_frames()


class ThreadState:
    """One thread's lease in one domain: its id, its own views of the heap (a memoryview
    shared between threads has its reference count contended on every update), and the
    private handles it updates through. Held by the domain (``ThreadLeases.states``) until
    the id is given back; the thread's ``_Anchor`` tells when the thread has ended."""

    __slots__ = ("d", "handles", "lent", "q", "vcpu")

    def __init__(self) -> None:
        self.vcpu: int | None = None
        self.lent = False  #: ``vcpu`` is the process's own id, lent to this thread (T3)
        self.q: memoryview[int] | None = None
        self.d: memoryview[float] | None = None
        self.handles: list[Any] = []  #: private handles bound for this thread


class _Anchor:
    """Lives in the thread's slot of a ``threading.local`` and dies with the thread (CPython
    clears a thread's locals as it exits, before ``join`` returns): its ``__del__`` queues
    the thread's state for release. It only appends to a list: it may run in any thread,
    holding any lock."""

    __slots__ = ("dead", "state")

    def __init__(self, state: ThreadState, dead: list[ThreadState]) -> None:
        self.state = state
        self.dead = dead

    def __del__(self) -> None:
        self.dead.append(self.state)


class ThreadLeases:
    """Per-thread mode: each thread that updates a metric leases an id of its own on its
    first update and gives it back when it ends (its private handles are detached first, as
    in ``Lease.release``); the kernel drops the lease locks if the process dies.

    Invariants
    ----------
    T1. A thread's id is written only through that thread's private handles (and by the
        quiescer's copy of compaction after a stop-the-world, ``Grace``), so each id still
        has one writer at a time.
    T2. An id goes back only after its private handles are detached (``_cells`` stored
        first): a thread ended, so none of its updates is in flight.
    T3. The process's own lease (``Lease.vcpu``) holds the caches and raw objects, and is
        lent to one thread at a time (the first that needs an id while none borrows it,
        ``ThreadState.lent``; the overflow id too, when the process shares it: the borrower
        then follows the process's lease when it is handed an id), so a process whose
        metrics one thread updates is one holder, as on a GIL build. While it is lent its
        metric slots have that thread as their only writer, and they are treated as a
        thread's id: their compaction copy waits for the detach and the stop of the world
        (``Grace.acknowledge_threads``, never ``Moves.sync``). When the borrower ends, the
        id stays the process's and its live-mode gauges are zeroed (the thread's part drops
        out, as a thread's own id's does when it is given back). Raw objects are never in a
        metric slot, so they race with no borrower.
    """

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self._dom = lease._dom
        self.local = threading.local()  #: ``.anchor``: this thread's ``_Anchor``
        self.states: list[ThreadState] = []  #: every state holding an id (under ``_plock``)
        self.dead: list[ThreadState] = []  #: states of ended threads, to release
        self.borrower: ThreadState | None = None  #: the thread the process's id is lent to

    def state(self) -> ThreadState:
        """This thread's state, its id taken (``_plock`` held)."""
        anchor = getattr(self.local, "anchor", None)
        if anchor is None:
            anchor = self.local.anchor = _Anchor(ThreadState(), self.dead)
        st: ThreadState = anchor.state
        if st.vcpu is None:
            self.reap()  # ids of ended threads first: the lowest id goes to the next thread
            dom = self._dom
            dom._check_open()
            if dom._lease.vcpu is None:
                dom._lease.take()  # the process's own id first: its caches serve registration
            if dom._lease.vcpu is not None and self.borrower is None:
                st.vcpu, st.lent, self.borrower = dom._lease.vcpu, True, st  # T3 (maybe overflow)
            else:
                st.vcpu, _path = self._lease.record(self._choose(), thread=True)
            st.q, st.d = dom._q[:], dom._d[:]
            self.states.append(st)
        return st

    def hand_over(self) -> int:
        """Hand the threads that share the overflow id a freed id each, while the lock probe
        finds one (``Lease.hand_over``); their private handles are detached (the safe
        direction: a detached handle's next update waits for ``_plock`` and binds it to the
        thread's new id, ``Bindings.bind_private``). Every update on the overflow id ran
        under ``_plock``, so none is in flight. ``_plock`` and the domain lock held."""
        dom = self._dom
        bound = dom._max
        moved = 0
        for st in list(self.states):
            if st.vcpu != bound or st.lent:  # a borrower follows the process's lease
                continue
            k = self._choose()
            if k is None:
                break
            st.vcpu, _path = self._lease.record(k, thread=True)
            record_hand_over(dom._root, bound)
            self._unbind(st)
            moved += 1
        return moved

    def follow_lease(self, k: int) -> None:
        """The process's lease moved from the overflow id to ``k`` (``Lease.hand_over``): its
        borrower, if any, follows; its private handles are detached (the safe direction, as in
        :meth:`hand_over`: every update on the overflow id ran under ``_plock``, held here)."""
        st = self.borrower
        if st is not None and st.vcpu == self._dom._max:
            st.vcpu = k
            self._unbind(st)

    def _choose(self) -> int | None:
        """The lowest id a thread of ours can lease now (not the process's own, which is only
        ever lent); None: every id is taken."""
        mine = self._lease.vcpu
        return self._dom._holder.choose(mine if mine is not None and mine < self._dom._max
                                        else None)

    def _unbind(self, st: ThreadState) -> None:
        """Unbind ``st``'s private handles: each binds again, to the thread's id and views of
        the moment, on its next update (``Bindings.bind_private``)."""
        for h in st.handles:
            self._dom._bindings.forget_private(h)

    def reap(self) -> None:
        """Give back the ids of threads that ended (``_plock`` held)."""
        while self.dead:
            st = self.dead.pop()
            if st in self.states:
                self.release(st)

    def release(self, st: ThreadState, forget: bool = True) -> None:
        """Give ``st``'s id back and release its views, its private handles detached first
        (invariant T2; ``forget``: the thread ended, its handles are dropped, else they stay
        unbound for its next update). ``_plock`` held; the thread has ended, or the world
        was stopped since the detaching (``release_all``)."""
        dom = self._dom
        if forget:
            dom._bindings.drop_thread(st)
        vcpu, st.vcpu = st.vcpu, None
        views, st.q, st.d = (st.q, st.d), None, None
        self.states.remove(st)
        for v in views:
            if v is not None:
                v.release()
        if st.lent:  # the process keeps its id (T3): only the thread's live part goes
            st.lent, self.borrower = False, None
            # (release_all: the process gives the id back next; its next holder zeroes them)
            if forget and vcpu is not None and vcpu == self._lease.vcpu and vcpu < dom._max:
                with dom._lock:
                    self._lease._zero_live(vcpu)
        elif vcpu is not None and vcpu < dom._max:
            with dom._lock:
                record_release(dom._root, dom._max, vcpu)
            dom._holder.threads.discard(vcpu)
            dom._holder.unlock_lease(vcpu)
        elif vcpu is not None:
            self._lease.drop_overflow_ack()

    def release_all(self) -> None:
        """Every thread's id back (``Domain.release``, ``close``): each thread takes one again
        on its next update. The world is stopped between the detaching and the release, so
        no update still holds a view or an index of a given-back id (``_plock`` held)."""
        self.reap()
        states = list(self.states)
        for st in states:
            self._unbind(st)
        if states:
            stop_the_world()
        for st in states:
            self.release(st, forget=False)

    def after_fork(self) -> None:
        """In a forked child: the parent's threads and their ids are not ours."""
        self.local = threading.local()
        self.states = []
        self.dead = []
        self.borrower = None
        self._dom._holder.threads.clear()
