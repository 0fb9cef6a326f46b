"""Where everything lives inside an arena mapping: pure arithmetic, no OS calls.

An arena is one mapping of ``total`` bytes, seen by the code as an array of little-endian u64
words (a ``memoryview`` cast to ``'Q'``). It has three regions, each page-aligned::

    [ header | tags: one u64 per granule | heap: n_granules * granule bytes ]

The header holds the identity (magic, version, sizes) that ``Arena.open`` validates before it
trusts anything else, the shared statistics, and the TLSF index (two levels of bitmaps and the
heads of the segregated free lists). A *granule* is the arena's ``block_size``: every block is a
whole number of granules and starts on a granule boundary.

Invariant: ``layout_for(n_granules, granule)`` is a pure function of its arguments, and a header
whose fields do not equal what it computes for the fields it states is refused (see
:func:`validate_header`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 4096  # bytes; the unit of prefaulting and locking (mmap.PAGESIZE on x86-64)
MAGIC = int.from_bytes(b"PCARENA1", "little")
VERSION = 2  # 2: end tags carry TAG_END and words inside a block are zero (see below)

# Two-level segregated fit (TLSF): a first level per power of two, SL_COUNT lists per level.
SL_LOG2 = 4
SL_COUNT = 1 << SL_LOG2
FL_COUNT = 32  # covers blocks up to 2**35 granules: more than a tag's 32-bit size field
NIL = 0xFFFFFFFF  # "no granule" in a free-list link
MAX_GRANULES = NIL - 1  # granule indexes and sizes must fit the 32-bit fields

# Header word indexes (u64 each).
W_MAGIC = 0
W_VERSION = 1
W_TOTAL = 2  # bytes mapped
W_GRANULE = 3  # bytes per granule (block_size)
W_NGRAN = 4  # granules in the heap
W_TAGS = 5  # byte offset of the tag table
W_HEAP = 6  # byte offset of the heap
W_OP = 7  # pid of the operation in progress; 0 when the structure is consistent
W_USED = 8  # granules in used blocks
W_ALLOCS = 9  # successful allocations, ever
W_FREES = 10  # frees, ever
W_FAILED = 11  # allocations refused for want of space, ever
W_RECOVERIES = 12  # times the index was rebuilt after an interrupted operation
W_ROOT = 13  # reserved for the layer above: offset + 1 of its root block, 0 when none
W_CREATOR = 14  # pid that created the arena (diagnostic)
W_FL = 15  # first-level bitmap
W_SL = 16  # FL_COUNT second-level bitmaps
W_HEADS = W_SL + FL_COUNT  # FL_COUNT * SL_COUNT free-list heads
HEADER_WORDS = W_HEADS + FL_COUNT * SL_COUNT

# A tag word describes the block that starts (and, repeated with TAG_END, the block that ends)
# at a granule. Invariant: a tag word is a block's start tag, its end tag (blocks of two granules
# or more) or zero (every granule strictly inside a block), so "is there a block starting at g?"
# is answered by two words, and a forged or stale offset is told apart from a real block.
TAG_SIZE_MASK = 0xFFFFFFFF  # bits 0..31: size in granules (>= 1)
TAG_USED = 1 << 32  # bit 32: the block is allocated
TAG_OWNER_SHIFT = 33  # bits 33..61: pid of the allocating process; 0 = kept by the structure
TAG_OWNER_MAX = (1 << 29) - 1  # Linux pids stay below 2**22 (PID_MAX_LIMIT)
# bit 62 (start tags only): the block belongs to its owner's per-process cache (see
# arena._arena, "caches"): no other process may free it or take a handle on it. End tags never
# carry it, so the owner can set and clear it with one store of the start tag.
TAG_CACHED = 1 << 62
TAG_END = 1 << 63  # bit 63: this word is the end tag of a block of two granules or more

MIN_GRANULE = 16  # bytes: a free block keeps its two 32-bit links in its first word
MAX_GRANULE = 1 << 20


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (a power of two)."""
    return (value + multiple - 1) & ~(multiple - 1)


def is_power_of_two(value: int) -> bool:
    """True for 1, 2, 4, 8...; False for 0, negatives and everything else."""
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class Layout:
    """Byte offsets and sizes of the three regions of an arena mapping."""

    granule: int  # bytes per granule
    n_granules: int  # granules in the heap
    tags_offset: int  # bytes from the mapping start to the tag table
    heap_offset: int  # bytes from the mapping start to the heap
    total: int  # bytes mapped

    @property
    def heap_size(self) -> int:
        """Bytes in the heap (what blocks are carved from)."""
        return self.n_granules * self.granule


def layout_for(n_granules: int, granule: int) -> Layout:
    """The layout of an arena with ``n_granules`` granules of ``granule`` bytes."""
    header_bytes = round_up(HEADER_WORDS * 8, PAGE_SIZE)
    tags_bytes = round_up(n_granules * 8, PAGE_SIZE)
    heap_offset = header_bytes + tags_bytes
    total = heap_offset + round_up(n_granules * granule, PAGE_SIZE)
    return Layout(granule, n_granules, header_bytes, heap_offset, total)


def validate_header(words: Any, file_size: int) -> Layout:
    """Check the identity fields of a mapped header; return its layout or raise ValueError.

    ``words`` supports ``words[i] -> int``. Nothing beyond the header is read, so a hostile
    file cannot steer the caller outside the mapping: every offset is recomputed from the two
    size fields and compared with what the header claims.
    """
    w = words  # a memoryview cast to 'Q' or a list; typed loosely for tests
    get = w.__getitem__
    if get(W_MAGIC) != MAGIC:
        raise ValueError("bad magic: not an arena file (or its creator died while creating it)")
    if get(W_VERSION) != VERSION:
        raise ValueError(f"arena format version {get(W_VERSION)} is not supported (want {VERSION})")
    granule, n_granules = get(W_GRANULE), get(W_NGRAN)
    if not is_power_of_two(granule) or not MIN_GRANULE <= granule <= MAX_GRANULE:
        raise ValueError(f"bad block size {granule} in header")
    if not 1 <= n_granules <= MAX_GRANULES:
        raise ValueError(f"bad granule count {n_granules} in header")
    layout = layout_for(n_granules, granule)
    stated = (get(W_TOTAL), get(W_TAGS), get(W_HEAP))
    if stated != (layout.total, layout.tags_offset, layout.heap_offset):
        raise ValueError(f"header sizes {stated} do not match the layout they imply")
    if layout.total > file_size:
        raise ValueError(f"file is {file_size} bytes but its header says {layout.total}")
    return layout
