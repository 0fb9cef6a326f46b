"""Plain models that the allocator tests check the arena and its TLSF core against."""

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
