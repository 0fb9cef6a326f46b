"""Where a domain keeps its shared state inside its arena: pure arithmetic, no OS calls.

A domain's *root block* (its offset is the arena's ``root_offset``) is an array of u64 words:

    [ domain header | lease records: one per vcpu id, plus the overflow id |
      pageset chunk table | pending-free queue | move region (compaction, see ``_compact``) |
      registry segment directory ]

Pagesets are described in *chunks* of ``PS_PER_CHUNK`` entries, allocated on demand and never
moved, so an entry's offset is stable for the life of the domain. The registry (name + labels ->
slot) is ``REG_SEGMENTS`` open-addressing hash tables, each in its own block, re-allocated
when it grows (so no one block of it is large). Every word
of these structures is read and written under the domain lock (the arena's lock), except the
counter *slots* themselves, which are the hot path.

Size classes: 4, 8, 16, 32 and 64 bytes. Slot ``k`` of a pageset is the same object in every
vcpu id's page; a *ref* names it as ``pageset << REF_SHIFT | k``.
"""

from __future__ import annotations

from typing import Any

PAGE = 4096  # bytes per page of a pageset (one page per vcpu id)
MAGIC = int.from_bytes(b"PCDOMAN1", "little")
VERSION = 6  # 2: move region; 3: pending spill; 4: registry segments; 5: metric model;
# 6: a pending entry's size class

# Bytes; seed 002's FreeBSD-style per-cpu zones. Raw objects (``Domain.alloc``) take up to 64
# bytes; the larger classes hold histograms (their bucket counts, sum: one slot, one ref, so
# the registry, the grace periods and the audit treat them like any metric).
SIZE_CLASSES = (4, 8, 16, 32, 64, 128, 256, 512)
MAX_OBJECT_SIZE = 64  # the largest raw object
MAX_BUCKETS = SIZE_CLASSES[-1] // 8 - 2  # finite histogram buckets (one slot of 512 bytes)
REF_SHIFT = 16  # slot index bits in a ref (a 4-byte class has 1024 slots a page)
SLOT_MASK = (1 << REF_SHIFT) - 1

# Root header words.
D_MAGIC = 0
D_VERSION = 1
D_MAX_VCPUS = 2  # ids 0..max-1 are leased; id max is the shared overflow id
D_EPOCH = 3  # bumped by every change that live holders must acknowledge (grace periods)
D_SERIES_LIMIT = 4  # series a metric name may have (0: no limit), shared by every process
D_SERIES_REFUSED = 5  # registrations refused by that limit, ever
D_REG_FAMILIES = 6  # metric names (families) in the registry
D_REG_LIVE = 7  # live series (metrics)
D_REG_GEN = 8  # bumped when the registry changes (lets readers cache their decoding)
D_PS_COUNT = 9  # pageset entries ever created (high-water mark)
D_FRESH = 10  # path counters (seed 001's schedstat table): ids leased for the first time
D_REUSED = 11  # ids leased again after a clean release (inheriting their values)
D_RECLAIMED = 12  # ids taken over from a holder that died holding them
D_SHARED_OPS = 13  # operations on the overflow id (more holders than ids), under a lock
D_HIGHEST = 14  # 1 + the highest id ever leased
D_OVERFLOW_HOLDERS = 15  # holders that got no id of their own, ever
D_PENDING = 16  # entries in the pending-free queue
D_PAGES = 17  # pages allocated to pagesets, now
D_MOVES = 18  # slots moved by compaction, ever
D_RECLAIMED_PAGESETS = 19  # pagesets emptied and given back by compaction, ever
D_RECOVERED_SLOTS = 20  # cache slots recovered from dead holders, ever
# Compaction (``_compact``): one batch of moves at a time, described in the move region.
D_MV_GEN = 21  # batch generation: odd while a batch is in flight (readers pair old and new)
D_MV_COUNT = 22  # moves in the batch in flight
D_MV_EPOCH = 23  # epoch that published it: a holder whose ack reaches it has rebound
D_MV_SOURCES = 24  # pagesets the batch in flight empties
D_MV_PAGES = 25  # pages given back to the arena by compaction, ever
D_MV_BATCHES = 26  # batches completed, ever
D_MV_STARTED = 27  # CLOCK_MONOTONIC ns when the batch in flight was published
D_MV_REG_DONE = 28  # = D_MV_GEN once the registry points at the batch's new refs
D_SPILL = 29  # the pending queue's spill table: offset | log2(entries), 0 = none (see below)
D_SPILL_N = 30  # entries in the spill table
D_RESERVE = 31  # offset + 1 of the first page of the page reserve (``_pagesets``), 0 = none
HEADER_WORDS = 32

# One lease record per id (max_vcpus + 1 of them: the last is the overflow id).
L_PID = 0  # holder pid; 0 when released cleanly (non-zero with no lock held = holder died)
L_LEASES = 1  # times this id was leased
L_ACK = 2  # the epoch this holder has acknowledged (it no longer uses anything older)
L_SEQ = 3  # sequence count: odd while a move of this id's values is in flight
L_CACHE = 4  # per size class: [count, refs...]
CACHE_CAP = 16  # refs a per-vcpu cache holds per class
CACHE_REFILL = 8  # refs moved from the pageset layer in one batch
CACHE_WORDS = 1 + CACHE_CAP
LEASE_WORDS = L_CACHE + len(SIZE_CLASSES) * CACHE_WORDS

# Pageset entries.
P_CLASS = 0  # size class index + 1; 0 = entry unused or given back
P_TAKEN = 1  # slots taken from this pageset (by caches or objects)
P_BITMAP = 2  # BITMAP_WORDS words: bit k set = slot k taken
BITMAP_WORDS = PAGE // SIZE_CLASSES[0] // 64
P_PAGES = P_BITMAP + BITMAP_WORDS  # one word per id: offset + 1 of its page, 0 = none yet
PS_PER_CHUNK = 64
MAX_CHUNKS = 1024  # so at most 65536 pagesets in one domain

# Pending frees: slots waiting for a grace period before they are zeroed and reused. The first
# PENDING_CAP wait in the root block; more (while a holder is stopped, say) wait in the spill
# table, an arena block that doubles when full, so that remove() never waits for a holder.
PENDING_CAP = 4096
PE_REF = 0
PE_EPOCH = 1  # the epoch, and the slot's size class from bit PE_CLASS_SHIFT up
PE_CLASS_SHIFT = 58
EPOCH_MASK = (1 << PE_CLASS_SHIFT) - 1  # an epoch word above it is damage (``_grace``)
PENDING_WORDS = 2

# The move region (compaction): words appended after the pending queue, so every word above
# keeps its offset. Per id (overflow id included), a move state: the batch generation whose
# moves this id's copies have had (MS_DONE), and a one-move journal (MS_STEP = index + 1 of the
# move being copied, 0 = none; the old and new values before it, as int64 and as float64) that
# lets whoever next owns the id finish a copy its owner was killed in the middle of.
MS_DONE = 0
MS_STEP = 1
MS_OLD = 2
MS_NEW = 3
MS_OLD_F = 4
MS_NEW_F = 5
MS_WORDS = 6
MOVE_SOURCES_CAP = 512  # pagesets one batch may empty
MOVE_CAP = 2048  # moves in one batch (a larger compaction runs several batches)
M_OLD = 0  # ref moved from
M_NEW = 1  # ref moved to
M_KIND = 2  # registry kind of the metric (a summary moves a count and a float sum)
MOVE_WORDS = 3

# The registry: REG_SEGMENTS hash tables (open addressing, linear probing), each in its own
# arena block that grows on its own, so that no block of it is ever larger than a
# REG_SEGMENTS-th of the whole. A key's segment is its hash's top byte. Directory words per
# segment, in the root block:
REG_SEGMENTS = 256
RS_TABLE = 0  # pack_table(offset, capacity) of the segment's table, 0 = no table yet
RS_USED = 1  # live + tombstone entries of the segment (drives its growth)
RS_WORDS = 2
SEG_MIN_CAP = 8  # entries of a segment's first table
SEG_MAX_CAP = 1 << 24  # entries of the largest table a segment may grow to
# Registry entries.
E_HASH = 0  # 0 = empty, 1 = tombstone, else the key's hash (>= 2)
E_KEY = 1  # offset of the key's block
E_META = 2  # kind | class << 8 | key length << 16
E_REF = 3  # the slot (ref) of the metric
ENTRY_WORDS = 4
HASH_EMPTY, HASH_TOMBSTONE = 0, 1

# Kinds of series, and what each id's copy of its slot holds:
# * counter, gauge (mode sum), livesum gauge: an int64 part, then a float64 part (the value is
#   their sum; ints stay exact, fractional amounts go to the float word);
# * summary: the int64 count, then the float64 sum;
# * max/min/mostrecent gauges (and their live variants): the int64 time of the last set (ns
#   since the epoch; 0 = never set by this id), then the float64 value;
# * histogram: one int64 count per bucket (the finite buckets, then +Inf), then the float64
#   sum: ``8 * (buckets + 2)`` bytes.
KIND_COUNTER, KIND_GAUGE, KIND_SUMMARY, KIND_HISTOGRAM = 1, 2, 3, 4
KIND_GAUGE_LIVESUM, KIND_GAUGE_MAX, KIND_GAUGE_MIN, KIND_GAUGE_MOSTRECENT = 5, 6, 7, 8
KIND_GAUGE_LIVEMAX, KIND_GAUGE_LIVEMIN, KIND_GAUGE_LIVEMOSTRECENT = 9, 10, 11
GAUGE_MODES = {"sum": KIND_GAUGE, "livesum": KIND_GAUGE_LIVESUM, "max": KIND_GAUGE_MAX,
               "min": KIND_GAUGE_MIN, "mostrecent": KIND_GAUGE_MOSTRECENT,
               "livemax": KIND_GAUGE_LIVEMAX, "livemin": KIND_GAUGE_LIVEMIN,
               "livemostrecent": KIND_GAUGE_LIVEMOSTRECENT}
MODE_OF = {kind: mode for mode, kind in GAUGE_MODES.items()}
LIVE_KINDS = frozenset((KIND_GAUGE_LIVESUM, KIND_GAUGE_LIVEMAX, KIND_GAUGE_LIVEMIN,
                        KIND_GAUGE_LIVEMOSTRECENT))  # only ids with a live holder count
STAMPED_KINDS = frozenset((KIND_GAUGE_MAX, KIND_GAUGE_MIN, KIND_GAUGE_MOSTRECENT,
                           KIND_GAUGE_LIVEMAX, KIND_GAUGE_LIVEMIN, KIND_GAUGE_LIVEMOSTRECENT))
SUM_KINDS = frozenset((KIND_COUNTER, KIND_GAUGE, KIND_GAUGE_LIVESUM))  # int + float parts
KIND_NAMES = {KIND_COUNTER: "counter", KIND_SUMMARY: "summary", KIND_HISTOGRAM: "histogram",
              **{kind: "gauge" for kind in GAUGE_MODES.values()}}
KIND_SIZES = {**{kind: 16 for kind in KIND_NAMES}}  # a histogram's: histogram_size()
# Compaction moves the (int, float) pair of these kinds; it leaves histograms and stamped
# gauges where they are (their pagesets are kept, like raw objects').
MOVABLE_KINDS = frozenset((KIND_COUNTER, KIND_GAUGE, KIND_GAUGE_LIVESUM, KIND_SUMMARY))
# A family entry: one per metric name (its key is ``_names.family_key``); no slot: its ref
# word counts the name's live series (for the series limit), its class byte is 0.
KIND_FAMILY = 16

LEASE_LOCK_BASE = 1 << 20  # OFD lock byte of id k: LEASE_LOCK_BASE + k (beyond the data)
OVERFLOW_LOCK = LEASE_LOCK_BASE - 1  # serialises operations on the overflow id
OVERFLOW_ACK_BASE = 1 << 40  # overflow holder that acknowledged epoch e: read lock on +e


def histogram_size(buckets: int) -> int:
    """Bytes of a histogram's slot with ``buckets`` finite buckets (``1..MAX_BUCKETS``)."""
    return 8 * (buckets + 2)


def class_index(size: int) -> int:
    """Index of the smallest size class holding ``size`` bytes (1 <= size <= 512)."""
    for i, c in enumerate(SIZE_CLASSES):
        if size <= c:
            return i
    raise ValueError(f"size {size} is above the largest class ({MAX_OBJECT_SIZE} bytes)")


def slots_per_page(cls: int) -> int:
    """Slots in one page of a pageset of class index ``cls``."""
    return PAGE // SIZE_CLASSES[cls]


def lease_base(max_vcpus: int, vcpu: int) -> int:
    """Word index (in the root block) of id ``vcpu``'s lease record."""
    del max_vcpus
    return HEADER_WORDS + vcpu * LEASE_WORDS


def chunk_table(max_vcpus: int) -> int:
    """Word index of the pageset chunk table."""
    return HEADER_WORDS + (max_vcpus + 1) * LEASE_WORDS


def pending_base(max_vcpus: int) -> int:
    """Word index of the pending-free queue."""
    return chunk_table(max_vcpus) + MAX_CHUNKS


def move_base(max_vcpus: int) -> int:
    """Word index of the move region: per-id move states, then sources, then moves."""
    return pending_base(max_vcpus) + PENDING_CAP * PENDING_WORDS


def move_state_base(max_vcpus: int, vcpu: int) -> int:
    """Word index of id ``vcpu``'s move state (``MS_*`` words; the overflow id included)."""
    return move_base(max_vcpus) + vcpu * MS_WORDS


def move_sources_base(max_vcpus: int) -> int:
    """Word index of the batch's source pagesets (``MOVE_SOURCES_CAP`` words)."""
    return move_base(max_vcpus) + (max_vcpus + 1) * MS_WORDS


def move_records_base(max_vcpus: int) -> int:
    """Word index of the batch's move records (``MOVE_CAP`` x ``MOVE_WORDS`` words)."""
    return move_sources_base(max_vcpus) + MOVE_SOURCES_CAP


def registry_base(max_vcpus: int) -> int:
    """Word index of the registry's segment directory (``REG_SEGMENTS`` x ``RS_WORDS``)."""
    return move_records_base(max_vcpus) + MOVE_CAP * MOVE_WORDS


def root_words(max_vcpus: int) -> int:
    """Words in the root block of a domain with ``max_vcpus`` ids."""
    return registry_base(max_vcpus) + REG_SEGMENTS * RS_WORDS


def pageset_words(max_vcpus: int) -> int:
    """Words in one pageset entry."""
    return P_PAGES + max_vcpus + 1


def make_ref(pageset: int, slot: int) -> int:
    """The ref of slot ``slot`` of pageset ``pageset``."""
    return pageset << REF_SHIFT | slot


def split_ref(ref: int) -> tuple[int, int]:
    """(pageset, slot) of a ref."""
    return ref >> REF_SHIFT, ref & SLOT_MASK


TABLE_ALIGN = 64  # bytes: a table block's offset keeps its low 6 bits for log2(capacity)


def pack_table(off: int, cap: int) -> int:
    """One word naming a table block at ``off`` of ``cap`` entries (a power of two): the
    registry's D_REG_TABLE and the pending spill's D_SPILL, so that moving a table commits
    with one store."""
    assert off % TABLE_ALIGN == 0 and cap > 0 and cap & (cap - 1) == 0
    return off | (cap.bit_length() - 1)


def unpack_table(word: int) -> tuple[int, int]:
    """(offset, capacity) of a table from its word (see :func:`pack_table`)."""
    return word & ~(TABLE_ALIGN - 1), 1 << (word & (TABLE_ALIGN - 1))


# Sealed ref words: a ref (32 bits) stored in shared memory carries, in the word's top 32
# bits, a check of itself and of the place it is stored at (``salt``: the registry entry's
# hash, the cache's id, class and position, the pending entry's epoch and position). A
# flipped bit, a zeroed word or a word copied from another place fails ``unseal`` (but for
# one chance in 2**32), so a damaged ref is refused before anything is written through it.
_MASK64 = (1 << 64) - 1


def _ref_check(ref: int, salt: int) -> int:
    x = (ref ^ salt * 0x9E3779B97F4A7C15) & _MASK64
    x = (x ^ x >> 31) * 0xBF58476D1CE4E5B9 & _MASK64
    return (x ^ x >> 32) & 0xFFFFFFFF | 1  # never 0: a zeroed word never passes


def bump(words: Any, i: int, n: int = 1) -> None:
    """Add ``n`` to the shared counter ``words[i]``, modulo 2**64: a counter never raises,
    even one a damaged file set to the top of its range (no counter indexes anything)."""
    words[i] = (int(words[i]) + n) & _MASK64


def seal(ref: int, salt: int) -> int:
    """The word that stores ``ref`` (< 2**32) at the place named by ``salt``."""
    return ref | _ref_check(ref, salt) << 32


def unseal(word: int, salt: int) -> int:
    """The ref stored in ``word`` at the place ``salt``, or -1 if the word fails its check."""
    ref = word & 0xFFFFFFFF
    return ref if word >> 32 == _ref_check(ref, salt) else -1
