"""The registry: name + labels -> (kind, slot) of every metric of a domain, in shared memory.

An open-addressing hash table (linear probing) of ``ENTRY_WORDS``-word entries in its own
arena block; a key (the encoded name and labels, ``_names``) lives in a block of its own.

Invariants
----------
1. An entry exists once its hash word is written (the commit of :meth:`Registry.insert`) and
   is gone once that word is a tombstone (:meth:`Registry.tombstone`); its other words are
   written before the commit, so a holder killed mid-insert leaves no half entry (and leaks a
   key block and a slot at most, which ``check`` finds).
2. The table's offset and capacity are one word, ``D_REG_TABLE`` (``_layout.pack_table``):
   growing fills a new table completely, then commits with one store and frees the old one, so
   a crash leaves the old table in place, never a table read with the wrong size.
3. ``D_REG_GEN`` changes with every change of what :meth:`Registry.entries_at` returns
   (insert, tombstone, grow, a ref moved by compaction); readers cache by it.
4. An entry's ref may lag a compaction batch whose publisher died before pointing the
   registry at the new refs: callers map it through the batch (``Moves.current``).

Every word is read and written under the domain lock; the module is pure apart from the two
callables that allocate and free arena blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ._errors import BadDomainFile
from ._layout import (
    D_REG_CAP,
    D_REG_GEN,
    D_REG_LIVE,
    D_REG_TABLE,
    D_REG_USED,
    E_HASH,
    E_KEY,
    E_META,
    E_REF,
    ENTRY_WORDS,
    HASH_EMPTY,
    HASH_TOMBSTONE,
    REG_MIN_CAP,
    TABLE_ALIGN,
    pack_table,
    unpack_table,
)

Entry = tuple[int, int, int, bytes]  # (kind, size class, ref, key) of a live metric


def key_hash(key: bytes) -> int:
    """The hash word of ``key`` (never 0 or 1, which mean empty and tombstone)."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h if h > HASH_TOMBSTONE else h + 2


class Registry:
    """The registry of the domain whose root words are ``root``; ``heap`` is the arena.
    ``alloc(nbytes, what, align)`` returns the offset of a kept block (raising
    ``DomainFull``), ``free(offset)`` gives one back."""

    def __init__(self, root: memoryview, heap: memoryview,
                 alloc: Callable[[int, str, int | None], int],
                 free: Callable[[int], None]) -> None:
        self._root = root
        self._heap = heap
        self._alloc = alloc
        self._free = free
        self._cache: tuple[int, list[Entry]] = (-1, [])  # (generation, its entries)

    # -- the table -----------------------------------------------------------------------

    def create(self) -> None:
        """An empty table, for a new domain."""
        off = self._new_table(REG_MIN_CAP)
        r = self._root
        r[D_REG_TABLE] = pack_table(off, REG_MIN_CAP)  # commit
        r[D_REG_CAP] = REG_MIN_CAP
        r[D_REG_USED] = 0
        r[D_REG_LIVE] = 0
        r[D_REG_GEN] += 1

    def problem(self, arena_size: int) -> str | None:
        """Why the table word cannot be trusted (a damaged file), or None."""
        table, cap = unpack_table(int(self._root[D_REG_TABLE]))
        if cap < REG_MIN_CAP or table + cap * ENTRY_WORDS * 8 > arena_size:
            return "bad registry table in the domain header"
        return None

    def _new_table(self, cap: int) -> int:
        nbytes = cap * ENTRY_WORDS * 8
        off = self._alloc(nbytes, "the metric registry", TABLE_ALIGN)
        self._heap[off : off + nbytes] = bytes(nbytes)
        return off

    def table(self) -> memoryview:
        """The table's words (every entry's ``ENTRY_WORDS``)."""
        off, cap = unpack_table(int(self._root[D_REG_TABLE]))
        return self._heap[off : off + cap * ENTRY_WORDS * 8].cast("Q")

    def key_at(self, t: memoryview, i: int) -> bytes:
        """Entry ``i``'s key (bounds-checked against the arena)."""
        off = int(t[i * ENTRY_WORDS + E_KEY])
        n = int(t[i * ENTRY_WORDS + E_META]) >> 16
        if off + n > len(self._heap):
            raise BadDomainFile(22, f"registry entry {i} points outside the arena")
        return bytes(self._heap[off : off + n])

    def lookup(self, key: bytes, h: int | None = None) -> tuple[int, int]:
        """(entry index or -1, first free index on the probe path)."""
        h = key_hash(key) if h is None else h
        t = self.table()
        cap = len(t) // ENTRY_WORDS
        i, free = h & (cap - 1), -1
        for _ in range(cap):
            eh = t[i * ENTRY_WORDS + E_HASH]
            if eh == HASH_EMPTY:
                return -1, free if free >= 0 else i
            if eh == HASH_TOMBSTONE:
                if free < 0:
                    free = i
            elif eh == h and self.key_at(t, i) == key:
                return i, free
            i = (i + 1) & (cap - 1)
        return -1, free

    def kind_ref(self, idx: int) -> tuple[int, int]:
        """(kind, ref as recorded) of entry ``idx``."""
        t = self.table()
        return int(t[idx * ENTRY_WORDS + E_META]) & 0xFF, int(t[idx * ENTRY_WORDS + E_REF])

    # -- changes -------------------------------------------------------------------------

    def insert(self, key: bytes, kind: int, cls: int, ref: int) -> None:
        """Add ``key`` (not present) as a metric of ``kind`` in slot ``ref`` of class
        ``cls``, growing the table first if it is half full."""
        h = key_hash(key)
        r = self._root
        if (r[D_REG_USED] + 1) * 2 > unpack_table(int(r[D_REG_TABLE]))[1]:
            self._grow()
        _, free = self.lookup(key, h)
        key_off = self._alloc(max(len(key), 1), "a metric name", None)
        self._heap[key_off : key_off + len(key)] = key
        t = self.table()
        e = free * ENTRY_WORDS
        was_empty = t[e + E_HASH] == HASH_EMPTY
        t[e + E_KEY] = key_off
        t[e + E_META] = kind | cls << 8 | len(key) << 16
        t[e + E_REF] = ref
        t[e + E_HASH] = h  # commit
        r[D_REG_USED] += 1 if was_empty else 0
        r[D_REG_LIVE] += 1
        r[D_REG_GEN] += 1

    def tombstone(self, idx: int) -> int:
        """Remove entry ``idx`` (the commit), free its key block; its ref as recorded."""
        t = self.table()
        e = idx * ENTRY_WORDS
        ref, key_off = int(t[e + E_REF]), int(t[e + E_KEY])
        t[e + E_HASH] = HASH_TOMBSTONE  # commit: the name is gone
        r = self._root
        r[D_REG_LIVE] -= 1
        r[D_REG_GEN] += 1
        self._free(key_off)
        return ref

    def repoint(self, news: dict[int, int]) -> None:
        """Point every live entry whose ref is a key of ``news`` at its value (compaction)."""
        t = self.table()
        for i, (h, ref) in enumerate(zip(t[E_HASH::ENTRY_WORDS].tolist(),
                                         t[E_REF::ENTRY_WORDS].tolist(), strict=True)):
            if h > HASH_TOMBSTONE and ref in news:
                t[i * ENTRY_WORDS + E_REF] = news[ref]
        self._root[D_REG_GEN] += 1

    def _grow(self) -> None:
        """Rehash the live entries into a new table (dropping tombstones); invariant 2."""
        old = self.table()
        old_off, old_cap = unpack_table(int(self._root[D_REG_TABLE]))
        entries = [tuple(int(old[i * ENTRY_WORDS + j]) for j in range(ENTRY_WORDS))
                   for i in range(len(old) // ENTRY_WORDS)]
        old.release()
        live = [e for e in entries if e[E_HASH] > HASH_TOMBSTONE]
        cap = max(REG_MIN_CAP, old_cap)
        while (len(live) + 1) * 3 > cap:  # doubling: 25-50% full after a grow
            cap *= 2
        off = self._new_table(cap)
        t = self._heap[off : off + cap * ENTRY_WORDS * 8].cast("Q")
        for e in live:
            i = e[E_HASH] & (cap - 1)
            while t[i * ENTRY_WORDS + E_HASH] != HASH_EMPTY:
                i = (i + 1) & (cap - 1)
            for j in (E_KEY, E_META, E_REF, E_HASH):
                t[i * ENTRY_WORDS + j] = e[j]
        t.release()
        r = self._root
        r[D_REG_TABLE] = pack_table(off, cap)  # commit
        r[D_REG_CAP] = cap
        r[D_REG_USED] = len(live)
        r[D_REG_LIVE] = len(live)
        r[D_REG_GEN] += 1
        self._free(old_off)

    # -- reads ---------------------------------------------------------------------------

    def entries_at(self) -> tuple[int, list[Entry]]:
        """The generation and every live entry read at it, as one pair (cached by
        generation): another thread may replace the cache the moment this returns, so a
        caller never reads the generation back on its own."""
        gen = int(self._root[D_REG_GEN])
        cached = self._cache
        if cached[0] == gen:
            return cached
        t = self.table()
        out = []
        for i in range(len(t) // ENTRY_WORDS):
            if t[i * ENTRY_WORDS + E_HASH] > HASH_TOMBSTONE:
                meta = int(t[i * ENTRY_WORDS + E_META])
                out.append((meta & 0xFF, meta >> 8 & 0xFF, int(t[i * ENTRY_WORDS + E_REF]),
                            self.key_at(t, i)))
        self._cache = (gen, out)
        return gen, out

    def live_refs(self) -> dict[int, tuple[int, int]]:
        """Recorded ref -> (entry index, kind) of every live entry."""
        t = self.table()
        return {ref: (i, meta & 0xFF) for i, (h, meta, ref) in enumerate(zip(
            t[E_HASH::ENTRY_WORDS].tolist(), t[E_META::ENTRY_WORDS].tolist(),
            t[E_REF::ENTRY_WORDS].tolist(), strict=True)) if h > HASH_TOMBSTONE}

    def set_ref(self, idx: int, ref: int) -> None:
        """Point entry ``idx`` at ``ref`` (compaction's publish; the caller bumps the
        generation once for the batch)."""
        self.table()[idx * ENTRY_WORDS + E_REF] = ref
