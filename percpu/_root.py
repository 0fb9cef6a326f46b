"""The root block of a domain and the views and parts laid over it.

The root block (``_layout``: header, lease records, pageset directory, registry header,
pending queue) is one page-aligned block kept by the arena; its offset is the arena's root
offset. :class:`RootBlock` maps it and builds the parts that own its words.

Invariants
----------
1. A new domain's magic word is written last, under the domain lock: an opener trusts
   nothing of a root whose magic is not there (its creator died mid-way).
2. An opened root is checked before any part reads it: offset, magic, version, bound, and
   the registry's and pending queue's own headers; a bad one is :class:`BadDomainFile` with
   nothing written.
3. Every block the parts allocate is kept by the arena (it survives the death of the
   process that made it) and ``DomainFull`` is the only error an exhausted arena gives.
   Pageset pages are reserved for every id when their pageset is made (``_pagesets``
   invariant 4), so an exhausted arena refuses a registration, never a holder's first use.

:func:`arena_size_for` is the same layout as arithmetic: the arena a workload needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from arena import Arena, ArenaError, ArenaExhausted

from . import _cpuset
from ._caches import Caches
from ._errors import BadDomainFile, DomainFull, InvalidArgument
from ._layout import (
    CACHE_CAP,
    D_MAGIC,
    D_MAX_VCPUS,
    D_VERSION,
    ENTRY_WORDS,
    KIND_COUNTER,
    KIND_SIZES,
    KIND_SUMMARY,
    MAGIC,
    MAX_BUCKETS,
    PAGE,
    PS_PER_CHUNK,
    REG_SEGMENTS,
    SEG_MIN_CAP,
    SIZE_CLASSES,
    VERSION,
    chunk_table,
    class_index,
    histogram_size,
    pageset_words,
    pending_base,
    registry_base,
    root_words,
)
from ._pagesets import Pagesets
from ._pending import PendingQueue
from ._registry import Registry


class RootBlock:
    """The views of one domain's arena and the parts over its root block."""

    def __init__(self, arena: Arena, offset: int, bound: int, lock: Any,
                 draining: Callable[[], frozenset[int]]) -> None:
        heap = arena.heap
        self._arena = arena
        self.bytes = heap
        self.q = heap.cast("q")  #: every slot, as int64 words
        self.d = heap.cast("d")  #: the same words as float64 (summary sums)
        self.offset = offset
        self.bound = bound
        self.words = heap[offset : offset + root_words(bound) * 8].cast("Q")  #: the root
        alloc, free = self.alloc_block, self.free_block
        self.pending = PendingQueue(self.words, heap, pending_base(bound), alloc, free)
        self.registry = Registry(self.words, heap, registry_base(bound), alloc, free)
        self.pagesets = Pagesets(self.words, heap, self.q, self.d, chunk_table(bound),
                                 pageset_words(bound), bound + 1, lock, alloc, free, draining,
                                 self.block_size)
        self.caches = Caches(self.words, bound, lock, self.pagesets)

    @classmethod
    def create(cls, arena: Arena, bound: int, lock: Any,
               draining: Callable[[], frozenset[int]]) -> RootBlock:
        """Make a new domain's root block in a fresh arena (invariant 1). Domain lock held."""
        blk = arena.alloc(root_words(bound) * 8, align=PAGE)
        arena.keep(blk)
        self = cls(arena, blk.offset, bound, lock, draining)
        r = self.words
        r[D_VERSION] = VERSION
        r[D_MAX_VCPUS] = bound
        self.registry.create()
        r[D_MAGIC] = MAGIC
        arena.root_offset = blk.offset
        return self

    @classmethod
    def attach(cls, arena: Arena, lock: Any, draining: Callable[[], frozenset[int]]) -> RootBlock:
        """The root block of an existing domain, checked (invariant 2). Domain lock held."""
        off = arena.root_offset
        if off is None or off < 0 or off + 64 > arena.size or off % PAGE:
            raise BadDomainFile(22, "the arena holds no domain (no valid root block)")
        head = arena.heap[off : off + 64].cast("Q")
        magic, version, bound = head[D_MAGIC], head[D_VERSION], head[D_MAX_VCPUS]
        head.release()
        if magic != MAGIC:
            raise BadDomainFile(22, "bad domain magic: not a domain (or its creator died)")
        if version != VERSION:
            raise BadDomainFile(22, f"domain format version {version} is not supported")
        if not 1 <= bound <= _cpuset.MAX_VCPUS_LIMIT or off + root_words(bound) * 8 > arena.size:
            raise BadDomainFile(22, f"bad max_vcpus {bound} in the domain header")
        self = cls(arena, off, bound, lock, draining)
        problem = self.registry.problem(arena.size)
        if problem:
            raise BadDomainFile(22, problem)
        problem = self.pending.problem(arena.size)
        if problem:
            raise BadDomainFile(22, f"bad pending-free queue: {problem}")
        return self

    def alloc_block(self, nbytes: int, what: str, align: int | None = None) -> int:
        """A block kept by the arena (invariant 3); its offset."""
        try:
            blk = self._arena.alloc(nbytes, align=align)
        except ArenaExhausted as exc:
            raise DomainFull(f"no room in the domain's arena for {what}: {exc}") from None
        self._arena.keep(blk)
        return blk.offset

    def block_size(self, offset: int) -> int:
        """Bytes of the allocated block that starts at ``offset`` (0: none starts there)."""
        try:
            return self._arena.block_at(offset).size
        except ArenaError:
            return 0

    def free_block(self, offset: int) -> None:
        """Give a kept block back to the arena. Domain lock held."""
        self._arena.free(self._arena.block_at(offset))


GRANULE = 64  # bytes: the block size of a domain's arena (``arena.Arena``'s default)
#: The share of the arena a fill reaches before ``DomainFull`` (fragmentation takes the rest):
#: measured at 0.90 and more (docs/capacity.md; tests/test_capacity.py pins 0.80), which
#: sizing counts on.
FILL = 0.8


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def _pagesets(objects: int, slot: int, bound: int) -> int:
    """Pagesets of ``slot``-byte slots that ``objects`` objects may need, each id's cache of
    free slots (``CACHE_CAP``) included."""
    return math.ceil((objects + bound * CACHE_CAP) / (PAGE // slot)) if objects else 0


def _table_bytes(entries: int) -> int:
    """Registry tables holding ``entries`` keys: a segment holding ``n`` has the smallest
    power-of-two capacity above ``2 n`` (it grows when half full), and ``n`` is about normal
    around ``entries / REG_SEGMENTS``; the expected sum over the segments, plus the largest
    table twice (one segment's old and new tables while it grows)."""
    mean = entries / REG_SEGMENTS
    sigma = max(math.sqrt(mean), 0.5)
    cap, total, below = SEG_MIN_CAP, 0.0, 0.0
    while True:  # P(cap is C) = P(n <= C / 2 - 1) - P(n <= C / 4 - 1)
        upto = 0.5 * (1 + math.erf((cap / 2 - 0.5 - mean) / (sigma * math.sqrt(2))))
        total += (upto - below) * cap
        below = upto
        if upto > 1 - 1e-9:
            break
        cap *= 2
    return int((REG_SEGMENTS * total + 2 * cap) * ENTRY_WORDS * 8)


def arena_size_for(metrics: int, bound: int, summaries: int = 0, names: int | None = None,
                   key_bytes: int = 64, histograms: int = 0, buckets: int = 14) -> int:
    """Bytes of arena for ``metrics`` counters and gauges, ``summaries`` summaries and
    ``histograms`` histograms of ``buckets`` buckets under ``names`` metric names (None: one
    per metric, the most), keys of at most ``key_bytes`` bytes encoded (``_names.encode_key``;
    a family's help text counts in its key), with ``bound`` ids (max_vcpus): every block the
    workload makes, each id's page of every pageset reserved, divided by :data:`FILL`."""
    for what, n in (("metrics", metrics), ("summaries", summaries), ("key_bytes", key_bytes),
                    ("names", 0 if names is None else names), ("histograms", histograms)):
        if n.__class__ is not int or n < 0:
            raise InvalidArgument(f"{what} must be an int >= 0, got {n!r}")
    if buckets.__class__ is not int or not 1 <= buckets <= MAX_BUCKETS:
        raise InvalidArgument(f"buckets must be an int in 1..{MAX_BUCKETS}, got {buckets!r}")
    series = metrics + summaries + histograms
    names = series if names is None else min(names, series)
    sets = (_pagesets(metrics, KIND_SIZES[KIND_COUNTER], bound)
            + _pagesets(summaries, KIND_SIZES[KIND_SUMMARY], bound)
            + _pagesets(histograms, SIZE_CLASSES[class_index(histogram_size(buckets))], bound))
    used = (_round(root_words(bound) * 8, PAGE)
            + sets * (bound + 1) * PAGE  # the reserve: every id's page
            + math.ceil(sets / PS_PER_CHUNK) * _round(PS_PER_CHUNK * pageset_words(bound) * 8,
                                                      GRANULE)
            + (series + names) * _round(max(key_bytes, 1), GRANULE)
            + _table_bytes(series + names))
    return _round(max(math.ceil(used / FILL), root_words(bound) * 8 + 16 * PAGE), PAGE)
