"""A two-level segregated-fit (TLSF) block allocator over an array of u64 words.

Pure logic: it reads and writes ``words`` (a ``memoryview`` cast to ``'Q'`` over the arena
mapping in production, a plain one over a ``bytearray`` in tests) and makes no OS call. The
caller serialises every method (the arena's lock).

Theory of operation
-------------------
The heap is cut into granules. Every block, used or free, carries a *tag* word at its first
granule and the same word at its last granule (a boundary tag, so ``free`` finds the block
before it in O(1)). Free blocks sit on one of ``FL_COUNT * SL_COUNT`` doubly linked lists, chosen
by size: first level = power of two, second level = which sixteenth of it. Two bitmaps say which
lists are non-empty, so a fit is found with two ``lowest set bit`` operations on Python ints,
whatever the fill: no scan. Links live in the first word of the free block itself (free memory
is the allocator's), as two 32-bit granule indexes.

That good-fit search skips the request's own list (some of its blocks are smaller than the
request), so when it finds nothing ``alloc`` walks that one list for a block large enough, and
an aligned request the padded search cannot serve visits the free blocks large enough. Only a
nearly exhausted arena pays these walks, and they make the promise exact: ``alloc`` returns -1
only when no free block can hold the request (so ``largest_free`` granules can always be had).

Crash safety
------------
Rule 1: the *start* tags, walked from granule 0 by their sizes, always describe a partition of
the heap into blocks. Every mutation prepares the start tags it needs strictly inside the old
extent first and then makes one aligned 8-byte store, the *commit* (the start tag of the
leftmost block it changes). A process killed before the commit leaves the old partition, after
it the new one. No word that is a start tag of the old partition changes before the commit:
in particular a merge writes its new end tag after it, because that word may be the start tag
of a one-granule block being absorbed.

Rule 2: everything else (end tags, lists, bitmaps, the used count) is derived. ``W_OP`` holds the
pid of the operation in progress (the caller sets it; a private arena, which no other process
outlives, sets it only once an operation raised or a fork cut one short: see
``arena._arena``); the next lock holder that finds it non-zero calls :meth:`Tlsf.rebuild`,
which recomputes the derived state from the start tags in one pass.

Rule 3: a tag word is a start tag, an end tag (marked ``TAG_END``; a one-granule block has only
its start tag) or zero. ``free`` zeroes the boundary words it absorbs *after* its commit (before
it they are still start tags of the old partition), and ``rebuild`` zeroes every word inside a
block, so an interrupted operation cannot leave a stale tag behind. Hence :meth:`Tlsf.used_size`
tells in O(1) whether an offset is the start of a live block: a forged or stale offset (inside a
block, on an end tag, on a block freed and coalesced since) is refused, not freed.

Hence a process SIGKILLed inside ``alloc`` or ``free`` costs at most the block it was handling
(which then shows as a used block with a dead owner: ``Arena.check`` finds it).

Untrusted words
---------------
Rule 4: the words come from a file that anything may have written, so no word is used as an
index before it is checked against its bounds, and every operation checks all it reads before
its first store. A list head or link must name a granule of the heap whose tag is a free start
tag (and, where the block is taken, whose end tag matches); a link's neighbour must point back
(the unlink check of a doubly linked list, which also makes every walk end: a list whose back
links agree cannot loop); a bitmap bit must name a list that exists; the used count must stay
within the heap. A check that fails raises :class:`CorruptIndex` with the words unchanged (the
derived state is damaged: :meth:`Tlsf.rebuild` repairs it); broken start tags raise
:class:`CorruptArena` (nothing can repair them).

Cost: the common alloc and free are written out in one function each, their neighbour checks,
unlinks and pushes included (a Python call costs as much as a handful of word reads), and a
split or merge whose remainder stays on the list it was on relinks in place instead of
unlinking and pushing again (found from the top bits of the size: a list above level 0 holds
the sizes whose top SL_LOG2 + 1 bits are the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ._layout import (
    FL_COUNT,
    NIL,
    SL_COUNT,
    SL_LOG2,
    TAG_CACHED,
    TAG_END,
    TAG_OWNER_MAX,
    TAG_OWNER_SHIFT,
    TAG_SIZE_MASK,
    TAG_USED,
    W_FL,
    W_HEADS,
    W_OP,
    W_RECOVERIES,
    W_SL,
    W_USED,
)

_LOW32 = 0xFFFFFFFF
_HIGH32 = 0xFFFFFFFF00000000
_MASK64 = 0xFFFFFFFFFFFFFFFF
_NIL_PREV = NIL << 32  # a link word's "no predecessor" half
_ZEROS = memoryview(bytes(8 * 4096)).cast("Q")  # source for zeroing runs of tag words


def mapping_insert(n: int) -> tuple[int, int]:
    """The (first, second) level list a free block of ``n`` granules is kept on.

    Level 0 holds the exact sizes 0..15; level f >= 1 holds [2**(f+3), 2**(f+4)) in sixteenths.
    """
    if n < SL_COUNT:
        return 0, n
    bl = n.bit_length()
    return bl - SL_LOG2, (n >> (bl - SL_LOG2 - 1)) & (SL_COUNT - 1)


def mapping_search(n: int) -> tuple[int, int]:
    """The first list whose every block holds at least ``n`` granules (round up, then map)."""
    if n >= SL_COUNT:
        n += (1 << (n.bit_length() - SL_LOG2 - 1)) - 1
    return mapping_insert(n)


def lowest_bit(x: int) -> int:
    """Index of the lowest set bit of ``x`` > 0."""
    return (x & -x).bit_length() - 1


def add64(value: int, delta: int) -> int:
    """``value + delta`` wrapped to a u64 (a statistics counter never overflows a word)."""
    return (value + delta) & _MASK64


@dataclass(frozen=True)
class BlockInfo:
    """One block as the tags describe it (granule units)."""

    start: int
    size: int
    used: bool
    owner: int
    cached: bool = False  #: in its owner's per-process cache (TAG_CACHED)


class CorruptArena(Exception):
    """The start tags do not describe a partition: the heap was overwritten from outside."""


class CorruptIndex(CorruptArena):
    """A derived word (list head or link, bitmap, used count) is out of its bounds or disagrees
    with the tags. Raised before anything was written; :meth:`Tlsf.rebuild` repairs it."""


class Tlsf:
    """The allocator state machine over ``words``; see the module docstring for the rules."""

    __slots__ = ("_heap", "_stride", "_tags", "n_granules", "words")

    def __init__(self, words: memoryview, tags_word: int, heap_word: int, granule: int,
                 n_granules: int) -> None:
        self.words = words
        self._tags = tags_word  # word index of granule 0's tag
        self._heap = heap_word  # word index of granule 0's first word
        self._stride = granule // 8  # words per granule
        self.n_granules = n_granules

    # -- set-up --------------------------------------------------------------------------

    def format(self) -> None:
        """Make the whole heap one free block (on a zeroed header)."""
        n = self.n_granules
        self._set_tags(0, n, n)  # a free tag is just the size
        self._clear_index()
        self._push(0, _list_index(n))
        self.words[W_USED] = 0

    def _clear_index(self) -> None:
        w = self.words
        w[W_FL] = 0
        for i in range(FL_COUNT):
            w[W_SL + i] = 0
        for i in range(FL_COUNT * SL_COUNT):
            w[W_HEADS + i] = NIL

    # -- tags ------------------------------------------------------------------------------

    def _set_tags(self, start: int, size: int, tag: int) -> None:
        """Write the start tag (it may be the commit), then the end tag.

        In this order because a merge's new end tag can land on a start tag of the old
        partition (the last absorbed block is one granule long): that word may change only
        once the commit has put it inside the new block. End tags are derived (Rule 2), so
        one missing after a kill is rebuilt. An end tag never carries TAG_CACHED.
        """
        w, t = self.words, self._tags
        w[t + start] = tag
        if size > 1:
            w[t + start + size - 1] = (tag & ~TAG_CACHED) | TAG_END

    def _zero_tags(self, first: int, stop: int) -> None:
        """Zero the tag words of granules ``first``..``stop - 1`` (inside one block: Rule 3)."""
        w, t = self.words, self._tags
        while first < stop:
            k = min(stop - first, len(_ZEROS))
            w[t + first : t + first + k] = _ZEROS[:k]
            first += k

    def tag(self, g: int) -> int:
        """The tag word at granule ``g`` (0 outside the heap)."""
        if not 0 <= g < self.n_granules:
            return 0
        return int(self.words[self._tags + g])

    def set_tag(self, g: int, tag: int) -> None:
        """Store the start tag of the used block at ``g`` (same size; flag and owner bits may
        change, TAG_CACHED included): one aligned store, the end tag is unaffected."""
        self.words[self._tags + g] = tag

    def used_size(self, g: int) -> int:
        """Granules of the used block that starts at granule ``g``; 0 when none starts there.

        O(1) by Rule 3: a start tag is non-zero without ``TAG_END``, and its block's last word
        is the matching end tag. Valid while the index is consistent (``W_OP`` clear).
        """
        if not 0 <= g < self.n_granules:
            return 0
        w, t = self.words, self._tags
        tag = w[t + g]
        if not tag & TAG_USED or tag & TAG_END:
            return 0
        n = tag & TAG_SIZE_MASK
        if not n or g + n > self.n_granules or (
                n > 1 and w[t + g + n - 1] != (tag & ~TAG_CACHED) | TAG_END):
            return 0
        return int(n)

    # -- checked reads (Rule 4) ------------------------------------------------------------

    def _free_size(self, g: int) -> int:
        """Granules of the free block at ``g``, its start and end tags checked (Rule 4)."""
        if not 0 <= g < self.n_granules:
            raise CorruptIndex(f"a free list names granule {g:#x}, outside the heap")
        w, t = self.words, self._tags
        m = int(w[t + g])
        if not 0 < m <= self.n_granules - g or (m > 1 and w[t + g + m - 1] != m | TAG_END):
            raise CorruptIndex(f"a free list names granule {g}, whose tag {m:#x} is not a free "
                               "block's")
        return m

    def _check_node(self, g: int, li: int) -> tuple[int, int]:
        """The (next, prev) links of free block ``g`` on list ``li`` (``fl * SL_COUNT + sl``),
        checked: each neighbour is a free block of the heap that links back to ``g``; with no
        predecessor, ``g`` heads the list."""
        w, t, heap, stride, top = self.words, self._tags, self._heap, self._stride, \
            self.n_granules
        link = w[heap + g * stride]
        nxt, prv = link & _LOW32, link >> 32
        if nxt != NIL and not (nxt < top and 0 < w[t + nxt] <= top - nxt
                               and w[heap + nxt * stride] >> 32 == g):
            raise CorruptIndex(f"free block {g}: its next link {nxt:#x} is not a free block "
                               "that links back")
        if prv == NIL:
            if w[W_HEADS + li] != g:
                raise CorruptIndex(f"free block {g} has no predecessor but does not head its "
                                   f"list {divmod(li, SL_COUNT)}")
        elif not (prv < top and 0 < w[t + prv] <= top - prv
                  and w[heap + prv * stride] & _LOW32 == g):
            raise CorruptIndex(f"free block {g}: its prev link {prv:#x} is not a free block "
                               "that links to it")
        return int(nxt), int(prv)

    def _check_head(self, li: int) -> None:
        """Check the head of list ``li`` (before a push onto it)."""
        w, t, top = self.words, self._tags, self.n_granules
        h = w[W_HEADS + li]
        if h != NIL and not (h < top and 0 < w[t + h] <= top - h
                             and w[self._heap + h * self._stride] >> 32 == NIL):
            raise CorruptIndex(f"list {divmod(li, SL_COUNT)} has head {h:#x}, not a free "
                               "block without a predecessor")

    # -- list stores (after the checks) ---------------------------------------------------

    def _push(self, g: int, li: int) -> None:
        """Push free block ``g`` on the head of list ``li`` (its head checked)."""
        w = self.words
        hi = W_HEADS + li
        head = w[hi]
        w[self._heap + g * self._stride] = head | _NIL_PREV  # next = head, prev = NIL
        if head != NIL:
            k = self._heap + head * self._stride
            w[k] = (w[k] & _LOW32) | (g << 32)
        w[hi] = g
        fl = li >> SL_LOG2
        w[W_SL + fl] |= 1 << (li & (SL_COUNT - 1))
        w[W_FL] |= 1 << fl

    def _unlink(self, g: int, li: int, nxt: int, prv: int) -> None:
        """Unlink free block ``g`` of list ``li`` whose links were checked."""
        w, heap, stride = self.words, self._heap, self._stride
        if nxt != NIL:
            k = heap + nxt * stride
            w[k] = (w[k] & _LOW32) | (prv << 32)
        if prv != NIL:
            k = heap + prv * stride
            w[k] = (w[k] & _HIGH32) | nxt
            return
        w[W_HEADS + li] = nxt
        if nxt == NIL:
            fl = li >> SL_LOG2
            slmap = w[W_SL + fl] & ~(1 << (li & (SL_COUNT - 1)))
            w[W_SL + fl] = slmap
            if not slmap:
                w[W_FL] &= ~(1 << fl) & _MASK64

    def _replace(self, old: int, new: int, nxt: int, prv: int, li: int) -> None:
        """Put free block ``new`` in the place of ``old`` on list ``li`` (checked links
        ``nxt``/``prv``): a merge that stays on its list relinks in place."""
        w, heap, stride = self.words, self._heap, self._stride
        w[heap + new * stride] = nxt | (prv << 32)
        if nxt != NIL:
            k = heap + nxt * stride
            w[k] = (w[k] & _LOW32) | (new << 32)
        if prv != NIL:
            k = heap + prv * stride
            w[k] = (w[k] & _HIGH32) | new
        else:
            w[W_HEADS + li] = new

    # -- the operations ------------------------------------------------------------------

    def alloc(self, n: int, align: int, owner: int) -> int:
        """Allocate ``n`` granules at a granule index that is a multiple of ``align``.

        Returns the granule index, or -1 when no free run can hold the request. The caller
        marks ``W_OP`` (Rule 2). ``owner`` is a pid (0..TAG_OWNER_MAX).
        """
        if not 0 <= owner <= TAG_OWNER_MAX:
            raise ValueError(f"owner {owner} does not fit a tag")
        return self.alloc_tagged(n, align, TAG_USED | owner << TAG_OWNER_SHIFT)

    def alloc_tagged(self, n: int, align: int, tag: int) -> int:
        """:meth:`alloc` with the start tag's flag and owner bits given (``TAG_USED | owner
        << TAG_OWNER_SHIFT``, maybe ``TAG_CACHED``), as the arena computes them once.

        Raises :class:`CorruptIndex` (nothing written) when a word it reads is out of its
        bounds (Rule 4).
        """
        w, t, top = self.words, self._tags, self.n_granules
        used0 = w[W_USED]
        if used0 + n > top:
            if used0 > top:
                raise CorruptIndex(f"used count {used0} exceeds the heap's {top} granules")
            return -1
        if align > 1:
            return self._alloc_aligned(n, align, tag, used0)
        # mapping_search(n), inlined: the first list whose every block holds n granules.
        if n < SL_COUNT:
            fl, sl = 0, n
        else:
            r = n + (1 << (n.bit_length() - SL_LOG2 - 1)) - 1
            bl = r.bit_length()
            fl, sl = bl - SL_LOG2, (r >> (bl - SL_LOG2 - 1)) & (SL_COUNT - 1)
        slmap = w[W_SL + fl] & (-1 << sl)
        if not slmap:
            flmap = w[W_FL] & (-1 << (fl + 1))
            if not flmap:
                return self._alloc_from_own_list(n, tag, used0)
            fl = (flmap & -flmap).bit_length() - 1
            if fl >= FL_COUNT:
                raise CorruptIndex(f"first-level bitmap {w[W_FL]:#x} names list {fl}")
            slmap = w[W_SL + fl]
        sl = (slmap & -slmap).bit_length() - 1  # >= 0: slmap is not 0
        if sl >= SL_COUNT:
            raise CorruptIndex(f"second-level bitmap {fl} ({w[W_SL + fl]:#x}) names no list")
        hi = W_HEADS + (fl << SL_LOG2) + sl
        g = w[hi]
        # Rule 4: the head is a free block of the heap, large enough, without a predecessor,
        # and its successor links back to it.
        if g >= top:
            raise CorruptIndex(f"list ({fl}, {sl}) is marked non-empty but its head is {g:#x}")
        tg = t + g
        m = w[tg]
        if not n <= m <= top - g or (m > 1 and w[tg + m - 1] != m | TAG_END):
            raise CorruptIndex(f"list ({fl}, {sl}) head {g}: tag {m:#x} is not a free block "
                               f"of at least {n} granules")
        heap, stride = self._heap, self._stride
        link = w[heap + g * stride]
        if link < _NIL_PREV:  # its prev half is not NIL
            raise CorruptIndex(f"list ({fl}, {sl}) head {g} has a predecessor")
        nxt = link & _LOW32
        if nxt != NIL and not (nxt < top and 0 < w[t + nxt] <= top - nxt
                               and w[heap + nxt * stride] >> 32 == g):
            raise CorruptIndex(f"free block {g}: its next link {nxt:#x} is not a free block "
                               "that links back")
        rest = m - n
        r = g + n
        if rest and fl and rest >> (fl - 1) == SL_COUNT + sl:
            # The rest stays on this list (the list (fl, sl) holds the sizes whose top bits
            # are 1 sl, fl >= 1): it takes g's place, with g's links (no bitmap change).
            w[t + r] = rest
            w[tg + m - 1] = rest | TAG_END  # rest >= SL_COUNT > 1
            w[tg] = n | tag  # commit
            if n > 1:
                w[t + r - 1] = n | (tag & ~TAG_CACHED) | TAG_END
            w[heap + r * stride] = link
            if nxt != NIL:
                k = heap + nxt * stride
                w[k] = (w[k] & _LOW32) | (r << 32)
            w[hi] = r
            w[W_USED] = used0 + n
            return g
        if rest:
            if rest < SL_COUNT:  # mapping_insert(rest), inlined
                fl2, sl2 = 0, rest
            else:
                bl = rest.bit_length()
                fl2, sl2 = bl - SL_LOG2, (rest >> (bl - SL_LOG2 - 1)) & (SL_COUNT - 1)
            hi2 = W_HEADS + (fl2 << SL_LOG2) + sl2
            h2 = w[hi2]
            # The head the rest goes in front of: a free block without a predecessor, and
            # not g itself (a damaged index that names g twice would link into the block).
            if h2 != NIL and not (h2 < top and h2 != g and 0 < w[t + h2] <= top - h2
                                  and w[heap + h2 * stride] >= _NIL_PREV):
                raise CorruptIndex(f"list ({fl2}, {sl2}) has head {h2:#x}, not a free block "
                                   "without a predecessor")
        # Unlink g (it heads its list), then write the tags and push the rest.
        if nxt != NIL:
            k = heap + nxt * stride
            w[k] = (w[k] & _LOW32) | _NIL_PREV
        w[hi] = nxt
        if nxt == NIL:
            slmap = w[W_SL + fl] & ~(1 << sl)
            w[W_SL + fl] = slmap
            if not slmap:
                w[W_FL] &= ~(1 << fl) & _MASK64
        if rest:
            w[t + r] = rest
            if rest > 1:
                w[tg + m - 1] = rest | TAG_END
        w[tg] = n | tag  # commit
        if n > 1:
            w[t + r - 1] = n | (tag & ~TAG_CACHED) | TAG_END
        if rest:  # _push(r, hi2 - W_HEADS), inlined (its head h2 was checked above)
            w[heap + r * stride] = h2 | _NIL_PREV
            if h2 != NIL:
                k = heap + h2 * stride
                w[k] = (w[k] & _LOW32) | (r << 32)
            w[hi2] = r
            w[W_SL + fl2] |= 1 << sl2
            w[W_FL] |= 1 << fl2
        w[W_USED] = used0 + n
        return g

    def _alloc_from_own_list(self, n: int, tag: int, used0: int) -> int:
        """The good-fit search starts one list above ``n``'s own; when that found nothing,
        walk ``n``'s own list for a block large enough (only a nearly full arena comes here)."""
        fl, sl = mapping_insert(n)
        for g, m in self._walk(fl, sl):
            if m >= n:
                return self._carve(g, m, 0, n, tag, used0)
        return -1

    def _alloc_aligned(self, n: int, align: int, tag: int, used0: int) -> int:
        """An aligned allocation: O(1) through the padded request; when that fails (an
        alignment close to the heap size), visit the free blocks large enough."""
        w = self.words
        fl, sl = mapping_search(n + align - 1)
        if fl < FL_COUNT:
            slmap = w[W_SL + fl] & (-1 << sl)
            if not slmap:
                flmap = w[W_FL] & (-1 << (fl + 1))
                fl = lowest_bit(flmap) if flmap else FL_COUNT
                slmap = w[W_SL + fl] if fl < FL_COUNT else 0
            if slmap:
                sl = lowest_bit(slmap)
                if sl >= SL_COUNT:
                    raise CorruptIndex(f"second-level bitmap {fl} ({slmap:#x}) names no list")
                g = int(w[W_HEADS + fl * SL_COUNT + sl])
                m = self._free_size(g)
                if m < n + align - 1:
                    raise CorruptIndex(f"list ({fl}, {sl}) holds block {g} of only {m} "
                                       "granules")
                return self._carve(g, m, -g % align, n, tag, used0)
            if fl >= FL_COUNT and w[W_FL] >> FL_COUNT:
                raise CorruptIndex(f"first-level bitmap {w[W_FL]:#x} names lists that do "
                                   "not exist")
        for g, m in self._free_blocks(min_size=n):
            gap = -g % align
            if gap + n <= m:
                return self._carve(g, m, gap, n, tag, used0)
        return -1

    def _carve(self, g: int, m: int, gap: int, n: int, tag: int, used0: int) -> int:
        """Take ``n`` granules at ``g + gap`` out of free block ``g`` of ``m`` (the general,
        colder path: any place in a list, a gap before it). Checks first, then stores."""
        li = _list_index(m)
        nxt, prv = self._check_node(g, li)
        rest = m - gap - n
        a = g + gap
        gli, rli = _list_index(gap), _list_index(rest)
        if gap:
            self._check_head(gli)
        if rest:
            self._check_head(rli)
        w = self.words
        self._unlink(g, li, nxt, prv)
        # Prepare every tag inside the old extent, then commit with the leftmost start tag.
        if rest:
            self._set_tags(a + n, rest, rest)
        used = n | tag
        if gap:
            self._set_tags(a, n, used)
            self._set_tags(g, gap, gap)  # commit
            self._push(g, gli)
        else:
            self._set_tags(a, n, used)  # commit
        if rest:
            self._push(a + n, rli)
        w[W_USED] = used0 + n
        return a

    def free(self, g: int, n: int = 0, bits: int = -1) -> int:
        """Free the used block at ``g``; coalesce with free neighbours. Returns its size in
        granules, or 0 (nothing changed) when no used block of ``n`` granules (any size when
        ``n`` is 0) starts at ``g``, or its start tag's flag and owner bits are not ``bits``
        (any when -1).

        Raises :class:`CorruptIndex`, nothing written, when a neighbour or list word read is
        out of its bounds (Rule 4).
        """
        w, t, top = self.words, self._tags, self.n_granules
        if not 0 <= g < top:
            return 0
        tg = t + g
        tag = w[tg]
        size = tag & TAG_SIZE_MASK
        if (not tag & TAG_USED or tag & TAG_END or not size or (n and size != n)
                or g + size > top
                or (size > 1 and w[tg + size - 1] != (tag & ~TAG_CACHED) | TAG_END)
                or (bits >= 0 and tag & ~TAG_SIZE_MASK != bits)):
            return 0
        n = size
        used0 = w[W_USED]
        if used0 < n or used0 > top:
            raise CorruptIndex(f"used count {used0} cannot hold a used block of {n} granules")
        heap, stride = self._heap, self._stride
        # The free neighbours, each checked (Rule 4) before anything is written; the list
        # index of a size (mapping_insert) is inlined for each.
        nxt = g + n
        nn = nli = ns = nq = n_next = n_prev = 0
        if nxt < top:
            nn = w[tg + n]
            if nn & TAG_USED:
                nn = 0
            else:
                if not 0 < nn <= top - nxt or (nn > 1 and w[tg + n + nn - 1] != nn | TAG_END):
                    raise CorruptIndex(f"granule {nxt} after block {g}: tag {nn:#x} is not "
                                       "a block's start")
                if nn < SL_COUNT:
                    nli = nn
                else:  # its top SL_LOG2 + 1 bits nq name the list: fl = ns + 1, sl = nq - 16
                    ns = nn.bit_length() - SL_LOG2 - 1
                    nq = nn >> ns
                    nli = (ns << SL_LOG2) + nq
                # _check_node(nxt, nli), inlined: its neighbours link back to it.
                link = w[heap + nxt * stride]
                n_next, n_prev = link & _LOW32, link >> 32
                if n_next != NIL and not (n_next < top and 0 < w[t + n_next] <= top - n_next
                                          and w[heap + n_next * stride] >> 32 == nxt):
                    raise CorruptIndex(f"free block {nxt}: its next link {n_next:#x} is not "
                                       "a free block that links back")
                if n_prev == NIL:
                    if w[W_HEADS + nli] != nxt:
                        raise CorruptIndex(f"free block {nxt} has no predecessor but does not "
                                           f"head its list {divmod(nli, SL_COUNT)}")
                elif not (n_prev < top and 0 < w[t + n_prev] <= top - n_prev
                          and w[heap + n_prev * stride] & _LOW32 == nxt):
                    raise CorruptIndex(f"free block {nxt}: its prev link {n_prev:#x} is not a "
                                       "free block that links to it")
        total = n + nn
        pn = pli = ps = pq = 0
        start = g
        if g:
            ptag = w[tg - 1]
            if not ptag & TAG_USED:
                pn = ptag & TAG_SIZE_MASK
                start = g - pn
                if (not 0 < pn <= g or ptag != (pn | TAG_END if pn > 1 else pn)
                        or w[t + start] != pn):
                    raise CorruptIndex(f"granule {g - 1} before block {g}: tag {ptag:#x} is "
                                       "not a free block's end")
                if pn < SL_COUNT:
                    pli = pn
                else:
                    ps = pn.bit_length() - SL_LOG2 - 1
                    pq = pn >> ps
                    pli = (ps << SL_LOG2) + pq
                total += pn
        # Whether the merged block stays on its neighbour's list: level 0 holds one size a
        # list (it never does); above, a list holds the sizes with the same top SL_LOG2 + 1
        # bits.
        if not pn:
            if nn >= SL_COUNT and total >> ns == nq:
                # Merged with the free block after: g takes its list place and its links
                # (_replace inlined), so only the neighbours' words change.
                w[tg] = total  # commit
                w[tg + total - 1] = total | TAG_END
                if n > 1:
                    w[tg + n - 1] = 0
                w[tg + n] = 0  # nn > 1: Rule 3, the old boundary is inside the block now
                w[heap + g * stride] = link
                if n_next != NIL:
                    k = heap + n_next * stride
                    w[k] = (w[k] & _LOW32) | (g << 32)
                if n_prev != NIL:
                    k = heap + n_prev * stride
                    w[k] = (w[k] & _HIGH32) | g
                else:
                    w[W_HEADS + nli] = g
                w[W_USED] = used0 - n
                return n
        elif not nn and pn >= SL_COUNT and total >> ps == pq:
            # Merged into the free block before: its list place, links and start stay (so its
            # links are not read).
            w[t + start] = total  # commit
            w[tg + n - 1] = total | TAG_END
            if n > 1:
                w[tg] = 0
            w[tg - 1] = 0  # pn > 1: Rule 3, the old boundary is inside the block now
            w[W_USED] = used0 - n
            return n
        p_next = p_prev = 0
        if pn:
            p_next, p_prev = self._check_node(start, pli)
        if total < SL_COUNT:
            tli = total
        else:
            bl = total.bit_length()
            tli = (bl - SL_LOG2) * SL_COUNT + ((total >> (bl - SL_LOG2 - 1)) & 15)
        th = w[W_HEADS + tli]  # _check_head(tli), inlined
        if th != NIL and not (th < top and 0 < w[t + th] <= top - th
                              and w[heap + th * stride] >> 32 == NIL):
            raise CorruptIndex(f"list {divmod(tli, SL_COUNT)} has head {th:#x}, not a free "
                               "block without a predecessor")
        if nn:  # _unlink(nxt, nli, n_next, n_prev), inlined
            if n_next != NIL:
                k = heap + n_next * stride
                w[k] = (w[k] & _LOW32) | (n_prev << 32)
            if n_prev != NIL:
                k = heap + n_prev * stride
                w[k] = (w[k] & _HIGH32) | n_next
            else:
                w[W_HEADS + nli] = n_next
                if n_next == NIL:
                    fl = nli >> SL_LOG2
                    slmap = w[W_SL + fl] & ~(1 << (nli & (SL_COUNT - 1)))
                    w[W_SL + fl] = slmap
                    if not slmap:
                        w[W_FL] &= ~(1 << fl) & _MASK64
        if pn:
            if nn:  # the unlink above may have changed start's links: take them again
                link = w[heap + start * stride]
                p_next, p_prev = link & _LOW32, link >> 32
            self._unlink(start, pli, p_next, p_prev)
        w[t + start] = total  # commit
        if total > 1:
            w[t + start + total - 1] = total | TAG_END
        # Rule 3: the boundary words absorbed by the merge are now inside the block (those
        # of g - 1, g, g + n - 1 and g + n strictly inside it; its end tag stays).
        if pn:
            if pn > 1:
                w[tg - 1] = 0
            if n > 1 or nn:
                w[tg] = 0
        if nn:
            if n > 1:
                w[tg + n - 1] = 0
            if nn > 1:
                w[tg + n] = 0
        # _push(start, tli), inlined (its head th was checked above; taken again, as the
        # unlinks may have changed it)
        hi = W_HEADS + tli
        th = w[hi]
        w[heap + start * stride] = th | _NIL_PREV
        if th != NIL:
            k = heap + th * stride
            w[k] = (w[k] & _LOW32) | (start << 32)
        w[hi] = start
        fl = tli >> SL_LOG2
        w[W_SL + fl] |= 1 << (tli & (SL_COUNT - 1))
        w[W_FL] |= 1 << fl
        w[W_USED] = used0 - n
        return n

    def merged_extent(self, g: int, n: int) -> tuple[int, int]:
        """``(start, stop)`` granules of the free block that freeing the used block of ``n``
        granules at ``g`` would make, its free neighbours joined; ``(g, g)`` when no such
        used block starts at ``g``. Reads the tags as :meth:`free` does, checked the same way
        (:class:`CorruptIndex`), and writes nothing."""
        if self.used_size(g) != n:
            return g, g
        w, t, top = self.words, self._tags, self.n_granules
        start, stop = g, g + n
        if stop < top:
            nn = w[t + stop]
            if not nn & TAG_USED:
                if not 0 < nn <= top - stop or (nn > 1 and w[t + stop + nn - 1] != nn | TAG_END):
                    raise CorruptIndex(f"granule {stop} after block {g}: tag {nn:#x} is not a "
                                       "block's start")
                stop += nn
        if g:
            ptag = w[t + g - 1]
            if not ptag & TAG_USED:
                pn = ptag & TAG_SIZE_MASK
                if (not 0 < pn <= g or ptag != (pn | TAG_END if pn > 1 else pn)
                        or w[t + g - pn] != pn):
                    raise CorruptIndex(f"granule {g - 1} before block {g}: tag {ptag:#x} is "
                                       "not a free block's end")
                start = g - pn
        return start, stop

    def set_owner(self, g: int, owner: int) -> None:
        """Record ``owner`` in the used block at ``g`` (both tags; one store each); clears
        TAG_CACHED."""
        if not 0 <= owner <= TAG_OWNER_MAX:
            raise ValueError(f"owner {owner} does not fit a tag")
        w, t = self.words, self._tags
        tag = w[t + g]
        new = (tag & (TAG_USED | TAG_SIZE_MASK)) | (owner << TAG_OWNER_SHIFT)
        self._set_tags(g, tag & TAG_SIZE_MASK, new)

    # -- inspection and recovery ---------------------------------------------------------

    def blocks(self) -> Iterator[BlockInfo]:
        """Walk the start tags from granule 0 (Rule 1). Raises CorruptArena on a bad size."""
        w, t, end = self.words, self._tags, self.n_granules
        g = 0
        while g < end:
            tag = w[t + g]
            n = tag & TAG_SIZE_MASK
            if n == 0 or g + n > end or tag & TAG_END:
                raise CorruptArena(f"granule {g}: tag {tag:#x} does not fit the heap")
            yield BlockInfo(g, int(n), bool(tag & TAG_USED),
                            int(tag >> TAG_OWNER_SHIFT & TAG_OWNER_MAX), bool(tag & TAG_CACHED))
            g += n

    def _walk(self, fl: int, sl: int) -> Iterator[tuple[int, int]]:
        """Every block on list (fl, sl) as (start, size), each checked (Rule 4): a free block
        whose back link names the block before it, so the walk ends."""
        w, heap, stride = self.words, self._heap, self._stride
        g, prev = w[W_HEADS + fl * SL_COUNT + sl], NIL
        while g != NIL:
            m = self._free_size(g)
            link = w[heap + g * stride]
            if link >> 32 != prev:
                raise CorruptIndex(f"list ({fl}, {sl}): free block {g} links back to "
                                   f"{link >> 32:#x}, not {prev:#x}")
            yield int(g), m
            g, prev = link & _LOW32, g

    def _free_blocks(self, min_size: int = 1) -> Iterator[tuple[int, int]]:
        """Every block on the lists that may hold ``min_size`` granules, as (start, size)."""
        w = self.words
        fl0, _ = mapping_insert(min_size)
        flmap = w[W_FL] & (-1 << fl0) & ((1 << FL_COUNT) - 1)
        while flmap:
            fl = lowest_bit(flmap)
            flmap &= flmap - 1
            slmap = w[W_SL + fl] & ((1 << SL_COUNT) - 1)
            while slmap:
                sl = lowest_bit(slmap)
                slmap &= slmap - 1
                for g, size in self._walk(fl, sl):
                    if size >= min_size:
                        yield g, size

    def largest_free(self) -> int:
        """Granules in the largest free block: the top non-empty list, searched."""
        w = self.words
        flmap = w[W_FL]
        if not flmap:
            return 0
        fl = flmap.bit_length() - 1
        if fl >= FL_COUNT:
            raise CorruptIndex(f"first-level bitmap {flmap:#x} names list {fl}")
        sl = w[W_SL + fl].bit_length() - 1
        if not 0 <= sl < SL_COUNT:
            raise CorruptIndex(f"second-level bitmap {fl} ({w[W_SL + fl]:#x}) names no list")
        return max((m for _, m in self._walk(fl, sl)), default=0)

    def used_count(self) -> int:
        """Granules in used blocks, as the header counts them (checked against the heap)."""
        used = int(self.words[W_USED])
        if used > self.n_granules:
            raise CorruptIndex(f"used count {used} exceeds the heap's {self.n_granules} "
                               "granules")
        return used

    def rebuild(self) -> None:
        """Recompute the derived state from the start tags (Rule 2); merges adjacent free runs
        and zeroes every word inside a block (Rule 3). Itself safe to interrupt: it changes a
        start tag only to commit a merge, and zeroes a word only once it is inside a block. A
        used block's start tag is never written (its owner may change TAG_CACHED on it).

        Raises CorruptArena, nothing written, when the start tags themselves are broken.
        """
        blocks = list(self.blocks())
        self._clear_index()
        w, t = self.words, self._tags
        used = 0
        run_start, run_size = -1, 0
        for b in blocks:
            if b.used:
                if run_size:
                    self._set_tags(run_start, run_size, run_size)
                    self._zero_tags(run_start + 1, run_start + run_size - 1)
                    self._push(run_start, _list_index(run_size))
                    run_size = 0
                if b.size > 1:
                    w[t + b.start + b.size - 1] = (w[t + b.start] & ~TAG_CACHED) | TAG_END
                self._zero_tags(b.start + 1, b.start + b.size - 1)
                used += b.size
            elif run_size:
                run_size += b.size
            else:
                run_start, run_size = b.start, b.size
        if run_size:
            self._set_tags(run_start, run_size, run_size)
            self._zero_tags(run_start + 1, run_start + run_size - 1)
            self._push(run_start, _list_index(run_size))
        w[W_USED] = used
        w[W_RECOVERIES] = add64(w[W_RECOVERIES], 1)
        w[W_OP] = 0

    def problems(self) -> list[str]:
        """Every disagreement between the derived state and the start tags (empty when sound).

        An expensive no-op when all is well: a full walk of tags and lists.
        """
        out: list[str] = []
        try:
            blocks = list(self.blocks())
        except CorruptArena as exc:
            return [str(exc)]
        w, t = self.words, self._tags
        free_starts: dict[int, int] = {}
        used = 0
        prev_free = False
        for b in blocks:
            start_tag = w[t + b.start]
            end_tag = w[t + b.start + b.size - 1]
            if b.size > 1 and end_tag != (start_tag & ~TAG_CACHED) | TAG_END:
                out.append(f"block at granule {b.start}: end tag {end_tag:#x} does not match "
                           f"start tag {start_tag:#x}")
            if b.size > 2:
                inside = w[t + b.start + 1 : t + b.start + b.size - 1].tobytes()
                if inside.count(0) != len(inside):
                    out.append(f"block at granule {b.start}: a stale tag inside it")
            if b.used:
                used += b.size
                prev_free = False
            else:
                if start_tag != b.size:
                    out.append(f"free block at granule {b.start}: flags in its tag "
                               f"{start_tag:#x}")
                if prev_free:
                    out.append(f"free block at granule {b.start} follows a free block")
                prev_free = True
                free_starts[b.start] = b.size
        if w[W_USED] != used:
            out.append(f"used count {w[W_USED]} != {used} granules in used blocks")
        if w[W_FL] >> FL_COUNT:
            out.append(f"first-level bitmap {w[W_FL]:#x} names lists that do not exist")
        listed: dict[int, int] = {}
        for fl in range(FL_COUNT):
            if w[W_SL + fl] >> SL_COUNT:
                out.append(f"second-level bitmap {fl} ({w[W_SL + fl]:#x}) names lists that "
                           "do not exist")
            for sl in range(SL_COUNT):
                g = w[W_HEADS + fl * SL_COUNT + sl]
                bit = bool(w[W_SL + fl] >> sl & 1)
                if bit != (g != NIL):
                    out.append(f"list ({fl}, {sl}): bitmap bit {bit} but head {g:#x}")
                prev, steps = NIL, 0
                while g != NIL and steps <= len(blocks):
                    size = free_starts.get(int(g))
                    if size is None or int(g) in listed:
                        out.append(f"list ({fl}, {sl}) holds granule {g}, not a free block "
                                   "(or one already listed)")
                        break
                    if mapping_insert(size) != (fl, sl):
                        out.append(f"free block {g} of {size} is on list ({fl}, {sl})")
                    link = w[self._heap + g * self._stride]
                    if link >> 32 != prev:
                        out.append(f"free block {g}: back link {link >> 32:#x} != {prev:#x}")
                    listed[int(g)] = size
                    prev, g = g, link & _LOW32
                    steps += 1
            if bool(w[W_FL] >> fl & 1) != bool(w[W_SL + fl] & ((1 << SL_COUNT) - 1)):
                out.append(f"first-level bit {fl} disagrees with its second-level map")
        if listed.keys() != free_starts.keys():
            out.append(f"{len(free_starts)} free blocks but {len(listed)} listed")
        return out


def _list_index(n: int) -> int:
    """``fl * SL_COUNT + sl`` of the list a free block of ``n`` granules is kept on."""
    fl, sl = mapping_insert(n)
    return fl * SL_COUNT + sl
