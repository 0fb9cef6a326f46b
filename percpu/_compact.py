"""Pageset compaction: move counters in active use out of sparse pagesets (seed 002).

The problem
-----------
Counters come and go (per connection, per tenant, per route). A pageset costs one page per id
that touched it for as long as any of its slots is taken, so after churn many pagesets each
hold a few live slots and pin ``ids`` pages apiece. Compaction moves the live slots of sparse
pagesets into free slots of dense ones, while the counters are being incremented, and gives the
emptied pagesets' pages back to the arena. Seed 002's recipe: publish the new location, wait
until everyone has observed it (an RCU grace period), then free the old one.

This module is the pure part, on integers and word arrays, tested without the OS: the planner
(:func:`plan_compaction`), the per-id value copy and its crash journal (:func:`copy_moves`,
:func:`finish_interrupted`), the policy test and the result types. ``_domain`` (section
"compaction") does the shared-memory and OS part. Words are in ``_layout``: ``D_MV_GEN`` (batch
generation, odd while a batch is in flight), ``D_MV_EPOCH``, the move records ``[old ref, new
ref, kind]``, the source list, and per id ``L_SEQ`` (in its lease record: the id's sequence
count, odd while its copies are being moved) and its move state (``MS_DONE``: the generation
whose moves it has had; a one-move journal).

The protocol (one batch at a time; every step under the domain lock unless said otherwise)
--------------------------------------------------------------------------------------------
1. **Plan.** The compactor first lets the grace period of recently removed slots pass (within
   its timeout), then takes an inventory (pagesets and their bitmaps, the registry's refs,
   every id's cache, the pending-free queue) and plans moves ``old ref -> new ref`` for
   *registered metrics only*. Raw ``PerCpu`` objects (a user may hold a ``local`` memoryview
   of them) and slots waiting for a grace period pin their pageset. Cached free slots in a
   pageset being emptied are given back instead of moved.
2. **Publish.** The compactor allocates the target pages that ids with a page in a source will
   need, reserves the target slots (bits set), writes the move records and the source list,
   bumps ``D_EPOCH`` (``D_MV_EPOCH`` = the new epoch), and stores ``D_MV_GEN`` odd: the commit.
   It then points the registry entries at the new refs and bumps ``D_REG_GEN``. From here on:
   sources are closed to allocation, readers pair old and new slots, and a pending free of a
   ref in the batch waits for the batch.
3. **Rebind at a quiescent point.** Each process applies the batch at its next quiescent
   point: its quiescer thread (every ``QUIESCE_INTERVAL``), or any of its threads that enters
   the domain (bind, read, lease, compact), always holding the GIL and the domain lock. It
   (a) rebinds its handles of every moved ref (``_ref`` = new, ``_index`` = its copy in the new
   slot: single attribute stores); (b) copies the values of the id it holds (step 4); (c) gives
   back the slots of its cache that lie in sources; (d) acknowledges the epoch (``L_ACK``, or
   an overflow holder's ack lock). The hot path gains no work: the thread running this holds
   the GIL, so no other thread of the process is inside the one-statement update (CPython
   3.11 switches threads only at function entry, backward jumps and calls); a thread switched
   out at ``add``'s entry resumes and loads the new ``_index``.
4. **Copy, by the owner only.** Id ``k``'s copies move from old to new once per batch, by
   (i) the holder of ``k``, in step 3, after its handles point at new, so nobody writes ``k``'s
   old copy any more; (ii) whoever takes ``k``'s lease next: the lease taker applies the batch
   under the lock before it binds anything; (iii) for an id nobody holds, the compactor or any
   process's quiescer, after ``try_lock`` on ``k``'s lease byte, so nobody takes ``k`` meanwhile
   (this is how a dead holder's values move; quiescers join in only once the batch is older
   than ``DRIVE_AFTER``, when its compactor seems gone); (iv) for the overflow id, shared by
   several holders under the overflow lock: whoever holds that lock, once every live holder
   has acknowledged (rebound): not only the overflow holders, since in per-thread mode a
   thread shares the overflow id under its process's acknowledgement of its own id. One
   move of one id (:func:`copy_moves`): journal (old value ``v``, new value ``w``, step),
   ``new = w + v``, ``old = 0``, step cleared, all bracketed by ``L_SEQ[k]`` odd ... even,
   then ``MS_DONE[k] = gen``. The journal-to-store sequence is
   straight-line code (no call, no backward jump): no other thread of the process runs between
   reading ``w`` and storing ``w + v``. A holder killed mid-copy leaves the journal and an odd
   ``L_SEQ``; the next owner redoes that step with absolute stores (idempotent) and carries on.
   Nobody writes the id in between: a lease taker copies under the lock before it binds
   anything, and an overflow operation finishes an interrupted copy before it writes. So an
   odd ``L_SEQ`` seen *under the domain lock* always means a dead copier, and whoever holds the
   lock may finish that copy (a reader's locked fallback does).
5. **Grace period, completion.** The batch completes (in any process) when every live holder
   has acknowledged ``D_MV_EPOCH``, every live overflow holder too, and every id with a page in
   a source has ``MS_DONE = gen``. Completion points any registry entry still on an old ref at
   its new one, zeroes and returns the old slots, gives back each source pageset that is now
   empty (``P_PAGES[k] = 0`` before the arena block is freed, then ``P_CLASS = 0``), bumps
   ``D_REG_GEN`` and stores ``D_MV_GEN`` even: the commit. Each step is idempotent while
   ``D_MV_GEN`` is odd, so a compactor killed mid-completion leaves work the next one finishes.
6. **A holder that never quiesces** (SIGSTOP, a long C call) keeps the batch in flight:
   ``compact()`` returns with ``pending_moves > 0``, ``stats()`` shows the batch and its age,
   and it completes soon after the holder resumes (its quiescer acknowledges within
   ``QUIESCE_INTERVAL``; the compactor, or after ``DRIVE_AFTER`` any quiescer, completes it),
   or after its death through (iii). Meanwhile nothing is wrong: its updates land in the old
   slot, which stays allocated, and readers count both slots.

Readers (``value``, ``snapshot``)
---------------------------------
A reader loads ``g = D_MV_GEN`` (syncing this process first if it lags), then forwards its ref
through the maps of this process's last two syncs: the handle's ref it was given may predate a
move that another thread of the process has synced since. Even: it sums its ref's slot over the
ids, then retries if ``D_MV_GEN`` moved (a whole batch may have published and completed
meanwhile, and an old slot been reused). Odd: it records every id's ``L_SEQ`` (waiting while
one is odd), sums, for a moved metric, each id's old *and* new copy (either ref maps to the
pair), and keeps the result only if ``D_MV_GEN`` and every ``L_SEQ`` are unchanged. After
``READ_TRIES`` attempts it reads under the domain lock, after finishing any copy a dead holder
left. Per id, ``old[k] + new[k]`` only grows: hot-path writes add, and a copy moves ``v`` from
one word to the other inside one odd ``L_SEQ`` window, which a kept read cannot straddle. A
value is a sum of per-id parts, each non-decreasing and each read at some instant, so a later
read is never below an earlier one (the per-cpu counter argument), across publish and
completion too: after completion ``new[k]`` holds what ``old[k] + new[k]`` held. No sequence
count is needed on the hot path: it only adds to one word, and sums of non-decreasing words are
monotone without synchronisation; only the copy moves value between words, so only it is
bracketed.

Memory ordering: what needs a fence and what does not
------------------------------------------------------
* Threads of one process: every hand-over goes through the GIL, a mutex (release/acquire), so
  the quiescer's rebind and copy are ordered with the worker threads' updates. No fence;
  ``MEMBARRIER_CMD_PRIVATE_EXPEDITED`` would add nothing.
* Shared structures between processes (records, acks, leases, registry, bitmaps, journals) are
  read and written under the domain lock, an OFD lock whose kernel side is a spinlock with
  acquire/release semantics: what one holder stored is visible to the next. No fence.
* What races without a lock is only the readers' loads of slots, ``D_MV_GEN`` and ``L_SEQ``
  against a copy's and a completion's stores. The reader's check needs its loads in program
  order (generation and sequences before the slots, the slots before the re-check) and the
  writers' stores in order (``L_SEQ`` odd before the copy, the copy before ``L_SEQ`` even,
  ``D_MV_GEN`` even before any reuse of an old slot). The GIL hand-off orders the owner's
  stores for its *own* threads, not for a reader in another process, so it does not settle
  this. On x86-64 (TSO; also s390x) the hardware never reorders loads with loads nor stores
  with stores, and CPython does each memoryview access in a separate C call that the compiler
  does not merge or reorder: the check is correct as written and no fence is issued. On arm64,
  POWER and RISC-V loads can be reordered, and a read-side barrier would tax every read.
  Instead the rare writer issues ``membarrier`` (``_membarrier.fence``: the expedited global
  command, processes registered when they map a domain; else the plain global one): after
  ``L_SEQ`` goes odd and before the journal and values, after the values and before ``L_SEQ``
  goes even, and after ``D_MV_GEN`` goes even at completion, before the lock that allows reuse
  is released. Every running thread of a registered process then executes a full barrier
  between the writer's stores before and after the call, so a reader whose loads straddle it
  sees the count change and retries (liburcu's "memb" flavour). Where membarrier is missing on
  such a CPU, readers take the domain lock instead (``_membarrier.READ_UNDER_LOCK``). Honest
  limit: the weak-memory argument is reasoned, not tested; the machines here are x86-64.

Alternatives weighed
--------------------
* An indirection word read on every add (``cells[table[i]]``): work on the hot path; refused.
* The compactor copying values of live holders itself: an update between its read and its
  write would be lost unless the hot path synchronised; only the owner (or a lease holder of an
  id nobody holds) may copy.
* One global sequence count instead of one per id: a reader would retry on every copy by any
  id; per-id counts keep retries to the ids that moved, and each copier writes only its own.
* Never freeing old slots (readers sum both forever): no memory comes back, which is the point.

Open questions: summaries move a float sum, so ``old + new`` can differ from the sum read in
the other order by one rounding; PerCpu objects are never moved (they pin their pageset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._layout import (
    M_KIND,
    M_NEW,
    M_OLD,
    MOVE_CAP,
    MOVE_SOURCES_CAP,
    MOVE_WORDS,
    MS_DONE,
    MS_NEW,
    MS_NEW_F,
    MS_OLD,
    MS_OLD_F,
    MS_STEP,
    make_ref,
    slots_per_page,
)

READ_TRIES = 4  # lock-free attempts of a read while moves are in flight, then under the lock
GRACE_POLL = 0.001  # seconds between a compactor's looks at a batch in flight
DRIVE_AFTER = 0.05  # seconds after which every quiescer helps a batch complete (its
#                     compactor gave up waiting or died); before, only the compactor drives
POLICY_INTERVAL = 1.0  # seconds between the background policy's looks at occupancy
POLICY_TIMEOUT = 1.0  # seconds the background policy waits for one grace period

# Phases of the batch (the parity of D_MV_GEN) and the legal transitions (h11-style table).
IDLE = "idle"  # no batch: readers read one slot per ref
IN_FLIGHT = "in flight"  # a batch is published: readers pair old and new slots
TRANSITIONS = {
    (IDLE, "publish"): IN_FLIGHT,  # records written, target slots reserved, D_MV_GEN odd
    (IN_FLIGHT, "copy"): IN_FLIGHT,  # one id's copies moved (MS_DONE = gen)
    (IN_FLIGHT, "acknowledge"): IN_FLIGHT,  # a holder rebound its handles (L_ACK >= epoch)
    (IN_FLIGHT, "complete"): IDLE,  # old slots returned, empty sources given back, gen even
}


def phase(gen: int) -> str:
    """The batch phase that a ``D_MV_GEN`` value means."""
    return IN_FLIGHT if gen & 1 else IDLE


def next_phase(current: str, event: str) -> str:
    """The phase after ``event``; ValueError for an illegal transition."""
    try:
        return TRANSITIONS[(current, event)]
    except KeyError:
        raise ValueError(f"no transition from {current!r} on {event!r}") from None


# -- the planner -------------------------------------------------------------------------


@dataclass(frozen=True)
class PagesetInfo:
    """What the planner knows of one pageset (gathered under the domain lock)."""

    ps: int  #: pageset number
    cls: int  #: size class index
    live: tuple[int, ...]  #: slots of registered metrics: movable
    cached: tuple[int, ...] = ()  #: free slots held by per-id caches: given back, not moved
    pinned: int = 0  #: other taken slots (raw objects, pending frees, leaks): unmovable
    free: tuple[int, ...] = ()  #: slots not taken
    page_ids: frozenset[int] = frozenset()  #: ids that have a page of this pageset

    @property
    def taken(self) -> int:
        """Slots taken (live + cached + pinned)."""
        return len(self.live) + len(self.cached) + self.pinned


@dataclass(frozen=True)
class Move:
    """One slot to move: the metric at ``old`` goes to ``new`` (refs)."""

    old: int
    new: int


@dataclass(frozen=True)
class Plan:
    """What one batch does (see :func:`plan_compaction`)."""

    moves: tuple[Move, ...] = ()
    sources: tuple[int, ...] = ()  #: pagesets emptied, then given back
    targets: tuple[int, ...] = ()  #: pagesets receiving moves
    new_pages: tuple[tuple[int, int], ...] = ()  #: (target, id): pages targets must get
    pages_before: int = 0
    pages_after: int = 0  #: estimate, if the batch completes
    ideal_pages: int = 0

    @property
    def empty(self) -> bool:
        """True when the plan gives nothing back."""
        return not self.sources


def ideal_pages(infos: Iterable[PagesetInfo]) -> int:
    """``sum over classes of ceil(live slots / slots per page) x ids that touched the class``:
    the pages the live metrics would need if every pageset were full."""
    live: dict[int, int] = {}
    ids: dict[int, set[int]] = {}
    for i in infos:
        live[i.cls] = live.get(i.cls, 0) + len(i.live)
        ids.setdefault(i.cls, set()).update(i.page_ids)
    return sum(math.ceil(n / slots_per_page(c)) * len(ids[c]) for c, n in live.items())


def occupancy(pagesets: Iterable[tuple[int, int, bool]]) -> float:
    """Taken slots over the capacity of the pagesets that cost memory, from
    ``(class, taken, has_pages)`` per pageset; 1.0 when none does."""
    taken = capacity = 0
    for cls, n, has_pages in pagesets:
        if n or has_pages:
            taken += n
            capacity += slots_per_page(cls)
    return taken / capacity if capacity else 1.0


def should_compact(occ: float, threshold: float | None) -> bool:
    """The background policy: compact when occupancy is below ``threshold`` (None: never)."""
    return threshold is not None and occ < threshold


def plan_compaction(infos: Iterable[PagesetInfo], max_moves: int = MOVE_CAP,
                    max_sources: int = MOVE_SOURCES_CAP) -> Plan:
    """Choose, per size class, the pagesets to keep (the densest that hold every live slot,
    plus every pageset with a pinned slot) and the ones to empty (the rest that cost memory,
    fewest live slots first, within ``max_moves`` and ``max_sources``), and give each live
    slot of a source a free slot of a target, densest target first.

    With no pinned or cached slots and no limit hit, each class keeps exactly
    ``ceil(live / slots per page)`` pagesets.
    """
    all_infos = sorted(infos, key=lambda i: i.ps)
    by_class: dict[int, list[PagesetInfo]] = {}
    for i in all_infos:
        by_class.setdefault(i.cls, []).append(i)
    pages_before = sum(len(i.page_ids) for i in all_infos)
    budget, room = max_moves, max_sources
    moves: list[Move] = []
    sources: list[int] = []
    targets: list[int] = []
    new_pages: list[tuple[int, int]] = []
    freed_pages = 0
    for cls in sorted(by_class):
        group = by_class[cls]
        fixed = [i for i in group if i.pinned]
        movable = sorted((i for i in group if not i.pinned),
                         key=lambda i: (-len(i.live), -len(i.page_ids), i.ps))
        capacity = sum(len(i.free) for i in fixed)
        outside = sum(len(i.live) for i in movable)
        h = 0
        while h < len(movable) and outside > capacity:
            capacity += len(movable[h].free)
            outside -= len(movable[h].live)
            h += 1
        keep = fixed + movable[:h]
        chosen: list[PagesetInfo] = []
        for i in sorted(movable[h:], key=lambda i: (len(i.live), i.ps)):
            if not (i.page_ids or i.taken):
                continue  # costs nothing: leave it for the next allocation
            if room and len(i.live) <= budget:
                chosen.append(i)
                budget -= len(i.live)
                room -= 1
        if not chosen:
            continue
        # Fill the densest kept pagesets first: they are the likeliest to stay.
        keep.sort(key=lambda i: (-i.taken, i.ps))
        slots = ((t, s) for t in keep for s in t.free)
        used: dict[int, set[int]] = {}
        for src in chosen:
            sources.append(src.ps)
            freed_pages += len(src.page_ids)
            for s in src.live:
                t, free_slot = next(slots)  # capacity was checked above
                moves.append(Move(make_ref(src.ps, s), make_ref(t.ps, free_slot)))
                used.setdefault(t.ps, set()).update(src.page_ids)
        info = {i.ps: i for i in keep}
        for t_ps in sorted(used):
            targets.append(t_ps)
            new_pages.extend((t_ps, k) for k in sorted(used[t_ps] - info[t_ps].page_ids))
    if pages_before - freed_pages + len(new_pages) >= pages_before:
        # No gain (the targets would need as many new pages as the sources give back).
        return Plan(pages_before=pages_before, pages_after=pages_before,
                    ideal_pages=ideal_pages(all_infos))
    return Plan(moves=tuple(moves), sources=tuple(sources), targets=tuple(targets),
                new_pages=tuple(new_pages), pages_before=pages_before,
                pages_after=pages_before - freed_pages + len(new_pages),
                ideal_pages=ideal_pages(all_infos))


def check_plan(plan: Plan, infos: Iterable[PagesetInfo]) -> None:
    """Raise AssertionError unless ``plan`` is a valid plan for ``infos`` (test helper; an
    expensive no-op when all is well)."""
    by_ps = {i.ps: i for i in infos}
    src = set(plan.sources)
    assert len(src) == len(plan.sources), "a source appears twice"
    assert not src & set(plan.targets), "a pageset is both source and target"
    olds = [m.old for m in plan.moves]
    news = [m.new for m in plan.moves]
    assert len(set(olds)) == len(olds) and len(set(news)) == len(news), "a slot moves twice"
    for ps in src:
        assert by_ps[ps].pinned == 0, f"pageset {ps} has pinned slots"
        assert {make_ref(ps, s) for s in by_ps[ps].live} <= set(olds), \
            f"pageset {ps} would keep a live slot"
    for m in plan.moves:
        ops, oslot = m.old >> 16, m.old & 0xFFFF
        nps, nslot = m.new >> 16, m.new & 0xFFFF
        assert ops in src and oslot in by_ps[ops].live, f"{m} does not move a live source slot"
        assert nps not in src and nslot in by_ps[nps].free, f"{m} does not land on a free slot"
        assert by_ps[ops].cls == by_ps[nps].cls, f"{m} changes size class"


# -- the per-id copy ---------------------------------------------------------------------


class Words(Protocol):
    """Indexable int64 words (a memoryview cast to 'q', or a list in tests)."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...


class Floats(Protocol):
    """The same words as float64 (a memoryview cast to 'd', or a list in tests)."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...


#: One move of one id: (word of its old copy, word of its new copy, has a float word: every
#: movable kind has one, after its int word), or None when the id has nothing to move
#: there (no page of the old pageset, or a zero old copy).
Pair = tuple[int, int, bool] | None


def finish_interrupted(q: Words, d: Floats, state: int, pairs: Sequence[Pair]) -> bool:
    """Redo the journalled step of a copy whose copier died (its journal is at word ``state``
    of ``q``): absolute stores from the journal, so it is right whether the copier died before,
    between or after its stores. Only the id's owner calls it (nobody else writes the id)."""
    step = q[state + MS_STEP]
    if not step:
        return False
    pair = pairs[step - 1]
    if pair is None:
        raise ValueError(f"the journal names move {step - 1}, which this id has no copy of")
    o, n, summary = pair
    q[n] = q[state + MS_NEW] + q[state + MS_OLD]
    q[o] = 0
    if summary:
        d[n + 1] = d[state + MS_NEW_F] + d[state + MS_OLD_F]
        d[o + 1] = 0.0
    q[state + MS_STEP] = 0
    return True


def copy_moves(q: Words, d: Floats, state: int, seq: int, gen: int, pairs: Sequence[Pair],
               fence: Callable[[], None] | None = None) -> int:
    """Move one id's copies for batch ``gen``: for each move ``j`` (``pairs[j]``), new += old,
    old = 0, journalled at word ``state`` (``MS_*``), inside an odd window of the id's sequence
    count (word ``seq``); then ``MS_DONE = gen``. Returns the copies that held a value.

    The caller owns the id (its holder after rebinding its handles, the taker of its lease,
    or the holder of the overflow lock) and holds the domain lock and the GIL. Within one move,
    from reading the new copy to storing it, there is no call and no backward jump, so no other
    thread of this process runs in between: the id's own rebound handles may add to the new
    copy between moves, never inside one.
    """
    q[seq] = q[seq] | 1  # odd: this id's copies are moving; readers retry
    if fence is not None:
        fence()
    finish_interrupted(q, d, state, pairs)
    step, ov, nv = state + MS_STEP, state + MS_OLD, state + MS_NEW
    of, nf = state + MS_OLD_F, state + MS_NEW_F
    moved = 0
    for j, pair in enumerate(pairs):
        if pair is None:
            continue
        o, n, summary = pair
        v = q[o]
        if summary:
            f = d[o + 1]
            if v or f:
                w = q[n]
                g = d[n + 1]
                q[ov] = v
                q[nv] = w
                d[of] = f
                d[nf] = g
                q[step] = j + 1  # the journal is complete: from here a redo is exact
                d[n + 1] = g + f
                q[n] = w + v
                d[o + 1] = 0.0
                q[o] = 0
                q[step] = 0
                moved += 1
        elif v:
            w = q[n]
            q[ov] = v
            q[nv] = w
            q[step] = j + 1
            q[n] = w + v
            q[o] = 0
            q[step] = 0
            moved += 1
    if fence is not None:
        fence()
    q[state + MS_DONE] = gen
    q[seq] = q[seq] + 1  # even: done
    return moved


# -- the batch in flight, as a process reads it ------------------------------------------


@dataclass(frozen=True)
class MoveBatch:
    """The batch in flight (or none, ``gen`` even), decoded from the move region."""

    gen: int
    moves: tuple[tuple[int, int, int], ...] = ()  #: (old ref, new ref, registry kind)
    pairs: Mapping[int, tuple[int, int]] = field(default_factory=dict)  #: either ref -> (old, new)
    sources: frozenset[int] = frozenset()  #: pagesets being emptied

    @classmethod
    def decode(cls, gen: int, move_words: Sequence[int], source_words: Iterable[int]) -> MoveBatch:
        """From the records' words (``MOVE_WORDS`` a move) and the source list."""
        if not gen & 1:
            return cls(gen)
        moves = tuple((move_words[j + M_OLD], move_words[j + M_NEW], move_words[j + M_KIND])
                      for j in range(0, len(move_words), MOVE_WORDS))
        pairs: dict[int, tuple[int, int]] = {}
        for old, new, _kind in moves:
            pairs[old] = pairs[new] = (old, new)
        return cls(gen, moves, pairs, frozenset(source_words))

    def current(self, ref: int) -> int:
        """``ref``, or its new ref when it is the old ref of a move of this batch."""
        pair = self.pairs.get(ref)
        return pair[1] if pair is not None and pair[0] == ref else ref


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactResult:
    """What :meth:`Domain.compact` did."""

    moved: int = 0  #: slots moved by batches that completed in this call
    reclaimed_pagesets: int = 0  #: pagesets emptied and given back
    reclaimed_pages: int = 0  #: their pages, returned to the arena
    pages_before: int = 0  #: pages allocated to pagesets when the call began
    pages_after: int = 0  #: ... when it returned
    ideal_pages: int = 0  #: ceil(live slots / slots per page) x ids, over the classes
    pending_moves: int = 0  #: moves published but waiting for a holder (stopped or stuck)
    batches: int = 0  #: batches completed in this call
    seconds: float = 0.0  #: wall time of the call
    grace_seconds: tuple[float, ...] = field(default=())  #: publish-to-completion, per batch
