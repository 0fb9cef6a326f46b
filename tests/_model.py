"""Plain models that the tests check the arena, its TLSF core and the domain's parts against."""

from __future__ import annotations


def free_runs(extents: dict[int, int], total: int) -> list[tuple[int, int]]:
    """Maximal free runs (start, length) around the live ``extents`` {start: length} in a heap
    of ``total`` units (bytes for the arena, granules for the TLSF core)."""
    runs, at = [], 0
    for start in sorted(extents):
        if start > at:
            runs.append((at, start - at))
        at = start + extents[start]
    if at < total:
        runs.append((at, total - at))
    return runs


class FakeHeap:
    """A bytearray heap with a bump allocator, for the parts of a domain that take
    ``alloc(nbytes, what, align)`` and ``free(offset)`` callables: it records the blocks it
    gave and got back, and raises AssertionError (the tests' DomainFull) when full."""

    def __init__(self, size: int = 1 << 16, start: int = 4096) -> None:
        self.mem = bytearray(size)
        self.view = memoryview(self.mem)
        self.next = start  # below it: the fake root block
        self.live: set[int] = set()

    def alloc(self, nbytes: int, what: str, align: int | None) -> int:
        a = align or 8
        off = -(-self.next // a) * a
        assert off + nbytes <= len(self.mem), f"no room for {what}"
        self.next = off + nbytes
        self.live.add(off)
        return off

    def free(self, off: int) -> None:
        self.live.remove(off)
