"""Per-cpu counters indexed by vcpu ids: compact concurrency ids leased across processes.

A :class:`Domain` is an arena plus a root block holding the vcpu-id leases, the pageset
directory and the registry of named metrics. Each holder (a process on a GIL build, a thread on
a free-threaded one) leases the lowest free id and updates only its own copy of each slot, so the
hot path is one straight-line statement with no lock and no syscall. Reads sum every id's copy.
See docs/architecture.md.
"""

from ._compact import CompactResult
from ._domain import Domain
from ._errors import (
    BadDomainFile,
    DomainClosed,
    DomainExists,
    DomainFull,
    InvalidArgument,
    InvalidType,
    KindMismatch,
    MetricRemoved,
    PercpuError,
    TooManySeries,
)
from ._exposition import exposition
from ._family import DEFAULT_BUCKETS
from ._handles import Counter, Gauge, Histogram, PerCpu, StampedGauge, Summary
from ._results import DomainCheck, DomainStats, MetricValue

__all__ = [
    "BadDomainFile",
    "CompactResult",
    "Counter",
    "DEFAULT_BUCKETS",
    "Domain",
    "DomainCheck",
    "DomainClosed",
    "DomainExists",
    "DomainFull",
    "DomainStats",
    "Gauge",
    "Histogram",
    "InvalidArgument",
    "InvalidType",
    "KindMismatch",
    "MetricRemoved",
    "MetricValue",
    "PerCpu",
    "PercpuError",
    "StampedGauge",
    "Summary",
    "TooManySeries",
    "exposition",
]
