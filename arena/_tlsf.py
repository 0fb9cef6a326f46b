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
pid of the operation in progress; the next lock holder that finds it non-zero calls
:meth:`Tlsf.rebuild`, which recomputes the derived state from the start tags in one pass.

Rule 3: a tag word is a start tag, an end tag (marked ``TAG_END``; a one-granule block has only
its start tag) or zero. ``free`` zeroes the boundary words it absorbs *after* its commit (before
it they are still start tags of the old partition), and ``rebuild`` zeroes every word inside a
block, so an interrupted operation cannot leave a stale tag behind. Hence :meth:`Tlsf.used_size`
tells in O(1) whether an offset is the start of a live block: a forged or stale offset (inside a
block, on an end tag, on a block freed and coalesced since) is refused, not freed.

Hence a process SIGKILLed inside ``alloc`` or ``free`` costs at most the block it was handling
(which then shows as a used block with a dead owner: ``Arena.check`` finds it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ._layout import (
    FL_COUNT,
    NIL,
    SL_COUNT,
    SL_LOG2,
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


@dataclass(frozen=True)
class BlockInfo:
    """One block as the tags describe it (granule units)."""

    start: int
    size: int
    used: bool
    owner: int


class CorruptArena(Exception):
    """The start tags do not describe a partition: the heap was overwritten from outside."""


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
        self._insert(0, n)
        self.words[W_USED] = 0

    def _clear_index(self) -> None:
        w = self.words
        w[W_FL] = 0
        for i in range(FL_COUNT):
            w[W_SL + i] = 0
        for i in range(FL_COUNT * SL_COUNT):
            w[W_HEADS + i] = NIL

    # -- tags and links ------------------------------------------------------------------

    def _set_tags(self, start: int, size: int, tag: int) -> None:
        """Write the start tag (it may be the commit), then the end tag.

        In this order because a merge's new end tag can land on a start tag of the old
        partition (the last absorbed block is one granule long): that word may change only
        once the commit has put it inside the new block. End tags are derived (Rule 2), so
        one missing after a kill is rebuilt.
        """
        w, t = self.words, self._tags
        w[t + start] = tag
        if size > 1:
            w[t + start + size - 1] = tag | TAG_END

    def _zero_tags(self, first: int, stop: int) -> None:
        """Zero the tag words of granules ``first``..``stop - 1`` (inside one block: Rule 3)."""
        w, t = self.words, self._tags
        while first < stop:
            k = min(stop - first, len(_ZEROS))
            w[t + first : t + first + k] = _ZEROS[:k]
            first += k

    def tag(self, g: int) -> int:
        """The tag word at granule ``g``."""
        return int(self.words[self._tags + g])

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
        if g + n > self.n_granules or (n > 1 and w[t + g + n - 1] != tag | TAG_END):
            return 0
        return int(n)

    def _insert(self, g: int, n: int) -> None:
        """Push free block ``g`` of ``n`` granules on the head of its list."""
        w = self.words
        if n < SL_COUNT:  # mapping_insert(n), inlined: every alloc and free comes here
            fl, sl = 0, n
        else:
            bl = n.bit_length()
            fl, sl = bl - SL_LOG2, (n >> (bl - SL_LOG2 - 1)) & (SL_COUNT - 1)
        hi = W_HEADS + fl * SL_COUNT + sl
        head = w[hi]
        w[self._heap + g * self._stride] = head | (NIL << 32)  # next = head, prev = NIL
        if head != NIL:
            li = self._heap + head * self._stride
            w[li] = (w[li] & _LOW32) | (g << 32)
        w[hi] = g
        w[W_SL + fl] |= 1 << sl
        w[W_FL] |= 1 << fl

    def _remove(self, g: int, n: int) -> None:
        """Unlink free block ``g`` of ``n`` granules from its list."""
        w, heap, stride = self.words, self._heap, self._stride
        link = w[heap + g * stride]
        nxt, prv = link & _LOW32, link >> 32
        if nxt != NIL:
            li = heap + nxt * stride
            w[li] = (w[li] & _LOW32) | (prv << 32)
        if prv != NIL:
            li = heap + prv * stride
            w[li] = (w[li] & _HIGH32) | nxt
        else:
            if n < SL_COUNT:  # mapping_insert(n), inlined
                fl, sl = 0, n
            else:
                bl = n.bit_length()
                fl, sl = bl - SL_LOG2, (n >> (bl - SL_LOG2 - 1)) & (SL_COUNT - 1)
            w[W_HEADS + fl * SL_COUNT + sl] = nxt
            if nxt == NIL:
                slmap = w[W_SL + fl] & ~(1 << sl)
                w[W_SL + fl] = slmap
                if not slmap:
                    w[W_FL] &= ~(1 << fl) & _MASK64

    def _find(self, n: int) -> int:
        """Head of the first non-empty list whose blocks all hold ``n`` granules, or NIL."""
        w = self.words
        fl, sl = mapping_search(n)
        if fl >= FL_COUNT:
            return NIL
        slmap = w[W_SL + fl] & (-1 << sl)
        if not slmap:
            flmap = w[W_FL] & (-1 << (fl + 1))
            if not flmap:
                return NIL
            fl = (flmap & -flmap).bit_length() - 1  # lowest set bit, inlined
            slmap = w[W_SL + fl]
        return int(w[W_HEADS + fl * SL_COUNT + (slmap & -slmap).bit_length() - 1])

    # -- the operations ------------------------------------------------------------------

    def alloc(self, n: int, align: int, owner: int) -> int:
        """Allocate ``n`` granules at a granule index that is a multiple of ``align``.

        Returns the granule index, or -1 when no free run can hold the request. ``W_OP`` must
        be set by the caller around the call. ``owner`` is a pid (0..TAG_OWNER_MAX).
        """
        if not 0 <= owner <= TAG_OWNER_MAX:
            raise ValueError(f"owner {owner} does not fit a tag")
        w, t = self.words, self._tags
        if align <= 1:
            g = self._find(n)
            if g == NIL:
                g = self._find_in_own_list(n)
                if g == NIL:
                    return -1
            gap = 0
        else:
            g, gap = self._find_aligned(n, align)
            if g < 0:
                return -1
        m = w[t + g] & TAG_SIZE_MASK
        self._remove(g, m)
        a = g + gap
        rest = m - gap - n
        used = n | TAG_USED | (owner << TAG_OWNER_SHIFT)
        # Prepare every tag inside the old extent, then commit with the leftmost start tag.
        if rest:
            self._set_tags(a + n, rest, rest)
        if gap:
            self._set_tags(a, n, used)
            self._set_tags(g, gap, gap)  # commit
            self._insert(g, gap)
        else:
            self._set_tags(a, n, used)  # commit
        if rest:
            self._insert(a + n, rest)
        w[W_USED] += n
        return a

    def _find_in_own_list(self, n: int) -> int:
        """A block of at least ``n`` granules on the list that ``n`` itself maps to, or NIL.

        The good-fit search starts one list higher; this walk runs only when that failed.
        """
        w, t, heap, stride = self.words, self._tags, self._heap, self._stride
        fl, sl = mapping_insert(n)
        if fl >= FL_COUNT:
            return NIL
        g = w[W_HEADS + fl * SL_COUNT + sl]
        while g != NIL:
            if w[t + g] & TAG_SIZE_MASK >= n:
                return int(g)
            g = w[heap + g * stride] & _LOW32
        return NIL

    def _find_aligned(self, n: int, align: int) -> tuple[int, int]:
        """A free block able to hold ``n`` granules at an ``align`` boundary: (start, gap).

        O(1) through the padded request; when that fails (an alignment close to the heap size),
        falls back to visiting the free blocks large enough, which only such requests pay.
        """
        g = self._find(n + align - 1)
        if g != NIL:
            return g, -g % align
        for start, size in self._free_blocks(min_size=n):
            gap = -start % align
            if gap + n <= size:
                return start, gap
        return -1, 0

    def free(self, g: int) -> int:
        """Free the used block at ``g``; coalesce with free neighbours. Returns its size."""
        w, t = self.words, self._tags
        n = w[t + g] & TAG_SIZE_MASK
        size = n
        start = g
        nxt = g + n
        if nxt < self.n_granules:
            ntag = w[t + nxt]
            if not ntag & TAG_USED:
                nn = ntag & TAG_SIZE_MASK
                self._remove(nxt, nn)
                size += nn
        if g:
            ptag = w[t + g - 1]
            if not ptag & TAG_USED:
                pn = ptag & TAG_SIZE_MASK
                start = g - pn
                self._remove(start, pn)
                size += pn
        self._set_tags(start, size, size)  # commit
        # Rule 3: the boundary words absorbed by the merge are now inside the block.
        for c in (g - 1, g, g + n - 1, g + n):
            if start < c < start + size - 1:
                w[t + c] = 0
        self._insert(start, size)
        w[W_USED] -= n
        return int(n)

    def set_owner(self, g: int, owner: int) -> None:
        """Record ``owner`` in the used block at ``g`` (both tags; one store each)."""
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
                            int(tag >> TAG_OWNER_SHIFT & TAG_OWNER_MAX))
            g += n

    def _free_blocks(self, min_size: int = 1) -> Iterator[tuple[int, int]]:
        """Every block on the lists that may hold ``min_size`` granules, as (start, size)."""
        w, t, heap, stride = self.words, self._tags, self._heap, self._stride
        fl0, _ = mapping_insert(min_size)
        flmap = w[W_FL] & (-1 << fl0)
        while flmap:
            fl = lowest_bit(flmap)
            flmap &= flmap - 1
            slmap = w[W_SL + fl]
            while slmap:
                sl = lowest_bit(slmap)
                slmap &= slmap - 1
                g = w[W_HEADS + fl * SL_COUNT + sl]
                while g != NIL:
                    size = w[t + g] & TAG_SIZE_MASK
                    if size >= min_size:
                        yield int(g), int(size)
                    g = w[heap + g * stride] & _LOW32

    def largest_free(self) -> int:
        """Granules in the largest free block: the top non-empty list, searched."""
        w = self.words
        flmap = w[W_FL]
        if not flmap:
            return 0
        fl = flmap.bit_length() - 1
        sl = w[W_SL + fl].bit_length() - 1
        g = w[W_HEADS + fl * SL_COUNT + sl]
        best = 0
        while g != NIL:
            best = max(best, w[self._tags + g] & TAG_SIZE_MASK)
            g = w[self._heap + g * self._stride] & _LOW32
        return int(best)

    def rebuild(self) -> None:
        """Recompute the derived state from the start tags (Rule 2); merges adjacent free runs
        and zeroes every word inside a block (Rule 3). Itself safe to interrupt: it changes a
        start tag only to commit a merge, and zeroes a word only once it is inside a block.

        Raises CorruptArena when the start tags themselves are broken.
        """
        blocks = list(self.blocks())
        self._clear_index()
        used = 0
        run_start, run_size = -1, 0
        for b in blocks:
            if b.used:
                if run_size:
                    self._set_tags(run_start, run_size, run_size)
                    self._zero_tags(run_start + 1, run_start + run_size - 1)
                    self._insert(run_start, run_size)
                    run_size = 0
                self._set_tags(b.start, b.size, self.tag(b.start))
                self._zero_tags(b.start + 1, b.start + b.size - 1)
                used += b.size
            elif run_size:
                run_size += b.size
            else:
                run_start, run_size = b.start, b.size
        if run_size:
            self._set_tags(run_start, run_size, run_size)
            self._zero_tags(run_start + 1, run_start + run_size - 1)
            self._insert(run_start, run_size)
        self.words[W_USED] = used
        self.words[W_RECOVERIES] += 1
        self.words[W_OP] = 0

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
            if b.size > 1 and end_tag != start_tag | TAG_END:
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
                if prev_free:
                    out.append(f"free block at granule {b.start} follows a free block")
                prev_free = True
                free_starts[b.start] = b.size
        if w[W_USED] != used:
            out.append(f"used count {w[W_USED]} != {used} granules in used blocks")
        listed: dict[int, int] = {}
        for fl in range(FL_COUNT):
            for sl in range(SL_COUNT):
                g = w[W_HEADS + fl * SL_COUNT + sl]
                bit = bool(w[W_SL + fl] >> sl & 1)
                if bit != (g != NIL):
                    out.append(f"list ({fl}, {sl}): bitmap bit {bit} but head {g:#x}")
                prev, steps = NIL, 0
                while g != NIL and steps <= len(blocks):
                    size = free_starts.get(int(g))
                    if size is None:
                        out.append(f"list ({fl}, {sl}) holds granule {g}, not a free block")
                        break
                    if mapping_insert(size) != (fl, sl):
                        out.append(f"free block {g} of {size} is on list ({fl}, {sl})")
                    link = w[self._heap + g * self._stride]
                    if link >> 32 != prev:
                        out.append(f"free block {g}: back link {link >> 32:#x} != {prev:#x}")
                    listed[int(g)] = size
                    prev, g = g, link & _LOW32
                    steps += 1
            if bool(w[W_FL] >> fl & 1) != bool(w[W_SL + fl]):
                out.append(f"first-level bit {fl} disagrees with its second-level map")
        if listed.keys() != free_starts.keys():
            out.append(f"{len(free_starts)} free blocks but {len(listed)} listed")
        return out
