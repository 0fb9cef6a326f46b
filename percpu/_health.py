"""A domain's health: the figures of ``Domain.stats`` and the slot audit of ``Domain.check``.

Pure functions over what the domain's parts report (words read under the domain lock by the
caller): nothing here takes a lock or writes, except that the audit's pageset pass repairs a
taken count that disagrees with its bitmap (``Pagesets.audit``).

The admission figures (``reserved_pages``, ``reserve_shortfall``, ``free_slots``) say how much
room is left: a metric that needs no new pageset is admitted while the registry and its key
fit; a new pageset needs ``pageset_reserve_bytes`` of 4 KiB-aligned pages first.

Invariant checked: every taken slot has exactly one owner (a registry entry, an id's cache,
the pending queue, a raw object of this process, a compaction batch in flight), every owned
slot is taken, and every free slot is zero in every id's copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._layout import (
    CACHE_CAP,
    D_EPOCH,
    D_FRESH,
    D_OVERFLOW_HOLDERS,
    D_PAGES,
    D_RECLAIMED,
    D_RECOVERED_SLOTS,
    D_REG_FAMILIES,
    D_REG_LIVE,
    D_REUSED,
    D_SERIES_LIMIT,
    D_SERIES_REFUSED,
    D_SHARED_OPS,
    L_PID,
    P_TAKEN,
    PAGE,
    lease_base,
)
from ._lease_records import handed_over, ids_ever_used
from ._pagesets import Pagesets
from ._results import DomainCheck, DomainStats


def figures(root: memoryview, max_vcpus: int, vcpu: int | None, live: list[int],
            pagesets: Pagesets, arena: Any, pending: int,
            moves: dict[str, Any]) -> DomainStats:
    """``Domain.stats()`` from the root words, the live ids, the arena's stats and the
    compaction figures. Domain lock held."""
    r = root
    metrics, pages = int(r[D_REG_LIVE]), int(r[D_PAGES])
    ever = ids_ever_used(r)
    counts = {name: int(r[word]) for name, word in (
        ("fresh_ids", D_FRESH), ("reused_ids", D_REUSED), ("reclaimed_ids", D_RECLAIMED),
        ("overflow_holders", D_OVERFLOW_HOLDERS), ("shared_id_operations", D_SHARED_OPS),
        ("epoch", D_EPOCH), ("recovered_cache_slots", D_RECOVERED_SLOTS),
        ("metric_names", D_REG_FAMILIES), ("series_limit", D_SERIES_LIMIT),
        ("series_refused", D_SERIES_REFUSED))}
    _live, reserved, needed = pagesets.reservation()
    size = arena.used_bytes + arena.free_bytes
    return DomainStats(
        max_vcpus=max_vcpus, vcpu_id=vcpu, holders_now=len(live), ids_in_use=tuple(live),
        holder_pids={k: int(r[lease_base(max_vcpus, k) + L_PID]) for k in live},
        ids_ever_used=ever, highest_id_used=ever - 1, metrics=metrics,
        pagesets=sum(1 for ps in range(pagesets.count()) if pagesets.entry(ps)[P_TAKEN]),
        pages=pages, arena_used_bytes=arena.used_bytes, arena_free_bytes=arena.free_bytes,
        bytes_per_metric=pages * PAGE / metrics if metrics else 0.0,
        minor_faults=arena.minor_faults, major_faults=arena.major_faults,
        pending_frees=pending, reserved_pages=reserved,
        reserve_shortfall=max(0, needed - reserved),
        pageset_reserve_bytes=(max_vcpus + 1) * PAGE, free_slots=pagesets.free_slots(),
        arena_in_use=arena.used_bytes / size if size else 0.0,
        handed_over=handed_over(r, max_vcpus), **counts, **moves)


def reclaim_slots(pagesets: Pagesets, refs: list[int]) -> int:
    """Zero and give back ``refs`` (unreferenced slots, nobody else alive); how many."""
    for ref in refs:
        pagesets.zero(ref)
    pagesets.give_back(refs)
    return len(refs)


def check_report(problems: list[str], unreferenced: list[int], reclaimed: int,
                 arena_report: Any) -> DomainCheck:
    """``Domain.check``'s result from the audit, the reclamation and the arena's check."""
    return DomainCheck(ok=not problems and arena_report.ok and len(unreferenced) == reclaimed,
                       problems=tuple(problems), unreferenced_slots=len(unreferenced),
                       reclaimed_slots=reclaimed, arena=arena_report)


def audit(registry_refs: Iterable[int], caches: Iterable[tuple[int, int, int, list[int]]],
          pending_refs: Iterable[int], raw: set[int], moving: frozenset[int],
          pagesets: Pagesets) -> tuple[list[str], list[int]]:
    """(problems, unreferenced slots) of the invariant above. ``caches``: (id, class, count,
    refs) of every id's cache list. Domain lock held."""
    problems: list[str] = []
    shared = list(registry_refs)
    for k, c, n, refs in caches:
        if n > CACHE_CAP:
            problems.append(f"id {k} class {c}: cache count {n} > {CACHE_CAP}")
        shared.extend(refs)
    shared.extend(pending_refs)
    referenced = set(shared)
    if len(referenced) != len(shared):
        problems.append(f"{len(shared) - len(referenced)} slots are held twice (by the "
                        "registry, a cache or the pending queue)")
    if raw & referenced:
        problems.append(f"{len(raw & referenced)} raw objects of this process share their "
                        "slot with a metric, a cache or the pending queue")
    referenced |= raw
    referenced |= moving  # a compaction batch in flight holds both slots of each move
    taken, dirty, repaired = pagesets.audit()
    problems += repaired
    if dirty:
        problems.append(f"{dirty} free slots are not zero (written after being freed)")
    missing = referenced - taken
    if missing:
        problems.append(f"{len(missing)} referenced slots are not marked taken")
    return problems, sorted(taken - referenced)
