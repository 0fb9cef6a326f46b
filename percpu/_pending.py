"""The queue of slots waiting for a grace period (``Domain.remove``), in shared memory.

Invariants
----------
1. An entry ``(ref, epoch)`` stays in the queue until every live holder has acknowledged
   ``epoch``; only then is it taken out, and the entry goes *before* the slot is zeroed and
   freed (:meth:`PendingQueue.take_due` returns the refs, the caller frees them), so a holder
   killed in between leaks the slot (``check`` finds it) and never frees it twice.
2. Adding never waits for a holder: the first ``PENDING_CAP`` entries live in the root block,
   the rest in a *spill table*, an arena block that doubles when full (:meth:`reserve`, before
   the caller commits anything, so ``DomainFull`` changes nothing). A stopped holder delays
   reclamation, never ``remove``.
3. Each part's count word is the commit of a push or a take: an entry exists once it is
   counted. The spill table's location and capacity are one word (``D_SPILL``), so growing it
   commits with one store and a crash leaves the old table in place (and a block leaked).

4. Each ref is sealed with its epoch word, its part and its position (``_layout.seal``): an
   entry that fails its check (a flipped bit, a zeroed run, an entry copied from elsewhere)
   is refused (``BadDomainFile``) before any entry is taken out. The epoch word also holds
   the size class of the slot (``PE_CLASS_SHIFT``), so that whoever zeroes the slot can check
   that its pageset still says that class (a damaged class word would zero other slots).

Every word is read and written under the domain lock; the module is pure (words in, words
out) apart from the two callables that allocate and free arena blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Container

from ._errors import damaged
from ._layout import (
    D_PENDING,
    D_SPILL,
    D_SPILL_N,
    EPOCH_MASK,
    PE_CLASS_SHIFT,
    PE_EPOCH,
    PE_REF,
    PENDING_CAP,
    PENDING_WORDS,
    TABLE_ALIGN,
    pack_table,
    seal,
    unpack_table,
    unseal,
)

Part = tuple[memoryview, int, int]  # (words, index of the first entry, root word of its count)


def _salt(word: int, part: int, i: int) -> int:
    return 2 << 60 ^ word << 24 ^ part << 23 ^ i


def _split(word: int) -> tuple[int, int]:
    """(epoch, size class) of an entry's epoch word."""
    return word & EPOCH_MASK, word >> PE_CLASS_SHIFT


class PendingQueue:
    """The pending-free queue of one domain: inline part at word ``base`` of ``root``, spill
    table in ``heap``. ``alloc(nbytes, what, align)`` returns the offset of a kept arena block
    (raising ``DomainFull``), ``free(offset)`` gives one back."""

    def __init__(self, root: memoryview, heap: memoryview, base: int,
                 alloc: Callable[[int, str, int], int], free: Callable[[int], None]) -> None:
        self._root = root
        self._heap = heap
        self._base = base
        self._alloc = alloc
        self._free = free

    def problem(self, arena_size: int) -> str | None:
        """Why the queue's words cannot be trusted (a damaged file), or None."""
        r = self._root
        spill, cap = unpack_table(int(r[D_SPILL])) if r[D_SPILL] else (0, 0)
        if r[D_PENDING] > PENDING_CAP or r[D_SPILL_N] > cap:
            return "a pending-queue count is above its capacity"
        if spill + cap * PENDING_WORDS * 8 > arena_size:
            return "the pending spill table lies outside the arena"
        return None

    def parts(self) -> list[Part]:
        """The inline part, then the spill table if there is one."""
        r = self._root
        parts: list[Part] = [(r, self._base, D_PENDING)]
        if r[D_SPILL]:
            off, cap = unpack_table(int(r[D_SPILL]))
            parts.append((self._heap[off : off + cap * PENDING_WORDS * 8].cast("Q"), 0,
                          D_SPILL_N))
        return parts

    def count(self) -> int:
        """Slots waiting (a hint when read without the lock)."""
        return int(self._root[D_PENDING]) + int(self._root[D_SPILL_N])

    def entries(self) -> list[tuple[int, int]]:
        """(ref, epoch) of every waiting slot."""
        return [(ref, epoch) for ref, epoch, _cls in self.entries_with_class()]

    def entries_with_class(self) -> list[tuple[int, int, int]]:
        """(ref, epoch, size class of its slot) of every waiting slot, each checked."""
        r = self._root
        out = []
        for part, (words, base, count) in enumerate(self.parts()):
            for i in range(int(r[count])):
                p = base + i * PENDING_WORDS
                word = int(words[p + PE_EPOCH])
                ref = unseal(int(words[p + PE_REF]), _salt(word, part, i))
                if ref < 0:
                    raise damaged(f"pending entry {i} of part {part} is damaged")
                out.append((ref, *_split(word)))
        return out

    def reserve(self) -> None:
        """Make room for one more entry, growing the spill table when it is full."""
        r = self._root
        if r[D_PENDING] < PENDING_CAP:
            return
        word, n = int(r[D_SPILL]), int(r[D_SPILL_N])
        old_off, cap = unpack_table(word) if word else (0, 0)
        if n < cap:
            return
        new_cap = max(PENDING_CAP, cap * 2)
        off = self._alloc(new_cap * PENDING_WORDS * 8, "the pending-free queue", TABLE_ALIGN)
        used = n * PENDING_WORDS * 8
        self._heap[off : off + used] = self._heap[old_off : old_off + used]
        r[D_SPILL] = pack_table(off, new_cap)  # commit: a crash before it leaks the block
        if word:
            self._free(old_off)

    def push(self, ref: int, epoch: int, cls: int = 0) -> None:
        """Queue ``ref`` (a slot of size class ``cls``) until every live holder has
        acknowledged ``epoch``."""
        self.reserve()
        r = self._root
        part = 0 if r[D_PENDING] < PENDING_CAP else 1
        words, base, count = self.parts()[part]
        n = int(r[count])
        p = base + n * PENDING_WORDS
        word = epoch | cls << PE_CLASS_SHIFT
        words[p + PE_REF] = seal(ref, _salt(word, part, n))
        words[p + PE_EPOCH] = word
        r[count] = n + 1  # commit

    def take_due(self, oldest: int, keep: Container[int],
                 check: Callable[[int, int, int], None] | None = None) -> list[int]:
        """Take out every entry whose epoch every live holder has acknowledged (``<= oldest``)
        and whose ref is not in ``keep`` (a compaction still moves it); return their refs,
        which the caller zeroes and frees (invariant 1). ``check(ref, epoch, class)``, run on
        every entry first, may refuse one (raise) before anything is taken out."""
        for ref, epoch, cls in self.entries_with_class():  # every entry checked first (4)
            if check is not None:
                check(ref, epoch, cls)
        r = self._root
        due = []
        for part, (words, base, count) in enumerate(self.parts()):
            i = 0
            while i < int(r[count]):
                p = base + i * PENDING_WORDS
                word = int(words[p + PE_EPOCH])
                ref = unseal(int(words[p + PE_REF]), _salt(word, part, i))
                if word & EPOCH_MASK <= oldest and ref not in keep:
                    n = int(r[count]) - 1
                    last = base + n * PENDING_WORDS
                    moved = int(words[last + PE_EPOCH])
                    ref_moved = unseal(int(words[last + PE_REF]), _salt(moved, part, n))
                    # The last entry moves to position i: sealed again for it. A crash
                    # before the count's store leaves it at both places, the copy at i
                    # sealed for i: the next take finds both valid and frees the slot once
                    # (give_back refuses the second time), never zeroes a reused one: the
                    # two leave the queue together, before the slot can be reused.
                    words[p + PE_REF] = seal(ref_moved, _salt(moved, part, i))
                    words[p + PE_EPOCH] = moved
                    r[count] = n  # commit
                    due.append(ref)
                else:
                    i += 1
        return due
