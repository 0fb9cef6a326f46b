"""The compaction runtime: a domain's part that follows, drives and reads through move batches.

``_compact`` holds the protocol (its steps, its memory-ordering argument) and the pure parts
(the planner, the per-id copy and its journal); this module does the shared-memory side for
one process of a domain: planning and publishing a batch, following it at a quiescent point
(rebinding handles, copying the values of the id held), driving it to completion (copying
the ids nobody holds, finishing a dead copier's copy), and reading exact values while a batch
is in flight.

Shared words: ``D_MV_*`` in the header, ``L_SEQ`` in each lease record, the move region
(per-id move states and journals, sources, move records); all written under the domain lock,
except that readers load ``D_MV_GEN``, ``L_SEQ`` and the slots without it (:meth:`Moves.read`).
Process-local: ``seen`` (the batch generation our handles follow), ``info`` (the decoded batch
in flight), the policy thread. Lock order, as everywhere in the domain: the process lock, the
domain lock, then only ``try_lock`` on a lease byte or the overflow lock.

Invariant: a handle of this process names the slot its metric lives in, as of the batch
generation ``seen``, and ``seen`` is the shared generation at every quiescent point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from arena import ArenaError
from arena.locks import SharedLock

from . import _membarrier
from ._caches import Caches
from ._compact import (
    DRIVE_AFTER,
    GRACE_POLL,
    POLICY_INTERVAL,
    POLICY_TIMEOUT,
    READ_TRIES,
    CompactResult,
    MoveBatch,
    PagesetInfo,
    Pair,
    Plan,
    copy_moves,
    occupancy,
    plan_compaction,
    should_compact,
)
from ._errors import InvalidArgument, InvalidType, PercpuError
from ._gauges import gauge_value
from ._handles import SHARED_VARIANT, Counter, Gauge, Summary, _Handle
from ._holder import HolderLocks
from ._layout import (
    BITMAP_WORDS,
    D_EPOCH,
    D_MOVES,
    D_MV_BATCHES,
    D_MV_COUNT,
    D_MV_EPOCH,
    D_MV_GEN,
    D_MV_PAGES,
    D_MV_REG_DONE,
    D_MV_SOURCES,
    D_MV_STARTED,
    D_PAGES,
    D_RECLAIMED_PAGESETS,
    D_REG_GEN,
    KIND_GAUGE_LIVESUM,
    KIND_SUMMARY,
    L_ACK,
    L_SEQ,
    LEASE_WORDS,
    M_KIND,
    M_NEW,
    M_OLD,
    MOVABLE_KINDS,
    MOVE_CAP,
    MOVE_WORDS,
    MS_DONE,
    MS_NEW,
    MS_NEW_F,
    MS_OLD,
    MS_OLD_F,
    MS_STEP,
    P_BITMAP,
    P_CLASS,
    P_PAGES,
    P_TAKEN,
    PAGE,
    SIZE_CLASSES,
    bump,
    lease_base,
    make_ref,
    move_records_base,
    move_sources_base,
    move_state_base,
    slots_per_page,
    split_ref,
)
from ._pagesets import Pagesets
from ._pending import PendingQueue
from ._registry import Registry
from ._results import MetricValue

_T = TypeVar("_T")  # what a read returns

#: Handle classes bound to a slot of this holder (their ``_index`` follows a move).
_BOUND: frozenset[type] = frozenset(
    {Counter, Gauge, Summary, *(SHARED_VARIANT[c] for c in (Counter, Gauge, Summary))})


def _number(name: str, value: object, what: str, ok: Callable[[float], bool]) -> None:
    """Refuse ``value`` unless it is an int or a float (not a bool: ``InvalidType``) for
    which ``ok`` holds (else ``InvalidArgument``)."""
    if value.__class__ not in (int, float):
        raise InvalidType(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    assert isinstance(value, (int, float))
    if not ok(value):
        raise InvalidArgument(f"{name} must be {what}, got {value!r}")


class Host(Protocol):
    """What the runtime reads of the domain it belongs to (``Domain`` implements it)."""

    _root: memoryview[int]
    _root_off: int
    _max: int
    _q: memoryview[int]
    _d: memoryview[float]
    _lock: SharedLock
    _plock: Any  # a threading.RLock, replaced in a forked child
    _lease: Any
    _grace: Any
    _reads: Any
    _pagesets: Pagesets
    _holder: HolderLocks
    _caches: Caches
    _registry: Registry
    _pending: PendingQueue
    _by_ref: dict[int, list[_Handle]]
    _local: dict[tuple[int, bytes], _Handle]

    def _check_open(self) -> None: ...

    def _quiesce(self) -> None: ...



class Moves:
    """The compaction runtime of one process of a domain (see the module docstring)."""

    def __init__(self, dom: Host) -> None:
        """Process-local compaction state of ``dom`` (made last in its set-up)."""
        self._dom = dom
        self._root, self._max, self._q, self._d = dom._root, dom._max, dom._q, dom._d
        self._lock, self._holder = dom._lock, dom._holder
        self._pagesets, self._registry, self._caches = dom._pagesets, dom._registry, dom._caches
        self._by_ref, self._local = dom._by_ref, dom._local
        self._root_q = dom._root_off // 8  # index in _q of the root block's word 0
        self.seen = int(self._root[D_MV_GEN])  # the batch generation our handles follow
        self.info = MoveBatch(-1)  # the decoded batch in flight
        self.need: tuple[int, frozenset[int]] = (-1, frozenset())
        # old ref -> new ref of handles rebound by the last two syncs: a read that loaded a
        # handle's _ref just before a sync rebound it still finds its metric (read).
        self.fwd: dict[int, int] = {}
        self.fwd_prev: dict[int, int] = {}
        self.ovf_step = self._root_q + move_state_base(self._max, self._max) + MS_STEP
        self.policy: threading.Thread | None = None
        self.policy_stop = threading.Event()
        self.policy_runs = 0  # compactions the background policy started in this process
        _membarrier.register()

    def compact(self, timeout: float | None = 5.0, *, max_moves: int = MOVE_CAP) -> CompactResult:
        """See :meth:`Domain.compact`."""
        if timeout is not None:
            _number("timeout", timeout, "None or a number of seconds >= 0",
                    lambda t: 0 <= t < float("inf"))
        if max_moves.__class__ is not int:
            raise InvalidType(f"max_moves must be an int, got {type(max_moves).__name__} "
                              f"{max_moves!r}")
        if not 1 <= max_moves <= MOVE_CAP:
            raise InvalidArgument(f"max_moves must be an int in 1..{MOVE_CAP}, got {max_moves!r}")
        self._dom._check_open()
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        with self._lock:
            before = self.totals()
        graces: list[float] = []
        ideal = 0
        while self.wait(deadline):
            self.wait_pending(deadline)  # slots freed just before: movable, not pinned
            with self._dom._plock, self._lock:
                r = self._root
                if int(r[D_MV_GEN]) & 1:
                    continue  # another compactor published meanwhile
                self._dom._quiesce()  # our acknowledgement, and the pending frees that are due
                infos, live = self.inventory()
                plan = plan_compaction(infos, max_moves)
                ideal = plan.ideal_pages
                if plan.empty:
                    break
                self.publish(plan, live)
                self.sync()  # our own handles and id at once
                published = time.monotonic()
                reclaimed = int(r[D_RECLAIMED_PAGESETS])
            if not self.wait(deadline):
                break
            graces.append(time.monotonic() - published)
            if int(self._root[D_RECLAIMED_PAGESETS]) == reclaimed:
                break  # nothing came back (slots were taken meanwhile): stop here
        with self._lock:
            after = self.totals()
            r = self._root
            pending = int(r[D_MV_COUNT]) if int(r[D_MV_GEN]) & 1 else 0
        return CompactResult(
            moved=after[1] - before[1], reclaimed_pagesets=after[2] - before[2],
            reclaimed_pages=after[3] - before[3], pages_before=before[0], pages_after=after[0],
            ideal_pages=ideal, pending_moves=pending, batches=after[4] - before[4],
            seconds=time.monotonic() - start, grace_seconds=tuple(graces))

    def set_compaction(self, threshold: float | None, *, interval: float = POLICY_INTERVAL,
                       timeout: float = POLICY_TIMEOUT) -> None:
        """See :meth:`Domain.set_compaction`."""
        if threshold is not None:
            _number("threshold", threshold, "None or a fraction in (0, 1]",
                    lambda t: 0 < t <= 1)
        for name, value in (("interval", interval), ("timeout", timeout)):
            _number(name, value, "a number of seconds > 0", lambda t: 0 < t < float("inf"))
        self._dom._check_open()
        self.stop_policy()
        if threshold is None:
            return
        stop = self.policy_stop = threading.Event()
        t = threading.Thread(target=self.policy_loop,
                             args=(stop, float(threshold), float(interval), float(timeout)),
                             name="percpu-compactor", daemon=True)
        self.policy = t
        t.start()

    def policy_loop(self, stop: threading.Event, threshold: float, interval: float,
                        timeout: float) -> None:
        while not stop.wait(interval):
            try:
                with self._lock:
                    occ = self.occupancy()
                if should_compact(occ, threshold):
                    self.policy_runs += 1
                    self.compact(timeout)
            except (ValueError, PercpuError, ArenaError):
                return  # the domain was closed under us

    def stop_policy(self) -> None:
        self.policy_stop.set()
        t, self.policy = self.policy, None
        if t is not None and t is not threading.current_thread() and t.is_alive():
            t.join()

    def occupancy(self) -> float:
        """Taken slots over the capacity of the pagesets that cost memory. Lock held."""
        rows = []
        for ps in range(self._pagesets.count()):
            e = self._pagesets.entry(ps)
            if e[P_CLASS]:
                rows.append((SIZE_CLASSES.index(self._pagesets.slot_size(e)), int(e[P_TAKEN]),
                             bool(self._pagesets.page_offsets(e))))
        return occupancy(rows)

    def totals(self) -> tuple[int, int, int, int, int]:
        """(pages, moves, pagesets given back, pages given back, batches). Lock held."""
        r = self._root
        return (int(r[D_PAGES]), int(r[D_MOVES]), int(r[D_RECLAIMED_PAGESETS]),
                int(r[D_MV_PAGES]), int(r[D_MV_BATCHES]))

    def stats(self, arena_used: int) -> dict[str, Any]:
        """The compaction figures of :meth:`stats`. Lock held."""
        r = self._root
        flight = int(r[D_MV_GEN]) & 1
        age = (time.monotonic_ns() - int(r[D_MV_STARTED])) / 1e9 if flight else 0.0
        return {"arena_pages_used": -(-arena_used // PAGE),
                "pending_moves": int(r[D_MV_COUNT]) if flight else 0,
                "pending_move_seconds": max(age, 0.0), "moved_slots": int(r[D_MOVES]),
                "compacted_pagesets": int(r[D_RECLAIMED_PAGESETS]),
                "compacted_pages": int(r[D_MV_PAGES]),
                "compaction_batches": int(r[D_MV_BATCHES])}

    def wait(self, deadline: float | None) -> bool:
        """Drive the batch in flight until it completes (True) or ``deadline`` passes."""
        dom = self._dom
        while True:
            dom._check_open()  # a close() from another thread ends the wait
            if dom._lease.threads is not None:
                # Per-thread mode: our threads' ids (the lent one too) are copied at our
                # quiescent point; the compactor makes one rather than wait for the quiescer.
                dom._grace.acknowledge(probe=False)
            with dom._plock, self._lock:
                if self.advance():
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(GRACE_POLL)

    def wait_pending(self, deadline: float | None) -> None:
        """Let the pending frees' grace period pass (until ``deadline``): a slot waiting for
        one pins its pageset."""
        while True:
            self._dom._check_open()
            self._dom._quiesce()
            if not self._dom._pending.count() or (deadline is not None
                                             and time.monotonic() >= deadline):
                return
            time.sleep(GRACE_POLL)

    def tick(self) -> None:
        """The quiescer's part: follow the batch in flight; and drive it once it is older than
        ``DRIVE_AFTER`` (its compactor gave up waiting, or died), so that it completes anyway.
        Takes no lock when there is nothing to do."""
        r = self._root
        gen = int(r[D_MV_GEN])
        vcpu = self._dom._lease.vcpu
        stale = bool(gen & 1) and (time.monotonic_ns() - int(r[D_MV_STARTED])
                                   > DRIVE_AFTER * 1e9)
        if not stale and gen == self.seen and (
                not gen & 1 or vcpu is None or vcpu >= self._max
                or int(r[move_state_base(self._max, vcpu) + MS_DONE]) == gen):
            return
        with self._dom._plock, self._lock:
            if stale:
                self.advance()
            else:
                self.sync()

    # Planning and publishing (protocol steps 1-2).

    def inventory(self) -> tuple[list[PagesetInfo], dict[int, tuple[int, int]]]:
        """Every pageset's slots by role for the planner, and the registry's live refs ->
        (entry index, kind). Lock held, no batch in flight."""
        live = self._registry.live_refs()
        cached = {ref for k in range(self._max) for _cb, _n, refs in self._caches.lists(k)
                  for ref in refs}
        infos = []
        for ps in range(self._pagesets.count()):
            e = self._pagesets.entry(ps)
            if not e[P_CLASS]:
                continue
            cls = SIZE_CLASSES.index(self._pagesets.slot_size(e))
            bits = e[P_BITMAP : P_BITMAP + BITMAP_WORDS].tolist()
            ids = frozenset(k for k, _page in self._pagesets.id_pages(e))
            lv: list[int] = []
            ca: list[int] = []
            free: list[int] = []
            pinned = 0
            for s in range(slots_per_page(cls)):
                if bits[s >> 6] >> (s & 63) & 1:
                    ref = make_ref(ps, s)
                    if ref in live and live[ref][1] in MOVABLE_KINDS:
                        lv.append(s)
                    elif ref in cached:
                        ca.append(s)
                    else:
                        pinned += 1  # a raw object, a histogram or stamped gauge (never
                        # moved), a slot waiting for a grace period, a leak
                else:
                    free.append(s)
            infos.append(PagesetInfo(ps, cls, tuple(lv), tuple(ca), pinned, tuple(free),
                                     ids))
        return infos, live

    def publish(self, plan: Plan, live: dict[int, tuple[int, int]]) -> None:
        """Protocol step 2. ``_plock`` and the domain lock held, no batch in flight."""
        r = self._root
        for ps, k in plan.new_pages:
            self._pagesets.page(ps, k)  # may raise DomainFull: nothing is published yet
        base = move_records_base(self._max)
        for j, m in enumerate(plan.moves):
            w = base + j * MOVE_WORDS
            r[w + M_OLD], r[w + M_NEW], r[w + M_KIND] = m.old, m.new, live[m.old][1]
        sb = move_sources_base(self._max)
        for i, ps in enumerate(plan.sources):
            r[sb + i] = ps
        r[D_MV_COUNT] = len(plan.moves)
        r[D_MV_SOURCES] = len(plan.sources)
        for m in plan.moves:  # reserve the targets (a crash before the commit leaks them)
            self._pagesets.zero(m.new)
            self._pagesets.reserve(m.new)
        r[D_EPOCH] = self._dom._grace.epoch() + 1  # every quiescer looks within QUIESCE_INTERVAL
        r[D_MV_EPOCH] = r[D_EPOCH]
        r[D_MV_STARTED] = time.monotonic_ns()
        r[D_MV_GEN] += 1  # commit: the batch is in flight
        for m in plan.moves:
            self._registry.set_ref(live[m.old][0], m.new)
        r[D_MV_REG_DONE] = r[D_MV_GEN]
        bump(r, D_REG_GEN)

    # Following the batch (protocol steps 3-4).

    def batch(self, gen: int) -> MoveBatch:
        """The batch in flight as of ``gen`` (decoded under the lock once per batch)."""
        info = self.info
        if info.gen == gen:
            return info
        with self._lock:
            r = self._root
            gen = int(r[D_MV_GEN])
            mb, sb = move_records_base(self._max), move_sources_base(self._max)
            info = MoveBatch.decode(gen, r[mb : mb + int(r[D_MV_COUNT]) * MOVE_WORDS].tolist(),
                                    r[sb : sb + int(r[D_MV_SOURCES])].tolist())
            self.info = info
            return info

    def current(self, ref: int) -> int:
        """``ref``, or its new ref when a batch in flight moves it."""
        gen = int(self._root[D_MV_GEN])
        return self.batch(gen).current(ref) if gen & 1 else ref

    def moving_refs(self) -> frozenset[int]:
        """Old and new refs of the batch in flight (taken; not to be reused). Lock held."""
        gen = int(self._root[D_MV_GEN])
        return frozenset(self.batch(gen).pairs) if gen & 1 else frozenset()

    def draining(self) -> frozenset[int]:
        """Pagesets the batch in flight empties: closed to allocation. Lock held."""
        gen = int(self._root[D_MV_GEN])
        return self.batch(gen).sources if gen & 1 else frozenset()

    def follow(self, h: _Handle) -> None:
        """Before binding ``h``: follow the batches (``_plock`` held)."""
        if self._root[D_MV_GEN] != self.seen:
            with self._lock:
                self.sync()
        h._ref = self.current(h._ref)

    def sync(self) -> None:
        """Apply the batch in flight to this process (protocol step 3): rebind our handles,
        copy the values of the id we hold, give back our cached slots in sources. ``_plock``,
        the domain lock and the GIL are held: a quiescent point for our other threads."""
        r = self._root
        gen = int(r[D_MV_GEN])
        seen = self.seen
        if seen != gen:
            followed = seen + (seen & 1)  # a batch we rebound for is as good as complete
            fwd: dict[int, int] = {}
            if gen != followed:
                if not (gen & 1 and gen == followed + 1):
                    self.resync(fwd)  # a whole batch went by while we held no lease
                for old, new, _kind in self.batch(gen).moves:
                    handles = self._by_ref.pop(old, None)
                    if handles:
                        self.attach(handles, new)
                        fwd[old] = new
            if fwd:
                self.fwd_prev, self.fwd = self.fwd, fwd
            self.seen = gen
        lease = self._dom._lease
        vcpu = lease.vcpu
        if gen & 1 and vcpu is not None and vcpu < self._max and not lease.lent():
            self.adopt(vcpu)  # lent to a thread: copied as a thread's id (Grace)

    def attach(self, handles: list[_Handle], new: int) -> None:
        """Point ``handles`` at ref ``new``: one attribute store each for ``_ref`` and, if
        bound, ``_index`` (the hot path reads ``_index`` once per update: old or new slot,
        never a mix)."""
        ps, slot = split_ref(new)
        size = self._pagesets.slot_size(self._pagesets.entry(ps))
        vcpu = self._dom._lease.vcpu
        index = -1
        for h in handles:
            h._ref = new
            if vcpu is not None and type(h) in _BOUND:
                if index < 0:
                    index = (self._pagesets.page(ps, vcpu) + slot * size) // 8
                h._index = index
        self._by_ref.setdefault(new, []).extend(handles)

    def resync(self, fwd: dict[int, int]) -> None:
        """Point every named handle at the ref the registry has for it. Only after a batch
        completed while this process held no lease (its handles were unbound); a handle whose
        metric is gone is left to ``_bind``'s registry check. Locks held."""
        for (kind, key), h in list(self._local.items()):
            idx, _ = self._registry.lookup(key)
            if idx < 0:
                continue
            found, ref = self._registry.kind_ref(idx)
            if found != kind or ref == h._ref:
                continue
            old = h._ref
            handles = self._by_ref.get(old)
            if handles is not None and h in handles:
                handles.remove(h)
                if not handles:
                    del self._by_ref[old]
            self.attach([h], ref)
            fwd[old] = ref

    def adopt(self, k: int, drain: bool = True) -> int:
        """Copy id ``k``'s values for the batch in flight unless done (protocol step 4), and
        give back its cached slots that lie in sources. The caller owns ``k`` (holds its
        lease, has just taken it, holds its lease byte by ``try_lock``, or the overflow lock
        for the overflow id) and the domain lock. Returns the copies that held a value."""
        r = self._root
        gen = int(r[D_MV_GEN])
        if not gen & 1:
            return 0
        batch = self.batch(gen)
        st = move_state_base(self._max, k)
        moved = 0
        if int(r[st + MS_DONE]) != gen:
            moved = copy_moves(self._q, self._d, self._root_q + st,
                               self._root_q + lease_base(self._max, k) + L_SEQ, gen,
                               self.pairs_for(k, batch, st),
                               _membarrier.fence if _membarrier.NEEDS_FENCE else None)
        if drain and k < self._max:
            self._caches.drain(k, batch.sources)
        return moved

    def pairs_for(self, k: int, batch: MoveBatch, st: int) -> list[Pair]:
        """Per move: (word of id ``k``'s old copy, word of its new copy, summary?) or None
        when ``k`` has nothing there. Allocates a missing target page only for a non-zero
        copy (publishing allocated those it could foresee). Locks held."""
        q = self._q
        step = int(q[self._root_q + st + MS_STEP])
        entries: dict[int, memoryview] = {}
        pairs: list[Pair] = []
        for j, (old, new, _kind) in enumerate(batch.moves):
            ops, oslot = split_ref(old)
            e = entries.get(ops)
            if e is None:
                e = entries[ops] = self._pagesets.entry(ops)
            page = int(e[P_PAGES + k])
            if not page:
                pairs.append(None)
                continue
            size = self._pagesets.slot_size(e)
            ow = (page - 1 + oslot * size) // 8
            if not (q[ow] or q[ow + 1] or step == j + 1):  # q[ow + 1]: the float part's bits
                pairs.append(None)  # nothing to move, and nobody writes it any more
                continue
            nps, nslot = split_ref(new)
            pairs.append((ow, (self._pagesets.page(nps, k) + nslot * size) // 8, True))
        return pairs

    def need_ids(self, batch: MoveBatch) -> frozenset[int]:
        """Ids with a page in a pageset that a move leaves: their values must move. Only
        handles bound through ``_mv_follow`` touch those pagesets during the batch, never a
        moved slot, so the set is computed once per batch."""
        if self.need[0] == batch.gen:
            return self.need[1]
        ids: set[int] = set()
        for ps in {split_ref(old)[0] for old, _new, _kind in batch.moves}:
            ids.update(k for k, _page in self._pagesets.id_pages(self._pagesets.entry(ps)))
        self.need = (batch.gen, frozenset(ids))
        return self.need[1]

    def finish_overflow(self) -> None:
        """An overflow operation (holding the overflow lock) found a copy of the overflow id
        that its copier died in the middle of: finish it before writing (step 4 iv)."""
        with self._lock:
            self.adopt(self._max)

    def finish_dead(self) -> dict[int, Any]:
        """Under the domain lock, an odd ``L_SEQ`` means its copier died (copies run entirely
        under the lock). For an id ``k < max_vcpus`` nobody has written it since (a lease taker
        adopts under the lock before binding): finish those copies, so that a locked read sees
        no half-moved value. The overflow id is written by its holders under the overflow lock
        only, so its copy is finished only by whoever gets that lock (``try_lock``: the domain
        lock is held); when an overflow operation holds it, the copy is left to that operation
        and the read corrects for the one interrupted move instead (returned: ref -> what to
        add to a read of that metric, a count or a (count, sum) pair). ``_plock`` and the
        domain lock held."""
        r = self._root
        gen = int(r[D_MV_GEN])
        if not gen & 1:
            return {}
        fix: dict[int, Any] = {}
        for k, s in enumerate(self.seqs()):
            if not s & 1:
                continue
            if k < self._max:
                self.adopt(k, drain=False)  # its cache is its next owner's business
                continue
            if self._holder.try_overflow():  # private: _plock excludes them
                try:
                    self.adopt(k, drain=False)
                finally:
                    self._holder.unlock_overflow()
            else:
                fix = self.overflow_fix(self.batch(gen))
        return fix

    def overflow_fix(self, batch: MoveBatch) -> dict[int, Any]:
        """What a read must add for the overflow id's interrupted move (its journal step set):
        its words are (v, w), (v, w + v) or (0, w + v) for the journalled (v, w), untouched
        since (overflow operations finish it first, and they wait for the domain lock we
        hold), so the pair holds ``v + w``. Between moves (step 0) the pairs are exact."""
        q, d = self._q, self._d
        st = self._root_q + move_state_base(self._max, self._max)
        step = int(q[st + MS_STEP])
        if not 0 < step <= len(batch.moves):
            return {}
        old, new, kind = batch.moves[step - 1]
        words = []
        for ref in (old, new):
            ps, slot = split_ref(ref)
            e = self._pagesets.entry(ps)
            page = int(e[P_PAGES + self._max])
            if not page:
                return {}
            words.append((page - 1 + slot * self._pagesets.slot_size(e)) // 8)
        o, n = words
        dq = int(q[st + MS_OLD]) + int(q[st + MS_NEW]) - int(q[o]) - int(q[n])
        dd = d[st + MS_OLD_F] + d[st + MS_NEW_F] - d[o + 1] - d[n + 1]
        if kind == KIND_SUMMARY:
            return {old: (dq, dd), new: (dq, dd)}
        return {old: dq + dd if dd else dq, new: dq + dd if dd else dq}

    # Grace period and completion (protocol step 5).

    def advance(self) -> bool:
        """Drive the batch in flight: apply it here, copy the values of ids nobody holds,
        complete it once every holder has rebound and every id's values moved. True when no
        batch is in flight afterwards. ``_plock`` and the domain lock held."""
        r = self._root
        gen = int(r[D_MV_GEN])
        if not gen & 1:
            return True
        self.sync()
        batch = self.batch(gen)
        need = self.need_ids(batch)
        epoch = int(r[D_MV_EPOCH])
        mine = self._dom._lease.vcpu
        if self._dom._lease.lent():
            mine = None  # lent to a thread: its copy waits for the quiescer, as a thread's
        live = set(self._holder.live(self._dom._lease.vcpu))
        waiting = False
        for k in range(self._max):
            behind = k in need and int(r[move_state_base(self._max, k) + MS_DONE]) != gen
            if k in live:
                if k != mine and (behind or int(r[lease_base(self._max, k) + L_ACK]) < epoch):
                    waiting = True  # its quiescer has not come by yet (or it is stopped)
                continue
            if not (behind or self._caches.holds_any(k, batch.sources)):
                continue
            if not self._holder.try_lease(k):
                waiting = True  # being leased right now: its taker applies the batch
                continue
            try:
                self.adopt(k)  # nobody holds k (its holder died or left): step 4 iii
            finally:
                self._holder.unlock_lease(k)
        if self._dom._lease.threads is not None and self._dom._grace.ack < epoch:
            waiting = True  # our threads' private handles follow it at our acknowledgement
        if self._holder.oldest_ack(epoch) < epoch:
            waiting = True  # an overflow holder has not rebound yet
        # The overflow id is copied only once every live holder has acknowledged the batch,
        # not only its overflow holders: in per-thread mode a holder's threads may share it
        # while the holder's own lease is on an id of its own (its overflow lock says so,
        # ``_lease`` invariant 8; this wait costs nothing, the batch completes only then).
        if not waiting and self._max in need and int(
                r[move_state_base(self._max, self._max) + MS_DONE]) != gen:
            if self._holder.try_overflow():
                try:
                    self.adopt(self._max)  # step 4 iv: no overflow operation runs now
                finally:
                    self._holder.unlock_overflow()
            else:
                waiting = True
        if waiting:
            return False
        self.complete(batch)
        return True

    def complete(self, batch: MoveBatch) -> None:
        """Return the old slots and the emptied pagesets; commit. Every step is idempotent
        while ``D_MV_GEN`` is odd, so a completion cut short is finished by the next one."""
        r = self._root
        if int(r[D_MV_REG_DONE]) != batch.gen:
            self.fix_registry(batch)  # the publisher died before pointing it all at new
        ps_ = self._pagesets
        for old, _new, _kind in batch.moves:
            if ps_.is_taken(old):
                ps_.zero(old)
                ps_.give_back([old])
        pagesets = pages = 0
        for ps in sorted(batch.sources):
            e = ps_.entry(ps)
            if not e[P_CLASS] or e[P_TAKEN]:
                continue  # given back already, or a slot was taken meanwhile: kept
            pages += ps_.drop_pages(ps)
            pagesets += 1
        bump(r, D_REG_GEN)  # a snapshot() that straddled the batch reads again
        r[D_MV_GEN] = batch.gen + 1  # commit: readers stop pairing; old slots may be reused
        if _membarrier.NEEDS_FENCE:
            _membarrier.fence()  # before the lock that allows reuse is released
        bump(r, D_MOVES, len(batch.moves))
        bump(r, D_RECLAIMED_PAGESETS, pagesets)
        bump(r, D_MV_PAGES, pages)
        bump(r, D_MV_BATCHES)
        r[D_MV_COUNT] = 0
        r[D_MV_SOURCES] = 0

    def fix_registry(self, batch: MoveBatch) -> None:
        """Point every live registry entry still on an old ref at its new ref. Lock held."""
        self._registry.repoint({old: new for old, new, _kind in batch.moves})
        self._root[D_MV_REG_DONE] = batch.gen

    # Readers (the reader rule in _compact's docstring).

    def seqs(self) -> list[int]:
        """Every id's ``L_SEQ`` (the overflow id's included), read without the lock."""
        start = lease_base(self._max, 0) + L_SEQ
        return self._root[start : start + (self._max + 1) * LEASE_WORDS : LEASE_WORDS].tolist()

    def forward_stale(self, ref: int) -> int:
        """The new ref of a handle whose ``_ref`` a reader loaded just before a sync."""
        if ref in self._by_ref:
            return ref
        new = self.fwd.get(ref)  # not ``or``: 0 is a ref (slot 0 of pageset 0)
        return self.fwd_prev.get(ref, ref) if new is None else new

    def pairs_in_flight(self) -> Mapping[int, tuple[int, int]]:
        """Either ref -> (old, new) of every move of the batch in flight (empty: none)."""
        gen = int(self._root[D_MV_GEN])
        return self.batch(gen).pairs if gen & 1 else {}

    def read(self, ref: int, read: Callable[[int], _T], add: Callable[[_T, _T], _T]) -> _T:
        """``read(ref)`` (a sum over ids), made exact and monotonic while slots move."""
        r = self._root
        for _ in range(READ_TRIES):
            if _membarrier.READ_UNDER_LOCK:
                break
            gen = int(r[D_MV_GEN])
            if gen != self.seen:
                with self._dom._plock, self._lock:
                    self.sync()
                gen = int(r[D_MV_GEN])
            # Always: another thread of this process may have synced since the caller loaded
            # ``ref`` (the move then finished before ``gen`` was read, and its old pages may be
            # gone already).
            ref = self.forward_stale(ref)
            seqs = self.seqs() if gen & 1 else None
            if seqs is not None and any(s & 1 for s in seqs):
                time.sleep(0)  # a copy is running: let its process finish it
                continue
            try:
                pair = self.batch(gen).pairs.get(ref) if gen & 1 else None
                value = read(ref) if pair is None else add(read(pair[0]), read(pair[1]))
            except (IndexError, ValueError):  # a pageset was given back under us
                if int(r[D_MV_GEN]) == gen:
                    raise
                continue
            if int(r[D_MV_GEN]) == gen and (seqs is None or self.seqs() == seqs):
                return value
        with self._dom._plock, self._lock:  # batches and copies wait for us
            self.sync()
            ref = self.forward_stale(ref)
            fix = self.finish_dead()
            gen = int(r[D_MV_GEN])
            pair = self.batch(gen).pairs.get(ref) if gen & 1 else None
            value = read(ref) if pair is None else add(read(pair[0]), read(pair[1]))
            return value if ref not in fix else add(value, fix[ref])

    def read_begin(self) -> tuple[int, list[int] | None] | None:
        """For ``snapshot``: the batch generation and, while a batch is in flight, every id's
        sequence count; None when the read must be done under the lock."""
        if _membarrier.READ_UNDER_LOCK:
            return None
        r = self._root
        if int(r[D_MV_GEN]) != self.seen:
            with self._dom._plock, self._lock:
                self.sync()
        gen = int(r[D_MV_GEN])
        seqs = self.seqs() if gen & 1 else None
        if seqs is not None and any(s & 1 for s in seqs):
            return None
        return gen, seqs

    def read_end(self, token: tuple[int, list[int] | None] | None) -> bool:
        """True when nothing moved since :meth:`_mv_read_begin` returned ``token``."""
        return token is not None and int(self._root[D_MV_GEN]) == token[0] and (
            token[1] is None or self.seqs() == token[1])

    def adjust(self, entries: list[tuple[int, int, int, bytes]], out: list[MetricValue],
                   sums: dict[int, tuple[list[int], list[float]]]) -> list[MetricValue]:
        """Add the other slot's part to every metric whose move is in flight (``_values``;
        ``out[i]`` is ``entries[i]``'s value)."""
        gen = int(self._root[D_MV_GEN])
        pairs = self.batch(gen).pairs if gen & 1 else {}
        if not pairs:
            return out
        res = list(out)
        for i, (kind, cls, ref, _key) in enumerate(entries):
            pair = pairs.get(ref)
            if pair is None:
                continue
            other = pair[0] if ref == pair[1] else pair[1]
            ps, slot = split_ref(other)
            if ps not in sums:
                sums[ps] = self._pagesets.sums(ps, kind == KIND_SUMMARY)
            q, d = sums[ps]
            word = slot * SIZE_CLASSES[cls] // 8
            v = res[i]
            if kind == KIND_SUMMARY:
                res[i] = replace(v, value=v.value + d[word + 1], count=v.count + q[word])
            elif kind == KIND_GAUGE_LIVESUM:  # only the live ids' parts of the other slot
                part = gauge_value(kind, self._pagesets.slot_copies(other),
                                   self._dom._reads.live_ids())
                res[i] = replace(v, value=v.value + part)
            else:
                f = d[word + 1]
                res[i] = replace(v, value=v.value + q[word] + f if f else v.value + q[word])
        return res
