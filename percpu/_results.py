"""What a domain reports: its health figures, the metrics of a snapshot, a check's findings.

Plain values (copies: changing one changes nothing in the domain), shared by the domain and the
parts that fill them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DomainStats:
    """Health figures of a domain (shared figures count every process)."""

    max_vcpus: int  #: ids that can be leased (plus the shared overflow id)
    vcpu_id: int | None  #: this process's id (None before its first use; max_vcpus = overflow)
    holders_now: int  #: ids held by a live holder right now (overflow holders not included)
    ids_in_use: tuple[int, ...]  #: those ids, ascending (seed 000's "online" mask)
    holder_pids: dict[int, int]  #: id -> pid recorded by its live holder
    #: Ids ever leased in the domain. Ids go lowest first, so these are ids
    #: 0..ids_ever_used - 1 (per-cpu memory follows this figure), and it is at most the peak
    #: number of holders alive at once, however many processes came and went.
    ids_ever_used: int
    highest_id_used: int  #: the highest id ever leased: ids_ever_used - 1 (-1 before any)
    fresh_ids: int  #: leases of an id never leased before (= distinct ids ever used)
    reused_ids: int  #: leases of an id released cleanly before (its values carry on)
    reclaimed_ids: int  #: leases of an id whose holder died holding it (its values carry on)
    overflow_holders: int  #: holders, ever, that found every id taken and shared the overflow id
    shared_id_operations: int  #: operations done on the overflow id, under its lock, ever
    metrics: int  #: named metrics registered
    pagesets: int  #: pagesets with at least one slot taken
    pages: int  #: pages allocated to pagesets (each is one id's page of one pageset)
    pending_frees: int  #: slots waiting for a grace period
    epoch: int  #: grace-period epoch
    recovered_cache_slots: int  #: slots recovered from dead holders' caches
    arena_used_bytes: int
    arena_free_bytes: int
    bytes_per_metric: float  #: pages * 4096 / metrics (0 when there are none)
    minor_faults: int  #: minor page faults of this process since its arena was ready
    major_faults: int
    # Compaction (Domain.compact): memory given back, and the batch in flight if any.
    arena_pages_used: int = 0  #: 4096-byte pages of the arena in use (used bytes, rounded up)
    pending_moves: int = 0  #: moves published and waiting for a holder's quiescent point
    pending_move_seconds: float = 0.0  #: how long they have waited (0 when none)
    moved_slots: int = 0  #: slots moved by compaction, ever
    compacted_pagesets: int = 0  #: pagesets emptied and given back by compaction, ever
    compacted_pages: int = 0  #: their pages, returned to the arena, ever
    compaction_batches: int = 0  #: compaction batches completed, ever
    # The registry (Domain.set_series_limit).
    metric_names: int = 0  #: metric names (families) registered; ``metrics`` counts series
    series_limit: int = 0  #: series a metric name may have (0: no limit)
    series_refused: int = 0  #: registrations refused by that limit, ever
    # Admission (a new pageset reserves a page for every id first: ``_pagesets`` invariant 4).
    #: Pages set aside for ids that have not yet touched a pageset in use: a holder's first
    #: touch takes one, so counting never meets DomainFull. They are arena blocks, counted in
    #: ``arena_used_bytes``; ``arena_free_bytes`` is what is free beyond them.
    reserved_pages: int = 0
    reserve_shortfall: int = 0  #: pages the reserve lacks (a holder died mid page-in; else 0)
    #: Bytes the next new pageset reserves: (max_vcpus + 1) pages (the overflow id's included)
    pageset_reserve_bytes: int = 0
    free_slots: int = 0  #: free slots in the pagesets in use: metrics that need no new pageset
    arena_in_use: float = 0.0  #: arena_used_bytes / arena size (reserved pages are in use)
    #: Overflow holders (a process, or a thread in per-thread mode) handed a freed id at a
    #: quiescent point, ever: each left the overflow id's locked path; its lease is also
    #: counted by the id's path (fresh, reused, reclaimed).
    handed_over: int = 0


@dataclass(slots=True)  # not frozen: a snapshot builds one per metric, and a frozen
class MetricValue:      # dataclass's __init__ costs about three times as much
    """One metric in a :meth:`Domain.snapshot` (a copy: changing it changes nothing)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    kind: str  #: "counter", "gauge", "summary" or "histogram"
    value: int | float  #: counter/gauge value; a summary's or histogram's sum
    count: int = 0  #: a summary's or histogram's count
    #: a histogram's cumulative ``(le, count)`` per bucket, ``(inf, count)`` last
    buckets: tuple[tuple[float, int], ...] = ()
    documentation: str = ""  #: the family's help text
    unit: str = ""  #: the family's unit


@dataclass(frozen=True)
class DomainCheck:
    """What :meth:`Domain.check` found."""

    ok: bool
    problems: tuple[str, ...]
    unreferenced_slots: int  #: slots taken but in no registry entry, cache or pending queue
    reclaimed_slots: int
    arena: Any  #: the arena's CheckReport
