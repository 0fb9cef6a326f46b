"""Pagesets: the slots every per-cpu object lives in, one page per vcpu id, in shared memory.

A pageset of size class ``c`` is an entry in the pageset directory (chunks of
``PS_PER_CHUNK`` entries, allocated on demand and never moved or freed) with a bitmap of taken
slots, their count and one page per id (``P_PAGES``: offset + 1, 0 = none yet). Slot ``k`` is
the same object in every id's page; a *ref* names it as ``pageset << REF_SHIFT | k``.

Invariants
----------
1. An id's page exists from the first time that id touches the pageset (:meth:`page`) until
   compaction gives the emptied pageset back; memory follows the ids in use, not CPUs.
2. A slot is taken (bit set, counted in ``P_TAKEN``) by exactly one owner at a time (the
   registry, a cache, the pending queue, a raw object, a compaction batch); it is given back
   zeroed (:meth:`zero` before :meth:`give_back`). Giving back a free slot is refused and
   counted (``double_frees``): it would corrupt the count, and every reuse after it.
3. An id's page word is the commit of its allocation, and is cleared before its block is
   freed: a crash leaks a page, never leaves two pagesets sharing one.
4. Admission: a pageset exists only once a page for every id that has none of it (each of
   ``0..max_vcpus - 1`` and the overflow id) has been set aside in the *page reserve*, so
   :meth:`page` never runs out of memory and a holder can count into every metric that
   exists; ``DomainFull`` comes from :meth:`new` (registration), never from a first touch.
   The reserve is real arena blocks, each one 4 KiB-aligned page, linked through their
   first words (``D_RESERVE`` names the first): registry tables, key blocks, chunks and the
   pending spill cannot take them, and fragmentation cannot strand them (an aligned page
   that a fragmented arena could no longer carve out is already carved). Its size follows
   ``pagesets in use x ids - pages allocated``: :meth:`new` tops it up before its commit,
   :meth:`drop_pages` trims it after. A crash can leave it a page long or short (a page
   popped but not yet recorded leaks, and is made up for by the next :meth:`new`); a short
   reserve falls back to allocating the page.

Every word is read and written under the domain lock, except the page words read on the
hot paths of reads (a page word only ever goes from 0 to an offset while an id may use it).
Every word is checked before it is used to find or write memory (the count against the
directory's size, chunk and page words against the arena and their alignment, a class against
the classes, a ref's slot against its page): a damaged one raises ``BadDomainFile``. A page
word is checked once per process (aligned, in the arena, the start of a page-sized block:
``_checked_page``) before anything reads, binds to or zeroes it; only the one-metric reads
(``slot_sum``, ``slot_summary``: ``Counter.value``) read page words unchecked, for speed: at
worst a wrong value or an ``IndexError``, which the domain reports as ``BadDomainFile``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from arena.locks import SharedLock

from ._errors import DomainFull, damaged
from ._layout import (
    BITMAP_WORDS,
    D_PAGES,
    D_PS_COUNT,
    D_RESERVE,
    MAX_CHUNKS,
    P_BITMAP,
    P_CLASS,
    P_PAGES,
    P_TAKEN,
    PAGE,
    PS_PER_CHUNK,
    SIZE_CLASSES,
    bump,
    make_ref,
    slots_per_page,
    split_ref,
)

MAX_PAGESETS = MAX_CHUNKS * PS_PER_CHUNK
_ZEROS = [0.0] * (PAGE // 8)  # the float sums of a page with no float part (never written)
_MASK64 = (1 << 64) - 1
# The words of a page in the reserve (the rest of it is zero or stale: it is zeroed when it
# is handed out): the next page's offset + 1 (0: last), the pages from this one to the end,
# and a check of both and of the page's own offset, so that a damaged link is refused.
RV_NEXT, RV_COUNT, RV_CHECK = 0, 1, 2


def _reserve_check(off: int, nxt: int, count: int) -> int:
    x = (off * 0x9E3779B97F4A7C15 ^ nxt * 0xC2B2AE3D27D4EB4F ^ count) & _MASK64
    x = (x ^ x >> 31) * 0xBF58476D1CE4E5B9 & _MASK64
    return (x ^ x >> 32) | 1  # never 0: a zeroed page never passes for a reserve page


class Pagesets:
    """The pageset layer of one domain. ``root`` are its root words, ``heap`` the arena's
    bytes, ``chunks`` the word index of the chunk table, ``ids`` the ids a page can belong to
    (``max_vcpus + 1``, the overflow id included). ``alloc(nbytes, what, align)`` returns a
    kept block (raising ``DomainFull``), ``free(offset)`` gives one back; ``draining()``
    names the pagesets a compaction is emptying (closed to allocation)."""

    def __init__(self, root: memoryview, heap: memoryview, q: memoryview[int],
                 d: memoryview[float], chunks: int, entry_words: int, ids: int,
                 lock: SharedLock, alloc: Callable[[int, str, int | None], int],
                 free: Callable[[int], None], draining: Callable[[], frozenset[int]],
                 block_size: Callable[[int], int] = lambda _offset: PAGE) -> None:
        self._root = root
        self._block_size = block_size  # bytes of the arena block at an offset (0: none)
        self._known: set[int] = set()  # page words checked by this process (_checked_page)
        self._heap = heap
        self._q = q  # the heap as int64 words
        self._d = d  # ... and as float64 words (a Summary's sum)
        self._chunks = chunks
        self._words = entry_words
        self._ids = ids
        self._lock = lock
        self._alloc = alloc
        self._free = free
        self._draining = draining
        self._views: dict[int, memoryview] = {}  # pageset -> its entry (see entry)
        self.double_frees = 0  #: slots this process was asked to give back twice (a bug)

    def release(self) -> None:
        """Drop the entry views (the domain is being unmapped)."""
        for view in self._views.values():
            view.release()
        self._views.clear()

    # -- entries and their pages ---------------------------------------------------------

    def count(self) -> int:
        """Pageset entries ever created (given-back ones included: their class is 0)."""
        n = int(self._root[D_PS_COUNT])
        if n > MAX_PAGESETS:
            raise damaged(f"{n} pagesets, more than a domain can describe ({MAX_PAGESETS})")
        return n

    def entry(self, ps: int) -> memoryview:
        """Pageset ``ps``'s entry words. Entries never move once their chunk exists, so each
        view is made once (a cast costs about 40% of a value read)."""
        e = self._views.get(ps)
        if e is None:
            if not 0 <= ps < self.count():
                raise damaged(f"pageset {ps} does not exist")
            e = self._entry_view(ps)
        return e

    def _entry_view(self, ps: int) -> memoryview:
        chunk = int(self._root[self._chunks + ps // PS_PER_CHUNK])
        nbytes = self._words * 8
        if not chunk or (chunk - 1) % 8 or chunk - 1 + PS_PER_CHUNK * nbytes > len(self._heap):
            raise damaged(f"pageset {ps}'s directory chunk word {chunk:#x}")
        base = chunk - 1 + (ps % PS_PER_CHUNK) * nbytes
        e = self._views[ps] = self._heap[base : base + nbytes].cast("Q")
        return e

    def slot_size(self, e: memoryview) -> int:
        """Bytes per slot of the pageset whose entry is ``e`` (a pageset in use)."""
        c = int(e[P_CLASS])
        if not 1 <= c <= len(SIZE_CLASSES):
            raise damaged(f"a pageset of class word {c} is in use")
        return SIZE_CLASSES[c - 1]

    def check_ref(self, ref: int, cls: int | None = None) -> tuple[memoryview, int, int]:
        """(entry, slot, slot size) of ``ref``, checked: its pageset exists and is in use (of
        class ``cls`` when given), its slot lies in its page."""
        ps, slot = split_ref(ref)
        e = self.entry(ps)
        size = self.slot_size(e)
        if slot >= PAGE // size or (cls is not None and not (
                0 <= cls < len(SIZE_CLASSES) and size == SIZE_CLASSES[cls])):
            raise damaged(f"ref {ref:#x} names no slot of a {size}-byte pageset")
        return e, slot, size

    def _pages(self, e: memoryview) -> list[int]:
        """The page words of ``e`` (offset + 1, 0 = none), each checked (``_checked_page``)
        the first time this process meets it: a page word changes only from 0 to a page
        and back, so the ones checked are kept (``_known``)."""
        words = e[P_PAGES : P_PAGES + self._ids].tolist()
        known = self._known
        for p in words:
            if p and p not in known:
                self._checked_page(p)
        return words

    def id_pages(self, e: memoryview) -> list[tuple[int, int]]:
        """(id, byte offset of its page) of every id that has a page of the pageset whose
        entry is ``e``: the walk behind every per-slot sum and copy."""
        return [(k, p - 1) for k, p in enumerate(self._pages(e)) if p]

    def page_offsets(self, e: memoryview) -> list[int]:
        """The same walk without the ids."""
        return [p - 1 for p in self._pages(e) if p]

    def page(self, ps: int, vcpu: int) -> int:
        """Byte offset of id ``vcpu``'s page of pageset ``ps``, allocated on first touch."""
        e = self.entry(ps)
        page = int(e[P_PAGES + vcpu])
        if page:
            return self._checked_page(page)
        with self._lock:
            page = int(e[P_PAGES + vcpu])
            if page:
                return self._checked_page(page)
            off = self._reserve_pop()  # invariant 4; short only after a crash
            if off < 0:
                off = self._alloc(PAGE, "a pageset page", PAGE)
            self._heap[off : off + PAGE] = bytes(PAGE)
            e[P_PAGES + vcpu] = off + 1  # commit
            bump(self._root, D_PAGES)
            return off

    def _checked_page(self, p: int) -> int:
        """The offset of the page a word names, before anything reads, binds to or zeroes
        it: a page-aligned block of one page in the arena (not the middle of one, not the
        root block)."""
        if p not in self._known:
            if (p - 1) % PAGE or p - 1 + PAGE > len(self._heap) or \
                    self._block_size(p - 1) != PAGE:
                raise damaged(f"a page word {p:#x} names no page-sized block of the arena")
            self._known.add(p)
        return p - 1

    def zero_copy(self, ref: int, vcpu: int) -> None:
        """Clear id ``vcpu``'s copy of slot ``ref``, if it has a page there."""
        e, slot, size = self.check_ref(ref)
        page = int(e[P_PAGES + vcpu])
        if page:
            off = self._checked_page(page) + slot * size
            self._heap[off : off + size] = bytes(size)

    def drop_pages(self, ps: int) -> int:
        """Give every page of the (empty) pageset ``ps`` back and free its entry; the pages
        given back. Lock held."""
        e = self.entry(ps)
        pages = 0
        for k, page in self.id_pages(e):
            e[P_PAGES + k] = 0  # before the free: a crash leaks the page, never aliases it
            self._known.discard(page + 1)
            bump(self._root, D_PAGES, -1)
            self._free(page)
            pages += 1
        e[P_CLASS] = 0  # the entry is free for new()
        live, _free_entry = self._scan()
        for _ in range(max(0, self.reserved() - self.reserve_needed(live))):
            off = self._reserve_pop()
            if off < 0:
                break
            self._free(off)
        return pages

    # -- the page reserve (invariant 4) -----------------------------------------------------

    def _reserve_head(self) -> tuple[int, int, int]:
        """(offset, next word, count) of the reserve's first page, checked; (-1, 0, 0) when
        the reserve is empty."""
        h = int(self._root[D_RESERVE])
        if not h:
            return -1, 0, 0
        off = h - 1
        if off % PAGE or off + PAGE > len(self._heap):
            raise damaged(f"the page reserve's first word {h:#x}")
        w = self._reserve_words(off)
        nxt, count, check = int(w[RV_NEXT]), int(w[RV_COUNT]), int(w[RV_CHECK])
        w.release()
        if (check != _reserve_check(off, nxt, count)
                or not 1 <= count <= len(self._heap) // PAGE or (nxt == 0) != (count == 1)
                or (nxt and ((nxt - 1) % PAGE or nxt - 1 + PAGE > len(self._heap)))):
            raise damaged(f"the page reserve's page at {off:#x} fails its check")
        return off, nxt, count

    def reserved(self) -> int:
        """Pages in the reserve."""
        return self._reserve_head()[2]

    def _reserve_pop(self) -> int:
        """A page taken out of the reserve (its offset), or -1 when it is empty. Lock held."""
        off, nxt, _count = self._reserve_head()
        if off >= 0:
            self._root[D_RESERVE] = nxt  # commit: a crash from here leaks the page
        return off

    def _reserve_push(self, off: int) -> None:
        """Add the kept page block at ``off`` to the reserve. Lock held."""
        nxt = int(self._root[D_RESERVE])
        count = self.reserved() + 1
        w = self._reserve_words(off)
        w[RV_NEXT], w[RV_COUNT], w[RV_CHECK] = nxt, count, _reserve_check(off, nxt, count)
        w.release()
        self._root[D_RESERVE] = off + 1  # commit

    def _reserve_words(self, off: int) -> memoryview:
        return self._heap[off : off + 24].cast("Q")

    def reserve_needed(self, live: int) -> int:
        """Pages the reserve must hold when ``live`` pagesets are in use: a page for every id
        that has none of one of them."""
        return max(0, live * self._ids - int(self._root[D_PAGES]))

    def _scan(self) -> tuple[int, int]:
        """(pagesets in use, the first given-back entry or -1)."""
        live, free = 0, -1
        for ps in range(self.count()):
            if self.entry(ps)[P_CLASS]:
                live += 1
            elif free < 0:
                free = ps
        return live, free

    def free_slots(self) -> int:
        """Free slots of the pagesets in use (those a compaction empties left out)."""
        draining = self._draining()
        free = 0
        for ps in range(self.count()):
            e = self.entry(ps)
            if e[P_CLASS] and ps not in draining:
                free += max(0, PAGE // self.slot_size(e) - int(e[P_TAKEN]))
        return free

    def reservation(self) -> tuple[int, int, int]:
        """(pagesets in use, pages in the reserve, pages it should hold), for ``stats``."""
        live, _free = self._scan()
        return live, self.reserved(), self.reserve_needed(live)

    # -- sums over the ids (the reads) ----------------------------------------------------

    def slot_sum(self, ref: int) -> int | float:
        """Slot ``ref``'s int64 part plus its float64 part, summed over every id
        (``Counter.value``): an int while every float part is zero."""
        ps, slot = split_ref(ref)
        e = self.entry(ps)
        q, d = self._q, self._d
        word = slot * SIZE_CLASSES[int(e[P_CLASS]) - 1] // 8
        total = 0
        fraction = 0.0
        for vcpu in range(self._ids):  # page_offsets inlined: this is Counter.value
            page = e[P_PAGES + vcpu]
            if page:
                w = (page - 1) // 8 + word
                total += q[w]
                if q[w + 1]:  # the float part's bits: 0 is 0.0
                    fraction += d[w + 1]
        return total + fraction if fraction else total

    def slot_copies(self, ref: int) -> list[tuple[int, int, float]]:
        """(id, int64 word, float64 word) of slot ``ref`` in every id's page of it."""
        e, slot, size = self.check_ref(ref)
        q, d = self._q, self._d
        out = []
        for k, page in self.id_pages(e):
            w = (page + slot * size) // 8
            out.append((k, int(q[w]), float(d[w + 1])))
        return out

    def slot_words(self, ref: int, ints: int) -> tuple[list[int], float]:
        """Slot ``ref``'s first ``ints`` int64 words and the float64 word after them, each
        summed over every id (a histogram's bucket counts and sum)."""
        e, slot, size = self.check_ref(ref)
        if ints + 1 > size // 8:
            raise damaged(f"ref {ref:#x}: {ints + 1} words do not fit its {size}-byte slot")
        counts = [0] * ints
        total = 0.0
        for _k, page in self.id_pages(e):
            w = (page + slot * size) // 8
            counts = list(map(operator.add, counts, self._q[w : w + ints].tolist()))
            total += self._d[w + ints]
        return counts, total

    def page_rows(self, ps: int) -> list[tuple[int, list[int], list[float]]]:
        """(id, its page as int64 words, the same as float64 words) of every id with a page
        of pageset ``ps`` (the reads that need each id's copy: live and stamped gauges)."""
        n = PAGE // 8
        out: list[tuple[int, list[int], list[float]]] = []
        for k, page in self.id_pages(self.entry(ps)):
            out.append((k, self._q[page // 8 : page // 8 + n].tolist(),
                        self._d[page // 8 : page // 8 + n].tolist()))  # type: ignore[arg-type]
        return out

    def slot_summary(self, ref: int) -> tuple[int, float]:
        """A Summary slot's (count, sum) over every id."""
        ps, slot = split_ref(ref)
        e = self.entry(ps)
        word = slot * 2
        count, total = 0, 0.0
        for vcpu in range(self._ids):  # page_offsets inlined: this is Summary.value
            page = e[P_PAGES + vcpu]
            if page:
                w = (page - 1) // 8 + word
                count += self._q[w]
                total += self._d[w + 1]
        return count, total

    def sums(self, ps: int, floats: bool) -> tuple[list[int], list[float]]:
        """Per-word sums over ids of pageset ``ps`` as int64 and as float64. ``floats``: every
        float word matters (summaries, histograms); else (counters, gauges: a float part in
        each odd word) the float sums are read only when some odd word is not zero, and are
        zeros otherwise. One page copy per id with a page of it."""
        e = self.entry(ps)
        n = PAGE // 8
        pages = self.page_offsets(e)
        rows_q = [self._q[page // 8 : page // 8 + n].tolist() for page in pages]
        if not rows_q:
            return [0] * n, _ZEROS
        q_sums = list(map(sum, zip(*rows_q, strict=True)))
        if not floats and not any(q_sums[1::2]) and not any(any(r[1::2]) for r in rows_q):
            return q_sums, _ZEROS
        rows_d = [self._d[page // 8 : page // 8 + n].tolist() for page in pages]
        return q_sums, list(map(sum, zip(*rows_d, strict=True)))

    # -- slots ---------------------------------------------------------------------------

    def new(self, cls: int) -> int:
        """Create (or reuse a given-back entry for) a pageset of class ``cls``, its pages
        reserved first (invariant 4: ``DomainFull`` changes nothing). Lock held."""
        r = self._root
        live, ps = self._scan()
        if ps >= 0:
            e = self.entry(ps)
            if e[P_TAKEN] or any(e[P_BITMAP : P_BITMAP + BITMAP_WORDS].tolist()):
                raise damaged(f"pageset {ps} is given back but has slots taken")
        else:
            ps = self.count()
            if ps // PS_PER_CHUNK >= MAX_CHUNKS:
                raise DomainFull(f"the domain already has {ps} pagesets, the most it can "
                                 "describe")
        pages = self._reserve_pages(self.reserve_needed(live + 1) - self.reserved(), cls)
        try:
            chunk = ps // PS_PER_CHUNK
            if r[self._chunks + chunk] == 0:
                nbytes = PS_PER_CHUNK * self._words * 8
                blk = self._alloc(nbytes, "a pageset directory chunk", None)
                self._heap[blk : blk + nbytes] = bytes(nbytes)
                r[self._chunks + chunk] = blk + 1
        except DomainFull:
            for off in pages:
                self._free(off)
            raise
        for off in pages:  # a crash from here leaves the reserve long: harmless
            self._reserve_push(off)
        e = self._entry_view(ps)
        e[P_CLASS] = cls + 1  # commit
        if ps == self.count():
            r[D_PS_COUNT] = ps + 1
        return ps

    def _reserve_pages(self, n: int, cls: int) -> list[int]:
        """``n`` new page blocks (none when ``n <= 0``), or ``DomainFull`` with none kept."""
        pages: list[int] = []
        try:
            for _ in range(n):
                pages.append(self._alloc(PAGE, "a reserved page", PAGE))
        except DomainFull as exc:
            for off in pages:
                self._free(off)
            raise DomainFull(
                f"no room for a new pageset of {SIZE_CLASSES[cls]}-byte slots: it reserves "
                f"{n} pages (a page for each of the {self._ids - 1} ids and the overflow id, "
                "so that every holder can count into every metric), the arena has room for "
                f"{len(pages)} ({exc})") from None
        return pages

    def take(self, cls: int, want: int) -> list[int]:
        """Up to ``want`` free refs of class ``cls``, densest pageset first. Lock held."""
        per_page = slots_per_page(cls)
        best, best_taken = -1, -1
        draining = self._draining()
        for ps in range(self.count()):
            e = self.entry(ps)
            if (e[P_CLASS] == cls + 1 and best_taken < e[P_TAKEN] < per_page
                    and ps not in draining):
                best, best_taken = ps, int(e[P_TAKEN])
        if best < 0:
            best = self.new(cls)
        e = self.entry(best)
        refs: list[int] = []
        for w in range(BITMAP_WORDS):
            if len(refs) == want:
                break
            bits = int(e[P_BITMAP + w])
            for b in range(64):
                slot = w * 64 + b
                if slot >= per_page or len(refs) == want:
                    break
                if not bits >> b & 1:
                    bits |= 1 << b
                    refs.append(make_ref(best, slot))
            e[P_BITMAP + w] = bits
        if not refs:
            raise damaged(f"pageset {best} counts {int(e[P_TAKEN])} slots taken, its bitmap all")
        e[P_TAKEN] += len(refs)
        return refs

    def reserve(self, ref: int) -> None:
        """Take the free slot ``ref`` (compaction's target). Lock held."""
        e, slot, size = self.check_ref(ref)
        if e[P_TAKEN] >= PAGE // size:
            raise damaged(f"a pageset counts {int(e[P_TAKEN])} slots taken")
        e[P_BITMAP + slot // 64] |= 1 << (slot % 64)
        e[P_TAKEN] += 1

    def is_taken(self, ref: int) -> bool:
        """True when slot ``ref`` is taken (in a pageset that exists)."""
        e, slot, _size = self.check_ref(ref)
        return bool(e[P_BITMAP + slot // 64] >> (slot % 64) & 1)

    def give_back(self, refs: list[int]) -> None:
        """Give zeroed slots back to their pagesets (invariant 2). Lock held."""
        for e, slot, _size in [self.check_ref(ref) for ref in refs]:  # all checked first
            bit = 1 << (slot % 64)
            if not e[P_BITMAP + slot // 64] & bit or not e[P_TAKEN]:
                self.double_frees += 1
                continue
            e[P_BITMAP + slot // 64] &= ~bit & 0xFFFFFFFFFFFFFFFF
            e[P_TAKEN] -= 1

    def audit(self) -> tuple[set[int], int, list[str]]:
        """(refs of every taken slot, free slots not zero in some id's copy, problems), for
        ``Domain.check``; a taken count that disagrees with its bitmap is repaired (and said).
        Lock held."""
        taken: set[int] = set()
        dirty = 0
        problems: list[str] = []
        for ps in range(self.count()):
            e = self.entry(ps)
            if not e[P_CLASS]:
                continue
            size = self.slot_size(e)
            cls = SIZE_CLASSES.index(size)
            zero = bytes(size)
            pages = [bytes(self._heap[p : p + PAGE]) for p in self.page_offsets(e)]
            count = 0
            for slot in range(slots_per_page(cls)):
                if e[P_BITMAP + slot // 64] >> (slot % 64) & 1:
                    taken.add(make_ref(ps, slot))
                    count += 1
                elif any(page[slot * size : slot * size + size] != zero for page in pages):
                    dirty += 1
            if count != e[P_TAKEN]:
                problems.append(f"pageset {ps}: {count} slots taken, counter says {e[P_TAKEN]}")
                e[P_TAKEN] = count
        return taken, dirty, problems

    def zero(self, ref: int) -> None:
        """Clear every id's copy of slot ``ref`` (nobody may be using it)."""
        e, slot, size = self.check_ref(ref)
        zero = bytes(size)
        for _k, page in self.id_pages(e):
            off = page + slot * size
            self._heap[off : off + size] = zero
