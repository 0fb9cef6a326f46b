"""Per-id caches of free slots: allocation and free without the domain lock.

Each id's lease record holds, per size class, a count and up to ``CACHE_CAP`` refs of free
(zeroed, taken from their pageset) slots. Only the holder of the id touches its caches on the
fast path, under its process lock; a refill from, or a drain to, the pageset layer moves
``CACHE_REFILL`` refs at once under the domain lock.

Invariants
----------
1. The count word is the commit: a pop stores the smaller count *before* the ref is used, a
   push stores the larger count *after* the ref is written. A holder killed in between leaks
   a slot (``check`` finds it), never hands one out twice.
2. A dead holder's caches stay as they were; the next holder of the id takes them over (and
   counts them: ``D_RECOVERED_SLOTS``).
3. A count above ``CACHE_CAP`` (a damaged file) is never used to index: it is refused; each
   ref is sealed with its id, class and position (``_layout.seal``), and a ref that fails its
   check, or names a slot that is free or of another class, is refused before it is handed
   out (``BadDomainFile``).
"""

from __future__ import annotations

from arena.locks import SharedLock

from ._errors import damaged
from ._layout import (
    CACHE_CAP,
    CACHE_REFILL,
    CACHE_WORDS,
    L_CACHE,
    SIZE_CLASSES,
    lease_base,
    seal,
    split_ref,
    unseal,
)
from ._pagesets import Pagesets

CacheList = tuple[int, int, list[int]]  # (count word, count, refs)


def _salt(k: int, cls: int, i: int) -> int:
    return 1 << 60 | k << 16 | cls << 8 | i


class Caches:
    """The per-id caches of one domain (``root`` words, ``max_vcpus`` ids; the overflow id
    keeps none)."""

    def __init__(self, root: memoryview, max_vcpus: int, lock: SharedLock,
                 pagesets: Pagesets) -> None:
        self._root = root
        self._max = max_vcpus
        self._lock = lock
        self._pagesets = pagesets

    def lists(self, k: int) -> list[CacheList]:
        """Each size class's cache of id ``k``: the one walk over an id's caches. A count
        above ``CACHE_CAP`` comes with no refs."""
        r = self._root
        base = lease_base(self._max, k) + L_CACHE
        out = []
        for c in range(len(SIZE_CLASSES)):
            cb = base + c * CACHE_WORDS
            n = int(r[cb])
            words = r[cb + 1 : cb + 1 + n].tolist() if n <= CACHE_CAP else []
            refs = [unseal(w, _salt(k, c, i)) for i, w in enumerate(words)]
            if -1 in refs:
                raise damaged(f"id {k}'s cache of class {c} holds a damaged ref")
            out.append((cb, n, refs))
        return out

    def _store(self, cb: int, k: int, cls: int, refs: list[int], at: int = 0) -> None:
        """Write ``refs`` at positions ``at``.. of the cache list whose count word is ``cb``."""
        r = self._root
        for i, ref in enumerate(refs, at):
            r[cb + 1 + i] = seal(ref, _salt(k, cls, i))

    def all_lists(self) -> list[tuple[int, int, int, list[int]]]:
        """(id, class, count, refs) of every id's cache of every class (for ``check``)."""
        return [(k, c, n, refs) for k in range(self._max)
                for c, (_cb, n, refs) in enumerate(self.lists(k))]

    def count(self, k: int) -> int:
        """Slots in id ``k``'s caches."""
        return sum(len(refs) for _cb, _n, refs in self.lists(k))

    def pop(self, vcpu: int, cls: int) -> int:
        """A free ref of class ``cls`` for the holder of ``vcpu`` (its process lock held),
        refilling the cache in bulk when empty; the overflow id takes one from the pagesets."""
        r = self._root
        if vcpu == self._max:
            with self._lock:
                return self._pagesets.take(cls, 1)[0]
        base = lease_base(self._max, vcpu) + L_CACHE + cls * CACHE_WORDS
        if r[base] == 0:
            with self._lock:
                refs = self._pagesets.take(cls, CACHE_REFILL)
                self._store(base, vcpu, cls, refs)
                r[base] = len(refs)  # commit
        n = int(r[base])
        if n > CACHE_CAP:
            raise damaged(f"id {vcpu}'s cache count {n} is above {CACHE_CAP}")
        ref = unseal(int(r[base + n]), _salt(vcpu, cls, n - 1))
        if ref < 0:
            raise damaged(f"id {vcpu}'s cache of class {cls} holds a damaged ref")
        self._pagesets.check_ref(ref, cls)
        if not self._pagesets.is_taken(ref):
            raise damaged(f"id {vcpu}'s cache holds {ref:#x}, a slot not taken")
        r[base] = n - 1  # commit before use: a crash now leaks the slot, never doubles it
        return ref

    def push(self, vcpu: int, cls: int, ref: int) -> None:
        """Return a zeroed ref to the cache of ``vcpu`` (its process lock held), draining a
        batch to the pagesets when it is full."""
        r = self._root
        if vcpu == self._max:
            with self._lock:
                self._pagesets.give_back([ref])
            return
        base = lease_base(self._max, vcpu) + L_CACHE + cls * CACHE_WORDS
        n = int(r[base])
        if n > CACHE_CAP:
            raise damaged(f"id {vcpu}'s cache count {n} is above {CACHE_CAP}")
        if n == CACHE_CAP:
            with self._lock:
                keep = CACHE_CAP - CACHE_REFILL
                spill = self.lists(vcpu)[cls][2][keep:]
                r[base] = keep  # commit
                self._pagesets.give_back(spill)
                n = keep
        self._store(base, vcpu, cls, [ref], n)
        r[base] = n + 1  # commit

    def holds_any(self, k: int, pagesets: frozenset[int]) -> bool:
        """True when id ``k``'s caches hold a slot of one of ``pagesets``."""
        return any(split_ref(x)[0] in pagesets for _cb, _n, refs in self.lists(k) for x in refs)

    def drain(self, k: int, pagesets: frozenset[int]) -> None:
        """Give back id ``k``'s cached slots that lie in ``pagesets`` (a compaction empties
        them). The caller owns ``k`` and holds the domain lock."""
        if not pagesets:
            return
        r = self._root
        for c, (cb, _n, refs) in enumerate(self.lists(k)):
            out = [x for x in refs if split_ref(x)[0] in pagesets]
            if not out:
                continue
            keep = [x for x in refs if split_ref(x)[0] not in pagesets]
            self._store(cb, k, c, keep)
            r[cb] = len(keep)  # commit: a crash from here leaks the slots below (check())
            for x in out:
                self._pagesets.zero(x)
            self._pagesets.give_back(out)
