"""The registry: name + labels -> (kind, slot) of every metric of a domain, in shared memory.

``REG_SEGMENTS`` open-addressing hash tables (linear probing) of ``ENTRY_WORDS``-word
entries; a key's segment is the top byte of its hash, so each segment holds about a
``REG_SEGMENTS``-th of the keys and grows on its own: no block of the registry is ever larger
than that share (a registry of one table would need one contiguous run of the arena for all of
them). A segment has no table until its first key. A key (the encoded name and labels,
``_names``) lives in a block of its own. Besides one entry per series there is one *family*
entry per metric name (``KIND_FAMILY``), whose ref word counts the name's live series.

Invariants
----------
1. An entry exists once its hash word is written (the commit of :meth:`Registry.insert`) and
   is gone once that word is a tombstone (:meth:`Registry.tombstone`); its other words are
   written before the commit, so a holder killed mid-insert leaves no half entry (and leaks a
   key block and a slot at most, which ``check`` finds).
2. A segment grows when it is half full, or, when the arena has no free run for the doubled
   table (fragmentation), once it is 7/8 full (``DomainFull`` only then). Its table offset
   and capacity are one directory word (``_layout.pack_table``):
   growing fills a new table completely, then commits with one store and frees the old one, so
   a crash leaves the old table in place, never a table read with the wrong size.
3. ``D_REG_GEN`` changes with every change of what :meth:`Registry.entries_at` returns
   (insert, tombstone, grow, a ref moved by compaction); readers cache by it.
4. An entry's ref may lag a compaction batch whose publisher died before pointing the
   registry at the new refs: callers map it through the batch (``Moves.current``).
5. Every word is checked before it is used to find memory: a directory word against the
   arena and the capacities, a key's offset and length against the arena, a kind against the
   kinds and its class against the kind's, and the ref word is sealed with the entry's hash
   (``_layout.seal``), so that a flipped bit or a word copied from another entry is refused
   rather than followed to another metric's slot (a damaged one raises ``BadDomainFile``).

An entry index names a segment and a position: ``segment << 32 | i``. Every word is read and
written under the domain lock; the module is pure apart from the two callables that allocate
and free arena blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from ._errors import DomainFull, damaged
from ._layout import (
    D_REG_FAMILIES,
    D_REG_GEN,
    D_REG_LIVE,
    E_HASH,
    E_KEY,
    E_META,
    E_REF,
    ENTRY_WORDS,
    HASH_EMPTY,
    HASH_TOMBSTONE,
    KIND_FAMILY,
    KIND_HISTOGRAM,
    KIND_SIZES,
    MAX_BUCKETS,
    REG_SEGMENTS,
    RS_TABLE,
    RS_USED,
    RS_WORDS,
    SEG_MAX_CAP,
    SEG_MIN_CAP,
    TABLE_ALIGN,
    bump,
    class_index,
    histogram_size,
    pack_table,
    seal,
    unpack_table,
    unseal,
)

Entry = tuple[int, int, int, bytes]  # (kind, size class, ref, key) of a live metric
_HISTOGRAM_CLASSES = (class_index(histogram_size(1)), class_index(histogram_size(MAX_BUCKETS)))
_EXTRA = 4  # bytes of the length of a family's metadata, after its key
_SEG_SHIFT = 56  # a hash's top byte picks its segment
_POS_MASK = (1 << 32) - 1
# A segment grows when half full; when the arena has no free run for its doubled table, it
# takes entries up to FULL_NUM / FULL_DEN of its capacity first (linear probing stays short
# enough for registration), so that a fragmented arena is filled before DomainFull.
FULL_NUM, FULL_DEN = 7, 8
RETRY_DIV = 32  # past half full, growing is tried again every cap / RETRY_DIV entries


def _ref(word: int, h: int, idx: int) -> int:
    ref = unseal(word, h)
    if ref < 0:
        raise damaged(f"registry entry {idx:#x}: its ref word fails its check")
    return ref


def key_hash(key: bytes) -> int:
    """The hash word of ``key`` (never 0 or 1, which mean empty and tombstone)."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h if h > HASH_TOMBSTONE else h + 2


def _kind_class(meta: int, idx: int) -> tuple[int, int]:
    """The kind and size class of an entry's meta word, checked against each other."""
    kind, cls = meta & 0xFF, meta >> 8 & 0xFF
    if kind == KIND_FAMILY and cls == 0:
        return kind, cls
    if kind == KIND_HISTOGRAM and _HISTOGRAM_CLASSES[0] <= cls <= _HISTOGRAM_CLASSES[1]:
        return kind, cls
    if kind not in KIND_SIZES or cls != class_index(KIND_SIZES[kind]):
        raise damaged(f"registry entry {idx:#x}: kind {kind}, class {cls}")
    return kind, cls


#: meta & 0xFFFF (kind | class << 8) -> (kind, class) of every series kind
_SERIES_KIND_CLASS = {
    **{kind | class_index(size) << 8: (kind, class_index(size))
       for kind, size in KIND_SIZES.items() if kind != KIND_HISTOGRAM},
    **{KIND_HISTOGRAM | cls << 8: (KIND_HISTOGRAM, cls)
       for cls in range(_HISTOGRAM_CLASSES[0], _HISTOGRAM_CLASSES[1] + 1)}}


class Registry:
    """The registry of the domain whose root words are ``root`` (its segment directory at
    word ``base``); ``heap`` is the arena. ``alloc(nbytes, what, align)`` returns the offset
    of a kept block (raising ``DomainFull``), ``free(offset)`` gives one back."""

    def __init__(self, root: memoryview, heap: memoryview, base: int,
                 alloc: Callable[[int, str, int | None], int],
                 free: Callable[[int], None]) -> None:
        self._root = root
        self._heap = heap
        self._base = base
        self._alloc = alloc
        self._free = free
        self._cache: tuple[int, list[Entry]] = (-1, [])  # (generation, its entries)

    # -- segments ------------------------------------------------------------------------

    def create(self) -> None:
        """An empty registry, for a new domain (the directory is zero: no tables yet)."""
        bump(self._root, D_REG_GEN)

    def problem(self, arena_size: int) -> str | None:
        """Why the directory cannot be trusted (a damaged file), or None."""
        for seg in range(REG_SEGMENTS):
            try:
                self._segment(seg, arena_size)
            except OSError as exc:
                return str(exc.args[-1])
        return None

    def _segment(self, seg: int, limit: int | None = None) -> tuple[int, int, int]:
        """(table offset, capacity, used) of segment ``seg``, checked; capacity 0: no table."""
        d = self._base + seg * RS_WORDS
        word, used = int(self._root[d + RS_TABLE]), int(self._root[d + RS_USED])
        if not word:
            if used:
                raise damaged(f"registry segment {seg} has no table but {used} entries")
            return 0, 0, 0
        off, cap = unpack_table(word)
        size = len(self._heap) if limit is None else limit
        if not SEG_MIN_CAP <= cap <= SEG_MAX_CAP or off + cap * ENTRY_WORDS * 8 > size \
                or used > cap:
            raise damaged(f"registry segment {seg}'s directory words")
        return off, cap, used

    def table(self, seg: int) -> memoryview:
        """Segment ``seg``'s table words (every entry's ``ENTRY_WORDS``; empty: no table)."""
        off, cap, _used = self._segment(seg)
        return self._heap[off : off + cap * ENTRY_WORDS * 8].cast("Q")

    def _tables(self) -> Iterator[tuple[int, memoryview]]:
        for seg in range(REG_SEGMENTS):
            if self._root[self._base + seg * RS_WORDS + RS_TABLE]:
                yield seg, self.table(seg)

    def key_at(self, t: memoryview, i: int) -> bytes:
        """Entry ``i``'s key (bounds-checked against the arena)."""
        off = int(t[i * ENTRY_WORDS + E_KEY])
        n = int(t[i * ENTRY_WORDS + E_META]) >> 16
        if off + n > len(self._heap):
            raise damaged(f"registry entry {i} points outside the arena")
        return bytes(self._heap[off : off + n])

    def extra_at(self, idx: int) -> bytes:
        """The bytes kept after entry ``idx``'s key (bounds-checked against the arena)."""
        t, e = self._word(idx, 0)
        off = int(t[e + E_KEY]) + (int(t[e + E_META]) >> 16)
        if off + _EXTRA > len(self._heap):
            raise damaged(f"registry entry {idx:#x}'s metadata lies outside the arena")
        n = int.from_bytes(self._heap[off : off + _EXTRA], "little")
        if off + _EXTRA + n > len(self._heap):
            raise damaged(f"registry entry {idx:#x}'s metadata lies outside the arena")
        return bytes(self._heap[off + _EXTRA : off + _EXTRA + n])

    def lookup(self, key: bytes, h: int | None = None) -> tuple[int, int]:
        """(entry index or -1, first free index on the probe path or -1)."""
        h = key_hash(key) if h is None else h
        seg = h >> _SEG_SHIFT
        t = self.table(seg)
        cap = len(t) // ENTRY_WORDS
        if not cap:
            return -1, -1
        i, free = h & (cap - 1), -1
        for _ in range(cap):
            eh = t[i * ENTRY_WORDS + E_HASH]
            if eh == HASH_EMPTY:
                return -1, seg << 32 | (free if free >= 0 else i)
            if eh == HASH_TOMBSTONE:
                if free < 0:
                    free = i
            elif eh == h and self.key_at(t, i) == key:
                return seg << 32 | i, -1 if free < 0 else seg << 32 | free
            i = (i + 1) & (cap - 1)
        return -1, -1 if free < 0 else seg << 32 | free

    def _word(self, idx: int, field: int) -> tuple[memoryview, int]:
        t = self.table(idx >> 32)
        i = (idx & _POS_MASK) * ENTRY_WORDS + field
        if i >= len(t):
            raise damaged(f"registry entry {idx:#x} does not exist")
        return t, i

    def kind_ref(self, idx: int) -> tuple[int, int]:
        """(kind, ref as recorded) of entry ``idx`` (its kind and class checked)."""
        t, i = self._word(idx, 0)
        kind, _cls = _kind_class(int(t[i + E_META]), idx)
        return kind, _ref(int(t[i + E_REF]), int(t[i + E_HASH]), idx)

    def class_of(self, idx: int) -> int:
        """The size class of entry ``idx``'s slot (checked against its kind)."""
        t, i = self._word(idx, 0)
        return _kind_class(int(t[i + E_META]), idx)[1]

    # -- changes -------------------------------------------------------------------------

    def insert(self, key: bytes, kind: int, cls: int, ref: int, extra: bytes = b"") -> int:
        """Add ``key`` (not present) as an entry of ``kind`` with ref word ``ref`` (a series'
        slot of class ``cls``, or a family's count), growing its segment first if it is half
        full; the new entry's index. ``extra`` (a family's metadata) is kept after the key,
        in the same block (:meth:`extra_at`)."""
        h = key_hash(key)
        seg = h >> _SEG_SHIFT
        _off, cap, used = self._segment(seg)
        over = used + 1 - cap // 2
        if over > 0:
            must = (used + 1) * FULL_DEN > cap * FULL_NUM
            if must or (over - 1) % max(1, cap // RETRY_DIV) == 0:
                try:
                    self._grow(seg)
                except DomainFull:  # no run for the doubled table (fragmentation): fill
                    if must:  # this one further, up to 7/8
                        raise
        _, free = self.lookup(key, h)
        if free < 0:  # the used count said there was room: recount, and try once more
            self._grow(seg)
            _, free = self.lookup(key, h)
            if free < 0:
                raise damaged(f"registry segment {seg} is full below its growth threshold")
        body = key + (len(extra).to_bytes(_EXTRA, "little") + extra if extra else b"")
        key_off = self._alloc(max(len(body), 1), "a metric name", None)
        self._heap[key_off : key_off + len(body)] = body
        t, e = self._word(free, 0)
        was_empty = t[e + E_HASH] == HASH_EMPTY
        t[e + E_KEY] = key_off
        t[e + E_META] = kind | cls << 8 | len(key) << 16
        t[e + E_REF] = seal(ref, h)
        t[e + E_HASH] = h  # commit
        r = self._root
        bump(r, self._base + seg * RS_WORDS + RS_USED, 1 if was_empty else 0)
        bump(r, D_REG_FAMILIES if kind == KIND_FAMILY else D_REG_LIVE)
        bump(r, D_REG_GEN)
        return free

    def tombstone(self, idx: int) -> int:
        """Remove entry ``idx`` (the commit), free its key block; its ref as recorded."""
        t, e = self._word(idx, 0)
        if t[e + E_HASH] <= HASH_TOMBSTONE:
            raise damaged(f"registry entry {idx:#x} is not live")
        kind, _cls = _kind_class(int(t[e + E_META]), idx)
        ref, key_off = _ref(int(t[e + E_REF]), int(t[e + E_HASH]), idx), int(t[e + E_KEY])
        t[e + E_HASH] = HASH_TOMBSTONE  # commit: the name is gone
        r = self._root
        count = D_REG_FAMILIES if kind == KIND_FAMILY else D_REG_LIVE
        if r[count]:
            bump(r, count, -1)
        bump(r, D_REG_GEN)
        self._free(key_off)
        return ref

    def add_to_ref(self, idx: int, delta: int) -> int:
        """Add ``delta`` to entry ``idx``'s ref word (a family's series count, never below
        0); the new value. No generation change: no series changed."""
        t, e = self._word(idx, 0)
        h = int(t[e + E_HASH])
        value = min(max(0, _ref(int(t[e + E_REF]), h, idx) + delta), 0xFFFFFFFF)
        t[e + E_REF] = seal(value, h)
        return value

    def repoint(self, news: dict[int, int]) -> None:
        """Point every live series whose ref is a key of ``news`` at its value (compaction)."""
        for seg, t in self._tables():
            for i, (h, meta, word) in enumerate(zip(t[E_HASH::ENTRY_WORDS].tolist(),
                                                    t[E_META::ENTRY_WORDS].tolist(),
                                                    t[E_REF::ENTRY_WORDS].tolist(), strict=True)):
                if h > HASH_TOMBSTONE and meta & 0xFF != KIND_FAMILY:
                    ref = _ref(word, h, seg << 32 | i)
                    if ref in news:
                        t[i * ENTRY_WORDS + E_REF] = seal(news[ref], h)
        bump(self._root, D_REG_GEN)

    def _grow(self, seg: int) -> None:
        """Rehash segment ``seg``'s live entries into a new table (dropping tombstones);
        invariant 2."""
        old_off, old_cap, _used = self._segment(seg)
        live: list[tuple[int, ...]] = []
        if old_cap:
            old = self.table(seg)
            live = [tuple(int(old[i * ENTRY_WORDS + j]) for j in range(ENTRY_WORDS))
                    for i in range(old_cap) if old[i * ENTRY_WORDS + E_HASH] > HASH_TOMBSTONE]
            old.release()
        cap = max(SEG_MIN_CAP, old_cap)
        while (len(live) + 1) * 3 > cap:  # doubling: 25-50% full after a grow
            cap *= 2
        if cap > SEG_MAX_CAP:
            raise damaged(f"registry segment {seg} would need {cap} entries")
        nbytes = cap * ENTRY_WORDS * 8
        off = self._alloc(nbytes, "the metric registry", TABLE_ALIGN)
        self._heap[off : off + nbytes] = bytes(nbytes)
        t = self._heap[off : off + nbytes].cast("Q")
        for e in live:
            i = e[E_HASH] & (cap - 1)
            while t[i * ENTRY_WORDS + E_HASH] != HASH_EMPTY:
                i = (i + 1) & (cap - 1)
            for j in (E_KEY, E_META, E_REF, E_HASH):
                t[i * ENTRY_WORDS + j] = e[j]
        t.release()
        r = self._root
        d = self._base + seg * RS_WORDS
        r[d + RS_TABLE] = pack_table(off, cap)  # commit
        r[d + RS_USED] = len(live)
        bump(r, D_REG_GEN)
        if old_cap:
            self._free(old_off)

    # -- reads ---------------------------------------------------------------------------

    def entries_at(self) -> tuple[int, list[Entry]]:
        """The generation and every live series read at it, as one pair (cached by
        generation): another thread may replace the cache the moment this returns, so a
        caller never reads the generation back on its own."""
        gen = int(self._root[D_REG_GEN])
        cached = self._cache
        if cached[0] == gen:
            return cached
        out: list[Entry] = []
        append = out.append
        heap = self._heap
        size = len(heap)
        for seg, t in self._tables():  # one pass, in bulk: a new reader's first snapshot
            for i, (h, meta, word, off) in enumerate(zip(
                    t[E_HASH::ENTRY_WORDS].tolist(), t[E_META::ENTRY_WORDS].tolist(),
                    t[E_REF::ENTRY_WORDS].tolist(), t[E_KEY::ENTRY_WORDS].tolist(),
                    strict=True)):
                if h <= HASH_TOMBSTONE:
                    continue
                kc = _SERIES_KIND_CLASS.get(meta & 0xFFFF)
                if kc is None:  # a family entry, or damage: the full check says which
                    if _kind_class(meta, seg << 32 | i)[0] == KIND_FAMILY:
                        continue
                    raise damaged(f"registry entry {seg << 32 | i:#x}: meta {meta:#x}")
                end = off + (meta >> 16)
                if end > size:
                    raise damaged(f"registry entry {i} points outside the arena")
                append((kc[0], kc[1], _ref(word, h, seg << 32 | i), heap[off:end].tobytes()))
        self._cache = (gen, out)
        return gen, out

    def families(self) -> dict[bytes, int]:
        """Family key -> entry index of every family (for their metadata)."""
        out = {}
        for seg, t in self._tables():
            for i, (h, meta) in enumerate(zip(t[E_HASH::ENTRY_WORDS].tolist(),
                                              t[E_META::ENTRY_WORDS].tolist(), strict=True)):
                if h > HASH_TOMBSTONE and meta & 0xFF == KIND_FAMILY:
                    out[self.key_at(t, i)] = seg << 32 | i
        return out

    def live_refs(self) -> dict[int, tuple[int, int]]:
        """Recorded ref -> (entry index, kind) of every live series."""
        out = {}
        for seg, t in self._tables():
            for i, (h, meta, word) in enumerate(zip(t[E_HASH::ENTRY_WORDS].tolist(),
                                                    t[E_META::ENTRY_WORDS].tolist(),
                                                    t[E_REF::ENTRY_WORDS].tolist(), strict=True)):
                if h > HASH_TOMBSTONE and meta & 0xFF != KIND_FAMILY:
                    out[_ref(word, h, seg << 32 | i)] = (seg << 32 | i, meta & 0xFF)
        return out

    def set_ref(self, idx: int, ref: int) -> None:
        """Point entry ``idx`` at ``ref`` (compaction's publish; the caller bumps the
        generation once for the batch)."""
        t, e = self._word(idx, 0)
        t[e + E_REF] = seal(ref, int(t[e + E_HASH]))
