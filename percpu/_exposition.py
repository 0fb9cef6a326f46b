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
  ``percpu_exposition_dropped_series``. :func:`exposition` renders a domain for one request.
* :func:`make_server` binds to the loopback interface unless told otherwise, serves only
  ``GET``/``HEAD`` on ``/metrics`` and ``/``, and writes nothing to stderr: access lines,
  failures of ``collect`` and connection errors go to the ``percpu._exposition`` logger
  (which has a :class:`logging.NullHandler`, so they are dropped unless the application
  configures logging).

Standard library only.
"""

from __future__ import annotations

import logging
import math
import socket
import socketserver
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._errors import InvalidArgument, InvalidType, PercpuError
from ._names import Labels, canonical_labels, validate_metric_name

if TYPE_CHECKING:
    from ._domain import Domain

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_PROMETHEUS",
    "MetricKind",
    "MetricSample",
    "collect_domain",
    "domain_samples",
    "exposition",
    "health_samples",
    "make_server",
    "negotiate",
    "render_openmetrics",
    "render_prometheus",
]

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

MetricKind = Literal["counter", "gauge", "summary"]
_KINDS: frozenset[str] = frozenset(("counter", "gauge", "summary"))

# Integers are written exactly; they must fit in 64 bits (signed or unsigned), which is what
# the counters hold and what a scraper stores without surprise. Larger values: pass a float.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# The sample names each kind of family owns in OpenMetrics (which also reserves `_created`).
_OWNED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum", "_created"),
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

    Ints must fit in 64 bits (signed or unsigned) and are written exactly.
    """

    name: str
    kind: MetricKind
    labels: Labels
    value: int | float
    count: int = 0
    sum: float = 0.0
    help: str = ""

    def __post_init__(self) -> None:
        validate_metric_name(self.name)
        if not isinstance(self.kind, str) or self.kind not in _KINDS:
            raise InvalidArgument(
                f"metric kind {_show(self.kind)} is not known; accepted: 'counter', 'gauge', "
                "'summary'"
            )
        labels = canonical_labels(self.labels)
        if self.kind == "summary" and any(name == "quantile" for name, _ in labels):
            raise InvalidArgument(
                f"summary {self.name!r} has a 'quantile' label; accepted: any other label "
                "name ('quantile' is reserved for summary quantiles)"
            )
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

    @property
    def family(self) -> str:
        """The family name: ``name``, less a trailing ``_total`` for a counter."""
        if self.kind == "counter" and self.name.endswith("_total") and len(self.name) > 6:
            return self.name[:-6]
        return self.name


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    series: dict[Labels, MetricSample]


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


def _series(name: str, labels: Labels, value: int | float) -> str:
    if labels:
        inner = ",".join(f'{key}="{_escape_label_value(val)}"' for key, val in labels)
        return f"{name}{{{inner}}} {_format_number(value)}\n"
    return f"{name} {_format_number(value)}\n"


def _render(families: list[_Family], out: list[str], *, openmetrics: bool) -> None:
    for family in families:
        if family.kind == "counter" and not openmetrics:
            # Text 0.0.4 convention: the family is named like its sample, `<name>_total`.
            meta_name = family.name + "_total"
        else:
            meta_name = family.name
        if family.help:
            text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
            if openmetrics:
                text = text.replace('"', '\\"')
            out.append(f"# HELP {meta_name} {text}\n")
        out.append(f"# TYPE {meta_name} {family.kind}\n")
        for labels in sorted(family.series):
            sample = family.series[labels]
            if family.kind == "counter":
                out.append(_series(family.name + "_total", labels, sample.value))
            elif family.kind == "gauge":
                out.append(_series(family.name, labels, sample.value))
            else:
                out.append(_series(family.name + "_count", labels, sample.count))
                out.append(_series(family.name + "_sum", labels, sample.sum))


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
    summary as ``x_count`` and ``x_sum``; no ``# UNIT`` lines, no ``_created`` samples.
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


def domain_samples(
    values: Iterable[MetricValueLike], health: Iterable[MetricSample] = ()
) -> list[MetricSample]:
    """Samples for a domain's ``snapshot()`` values, then ``health``, ready to render.

    Never raises for one metric: a value the formats cannot carry, or a series that clashes
    with one met before it (the domain's metrics in snapshot order come before ``health``), is
    dropped, logged at WARNING on the ``percpu._exposition`` logger, and counted in the gauge
    ``percpu_exposition_dropped_series`` that ends the list.
    """
    candidates: list[MetricSample] = []
    dropped = 0
    for v in values:
        try:
            if v.kind == "summary":
                sample = MetricSample(v.name, "summary", v.labels, 0, count=v.count, sum=v.value)
            else:
                sample = MetricSample(
                    v.name, v.kind, v.labels, v.value  # type: ignore[arg-type]
                )
        except PercpuError as exc:
            _log.warning("metric %s%r left out of the exposition: %s", v.name, v.labels, exc)
            dropped += 1
            continue
        candidates.append(sample)
    candidates.extend(health)
    conflicts: list[tuple[MetricSample, str]] = []
    families = _group(candidates, conflicts)
    for sample, problem in conflicts:
        _log.warning("series %s%r left out of the exposition: %s", sample.name,
                     dict(sample.labels), problem)
    out = [s for family in families for s in family.series.values()]
    out.append(MetricSample(
        DROPPED_SERIES, "gauge", (), dropped + len(conflicts),
        help="Series of the last scrape left out because the formats cannot carry them or "
             "their names clash (see the percpu._exposition log)."))
    return out


def exposition(
    domain: Domain, accept: str | None = None, *, health: bool = True
) -> tuple[bytes, str]:
    """Render every metric of ``domain`` (and its health figures) for one scrape.

    Returns ``(body, content_type)`` in the format :func:`negotiate` picks for ``accept``
    (a request's ``Accept`` header): for a WSGI or ASGI ``/metrics`` route, or any server.
    """
    render, content_type = negotiate(accept)
    return render(collect_domain(domain, health=health)), content_type


def collect_domain(domain: Domain, *, health: bool = True) -> list[MetricSample]:
    """``domain_samples`` of a live domain: its snapshot, and its health when asked."""
    values = domain.snapshot()
    extra = health_samples(domain.stats(), domain.arena.stats()) if health else []
    return domain_samples(values, extra)


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


def _handler_for(collect: Callable[[], Iterable[MetricSample]]) -> type[BaseHTTPRequestHandler]:
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

        def do_GET(self) -> None:
            if urllib.parse.urlsplit(self.path).path not in _PATHS:
                self._reply(404, b"not found; metrics are at /metrics\n", _TEXT, {})
                return
            render, content_type = negotiate(", ".join(self.headers.get_all("Accept") or []))
            try:
                body = render(collect())
            except Exception:
                _log.exception("collecting or rendering metrics failed")
                self._reply(500, b"error collecting metrics\n", _TEXT, {})
                return
            self._reply(200, body, content_type, {"Vary": "Accept"})

        def do_HEAD(self) -> None:
            self.do_GET()

        def _not_allowed(self) -> None:
            self._reply(405, b"method not allowed; use GET\n", _TEXT, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _not_allowed

    return Handler


def make_server(
    collect: Callable[[], Iterable[MetricSample]],
    host: str = "127.0.0.1",
    port: int = 0,
) -> ThreadingHTTPServer:
    """Bind (but do not start) an HTTP server that exposes ``collect()``'s samples.

    ``GET /metrics`` (or ``/``) calls ``collect`` once per request and answers 200 with the
    format :func:`negotiate` picks from the ``Accept`` header; ``HEAD`` is answered likewise
    without a body. Other paths get 404, the methods POST, PUT, DELETE, PATCH, OPTIONS and
    TRACE get 405 (other unknown methods 501), and an exception from ``collect`` or from
    rendering gets 500 with a short text body (the traceback goes to the
    ``percpu._exposition`` logger, never to the client or to stderr).

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
    return server_class((host, port), _handler_for(collect))
