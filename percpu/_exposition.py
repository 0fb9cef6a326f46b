"""Rendering of metric values as Prometheus text (0.0.4) and OpenMetrics 1.0 text, and a
small HTTP endpoint that serves them.

Guarantees:

* A :class:`MetricSample` is validated when it is built (name, kind, labels, value types,
  OpenMetrics' rules for counter-like values), so the renderers only ever see samples they
  can write; a bad sample raises :class:`~percpu._errors.InvalidType` or
  :class:`~percpu._errors.InvalidArgument` at construction, naming the value.
* :func:`render_prometheus` and :func:`render_openmetrics` are pure functions of their input:
  the same samples give the same bytes whatever their order (families sorted by name, series
  sorted by labels), every family appears once with at most one ``# HELP`` (omitted when the
  help text is empty) and exactly one ``# TYPE``, label values and help text are escaped as
  each format requires, and the output is UTF-8. They raise
  :class:`~percpu._errors.InvalidArgument` instead of writing an ambiguous exposition: one
  family given as two kinds, one series given twice, or two families whose sample names
  would clash (a counter ``a`` and a gauge ``a_total``, for instance).
* :func:`negotiate` picks OpenMetrics only when the client's ``Accept`` header names
  ``application/openmetrics-text`` with a non-zero q-value at least as high as the one it
  gives the Prometheus text format; everything else, malformed headers included, gets the
  Prometheus text format.
* :func:`domain_samples` turns a :meth:`Domain.snapshot <percpu.Domain.snapshot>` (and, when
  asked, the domain's health figures) into samples, never failing a whole scrape for one bad
  metric: a series the formats cannot carry (a negative counter, a summary with a negative
  sum) or one that would clash with another (a counter ``a_total`` beside a counter ``a``, a
  gauge ``a_count`` beside a summary ``a``) is dropped, logged, and counted in the gauge
  ``percpu_exposition_dropped_series``. That family is the runtime's own: a user metric that
  claims it (any kind, any labels) is itself dropped and counted, never a failed scrape.
  Health figures, optional, give way to a user metric of the same name.
* :class:`DomainExposition` (and :func:`exposition`, which keeps one layout per domain in a
  weak table) renders exactly the bytes of the plain path above, from a layout made once per
  change of the domain's series (the text before each value, the order, what was left out):
  a scrape then costs one pass per line. Numbers the layout's bulk checks cannot vouch for
  send that scrape down the plain path, so the two never differ.
* :func:`encode` gzips a body exactly when the request's ``Accept-Encoding`` accepts gzip
  (:func:`accepts_gzip`); the HTTP endpoint does it for every scrape.
* :func:`make_server` binds to the loopback interface unless told otherwise, serves only
  ``GET``/``HEAD`` on ``/metrics`` and ``/``, and writes nothing to stderr: access lines,
  failures of ``collect`` and connection errors go to the ``percpu._exposition`` logger
  (which has a :class:`logging.NullHandler`, so they are dropped unless the application
  configures logging).

Standard library only.
"""

from __future__ import annotations

import gzip
import logging
import math
import operator
import re
import socket
import socketserver
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

from ._errors import InvalidArgument, InvalidType, PercpuError
from ._names import Labels, canonical_labels, validate_metric_name
from ._results import MetricValue

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_PROMETHEUS",
    "DomainExposition",
    "DomainLike",
    "GZIP_LEVEL",
    "MetricKind",
    "MetricSample",
    "Scrape",
    "Scraper",
    "accepts_gzip",
    "collect_domain",
    "domain_samples",
    "encode",
    "exposition",
    "health_samples",
    "make_server",
    "negotiate",
    "render_openmetrics",
    "render_prometheus",
]

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

MetricKind = Literal["counter", "gauge", "summary", "histogram"]
_KINDS: frozenset[str] = frozenset(("counter", "gauge", "summary", "histogram"))
_UNIT_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

# Integers are written exactly; they must fit in 64 bits (signed or unsigned), which is what
# the counters hold and what a scraper stores without surprise. Larger values: pass a float.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# The sample names each kind of family owns in OpenMetrics (which also reserves `_created`).
_OWNED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum", "_created"),
    "histogram": ("", "_bucket", "_count", "_sum", "_created"),
}

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_number(what: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidType(
            f"{what} must be an int or a float, got {type(value).__name__} {_show(value)}"
        )
    if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
        raise InvalidArgument(
            f"{what} {_show(value)} does not fit in 64 bits; accepted: an int from "
            f"-2**63 to 2**64-1, or a float"
        )
    return value


def _check_counter_like(what: str, value: int | float) -> None:
    if math.isnan(value) or value < 0:
        raise InvalidArgument(
            f"{what} is {_show(value)}; accepted: a number >= 0 that is not NaN "
            "(OpenMetrics forbids negative or NaN counter values)"
        )


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidType(f"{what} must be a str, got {type(value).__name__} {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{what} {_show(value)} cannot be encoded as UTF-8; accepted: text UTF-8 can encode"
        ) from None
    return value


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One series of one metric family, as the renderers take it.

    * ``name``: the metric name. For a counter, give it without the ``_total`` suffix; a name
      that ends in ``_total`` has it removed to form the family name (as prometheus_client
      does), so ``requests`` and ``requests_total`` name the same family.
    * ``kind``: ``"counter"``, ``"gauge"`` or ``"summary"``.
    * ``labels``: ``(name, value)`` pairs; stored validated and sorted by name. A summary may
      not carry a ``quantile`` label (the formats reserve it).
    * ``value``: the counter or gauge value (int or float; for a counter >= 0 and not NaN).
      Unused by a summary (pass 0).
    * ``count``, ``sum``: a summary's count (int >= 0) and sum (>= 0, not NaN). Unused by the
      other kinds.
    * ``help``: the family's help text, written without surrounding whitespace; the first
      sample of a family with a non-blank help gives it. No ``# HELP`` line is written for a
      family without one.
    * ``buckets``: a histogram's cumulative ``(le, count)`` pairs, ``le`` increasing, the
      last ``(inf, count)``; counts never decrease. ``count`` must equal the last one; a
      histogram may not carry an ``le`` label.
    * ``unit``: the family's unit (OpenMetrics ``# UNIT``; the family name must end with
      ``_<unit>``); the first sample of a family with a unit gives it.

    Ints must fit in 64 bits (signed or unsigned) and are written exactly.
    """

    name: str
    kind: MetricKind
    labels: Labels
    value: int | float
    count: int = 0
    sum: float = 0.0
    help: str = ""
    buckets: tuple[tuple[float, int], ...] = ()
    unit: str = ""

    def __post_init__(self) -> None:
        validate_metric_name(self.name)
        if not isinstance(self.kind, str) or self.kind not in _KINDS:
            raise InvalidArgument(
                f"metric kind {_show(self.kind)} is not known; accepted: 'counter', 'gauge', "
                "'summary', 'histogram'"
            )
        labels = canonical_labels(self.labels)
        if self.kind == "summary" and any(name == "quantile" for name, _ in labels):
            raise InvalidArgument(
                f"summary {self.name!r} has a 'quantile' label; accepted: any other label "
                "name ('quantile' is reserved for summary quantiles)"
            )
        if self.kind == "histogram":
            if any(name == "le" for name, _ in labels):
                raise InvalidArgument(f"histogram {self.name!r} has an 'le' label; accepted: "
                                      "any other label name ('le' is reserved for buckets)")
            _check_buckets(self.name, self.buckets, self.count)
        elif self.buckets:
            raise InvalidArgument(f"{self.kind} {self.name!r} has buckets; only a histogram does")
        if not isinstance(self.unit, str) or (self.unit and (
                _UNIT_RE.fullmatch(self.unit) is None
                or not self.family.endswith("_" + self.unit))):
            raise InvalidArgument(f"unit {_show(self.unit)} of {self.name!r}: accepted: a unit "
                                  "the family name ends with, after an underscore")
        object.__setattr__(self, "labels", labels)
        value = _check_number(f"value of {self.name!r}", self.value)
        count = self.count
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidType(
                f"count of {self.name!r} must be an int, got {type(count).__name__} {_show(count)}"
            )
        _check_number(f"count of {self.name!r}", count)
        total = _check_number(f"sum of {self.name!r}", self.sum)
        _check_text(f"help of {self.name!r}", self.help)
        if self.kind == "counter":
            _check_counter_like(f"value of counter {self.name!r}", value)
        elif self.kind == "summary":
            _check_counter_like(f"count of summary {self.name!r}", count)
            _check_counter_like(f"sum of summary {self.name!r}", total)
        elif self.kind == "histogram":
            _check_counter_like(f"count of histogram {self.name!r}", count)
            if math.isnan(total):
                raise InvalidArgument(f"sum of histogram {self.name!r} is NaN")

    @property
    def family(self) -> str:
        """The family name: ``name``, less a trailing ``_total`` for a counter."""
        if self.kind == "counter" and self.name.endswith("_total") and len(self.name) > 6:
            return self.name[:-6]
        return self.name


# --------------------------------------------------------------------------------------------
# Rendering


def _check_buckets(name: str, buckets: object, count: int) -> None:
    if not isinstance(buckets, tuple) or not buckets:
        raise InvalidArgument(f"histogram {name!r} needs its buckets: (le, count) pairs")
    previous_le, previous = -math.inf, 0
    for pair in buckets:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise InvalidArgument(f"histogram {name!r}: a bucket is not an (le, count) pair")
        le, n = pair
        if isinstance(n, bool) or not isinstance(n, int) or not isinstance(le, int | float):
            raise InvalidType(f"histogram {name!r}: bucket {_show(pair)} is not (number, int)")
        if not le > previous_le or n < previous:
            raise InvalidArgument(f"histogram {name!r}: buckets must have increasing le and "
                                  f"non-decreasing counts, got {_show(buckets)}")
        previous_le, previous = le, n
    if previous_le != math.inf or previous != count:
        raise InvalidArgument(f"histogram {name!r}: the last bucket must be (inf, count), "
                              f"got {_show(buckets[-1])} with count {count}")


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    series: dict[Labels, MetricSample]
    unit: str = ""


def _group(
    samples: Iterable[MetricSample], dropped: list[tuple[MetricSample, str]] | None = None
) -> list[_Family]:
    """Group samples by family, sorted by family name; refuse ambiguous input.

    With ``dropped`` (lenient mode) an ambiguous sample is appended there with the reason
    instead of raising; the first sample (in input order) of a name keeps it.
    """
    families: dict[str, _Family] = {}
    # Sample name -> the family that writes it (the names each kind owns, `_OWNED_SUFFIXES`).
    owner: dict[str, str] = {}
    for sample in samples:
        if not isinstance(sample, MetricSample):
            raise InvalidType(f"expected MetricSample, got {type(sample).__name__} {_show(sample)}")
        family = families.get(sample.family)
        problem = None
        if family is not None and family.kind != sample.kind:
            problem = (
                f"metric family {family.name!r} is given both as a {family.kind} and as a "
                f"{sample.kind}; accepted: one kind per family"
            )
        elif family is not None and sample.labels in family.series:
            problem = (
                f"series {family.name!r} with labels {dict(sample.labels)!r} is given twice; "
                "accepted: each series once"
            )
        elif family is None:
            for suffix in _OWNED_SUFFIXES[sample.kind]:
                other = owner.get(sample.family + suffix)
                if other is not None:
                    problem = (
                        f"metric families {other!r} and {sample.family!r} both claim the name "
                        f"{sample.family + suffix!r}; accepted: families whose sample names do "
                        "not clash"
                    )
                    break
        if problem is not None:
            if dropped is None:
                raise InvalidArgument(problem)
            dropped.append((sample, problem))
            continue
        if family is None:
            family = families[sample.family] = _Family(sample.family, sample.kind, "", {})
            for suffix in _OWNED_SUFFIXES[sample.kind]:
                owner[sample.family + suffix] = sample.family
        family.series[sample.labels] = sample
        if not family.help:
            # Whitespace around a help text is dropped: neither format carries it reliably
            # (parsers skip the spaces after the metric name and strip the end of a line).
            family.help = sample.help.strip()
        if not family.unit:
            family.unit = sample.unit
    return [families[name] for name in sorted(families)]


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_number(value: int | float) -> str:
    if isinstance(value, int):
        return int.__repr__(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return float.__repr__(value)


def _series_prefix(name: str, labels: Labels) -> str:
    """A sample line up to its value: ``name{labels} ``."""
    if labels:
        inner = ",".join(f'{key}="{_escape_label_value(val)}"' for key, val in labels)
        return f"{name}{{{inner}}} "
    return f"{name} "


# A line of a family: the text before its value (the family's headers folded into its first
# line), the sample that gives the value, and which of its fields: "value", "count", "sum",
# or "bucket<i>" (a histogram's i-th cumulative count).
_Line = tuple[str, MetricSample, str]


def _field(sample: MetricSample, field: str) -> int | float:
    if field.startswith("bucket"):
        return sample.buckets[int(field[6:])][1]
    value: int | float = getattr(sample, field)
    return value


def _family_lines(family: _Family, *, openmetrics: bool) -> list[_Line]:
    """Every line of ``family``, in order. The one place that decides what a family writes:
    both the plain renderers and the cached layout of a domain use it, so they agree."""
    lines = _family_body(family)
    prefix, sample, field = lines[0]  # a family exists only once it has a series
    lines[0] = (_family_head(family, openmetrics=openmetrics) + prefix, sample, field)
    return lines


def _family_head(family: _Family, *, openmetrics: bool) -> str:
    """The header lines of ``family`` (HELP, TYPE, UNIT): all that differs between formats."""
    if family.kind == "counter" and not openmetrics:
        # Text 0.0.4 convention: the family is named like its sample, `<name>_total`.
        meta_name = family.name + "_total"
    else:
        meta_name = family.name
    head = ""
    if family.help:
        text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        if openmetrics:
            text = text.replace('"', '\\"')
        head = f"# HELP {meta_name} {text}\n"
    head += f"# TYPE {meta_name} {family.kind}\n"
    if family.unit and openmetrics:
        head += f"# UNIT {meta_name} {family.unit}\n"
    return head


def _family_body(family: _Family) -> list[_Line]:
    """The sample lines of ``family`` (the same in both formats), in order."""
    lines: list[_Line] = []
    for labels in sorted(family.series):
        sample = family.series[labels]
        if family.kind == "counter":
            lines.append((_series_prefix(family.name + "_total", labels), sample, "value"))
        elif family.kind == "gauge":
            lines.append((_series_prefix(family.name, labels), sample, "value"))
        elif family.kind == "histogram":
            for i, (le, _n) in enumerate(sample.buckets):
                bound = (*labels, ("le", _format_number(float(le))))
                lines.append((_series_prefix(family.name + "_bucket", bound), sample,
                              f"bucket{i}"))
            lines.append((_series_prefix(family.name + "_count", labels), sample, "count"))
            lines.append((_series_prefix(family.name + "_sum", labels), sample, "sum"))
        else:
            lines.append((_series_prefix(family.name + "_count", labels), sample, "count"))
            lines.append((_series_prefix(family.name + "_sum", labels), sample, "sum"))
    return lines


def _render(families: list[_Family], out: list[str], *, openmetrics: bool) -> None:
    for family in families:
        for prefix, sample, field in _family_lines(family, openmetrics=openmetrics):
            out.append(f"{prefix}{_format_number(_field(sample, field))}\n")


def render_prometheus(samples: Iterable[MetricSample]) -> bytes:
    """Render ``samples`` in the Prometheus text format 0.0.4 (UTF-8).

    A counter family ``x`` is written as ``# TYPE x_total counter`` with samples
    ``x_total``; a summary as ``x_count`` and ``x_sum`` (no quantiles). Raises
    :class:`InvalidArgument` on ambiguous input (see the module docstring).
    """
    out: list[str] = []
    _render(_group(samples), out, openmetrics=False)
    return "".join(out).encode("utf-8")


def render_openmetrics(samples: Iterable[MetricSample]) -> bytes:
    """Render ``samples`` as OpenMetrics 1.0 text (UTF-8), ending with ``# EOF``.

    A counter family ``x`` is written as ``# TYPE x counter`` with samples ``x_total``; a
    summary as ``x_count`` and ``x_sum``; a histogram as ``x_bucket{le=...}``, ``x_count``
    and ``x_sum``; ``# UNIT`` for a family with a unit; no ``_created`` samples.
    Raises :class:`InvalidArgument` on ambiguous input (see the module docstring).
    """
    out: list[str] = []
    _render(_group(samples), out, openmetrics=True)
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Content negotiation

Renderer = Callable[[Iterable[MetricSample]], bytes]

# Versions of each media type that our output satisfies (None: no version parameter).
# Text 1.0.0 differs from 0.0.4 only in allowing quoted UTF-8 names, which we never write.
_TEXT_VERSIONS = frozenset((None, "0.0.4", "1.0.0"))
_OPENMETRICS_VERSIONS = frozenset((None, "0.0.1", "1.0.0"))


def _parse_q(text: str) -> float | None:
    try:
        q = float(text)
    except ValueError:
        return None
    return q if 0.0 <= q <= 1.0 else None


def _parse_accept(accept: str) -> list[tuple[str, str, str | None, float]]:
    """``(type, subtype, version, q)`` for each well-formed media range; others dropped."""
    ranges: list[tuple[str, str, str | None, float]] = []
    for item in accept.split(","):
        media, *params = item.split(";")
        main, slash, sub = media.strip().lower().partition("/")
        if not slash or not main or not sub:
            continue
        version: str | None = None
        q: float | None = 1.0
        for param in params:
            key, _, val = param.partition("=")
            key = key.strip().lower()
            val = val.strip().strip('"')
            if key == "q":
                q = _parse_q(val)
            elif key == "version":
                version = val
        if q is not None:
            ranges.append((main.strip(), sub.strip(), version, q))
    return ranges


def _quality(
    ranges: list[tuple[str, str, str | None, float]],
    main: str,
    sub: str,
    versions: frozenset[str | None],
) -> tuple[float, bool]:
    """The q-value the client gives ``main/sub`` (most specific matching range wins, as in
    RFC 9110), and whether a range named the type itself rather than a wildcard."""
    best_rank = -1
    best_q = 0.0
    for r_main, r_sub, r_version, r_q in ranges:
        if r_main == main and r_sub == sub:
            if r_version is None:
                rank = 2
            elif r_version in versions:
                rank = 3
            else:
                continue
        elif r_main == main and r_sub == "*":
            rank = 1
        elif r_main == "*" and r_sub == "*":
            rank = 0
        else:
            continue
        if rank > best_rank or (rank == best_rank and r_q > best_q):
            best_rank, best_q = rank, r_q
    return best_q, best_rank >= 2


def negotiate(accept: str | None) -> tuple[Renderer, str]:
    """Choose the renderer and Content-Type for a request's ``Accept`` header.

    OpenMetrics when the header names ``application/openmetrics-text`` (no version, or
    version 1.0.0 or 0.0.1) with q > 0 and does not give the Prometheus text format
    (``text/plain``, via a wildcard included) a strictly higher q. Otherwise -- no header,
    ``*/*``, a malformed header, ``q=0`` on OpenMetrics -- the Prometheus text format 0.0.4.
    """
    if accept:
        ranges = _parse_accept(accept)
        om_q, om_named = _quality(ranges, "application", "openmetrics-text", _OPENMETRICS_VERSIONS)
        text_q, _ = _quality(ranges, "text", "plain", _TEXT_VERSIONS)
        if om_named and om_q > 0 and om_q >= text_q:
            return render_openmetrics, CONTENT_TYPE_OPENMETRICS
    return render_prometheus, CONTENT_TYPE_PROMETHEUS


# --------------------------------------------------------------------------------------------
# A domain's metrics and health figures as samples

DROPPED_SERIES = "percpu_exposition_dropped_series"


class MetricValueLike(Protocol):
    """What :func:`domain_samples` reads from each item of ``Domain.snapshot()``."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> Labels: ...
    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> int | float: ...
    @property
    def count(self) -> int: ...


# (sample name, kind, DomainStats field, help). Counter names carry no `_total` here: the
# renderers add it.
_HEALTH: tuple[tuple[str, MetricKind, str, str], ...] = (
    ("percpu_domain_max_vcpus", "gauge", "max_vcpus",
     "vcpu ids that can be leased at once (more holders share one id under a lock)."),
    ("percpu_domain_ids_in_use", "gauge", "holders_now",
     "vcpu ids held by a live holder right now."),
    ("percpu_domain_ids_ever_used", "gauge", "ids_ever_used",
     "vcpu ids ever leased (ids 0..n-1, lowest first): at most the peak number of holders "
     "at once."),
    ("percpu_domain_overflow_holders", "counter", "overflow_holders",
     "Holders that found every id taken and shared the overflow id."),
    ("percpu_domain_shared_id_operations", "counter", "shared_id_operations",
     "Operations done on the overflow id, each under its lock (the slow path)."),
    ("percpu_domain_handed_over", "counter", "handed_over",
     "Overflow holders handed a freed id at a quiescent point (they leave the slow path)."),
    ("percpu_domain_metrics", "gauge", "metrics", "Named metrics registered."),
    ("percpu_domain_pagesets", "gauge", "pagesets", "Pagesets with at least one slot taken."),
    ("percpu_domain_pages", "gauge", "pages",
     "Pages allocated to pagesets (one per vcpu id that touched each pageset)."),
    ("percpu_domain_bytes_per_metric", "gauge", "bytes_per_metric",
     "Pageset bytes per named metric (pages * 4096 / metrics)."),
    ("percpu_domain_pending_frees", "gauge", "pending_frees",
     "Slots of removed metrics waiting for a grace period."),
    ("percpu_domain_pending_moves", "gauge", "pending_moves",
     "Slot moves by compaction waiting for a holder's quiescent point."),
    ("percpu_domain_pending_move_seconds", "gauge", "pending_move_seconds",
     "How long the pending moves have waited (0 when none)."),
    ("percpu_domain_moved_slots", "counter", "moved_slots", "Slots moved by compaction."),
    ("percpu_domain_compacted_pages", "counter", "compacted_pages",
     "Pages given back to the arena by compaction."),
    ("percpu_domain_compaction_batches", "counter", "compaction_batches",
     "Compaction batches completed."),
    ("percpu_domain_recovered_cache_slots", "counter", "recovered_cache_slots",
     "Slots recovered from the caches of holders that died."),
    ("percpu_domain_arena_used_bytes", "gauge", "arena_used_bytes",
     "Bytes of the domain's arena in use."),
    ("percpu_domain_arena_free_bytes", "gauge", "arena_free_bytes",
     "Bytes of the domain's arena free."),
    ("percpu_domain_arena_pages_used", "gauge", "arena_pages_used",
     "4096-byte pages of the domain's arena in use."),
)
_LEASE_PATHS = (("fresh", "fresh_ids"), ("reused", "reused_ids"), ("reclaimed", "reclaimed_ids"))
_ARENA_HEALTH: tuple[tuple[str, MetricKind, str, str], ...] = (
    ("percpu_domain_arena_failed_allocations", "counter", "failed_allocations",
     "Allocations the domain's arena refused for want of a large enough free run."),
    ("percpu_domain_arena_largest_free_bytes", "gauge", "largest_free",
     "Bytes in the arena's largest free run: the largest block it can hand out now."),
    ("percpu_domain_arena_recoveries", "counter", "recoveries",
     "Repairs of the arena after a process died inside an operation."),
)


def health_samples(stats: object, arena_stats: object | None = None) -> list[MetricSample]:
    """The health figures of ``Domain.stats()`` (and ``Arena.stats()``) as samples.

    Figures this version of the domain does not report (``pending_moves`` before compaction
    exists, for instance) are left out rather than written as zero.
    """
    out: list[MetricSample] = []
    for name, kind, field, text in _HEALTH:
        value = getattr(stats, field, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append(MetricSample(name, kind, (), value, help=text))
    for path, field in _LEASE_PATHS:
        value = getattr(stats, field, None)
        if isinstance(value, int):
            out.append(MetricSample(
                "percpu_domain_leases", "counter", (("path", path),), value,
                help="vcpu ids leased, by how: fresh (first time), reused (released "
                     "cleanly before), reclaimed (its holder died)."))
    if arena_stats is not None:
        for name, kind, field, text in _ARENA_HEALTH:
            value = getattr(arena_stats, field, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.append(MetricSample(name, kind, (), value, help=text))
    return out


_DROPPED_HELP = (
    "Series of the last scrape left out because the formats cannot carry them or their names "
    "clash (see the percpu._exposition log)."
)


def _trusted_sample(name: str, kind: str, labels: Labels, text: str, unit: str
                    ) -> MetricSample:
    sample = object.__new__(MetricSample)
    for field, value in (("name", name), ("kind", kind), ("labels", labels), ("value", 0),
                         ("count", 0), ("sum", 0.0), ("help", text), ("buckets", ()),
                         ("unit", unit)):
        object.__setattr__(sample, field, value)
    return sample


def _dropped_sample(count: int) -> MetricSample:
    return MetricSample(DROPPED_SERIES, "gauge", (), count, help=_DROPPED_HELP)


def _value_sample(v: MetricValueLike, *, neutral: bool) -> MetricSample:
    """The sample of one snapshot value. With ``neutral``, zeros stand for its numbers, so
    that only what does not change between scrapes (name, kind, labels) is checked."""
    text = getattr(v, "documentation", "")
    unit = getattr(v, "unit", "")
    if neutral and v.__class__ is MetricValue and v.kind != "histogram":
        # A domain's own value: its name and labels were checked when they were decoded from
        # the registry, and neutral numbers need no check; built without the constructor's.
        return _trusted_sample(v.name, v.kind, v.labels, text, unit)
    if v.kind == "summary":
        if neutral:
            return MetricSample(v.name, "summary", v.labels, 0, help=text, unit=unit)
        return MetricSample(v.name, "summary", v.labels, 0, count=v.count, sum=v.value,
                            help=text, unit=unit)
    if v.kind == "histogram":
        buckets = tuple(getattr(v, "buckets", ()))
        if neutral:  # zeros, and a count that agrees with them
            return MetricSample(v.name, "histogram", v.labels, 0, help=text, unit=unit,
                                buckets=tuple((le, 0) for le, _n in buckets))
        return MetricSample(v.name, "histogram", v.labels, 0, count=v.count, sum=v.value,
                            help=text, buckets=buckets, unit=unit)
    return MetricSample(v.name, v.kind, v.labels, 0 if neutral else v.value,  # type: ignore[arg-type]
                        help=text, unit=unit)


@dataclass
class _Plan:
    """What a scrape writes: the families (sorted; the dropped-series gauge among them with a
    placeholder value), why each left-out series was left out, and where each candidate came
    from (``id(sample)`` -> index in values + health; valid while ``candidates`` and
    ``reserved``, the samples left out for claiming the runtime's family, live)."""

    families: list[_Family]
    problems: list[str]
    candidates: list[MetricSample]
    reserved: list[MetricSample]
    sources: dict[int, int]


def _plan(
    values: Sequence[MetricValueLike], health: Sequence[MetricSample], *, neutral: bool
) -> _Plan:
    problems: list[str] = []
    # The runtime's own gauge goes first, so that it keeps its name whatever else claims it:
    # it is the series that says something was left out, it cannot be the one left out.
    placeholder = _dropped_sample(0)
    candidates = [placeholder]
    reserved: list[MetricSample] = []
    sources = {id(placeholder): len(values) + len(health)}
    for i, v in enumerate(values):
        try:
            sample = _value_sample(v, neutral=neutral)
        except PercpuError as exc:
            problems.append(f"metric {v.name}{v.labels!r} left out of the exposition: {exc}")
            continue
        if sample.family == DROPPED_SERIES:  # same family, other labels: still the runtime's
            problems.append(
                f"series {sample.name}{dict(sample.labels)!r} left out of the exposition: "
                f"the family {DROPPED_SERIES!r} is the runtime's own; accepted: any other name")
            reserved.append(sample)
        else:
            candidates.append(sample)
        sources[id(sample)] = i
    for j, h in enumerate(health):
        sources[id(h)] = len(values) + j
        candidates.append(h)
    conflicts: list[tuple[MetricSample, str]] = []
    families = _group(candidates, conflicts)
    problems.extend(
        f"series {sample.name}{dict(sample.labels)!r} left out of the exposition: {problem}"
        for sample, problem in conflicts)
    return _Plan(families, problems, candidates, reserved, sources)


def domain_samples(
    values: Iterable[MetricValueLike], health: Iterable[MetricSample] = ()
) -> list[MetricSample]:
    """Samples for a domain's ``snapshot()`` values, then ``health``, ready to render.

    Never raises for one metric: a value the formats cannot carry, a series that clashes with
    one met before it (the domain's metrics in snapshot order come before ``health``), or one
    that claims the family ``percpu_exposition_dropped_series`` (the runtime's own, whatever
    its kind or labels) is dropped, logged at WARNING on the ``percpu._exposition`` logger, and
    counted in that gauge, which ends the list.
    """
    plan = _plan(list(values), list(health), neutral=False)
    for problem in plan.problems:
        _log.warning("%s", problem)
    out = [s for family in plan.families if family.name != DROPPED_SERIES
           for s in family.series.values()]
    out.append(_dropped_sample(len(plan.problems)))
    return out


def collect_domain(domain: DomainLike, *, health: bool = True) -> list[MetricSample]:
    """``domain_samples`` of a live domain: its snapshot, and its health when asked."""
    values = domain.snapshot()
    extra = health_samples(domain.stats(), domain.arena.stats()) if health else []
    return domain_samples(values, extra)


# --------------------------------------------------------------------------------------------
# Rendering a domain scrape after scrape, from a cached layout
#
# Between two scrapes the values change and the series almost never do. So the text before
# each value (headers folded into a family's first line, then `name{labels} `), the order of the
# lines and what was left out are worked out once, by the same code as the plain path (`_plan`
# with neutral values, `_family_lines`), and kept while the snapshot's (name, labels, kind)
# keys and the health keys stay equal. A scrape then gathers the numbers, checks them in bulk
# (C-level passes: types, min, max, sum) and joins prefix + number for each line. Whatever the
# bulk checks cannot vouch for (a negative counter, a NaN where it is not allowed, an int beyond
# 64 bits, an unexpected type) sends the scrape down the plain path, which drops and logs per
# series: so both paths always give the same bytes.


class _HasStats(Protocol):
    def stats(self) -> object: ...


class DomainLike(Protocol):
    """What the exposition reads from a domain (``percpu.Domain`` is one)."""

    def snapshot(self) -> Sequence[MetricValueLike]: ...
    def stats(self) -> object: ...
    @property
    def arena(self) -> _HasStats: ...


_NAME = operator.attrgetter("name")
_LABELS = operator.attrgetter("labels")
_KIND = operator.attrgetter("kind")
_VALUE = operator.attrgetter("value")
_COUNT = operator.attrgetter("count")
_SECOND = operator.itemgetter(1)
_NUMBER_TYPES = frozenset((int, float))
_INT_TYPE = frozenset((int,))
Numbers = list[int | float]
_Pick = Callable[[Numbers], tuple[int | float, ...]]


def _picker(indices: list[int]) -> _Pick:
    """``nums -> tuple(nums[i] for i in indices)``, in C (itemgetter) when there are two or
    more (itemgetter of one index returns the item itself, not a tuple)."""
    if len(indices) >= 2:
        return cast(_Pick, operator.itemgetter(*indices))
    return lambda nums: tuple(nums[i] for i in indices)


@dataclass(frozen=True, slots=True)
class _Layout:
    """The fixed part of a domain's scrapes, for one set of keys.

    The numbers of a scrape (``_Layout.numbers``): each snapshot value's ``value`` (a
    summary's or histogram's sum), each health sample's value (or sum), the dropped count,
    then -- only when some line shows a count -- each snapshot value's and health sample's
    ``count``, then each histogram's cumulative bucket counts, in snapshot order.
    """

    # The snapshot's keys, as three lists: lists of the objects the snapshot already holds,
    # where a list of (name, labels, kind) tuples would allocate one per series per scrape.
    names: list[str]
    labels: list[Labels]
    kinds: list[str]
    health_keys: list[tuple[str, Labels, str, str]]  # (name, labels, kind, help) of health
    problems: tuple[str, ...]  # the series left out whatever their values, logged each scrape
    prometheus: tuple[str, ...]  # per line, the text before its value, in each format
    openmetrics: tuple[str, ...]
    pick: _Pick  # the number of each line, in line order
    counter_like: _Pick  # the numbers that must be >= 0 and not NaN (of every candidate)
    gauges: _Pick  # the numbers that must be within int range if ints
    counts: _Pick | None  # summary and histogram counts (ints); None when there are none
    dropped: int
    histograms: tuple[int, ...] = ()  # the snapshot indices of the histograms
    sums: _Pick | None = None  # the histograms' sums (any sign; never NaN)

    def numbers(self, values: Sequence[MetricValueLike], health: Sequence[MetricSample]) -> Numbers:
        nums: Numbers = list(map(_VALUE, values))
        nums.extend(h.sum if h.kind == "summary" else h.value for h in health)
        nums.append(self.dropped)
        if self.counts is not None:
            nums.extend(map(_COUNT, values))
            nums.extend(h.count for h in health)
        for i in self.histograms:
            nums.extend(map(_SECOND, getattr(values[i], "buckets", ())))
        return nums

    def vouches_for(self, nums: Numbers) -> bool:
        """Whether the plain path would keep every number (False may be wrong, True never)."""
        if not set(map(type, nums)) <= _NUMBER_TYPES:  # bool, subclasses: plain path
            return False
        # min() and max() skip a NaN unless it comes first, and then compare False: so a True
        # below holds for every number that is not NaN, and sum() is NaN when one is.
        cl = self.counter_like(nums)
        if cl and not (min(cl) >= 0 and max(cl) <= _INT_MAX and not math.isnan(sum(cl))):
            return False
        g = self.gauges(nums)
        if g and not (min(g) >= _INT_MIN and max(g) <= _INT_MAX):
            return False
        if self.sums is not None and math.isnan(sum(self.sums(nums))):
            return False
        return self.counts is None or set(map(type, self.counts(nums))) <= _INT_TYPE

    def render(self, nums: Numbers, *, openmetrics: bool) -> bytes:
        line_values = self.pick(nums)
        # str() writes ints and finite floats exactly as _format_number does; the sum is
        # finite only when no value is NaN or infinite (an overflow just takes the slow way).
        fmt: Callable[[int | float], str] = (
            str if math.isfinite(sum(line_values)) else _format_number)
        prefixes = self.openmetrics if openmetrics else self.prometheus
        text = "\n".join(map(operator.add, prefixes, map(fmt, line_values)))
        return (text + ("\n# EOF\n" if openmetrics else "\n")).encode("utf-8")


def _layout(
    values: Sequence[MetricValueLike],
    health: Sequence[MetricSample],
    keys: tuple[list[str], list[Labels], list[str]],
    health_keys: list[tuple[str, Labels, str, str]],
) -> _Layout:
    plan = _plan(values, health, neutral=True)
    n, m = len(values), len(health)
    count_base = n + m + 1  # where the counts start in a scrape's numbers
    histograms = tuple(i for i, v in enumerate(values) if v.kind == "histogram")
    bucket_at: dict[int, int] = {}  # snapshot index -> where its bucket counts start
    at = count_base + n + m
    for i in histograms:
        bucket_at[i] = at
        at += len(getattr(values[i], "buckets", ()))
    sums: list[int] = []
    prometheus: list[str] = []
    openmetrics: list[str] = []
    pick: list[int] = []
    counter_like: list[int] = []
    gauges: list[int] = []
    counts: list[int] = []
    for family in plan.families:
        body = _family_body(family)  # once: only the headers differ between the formats
        first = len(prometheus)
        for text, sample, field in body:
            source = plan.sources[id(sample)]
            prometheus.append(text)
            if field.startswith("bucket"):
                pick.append(bucket_at[source] + int(field[6:]))
            else:
                pick.append(count_base + source if field == "count" else source)
        openmetrics.extend(prometheus[first:])
        prometheus[first] = _family_head(family, openmetrics=False) + prometheus[first]
        openmetrics[first] = _family_head(family, openmetrics=True) + openmetrics[first]
    # The checks cover every sample, the ones a clash or the reserved family leaves out too:
    # the plain path drops a bad number first, and says so in its own words.
    for sample in plan.candidates + plan.reserved:
        source = plan.sources[id(sample)]
        if sample.kind == "gauge":
            gauges.append(source)
        elif sample.kind == "histogram":  # its sum may be negative; its counts may not
            gauges.append(source)
            sums.append(source)
            buckets = range(bucket_at[source], bucket_at[source] + len(sample.buckets))
            counter_like.extend(buckets)
            counts.extend(buckets)
        else:
            counter_like.append(source)
        if sample.kind in ("summary", "histogram"):
            counter_like.append(count_base + source)
            counts.append(count_base + source)
    return _Layout(
        *keys, health_keys, tuple(plan.problems), tuple(prometheus), tuple(openmetrics),
        _picker(pick), _picker(counter_like), _picker(gauges),
        _picker(counts) if counts else None, len(plan.problems), histograms,
        _picker(sums) if sums else None)


class _LayoutCache:
    """The layout of one domain's scrapes (with or without health), shared by its scrapers.
    It holds no reference to the domain, so a weak-keyed table can keep it per domain."""

    __slots__ = ("builds", "layout", "lock", "plain")

    def __init__(self) -> None:
        self.layout: _Layout | None = None
        self.builds = 0  # layouts made: once per change of keys, not once per scrape
        self.plain = 0  # scrapes the bulk checks sent down the plain path
        self.lock = threading.Lock()  # one scrape at a time reads the domain


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape's answer: the body, its Content-Type, and ``"gzip"`` when it is compressed
    (send it as Content-Encoding) or None."""

    body: bytes
    content_type: str
    content_encoding: str | None = None


@runtime_checkable
class Scraper(Protocol):
    """What :func:`make_server` serves besides a ``collect`` callable:
    :class:`DomainExposition` is one."""

    def scrape(self, accept: str | None = None, accept_encoding: str | None = None) -> Scrape: ...


class DomainExposition:
    """Every metric of ``domain`` (and its health figures, unless ``health=False``), rendered
    for one scrape at a time from a layout kept between scrapes.

    The bytes are those of ``render_prometheus(collect_domain(domain))`` (or OpenMetrics):
    the layout is remade when the snapshot's series change, and a scrape whose numbers the bulk
    checks cannot vouch for is rendered the plain way. Scrapes are serialised (one at a time
    reads the domain); the object may be shared by threads.
    """

    def __init__(self, domain: DomainLike, *, health: bool = True,
                 _cache: _LayoutCache | None = None) -> None:
        self.domain = domain
        self.health = health
        self._cache = _LayoutCache() if _cache is None else _cache

    @property
    def layout_builds(self) -> int:
        """How many times the layout was made (once per change of the domain's series)."""
        return self._cache.builds

    @property
    def plain_scrapes(self) -> int:
        """How many scrapes were rendered the plain way (a number the bulk checks could not
        vouch for: a negative counter, a NaN counter, an int beyond 64 bits...)."""
        return self._cache.plain

    def samples(self) -> list[MetricSample]:
        """The samples of one scrape, the plain way (``collect_domain``)."""
        return collect_domain(self.domain, health=self.health)

    def _body(self, openmetrics: bool) -> bytes:
        d = self.domain
        values = d.snapshot()
        health = health_samples(d.stats(), d.arena.stats()) if self.health else []
        names, labels, kinds = (list(map(_NAME, values)), list(map(_LABELS, values)),
                                list(map(_KIND, values)))
        health_keys: list[tuple[str, Labels, str, str]] = [
            (h.name, h.labels, h.kind, h.help) for h in health]
        cache = self._cache
        if "histogram" in kinds and any(v.__class__ is not MetricValue for v in values
                                        if v.kind == "histogram"):
            # Only a domain's own histogram values are consistent by construction (their
            # count is their last bucket's): the bulk checks do not look inside others.
            cache.plain += 1
            render = render_openmetrics if openmetrics else render_prometheus
            return render(domain_samples(values, health))
        layout = cache.layout
        # Equal keys, equal layout (list and tuple equality test identity first: the same
        # name and labels objects come back from one registry generation to the next).
        if (layout is None or layout.names != names or layout.labels != labels
                or layout.kinds != kinds or layout.health_keys != health_keys):
            layout = cache.layout = _layout(values, health, (names, labels, kinds),
                                            health_keys)
            cache.builds += 1
        nums = layout.numbers(values, health)
        if not layout.vouches_for(nums):
            cache.plain += 1
            render = render_openmetrics if openmetrics else render_prometheus
            return render(domain_samples(values, health))
        for problem in layout.problems:
            _log.warning("%s", problem)
        return layout.render(nums, openmetrics=openmetrics)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """``(body, content_type)`` in the format :func:`negotiate` picks for ``accept``."""
        render, content_type = negotiate(accept)
        with self._cache.lock:
            return self._body(render is render_openmetrics), content_type

    def scrape(self, accept: str | None = None, accept_encoding: str | None = None) -> Scrape:
        """:meth:`render`, gzipped when ``accept_encoding`` (the request's Accept-Encoding
        header) accepts gzip."""
        body, content_type = self.render(accept)
        return encode(body, content_type, accept_encoding)


# Domain -> its layout caches (with health, without): what `exposition` keeps between calls.
_CACHES: weakref.WeakKeyDictionary[object, dict[bool, _LayoutCache]] = (
    weakref.WeakKeyDictionary())
_CACHES_LOCK = threading.Lock()


def _cache_for(domain: DomainLike, health: bool) -> _LayoutCache:
    with _CACHES_LOCK:
        caches = _CACHES.setdefault(domain, {})
        cache = caches.get(health)
        if cache is None:
            cache = caches[health] = _LayoutCache()
        return cache


def exposition(
    domain: Domain, accept: str | None = None, *, health: bool = True
) -> tuple[bytes, str]:
    """Render every metric of ``domain`` (and its health figures) for one scrape.

    Returns ``(body, content_type)`` in the format :func:`negotiate` picks for ``accept``
    (a request's ``Accept`` header): for a WSGI or ASGI ``/metrics`` route, or any server.
    The layout of the exposition is kept with the domain (weakly) between calls, as
    :class:`DomainExposition` keeps it.
    """
    return DomainExposition(domain, health=health, _cache=_cache_for(domain, health)).render(
        accept)


# --------------------------------------------------------------------------------------------
# Compression

GZIP_LEVEL = 1
"""zlib level of gzipped scrapes: expositions are repetitive text, so the fastest level
already shrinks them several times, for a fraction of the time of the default (9)."""


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip: ``gzip`` (or ``x-gzip``) with
    q > 0, or ``*`` with q > 0 where gzip is not named. No header, or a malformed one: no."""
    named: float | None = None
    star: float | None = None
    for item in (accept_encoding or "").split(","):
        coding, *params = item.split(";")
        coding = coding.strip().lower()
        q: float | None = 1.0
        for param in params:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                q = _parse_q(val.strip())
        if q is None:
            continue
        if coding in ("gzip", "x-gzip"):
            named = q if named is None else max(named, q)
        elif coding == "*":
            star = q if star is None else max(star, q)
    if named is not None:
        return named > 0
    return star is not None and star > 0


def encode(body: bytes, content_type: str, accept_encoding: str | None) -> Scrape:
    """``body`` as a :class:`Scrape`, gzipped when ``accept_encoding`` accepts it."""
    if accepts_gzip(accept_encoding):
        return Scrape(gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0), content_type,
                      "gzip")
    return Scrape(body, content_type)


# --------------------------------------------------------------------------------------------
# HTTP endpoint

_PATHS = frozenset(("/", "/metrics"))
_TEXT = "text/plain; charset=utf-8"


class _MetricsServer(ThreadingHTTPServer):
    """A threading HTTP server that reports connection errors to the logger, not stderr."""

    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can hang
        # for seconds); the name is never used here, so bind without it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("error while serving %r", client_address, exc_info=True)


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


ScrapeFunction = Callable[[str | None, str | None], Scrape]


def _scrape_function(source: Callable[[], Iterable[MetricSample]] | Scraper) -> ScrapeFunction:
    if isinstance(source, Scraper):
        return source.scrape
    collect = source

    def scrape(accept: str | None, accept_encoding: str | None) -> Scrape:
        render, content_type = negotiate(accept)
        return encode(render(collect()), content_type, accept_encoding)

    return scrape


def _handler_for(scrape: ScrapeFunction) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "percpu-metrics"
        sys_version = ""
        timeout = 30  # seconds a connection may stay idle mid-request

        def log_message(self, format: str, *args: Any) -> None:
            _log.debug("%s " + format, self.address_string(), *args)

        def _reply(
            self, code: int, body: bytes, content_type: str, headers: dict[str, str]
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _joined(self, header: str) -> str:
            return ", ".join(self.headers.get_all(header) or [])

        def do_GET(self) -> None:
            if urllib.parse.urlsplit(self.path).path not in _PATHS:
                self._reply(404, b"not found; metrics are at /metrics\n", _TEXT, {})
                return
            try:
                result = scrape(self._joined("Accept"), self._joined("Accept-Encoding"))
            except Exception:
                _log.exception("collecting or rendering metrics failed")
                self._reply(500, b"error collecting metrics\n", _TEXT, {})
                return
            headers = {"Vary": "Accept, Accept-Encoding"}
            if result.content_encoding is not None:
                headers["Content-Encoding"] = result.content_encoding
            self._reply(200, result.body, result.content_type, headers)

        def do_HEAD(self) -> None:
            self.do_GET()

        def _not_allowed(self) -> None:
            self._reply(405, b"method not allowed; use GET\n", _TEXT, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _not_allowed

    return Handler


def make_server(
    collect: Callable[[], Iterable[MetricSample]] | Scraper,
    host: str = "127.0.0.1",
    port: int = 0,
) -> ThreadingHTTPServer:
    """Bind (but do not start) an HTTP server that exposes ``collect()``'s samples.

    ``GET /metrics`` (or ``/``) calls ``collect`` once per request and answers 200 with the
    format :func:`negotiate` picks from the ``Accept`` header, gzipped when the
    ``Accept-Encoding`` header accepts it (:func:`accepts_gzip`). ``collect`` may also be a
    :class:`Scraper` (a :class:`DomainExposition`): its ``scrape`` answers each request.
    ``HEAD`` is answered likewise without a body. Other paths get 404, the methods POST,
    PUT, DELETE, PATCH, OPTIONS and TRACE get 405 (other unknown methods 501), and an
    exception from ``collect`` or from rendering gets 500 with a short text body (the
    traceback goes to the ``percpu._exposition`` logger, never to the client or to stderr).

    The server listens on ``host``, by default the IPv4 loopback address, so only this machine
    can scrape it. Binding any other address (``"0.0.0.0"``, ``"::"``, a public interface)
    exposes the metrics to the network and is the caller's explicit choice; the endpoint has
    no authentication. A host containing ``:`` is bound as IPv6. ``port=0`` picks a free
    port; read it from ``server.server_address[1]``.

    Run it with ``server.serve_forever()`` (typically in a daemon thread); stop it with
    ``server.shutdown()`` from another thread, then ``server.server_close()``. ``collect``
    may be called from several threads at once.
    """
    server_class = _MetricsServer6 if ":" in host else _MetricsServer
    return server_class((host, port), _handler_for(_scrape_function(collect)))
