"""The domain: the unit of sharing for per-cpu objects, on top of one arena.

A domain is an arena (private, a memfd inherited across fork, or a file several processes map)
plus a root block that holds the vcpu-id lease records, the pageset directory, the registry of
named metrics and the queue of slots waiting for a grace period. See ``_layout`` for the words.

Invariants
----------
1. A value is the sum of its slots over every vcpu id ever leased in the domain. A dead holder's
   slots keep their values; the next holder of that id continues on top of them.
2. Only the holder of id ``k`` writes id ``k``'s copy of a slot, by the one-statement hot path
   (``_handles``). Everything else (registry, pagesets, caches, leases, the pending queue) is
   written under the domain lock, which is the arena's lock.
3. A slot is reused only after every live holder has acknowledged that it no longer uses it
   (a grace period): ``remove`` publishes the slot in the pending queue with a new epoch; each
   process's quiescer thread, holding the GIL (so no thread of its process is inside a hot-path
   statement), rebinds or retires its handles and stores the epoch in its lease record's
   ``L_ACK``; the slot is zeroed and returned when every live holder, the reclaiming process
   included, has acknowledged. A holder that never acknowledges (stopped, stuck in C) delays
   the reuse, never correctness, and never makes another holder wait.
6. A process writes an id's slots only while it holds that id: ``release`` detaches every
   handle before the lease goes, a forked child starts with every handle unbound, and an
   update that meets a handle in any other state goes through ``Bindings.slow_update``.
   After ``close`` begins, every call either completes (an update is counted) or raises
   ``DomainClosed``.
4. Crash safety: each shared update under the lock ends with one commit store (a registry entry
   becomes visible when its hash word is written; a cache pop commits its count before the ref
   is used), so a holder killed mid-update leaks at most a slot, which ``check`` finds.
5. Compaction (``compact``; protocol and memory ordering in ``_compact``) moves a metric's
   slot only through a batch that every live holder acknowledges; each id's values are copied
   by that id's owner alone; readers pair old and new slots while a batch is in flight.

Locks, their order, and what may wait
-------------------------------------
* ``_plock``: a re-entrant thread lock of this process; guards its lease, its handles (their
  states change only under it: ``_handles``) and its caches. Never shared across processes.
* the domain lock (``self._lock``, the arena's lock: a thread lock, then an OFD write lock on
  byte 0 of the file); guards every shared word but the slots.
* the overflow lock (OFD byte ``OVERFLOW_LOCK``); guards the overflow id's words, which any
  number of overflow holders write.
* lease bytes (one OFD byte per id), held for the life of a lease; and the overflow holders'
  acknowledgement bytes (read locks).

Order: ``_plock``, then the domain lock; while holding the domain lock, a lease byte or the
overflow lock is only ever *tried* (``try_lock``), never waited for. An overflow operation
takes ``_plock``, then the overflow lock, then (to finish a dead copier's copy) the domain
lock. Wait rules: nothing waits for another holder to *acknowledge* (grace periods, batches:
a stopped holder delays reclamation and compaction, never a caller, and ``remove`` never
waits, its queue spills into the arena). What can wait for another process is one of the two
locks it holds for a short section; a holder stopped inside one stalls the others until it
resumes or dies (the kernel drops a dead holder's locks). ``close`` waits for this process's
calls in flight (each bounded as above, all of them at most ``CLOSE_WAIT``); ``fork`` waits
at most ``FORK_LOCK_WAIT`` for ``_plock``.

The parts
---------
``Domain`` is the facade: its constructors, the public methods, close and fork. It composes
one part per concept, each with its invariant in its own docstring: ``_root`` (the root
block, its views, and the parts over its words), ``_pagesets`` (slots, one page per id),
``_caches`` (per-id caches of free slots), ``_registry`` (names -> slots), ``_pending``
(slots waiting for a grace period), ``_lease`` (this process's id, the overflow path, fork),
``_holder`` (the OFD locks of leases and of the overflow id), ``_metrics`` (registering and
removing named metrics), ``_raw`` (``alloc``'s objects), ``_bindings`` (this process's
handles and when they bind), ``_grace`` (acknowledging epochs, reclaiming, the quiescer
thread), ``_moves`` (the compaction runtime), ``_snapshot`` (snapshot values), ``_health``
(stats and check), and ``_handles`` (the hot path and every store to a handle's state). Parts
never import this module: they take views, the lock and callables at construction, or read
the domain through a small protocol (each part's ``Host``, ``_handles.Owner``).
"""

from __future__ import annotations

import atexit
import functools
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from arena import Arena, ArenaError, ArenaExists, LockPolicy, error_line

from . import _cpuset
from ._bindings import Bindings
from ._compact import POLICY_INTERVAL, POLICY_TIMEOUT, CompactResult
from ._errors import (
    BadDomainFile,
    DomainClosed,
    DomainExists,
    InvalidArgument,
    InvalidType,
    damaged,
)
from ._family import check_buckets, family, gauge_kind
from ._grace import Grace
from ._handles import Counter, Gauge, Histogram, PerCpu, StampedGauge, Summary, _Handle
from ._health import audit, check_report, figures, reclaim_slots
from ._holder import HolderLocks
from ._layout import (
    D_REG_GEN,
    KIND_COUNTER,
    KIND_HISTOGRAM,
    KIND_SUMMARY,
    MOVE_CAP,
    PAGE,
    STAMPED_KINDS,
    root_words,
)
from ._lease import Lease
from ._lease_records import LeasePath
from ._metrics import Metrics
from ._moves import Moves
from ._raw import RawObjects
from ._reads import Reads
from ._results import DomainCheck, DomainStats, MetricValue
from ._root import RootBlock, arena_size_for
from ._snapshot import SnapshotReader, with_fix

H = TypeVar("H", bound=_Handle)
_P = ParamSpec("_P")
_R = TypeVar("_R")
DEFAULT_SIZE = 16 * 1024 * 1024  # bytes of arena for a domain made without a size
CLOSE_WAIT = 10.0  # seconds close() waits at most for the calls in flight
_SNAPSHOT_TRIES = 3  # lock-free attempts of snapshot() before it reads under the domain lock
_domains: weakref.WeakSet[Domain] = weakref.WeakSet()


def _closed_guard(method: Callable[Concatenate[Domain, _P], _R]
                  ) -> Callable[Concatenate[Domain, _P], _R]:
    """Count the call in flight (``close`` waits for calls in flight before it unmaps), and
    report as ``DomainClosed`` a ``close()`` that began under a call that had not yet been
    counted: such a call may find the mapping released (``ValueError`` from a memoryview) or
    the descriptor closed (``OSError``), and it changed nothing.

    The count is one attribute update on each side, with no call in between: atomic under
    the GIL, like the hot path."""
    @functools.wraps(method)
    def guarded(self: Domain, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self._inflight += 1
        try:
            return method(self, *args, **kwargs)
        except (ValueError, OSError, BufferError, ArenaError):
            if self._closed or self._closing:
                raise DomainClosed("the domain was closed during the call") from None
            raise
        finally:
            self._inflight -= 1
    return guarded


class Domain:
    """A set of per-cpu objects indexed by compact vcpu ids; see the module docstring.

    ``Domain()`` is private to the process (``shared=True``: children forked later share it).
    ``Domain.create(path)`` / ``Domain.open(path)`` share one mapping between processes.
    ``max_vcpus`` bounds the ids in use; by default it derives from the CPUs this process may
    run on (affinity and cgroup cpuset) with headroom for pre-fork servers (``_cpuset``).
    """

    _moves: Moves  # made late in _attach; the pagesets ask it which pagesets are draining

    def __init__(self, size: int = DEFAULT_SIZE, *, max_vcpus: int | None = None,
                 lock: LockPolicy = "auto", prefault: bool = True, shared: bool = False) -> None:
        bound = _check_max_vcpus(max_vcpus)
        self._attach(Arena(_arena_size(size, bound), lock=lock, prefault=prefault,
                           shared=shared), fresh_bound=bound)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int = DEFAULT_SIZE, *,
               max_vcpus: int | None = None, lock: LockPolicy = "auto",
               prefault: bool = True) -> Domain:
        """Create a shared domain file (0600, never an existing path)."""
        bound = _check_max_vcpus(max_vcpus)
        try:
            arena = Arena.create(path, _arena_size(size, bound), lock=lock, prefault=prefault)
        except ArenaExists as exc:
            raise DomainExists(exc.errno, f"{os.fspath(path)}: already exists (Domain.open "
                               "attaches to a domain file; remove it first to make a new one)"
                               ) from None
        self = cls.__new__(cls)
        try:
            self._attach(arena, fresh_bound=bound)
        except BaseException:
            arena.close()
            os.unlink(path)
            raise
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: LockPolicy = "auto",
             prefault: bool = True) -> Domain:
        """Open a shared domain file made by :meth:`create` (owner, mode and headers checked)."""
        try:
            arena = Arena.open(path, lock=lock, prefault=prefault)
        except ArenaError as exc:  # its own errno once, not "[Errno 22] [Errno 22] ..."
            raise BadDomainFile(getattr(exc, "errno", None) or 22, error_line(exc)) from None
        self = cls.__new__(cls)
        try:
            self._attach(arena, fresh_bound=None)
        except BaseException:
            arena.close()
            raise
        return self

    @staticmethod
    def size_for(metrics: int, *, max_vcpus: int | None = None, summaries: int = 0,
                 histograms: int = 0, buckets: int = 14, names: int | None = None,
                 key_bytes: int = 64) -> int:
        """The ``size`` a domain needs for ``metrics`` counters and gauges, ``summaries``
        summaries and ``histograms`` histograms (of ``buckets`` buckets), with ``max_vcpus``
        ids (None: the default ``Domain()`` would take) all counting into every one of them:
        pure arithmetic over the layout (``_root``). ``names``: distinct metric names (None:
        one per series, the most); ``key_bytes``: the longest name with its labels, encoded
        (about the text's length + 3 per label)."""
        return arena_size_for(metrics, _check_max_vcpus(max_vcpus), summaries, names,
                              key_bytes, histograms, buckets)

    # -- set-up ------------------------------------------------------------------------

    def _attach(self, arena: Arena, fresh_bound: int | None) -> None:
        self.arena = arena
        self._lock = arena.locked_section()  # guards every shared word but the slots
        with self._lock:
            args = (self._lock, lambda: self._moves.draining())  # the moves come later
            rb = (RootBlock.attach(arena, *args) if fresh_bound is None
                  else RootBlock.create(arena, fresh_bound, *args))
        self._root, self._root_off, self._max = rb.words, rb.offset, rb.bound
        self._q, self._d, self._bytes = rb.q, rb.d, rb.bytes
        self._pending, self._registry = rb.pending, rb.registry
        self._pagesets, self._caches = rb.pagesets, rb.caches
        # Guards this process's lease and cache state; never held across processes.
        self._plock = threading.RLock()
        self._closed = False
        self._closing = False  # close() has begun: no new call, lease or thread
        self._inflight = 0  # public calls running now (_closed_guard); close() waits for them
        self._pid = os.getpid()
        self._holder = HolderLocks(arena, self._root, self._max)  # our lease's OFD locks
        self._lease = Lease(self)  # this process's id
        self._bindings = Bindings(self)  # this process's handles and how they bind
        self._private = self._bindings.private_for  # per-thread mode: a thread's own handle
        self._local = self._bindings.local  # (kind, key) -> named handle
        self._by_ref = self._bindings.by_ref  # ref -> this process's handles on it
        self._metrics = Metrics(self)  # registering and removing named metrics
        self._raw = RawObjects(self)  # Domain.alloc's objects
        self._reads = Reads(self)  # reads of more than one word per id
        self._moves = Moves(self)  # compaction's process-local state
        self._grace = Grace(self)  # grace periods and the quiescer thread
        self._snapshots = SnapshotReader(self._pagesets, self._moves,
                                         self._metrics.families_of, self._reads.live_ids)
        _domains.add(self)

    # -- properties --------------------------------------------------------------------

    @property
    def max_vcpus(self) -> int:
        """Ids that can be leased at once; more holders share one id under a lock."""
        return self._max

    @property
    def path(self) -> str | None:
        """The domain's file (None for a private or memfd domain)."""
        return self.arena.path

    @property
    def shared(self) -> bool:
        """True when other processes can map this domain."""
        return self.arena.shared

    @property
    def last_lease_path(self) -> LeasePath | None:
        """How the current (or last) lease of this process was taken."""
        return self._lease.last_path

    # -- leases ------------------------------------------------------------------------

    @_closed_guard
    def vcpu_id(self) -> int:
        """This holder's vcpu id, taking the lease on first use: the lowest id no live holder
        has. ``max_vcpus`` means every id was taken: this holder shares the overflow id, each
        of its operations under a lock (counted in ``stats().shared_id_operations``)."""
        vcpu = self._lease.vcpu
        if vcpu is None:
            vcpu = self._lease.take()
        return vcpu

    def possible_vcpus(self) -> frozenset[int]:
        """Every id a holder can lease (seed 000's "possible" mask): ``0..max_vcpus - 1``.
        Fixed for the life of the domain; per-cpu memory is never sized beyond it."""
        return frozenset(range(self._max))

    @_closed_guard
    def online_vcpus(self) -> frozenset[int]:
        """The ids held by a live holder now, this process's included (seed 000's "online"
        mask): a hint, stale as soon as it returns. Takes the domain lock."""
        self._check_open()
        with self._lock:
            return frozenset(self._holder.live(self._lease.vcpu))

    @_closed_guard
    def release(self) -> None:
        """Give this process's id back now. Handles stay usable: each is bound again, to
        whatever id the process then gets, on its next use (raw objects are freed).

        Also run at interpreter exit and by :meth:`close`. A holder that dies without it
        (``os._exit``, a signal) loses its id all the same (the kernel drops the lock); the
        next holder of the id then counts it as reclaimed rather than reused.
        """
        with self._plock:
            quiescer = self._lease.release()
        nested = self._plock._is_owned()  # type: ignore[attr-defined]  # release() re-entered
        if quiescer is not None and quiescer is not threading.current_thread() and not nested:
            quiescer.join()

    # -- handles (``_handles.Owner``) ----------------------------------------------------------

    def _bind(self, h: _Handle) -> None:
        """Bind ``h`` to this holder's copy of its slot (``Bindings.bind``)."""
        self._bindings.bind(h)

    def _slow_update(self, h: _Handle, n: int, x: float | None) -> None:
        """An update off the lock-free statement (``Bindings.slow_update``)."""
        self._bindings.slow_update(h, n, x)

    def _slow_store(self, h: _Handle, op: Callable[[Any, Any, int], None]) -> None:
        """An update that is not one ``+=``, off the bound state (``Bindings.slow_store``)."""
        self._bindings.slow_store(h, op)

    @_closed_guard
    def _read_gauge(self, ref: int, kind: int) -> int | float:
        self._check_open()
        return self._reads.gauge(ref, kind)

    @_closed_guard
    def _read_histogram(self, ref: int, buckets: int) -> tuple[list[int], float]:
        self._check_open()
        return self._reads.histogram(ref, buckets)

    def _retire(self, h: _Handle) -> None:
        """Make every later use of ``h`` raise (``Bindings.retire``). ``_plock`` held."""
        self._bindings.retire(h)

    # -- named metrics -------------------------------------------------------------------

    @_closed_guard
    def counter(self, name: str, labels: dict[str, str] | None = None, *,
                documentation: str = "", unit: str = "") -> Counter:
        """The monotonic counter ``name{labels}``: the same one in every process of the domain.

        Registering takes the domain lock once per process and name; using never does.
        ``documentation`` is the ``# HELP`` text and ``unit`` the OpenMetrics unit (the name
        must end with ``_<unit>``); the first registration of a name sets them.
        """
        return self._metrics.handle(Counter, name, labels,
                                    family(name, KIND_COUNTER, documentation, unit))

    @_closed_guard
    def gauge(self, name: str, labels: dict[str, str] | None = None, *, mode: str = "sum",
              documentation: str = "", unit: str = "") -> Gauge:
        """The gauge ``name{labels}``. ``mode`` (prometheus_client's multiprocess modes): how
        the holders' values combine: ``sum`` (of every id's), ``livesum`` (of the ids whose
        holder is alive: a dead worker's part drops out, and the next holder of its id starts
        from zero), ``max``, ``min``, ``mostrecent`` (of the values the holders set last) and
        ``livemax``, ``livemin``, ``livemostrecent`` (the same over live holders)."""
        meta = family(name, gauge_kind(mode), documentation, unit)
        cls_ = StampedGauge if meta.kind in STAMPED_KINDS else Gauge
        return self._metrics.handle(cls_, name, labels, meta)

    @_closed_guard
    def summary(self, name: str, labels: dict[str, str] | None = None, *,
                documentation: str = "", unit: str = "") -> Summary:
        """The summary ``name{labels}``: count and sum of observations."""
        return self._metrics.handle(Summary, name, labels,
                                    family(name, KIND_SUMMARY, documentation, unit))

    @_closed_guard
    def histogram(self, name: str, labels: dict[str, str] | None = None, *,
                  buckets: Sequence[float] | None = None, documentation: str = "",
                  unit: str = "") -> Histogram:
        """The histogram ``name{labels}``: observations counted in buckets (finite, increasing
        ``buckets``, at most 62; default prometheus_client's, 0.005 to 10), with their sum."""
        return self._metrics.handle(Histogram, name, labels, family(
            name, KIND_HISTOGRAM, documentation, unit, check_buckets(buckets)))

    @_closed_guard
    def remove(self, name: str, labels: dict[str, str] | None = None) -> bool:
        """Remove the metric ``name{labels}`` in every process; False if it does not exist.

        Its handles raise :class:`MetricRemoved` from now on (in other processes, from their
        next quiescent point, within milliseconds); its slot is reused only after every live
        holder has acknowledged (a grace period).
        """
        return self._metrics.remove(name, labels)

    @_closed_guard
    def set_series_limit(self, limit: int | None) -> None:
        """Refuse (:class:`TooManySeries`) a new label set of a metric name that has
        ``limit`` series already, in every process of the domain (``None``: no limit).
        Series registered before stay; the limit is kept in the domain file."""
        self._check_open()
        self._metrics.set_series_limit(limit)

    # -- grace periods -------------------------------------------------------------------

    def _quiesce(self) -> None:
        """Acknowledge the current epoch at this quiescent point (``Grace.acknowledge``)."""
        self._grace.acknowledge()

    @property
    def quiescer_errors(self) -> list[str]:
        """What this process's quiescer thread survived (the last 16; empty when healthy)."""
        return list(self._grace.errors)

    #: Test hook: False starts no quiescer thread, so that a test runs every grace period by
    #: hand (``_quiesce``) and deterministically. Never set it in production: a holder
    #: without a quiescer acknowledges epochs only when it takes a lease or removes.
    _background_quiescer = True

    @_closed_guard
    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every pending slot has been reclaimed (a full grace period).

        Returns False if ``timeout`` seconds passed first (a holder has not acknowledged:
        stopped or stuck); the slots stay pending and are reclaimed later.
        """
        return self._grace.synchronize(timeout)

    # -- compaction (the runtime: percpu/_moves.py; the protocol: percpu/_compact.py) --------

    @_closed_guard
    def compact(self, timeout: float | None = 5.0, *, max_moves: int = MOVE_CAP) -> CompactResult:
        """Move live metrics out of sparse pagesets into dense ones, through a grace period,
        and give the emptied pagesets' pages back to the arena (seed 002).

        Runs batches of at most ``max_moves`` moves until nothing more can be given back.
        Counting goes on meanwhile, in every process, with no extra work per update; values
        stay exact and never go backwards. Each batch waits for every live holder to rebind at
        its next quiescent point (milliseconds). A holder that does not (stopped, stuck in a
        long C call) keeps its batch in flight past ``timeout`` seconds (None: no limit): the
        call then returns with ``pending_moves > 0`` and the batch completes in the background
        when the holder resumes or dies. Raw ``PerCpu`` objects are never moved (their
        pageset is kept), nor slots waiting for a grace period.
        """
        return self._moves.compact(timeout, max_moves=max_moves)

    @_closed_guard
    def set_compaction(self, threshold: float | None, *, interval: float = POLICY_INTERVAL,
                       timeout: float = POLICY_TIMEOUT) -> None:
        """The background policy (off by default): every ``interval`` seconds a daemon thread
        of this process runs :meth:`compact` (with ``timeout``) when the occupancy of the
        pagesets that cost memory (taken slots / their capacity) is below ``threshold``, a
        fraction in (0, 1]. ``None`` stops it. One process of a domain is enough."""
        self._moves.set_compaction(threshold, interval=interval, timeout=timeout)

    # -- raw per-cpu objects ---------------------------------------------------------------

    @_closed_guard
    def alloc(self, size: int) -> PerCpu:
        """A per-cpu object of ``size`` bytes (1..64) from the smallest class that fits.

        Served from this holder's cache without the domain lock (the cache refills in bulk).
        The object belongs to this process: free it with ``obj.free()``.
        """
        return self._raw.alloc(size)

    @_closed_guard
    def _local_view(self, h: PerCpu) -> memoryview:
        return self._raw.view(h)

    @_closed_guard
    def _copies(self, ref: int, size: int) -> dict[int, memoryview]:
        return self._raw.copies(ref, size)

    @_closed_guard
    def _free_object(self, h: PerCpu) -> None:
        self._raw.free(h)

    # -- reads ---------------------------------------------------------------------------

    def _read_sum(self, ref: int, size: int) -> int | float:
        """A Counter's or Gauge's value: the sum of its slot over every id (of its old and new
        slots while a compaction moves it: ``Moves.read``). ``_closed_guard`` written out: this
        is ``Counter.value``, and the wrapper's call would cost a fifth of it."""
        self._inflight += 1
        try:
            if self._closing or self._closed:
                raise DomainClosed("the domain is closed")
            value: int | float = self._moves.read(ref, self._pagesets.slot_sum, operator.add)
            return value
        except IndexError:  # a page word read unchecked (``_pagesets``) is out of the arena
            raise damaged(f"a page of ref {ref:#x} lies outside the arena") from None
        except (ValueError, OSError, BufferError, ArenaError):
            if self._closed or self._closing:
                raise DomainClosed("the domain was closed during the call") from None
            raise
        finally:
            self._inflight -= 1

    @_closed_guard
    def _read_summary(self, ref: int) -> tuple[int, float]:
        """A Summary's (count, sum) over every id (moves: as in ``_read_sum``)."""
        self._check_open()
        try:
            return self._moves.read(ref, self._pagesets.slot_summary,
                                    lambda a, b: (a[0] + b[0], a[1] + b[1]))
        except IndexError:  # as in _read_sum
            raise damaged(f"a page of ref {ref:#x} lies outside the arena") from None

    @_closed_guard
    def snapshot(self) -> list[MetricValue]:
        """Every named metric's value, at a cost proportional to metrics x ids in use.

        Each id's copy only grows between two reads (hot-path writers only add), so a later
        snapshot never shows a Counter lower than an earlier one. The values match the registry
        read with them: if a metric was removed meanwhile (its slot may then be reused by
        another), the read is done again, the last time under the domain lock.
        """
        self._check_open()
        for _ in range(_SNAPSHOT_TRIES):
            gen, entries = self._metrics.entries_at()
            moves = self._moves.read_begin()  # compaction: the batch and the ids' sequences
            try:
                out = self._snapshots.values(entries)
            except (IndexError, ValueError, BadDomainFile) as exc:  # stale entries met a
                if self._root[D_REG_GEN] == gen and self._moves.read_end(moves):  # pageset
                    if isinstance(exc, IndexError):  # given back; else the words are bad
                        raise damaged("a page lies outside the arena") from None
                    raise
                continue
            if self._root[D_REG_GEN] == gen and self._moves.read_end(moves):
                return out
        with self._plock, self._lock:  # removals wait: the slots read cannot be reused
            fix = self._moves.finish_dead()  # compaction: no half-moved value under the lock
            entries = self._metrics.entries()
            return with_fix(entries, self._snapshots.values(entries), fix)

    # -- health --------------------------------------------------------------------------

    @_closed_guard
    def stats(self) -> DomainStats:
        """Health figures: ids, path counters, pagesets, memory, page faults."""
        self._check_open()
        a = self.arena.stats()
        with self._lock:
            return figures(self._root, self._max, self._lease.vcpu,
                           self._holder.live(self._lease.vcpu),
                           self._pagesets, a, self._pending.count(),
                           self._moves.stats(a.used_bytes))

    @_closed_guard
    def check(self, reclaim: bool = False) -> DomainCheck:
        """Verify the domain's shared structures and the arena under it.

        Slots taken from pagesets but held by no metric, cache or pending queue are reported
        (``unreferenced_slots``): a holder died between taking and recording one, or while it
        held raw objects (``alloc``), or they are raw objects of other live holders. With
        ``reclaim=True`` they are zeroed and returned, but only when no other holder is alive,
        on an id or on the overflow id (raw objects of live holders would be hit). Slots in a
        dead holder's cache need no check: the next holder of its id takes the cache over.

        Problems reported: a slot held twice (by two of the registry, the caches, the pending
        queue and this process's raw objects), a slot held but marked free, a pageset whose
        taken count disagrees with its bitmap (repaired), and a free slot that is not zero in
        some id's copy (a write after free: the next user of the slot would not start at 0).
        """
        self._check_open()
        with self._plock, self._lock:
            problems, unreferenced = audit(
                (ref for _kind, _cls, ref, _key in self._metrics.entries()),
                self._caches.all_lists(), (ref for ref, _epoch in self._pending.entries()),
                {h._ref for h in self._raw.live()}, self._moves.moving_refs(), self._pagesets)
            alone = reclaim and bool(unreferenced) and not self._reads.others_alive()
            reclaimed = reclaim_slots(self._pagesets, unreferenced) if alone else 0
        return check_report(problems, unreferenced, reclaimed, self.arena.check(reclaim=reclaim))

    # -- life cycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise DomainClosed("the domain is closed")

    def close(self) -> None:
        """Release this process's id, stop the quiescer and unmap. Idempotent.

        Safe while other threads of the process use the domain: from the moment ``close``
        starts, each of their calls either completes (an update is counted) or raises
        :class:`DomainClosed`.
        """
        with self._plock:
            if self._closed or self._closing:
                return
            self._closing = True  # from here no lease is taken and no thread started
        self._moves.stop_policy()  # compaction's background thread, if any
        self._grace.halt()
        # Calls that began before: each completes (none waits for long once closing: compact
        # and synchronize stop waiting). Bounded all the same: a call stuck behind a stopped
        # process's lock (or a count made wrong by threads running without the GIL) must not
        # make close() wait for ever; a call that outlives the bound finds DomainClosed.
        deadline = time.monotonic() + CLOSE_WAIT
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.0005)
        with self._plock:  # updates in flight wait for it, then find the domain closed
            self.release()
            self._unmap()

    def _unmap(self) -> None:
        self._closed = True
        for handles in self._by_ref.values():
            for h in handles:
                self._retire(h)  # any use, even a late one, raises DomainClosed
        self._by_ref.clear()
        self._local.clear()
        self._pagesets.release()
        for view in (self._root, self._q, self._d):
            view.release()
        self.arena.close()
        _domains.discard(self)

    def _abandon(self) -> None:
        """Test hook: vanish the way a SIGKILLed holder does, inside one process.

        The kernel's part happens (closing the descriptor drops this holder's OFD locks:
        its lease, any overflow acknowledgement); nothing shared is written: the lease
        record keeps our pid (the next holder of the id counts it as reclaimed), the id's
        caches keep their slots, raw objects stay taken (``check`` finds them).
        """
        if self._closed:
            return
        self._grace.halt()
        with self._plock:
            self._unmap()

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Domain {self.arena!r} max_vcpus={self._max} vcpu={self._lease.vcpu}>"

    def _after_fork_in_child(self) -> None:
        """The child takes its own id (lazily) and rebinds named handles; raw objects stay the
        parent's (their handles raise in the child)."""
        self._pid = os.getpid()
        self._plock = threading.RLock()
        self._inflight = 0  # the calls of the parent's other threads do not exist here
        self._grace.after_fork()
        if not self._closed:
            self._lease.after_fork()


def _check_max_vcpus(max_vcpus: object) -> int:
    if max_vcpus is None:
        return _cpuset.read_cpu_bounds().default_max_vcpus
    if max_vcpus.__class__ is not int:
        raise InvalidType(f"max_vcpus must be an int, got {type(max_vcpus).__name__}")
    assert isinstance(max_vcpus, int)
    if not 1 <= max_vcpus <= _cpuset.MAX_VCPUS_LIMIT:
        raise InvalidArgument(f"max_vcpus must be in 1..{_cpuset.MAX_VCPUS_LIMIT}, "
                              f"got {max_vcpus}")
    return max_vcpus


def _arena_size(size: object, bound: int) -> int:
    if size.__class__ is not int:
        raise InvalidType(f"size must be an int, got {type(size).__name__}")
    assert isinstance(size, int)
    minimum = root_words(bound) * 8 + 16 * PAGE
    if size < minimum:
        raise InvalidArgument(f"size {size} is too small for a domain of {bound} ids: "
                              f"at least {minimum} bytes")
    return size


# Fork: every domain's process lock is taken before the fork and released after it in the
# parent, so that no fork falls inside a section that has handles out of their tables (a
# quiescer retiring or rebinding them): the child then finds every handle where Bindings.after_fork
# sees it. The lock is re-entrant (a fork from inside a section of ours takes it at once) and
# its sections are short, except one that waits for the domain lock while another process
# holds it (stopped, say): a fork waits at most FORK_LOCK_WAIT for that, then goes ahead, and
# the child recovers the handles it may find out of their tables from _local.
FORK_LOCK_WAIT = 0.5  # seconds
_held_for_fork: list[threading.RLock] = []


def _lock_before_fork() -> None:
    for d in list(_domains):
        lock_ = d._plock
        if lock_.acquire(timeout=FORK_LOCK_WAIT):
            _held_for_fork.append(lock_)


def _unlock_after_fork_in_parent() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()


def _reset_after_fork() -> None:
    _held_for_fork.clear()  # the child makes itself new process locks
    for d in list(_domains):
        d._after_fork_in_child()


def _release_at_exit() -> None:
    """Release leases cleanly, so the next holder of each id counts as reused, not reclaimed."""
    for d in list(_domains):
        if d._pid == os.getpid():
            d.release()


os.register_at_fork(before=_lock_before_fork, after_in_parent=_unlock_after_fork_in_parent,
                    after_in_child=_reset_after_fork)
atexit.register(_release_at_exit)
