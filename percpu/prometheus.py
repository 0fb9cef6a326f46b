"""prometheus_client's API over a percpu domain: drop-in metrics and :class:`PercpuCollector`.

Drop-in metrics
---------------
::

    from percpu.prometheus import Counter, Gauge, Histogram, Summary   # was: prometheus_client

    REQUESTS = Counter("requests_total", "Requests served.", ["route"])
    IN_FLIGHT = Gauge("in_flight", "Requests in progress.", multiprocess_mode="livesum")

The constructors take prometheus_client's arguments (``name, documentation, labelnames,
namespace, subsystem, unit, registry``; ``buckets`` for a Histogram; ``multiprocess_mode`` for
a Gauge) and one more, ``domain=``: the :class:`~percpu.Domain` the metric lives in. Without
it, the domain is the file named by the environment variable ``PERCPU_DOMAIN`` (opened once
per process, by :func:`default_domain`, the way prometheus_client reads
``PROMETHEUS_MULTIPROC_DIR``); with neither, the constructor raises :class:`NoDomain`, which
says what to do. Every process that names the same file counts into the same series.

Invariants:

* Names are built as prometheus_client builds them: ``namespace_subsystem_name``, a counter's
  trailing ``_total`` removed (the exposition adds it back), ``_<unit>`` appended when the
  name does not end with it already. The domain stores the built name, so a series is the
  same in every process whatever the spelling used.
* A metric with label names is a parent: it counts nothing itself (its updates raise
  ``ValueError``, as in prometheus_client), ``labels()`` gives the child of one label set,
  made once per process and label set and registered in the domain on first ``labels()``.
  Every update of a child is one call into its percpu handle (the handle's one-statement hot
  path); nothing else runs unless the handle raises.
* ``remove()``/``clear()`` remove the series from the domain, in every process. A process
  that still holds a child of a removed series and updates it registers the series again
  (from zero): an update is never lost silently, and never raises ``MetricRemoved``.
* Values percpu refuses by type (a bool, a numeric string) are retried as ``float(x)``, as
  prometheus_client converts them; NaN and infinities are refused (``ValueError``), since in
  a shared sum they would poison the value for good.
* Gauge modes: prometheus_client's ``multiprocess_mode`` names map to the domain's gauge modes
  one to one (``sum``, ``livesum``, ``max``, ``min``, ``mostrecent`` and their ``live``
  forms), and the two per-process modes to sums, since a domain keeps one part per vcpu id,
  not one series per pid: ``all`` (prometheus_client's default) is ``sum`` (every holder's
  part, dead ones included, as ``all`` keeps a dead pid's file) and ``liveall`` is
  ``livesum``. No ``pid`` label is written: ``sum without (pid) (...)`` over the old series
  is the new series.
* ``registry=`` (default: prometheus_client's ``REGISTRY``) is used as prometheus_client uses
  it: the parent metric registers itself there, so a name made twice in one registry raises
  prometheus_client's "Duplicated timeseries" error, and the registry serves the metric's
  values: the first metric of a domain registered in a registry also registers one
  :class:`PercpuCollector` of that domain there, which serves every series of the domain
  (those of other processes included) on each collect. ``registry=None`` registers nothing.

What prometheus_client has and this does not: exemplars (accepted, not stored),
``Counter.reset`` and ``Gauge.set_function`` (they raise ``NotImplementedError``: a counter
is the sum of every process's part, and a function cannot be called from another process),
``Info`` and ``Enum``, and metric or label names outside ``[a-zA-Z_:][a-zA-Z0-9_:]*``
(prometheus_client 0.26 accepts any UTF-8 by default; the domain refuses them).

The collector
-------------
::

    registry = CollectorRegistry()
    PercpuCollector(domain, registry=registry)   # or registry.register(PercpuCollector(domain))
    app = make_wsgi_app(registry)                # or generate_latest(registry), ...

Invariant: each ``collect()`` reads the domain once (one ``snapshot()``) and yields, as
prometheus_client ``Metric`` families sorted by name, every series of that read: counters,
gauges and summaries exactly as percpu's own exposition writes them
(:func:`percpu._exposition.domain_samples`: the same series left out and counted in
``percpu_exposition_dropped_series``), and histograms as ``_bucket{le=...}`` (cumulative,
``le`` spelt as prometheus_client spells it), ``_count`` and ``_sum``; each family with the
help text and unit its first registration gave. A histogram whose sample names would clash
with another family is left out, logged and counted in the same gauge (a health figure gives
way instead). prometheus_client writes every value as a float, so an int beyond 2**53 comes
out rounded there, where ``python -m percpu serve`` writes it exactly.

``describe()`` names no series: a domain's series come and go while the service runs (and
other processes add them), so they cannot be claimed when the collector is registered.

Needs the optional extra ``prometheus`` (``pip install 'percpu-arena[prometheus]'``); the rest
of percpu never imports this module or prometheus_client.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Self

from ._domain import Domain
from ._errors import InvalidType, MetricRemoved, PercpuError
from ._exposition import DROPPED_SERIES, DomainLike, domain_samples, health_samples
from ._names import validate_labels, validate_metric_name
from ._timing import Block as _Block
from ._timing import CountExceptions as _CountExceptions

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample
    from prometheus_client.utils import floatToGoString
except ModuleNotFoundError as exc:  # the extra is not installed
    raise ModuleNotFoundError(
        "percpu.prometheus needs prometheus_client: pip install 'percpu-arena[prometheus]' "
        "(or pip install prometheus-client)", name=exc.name) from None

__all__ = ["ENV_VAR", "Counter", "Gauge", "Histogram", "NoDomain", "PercpuCollector", "Summary",
           "default_domain"]

ENV_VAR = "PERCPU_DOMAIN"
_log = logging.getLogger("percpu._exposition")  # where percpu's exposition logs what it drops


# -- the domain --------------------------------------------------------------------------------


class NoDomain(PercpuError, LookupError):
    """A drop-in metric was made with no ``domain=`` and no usable ``PERCPU_DOMAIN``."""


_env_lock = threading.Lock()
_env_domains: dict[str, Domain] = {}  # path -> the domain this process opened there


def default_domain() -> Domain:
    """The domain named by ``PERCPU_DOMAIN``, opened on first use and kept for the process
    (a forked child keeps using its parent's, as a percpu domain allows). Raises
    :class:`NoDomain` when the variable is unset or names no file."""
    path = os.environ.get(ENV_VAR, "")
    if not path:
        raise NoDomain(
            f"no percpu domain: pass domain=percpu.Domain.open(PATH) to the metric, or set "
            f"{ENV_VAR}=PATH (for instance /dev/shm/app.domain) in the environment of every "
            "process, the file made once before the workers start by percpu.Domain.create(PATH)"
            " (this replaces PROMETHEUS_MULTIPROC_DIR)")
    with _env_lock:
        d = _env_domains.get(path)
        if d is None or d._closed or d._closing:
            try:
                d = Domain.open(path)
            except FileNotFoundError:
                raise NoDomain(
                    f"{ENV_VAR}={path}: no such domain file; create it once before the workers "
                    f"start (percpu.Domain.create({path!r})), then start them") from None
            _env_domains[path] = d
        return d


# -- registries --------------------------------------------------------------------------------

_served_lock = threading.Lock()
#: registry -> the domains a PercpuCollector serves there (registered by this module)
_served: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _serve(domain: DomainLike, registry: Any) -> None:
    """Register one :class:`PercpuCollector` of ``domain`` in ``registry``, once."""
    with _served_lock:
        domains = _served.get(registry)
        if domains is not None and domain in domains:
            return
    PercpuCollector(domain, registry=registry)


# -- names and labels (prometheus_client's rules) ------------------------------------------------


def _full_name(kind: str, name: str, namespace: str, subsystem: str, unit: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a metric name must be a non-empty str, got {name!r}")
    full = "_".join(part for part in (namespace, subsystem, name) if part)
    if kind == "counter" and full.endswith("_total"):
        full = full[:-6]
    if unit and not full.endswith("_" + unit):
        full += "_" + unit
    validate_metric_name(full)
    return full


def _label_names(labelnames: Iterable[str], reserved: tuple[str, ...], what: str
                 ) -> tuple[str, ...]:
    if isinstance(labelnames, str):  # a str is an iterable of one-letter names: say so
        raise ValueError(f"labelnames must be a sequence of names, got the str {labelnames!r}")
    names = tuple(labelnames)
    validate_labels(dict.fromkeys(names, ""))  # raises InvalidArgument/InvalidType
    for n in names:
        if n in reserved:
            raise ValueError(f"the label name {n!r} is reserved in a {what}")
    if len(set(names)) != len(names):
        raise ValueError(f"label names repeat: {names}")
    return names


def _as_float(x: Any) -> float:
    return float(x)


# -- the metrics -------------------------------------------------------------------------------


class _Parent:
    """Stands for the handle of a metric that has label names: every update raises."""

    __slots__ = ("_kind",)

    def __init__(self, kind: str) -> None:
        self._kind = kind

    def __getattr__(self, name: str) -> Any:
        raise ValueError(f"{self._kind} metric is missing label values: call .labels(...) "
                         "first")


class _Metric:
    """What the four drop-in classes share: names, labels, the domain, registration."""

    _type: ClassVar[str]
    _reserved: ClassVar[tuple[str, ...]] = ()

    _h: Any  #: the percpu handle of this series (a _Parent for a parent)

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: CollectorRegistry | None = REGISTRY,
                 _labelvalues: Sequence[str] | None = None, *,
                 domain: Domain | None = None) -> None:
        if not isinstance(documentation, str):
            raise TypeError(f"documentation must be a str, got {type(documentation).__name__}")
        self._name = _full_name(self._type, name, namespace, subsystem, unit)
        self._documentation = documentation
        self._unit = unit
        self._labelnames = _label_names(labelnames, self._reserved, self._type)
        self._labelvalues: tuple[str, ...] = tuple(_labelvalues or ())
        self._domain: Domain = domain if domain is not None else default_domain()
        self._children: dict[tuple[str, ...], Self] = {}
        self._lock = threading.Lock()
        self._args: tuple[Any, ...] = (name, namespace, subsystem)
        self._h = _Parent(self._type)
        if not self._labelnames or self._labelvalues:
            self._h = self._make()
        if registry is not None and not self._labelvalues:
            registry.register(self)  # prometheus_client's duplicate-name check
            _serve(self._domain, registry)

    # what the registry asks of a collector: its names (for the duplicate check); the values
    # come from the domain's PercpuCollector, which serves every series of the domain.
    def describe(self) -> list[Metric]:
        return [Metric(self._name, self._documentation, self._type, self._unit)]

    def collect(self) -> list[Metric]:
        return []

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__}({self._name})"

    def _labels_dict(self) -> dict[str, str]:
        return dict(zip(self._labelnames, self._labelvalues, strict=True))

    def _make(self) -> Any:  # the percpu handle of this series, registered in the domain
        raise NotImplementedError

    def _again(self) -> None:
        """The series was removed (by this process or another): register it again."""
        self._h = self._make()

    def _retry(self, exc: Exception, method: str, amount: Any) -> None:
        """After ``self._h.<method>(amount)`` raised ``exc`` (the update methods try the
        handle first, inline: the hot path): an amount of another number type is taken as a
        float, as prometheus_client does; a series removed meanwhile (by this process or
        another) is registered again and updated. Anything else goes on."""
        if isinstance(exc, MetricRemoved):
            self._again()
        else:
            amount = _as_float(amount)
        getattr(self._h, method)(amount)

    def _check_observable(self) -> None:
        if isinstance(self._h, _Parent):
            raise ValueError(f"{self._type} metric is missing label values: call .labels(...) "
                             "first")

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        """The child of one label set (by position or by name; values made ``str``)."""
        if not self._labelnames:
            raise ValueError(f"no label names were set when constructing {self!r}")
        if self._labelvalues:
            raise ValueError(f"{self!r} already has labels set ({self._labels_dict()}); "
                             "can not chain calls to .labels()")
        if labelvalues and labelkwargs:
            raise ValueError("can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(self._labelnames):
                raise ValueError(f"incorrect label names: got {sorted(labelkwargs)}, expected "
                                 f"{list(self._labelnames)}")
            key = tuple(str(labelkwargs[n]) for n in self._labelnames)
        else:
            if len(labelvalues) != len(self._labelnames):
                raise ValueError(f"incorrect label count: got {len(labelvalues)}, expected "
                                 f"{len(self._labelnames)} ({list(self._labelnames)})")
            key = tuple(str(v) for v in labelvalues)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child(key)
        return child

    def _child(self, key: tuple[str, ...]) -> Self:
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child._labelvalues = key
        child._children = {}
        child._lock = threading.Lock()
        child._h = child._make()
        return child

    def remove(self, *labelvalues: object) -> None:
        """Remove the series of these label values, in every process of the domain."""
        if not self._labelnames:
            raise ValueError(f"no label names were set when constructing {self!r}")
        if len(labelvalues) != len(self._labelnames):
            raise ValueError(f"incorrect label count (expected {len(self._labelnames)}, got "
                             f"{labelvalues})")
        key = tuple(str(v) for v in labelvalues)
        with self._lock:
            self._children.pop(key, None)
            self._domain.remove(self._name, dict(zip(self._labelnames, key, strict=True)))

    def clear(self) -> None:
        """Remove every series of this metric, in every process of the domain (the label sets
        other processes made included)."""
        if not self._labelnames:
            return
        with self._lock:
            self._children.clear()
            for m in self._domain.snapshot():
                if m.name == self._name:
                    self._domain.remove(m.name, dict(m.labels))


class Counter(_Metric):
    """prometheus_client's ``Counter`` over a domain counter (ints exact, floats summed)."""

    _type = "counter"

    def _make(self) -> Any:
        return self._domain.counter(self._name, self._labels_dict(),
                                    documentation=self._documentation, unit=self._unit)

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        """Add ``amount`` (>= 0; 1 by default). ``exemplar`` is accepted and not stored."""
        try:
            if amount == 1:
                self._h.inc()
            else:
                self._h.add(amount)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "add", amount)

    def count_exceptions(self, exception: type[BaseException] | tuple[type[BaseException], ...]
                         = Exception) -> _CountExceptions:
        """A context manager and decorator: one more when the block raises ``exception``."""
        self._check_observable()
        return _CountExceptions(self, exception)

    def reset(self) -> None:
        """Not available: a domain counter is the sum of every process's part."""
        raise NotImplementedError("a percpu counter is shared by every process of its domain "
                                  "and only goes up; remove() the series to start it again")


_GAUGE_MODES = {"all": "sum", "liveall": "livesum", "sum": "sum", "livesum": "livesum",
                "max": "max", "livemax": "livemax", "min": "min", "livemin": "livemin",
                "mostrecent": "mostrecent", "livemostrecent": "livemostrecent"}


class Gauge(_Metric):
    """prometheus_client's ``Gauge`` over a domain gauge; ``multiprocess_mode`` is the mode
    (see the module docstring for ``all`` and ``liveall``)."""

    _type = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: CollectorRegistry | None = REGISTRY,
                 _labelvalues: Sequence[str] | None = None, multiprocess_mode: str = "all", *,
                 domain: Domain | None = None) -> None:
        mode = _GAUGE_MODES.get(multiprocess_mode) if isinstance(multiprocess_mode, str) \
            else None
        if mode is None:
            raise ValueError(f"Invalid multiprocess mode: {multiprocess_mode!r}; accepted: "
                             f"{', '.join(_GAUGE_MODES)}")
        self._multiprocess_mode = multiprocess_mode
        self._mode = mode
        self._most_recent = mode.endswith("mostrecent")
        super().__init__(name, documentation, labelnames, namespace, subsystem, unit, registry,
                         _labelvalues, domain=domain)

    def _make(self) -> Any:
        return self._domain.gauge(self._name, self._labels_dict(), mode=self._mode,
                                  documentation=self._documentation, unit=self._unit)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (1 by default) to this process's part."""
        if self._most_recent:
            raise RuntimeError("inc must not be used with the mostrecent mode")
        try:
            self._h.add(amount)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "add", amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount`` (1 by default) from this process's part."""
        if self._most_recent:
            raise RuntimeError("dec must not be used with the mostrecent mode")
        try:
            self._h.sub(amount)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "sub", amount)

    def set(self, value: float) -> None:
        """Set this process's part to ``value``."""
        try:
            self._h.set(value)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "set", value)

    def set_to_current_time(self) -> None:
        """``set(time.time())``."""
        self.set(time.time())

    def track_inprogress(self) -> _Block:
        """A context manager and decorator: ``inc()`` before, ``dec()`` after (with mode
        ``livesum``, a process that dies inside drops out of the value)."""
        self._check_observable()
        return _Block(lambda _s: self.dec(), self.inc)

    def time(self) -> _Block:
        """A context manager and decorator that sets the gauge to the block's duration."""
        self._check_observable()
        return _Block(self.set)

    def set_function(self, f: Callable[[], float]) -> None:
        """Not available: a function of one process cannot be called by another's scrape."""
        raise NotImplementedError("set_function is not available on a percpu gauge: the "
                                  "scrape may run in another process; set() the value instead")


class Summary(_Metric):
    """prometheus_client's ``Summary`` (count and sum) over a domain summary."""

    _type = "summary"
    _reserved = ("quantile",)

    def _make(self) -> Any:
        return self._domain.summary(self._name, self._labels_dict(),
                                    documentation=self._documentation, unit=self._unit)

    def observe(self, amount: float) -> None:
        """Record one observation."""
        try:
            self._h.observe(amount)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "observe", amount)

    def time(self) -> _Block:
        """A context manager and decorator that observes the block's duration in seconds."""
        self._check_observable()
        return _Block(self.observe)


def _buckets(buckets: Sequence[float | str]) -> tuple[float, ...]:
    """prometheus_client's bucket rules: sorted, +Inf appended, at least two with it."""
    bounds = [float(b) for b in buckets]
    if bounds != sorted(bounds):
        raise ValueError("Buckets not in sorted order")
    if bounds and bounds[-1] != math.inf:
        bounds.append(math.inf)
    if len(bounds) < 2:
        raise ValueError("Must have at least two buckets")
    return tuple(bounds[:-1])


class Histogram(_Metric):
    """prometheus_client's ``Histogram`` over a domain histogram."""

    _type = "histogram"
    _reserved = ("le",)
    DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       math.inf)

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 namespace: str = "", subsystem: str = "", unit: str = "",
                 registry: CollectorRegistry | None = REGISTRY,
                 _labelvalues: Sequence[str] | None = None,
                 buckets: Sequence[float | str] = DEFAULT_BUCKETS, *,
                 domain: Domain | None = None) -> None:
        self._bounds = _buckets(buckets)
        super().__init__(name, documentation, labelnames, namespace, subsystem, unit, registry,
                         _labelvalues, domain=domain)

    def _make(self) -> Any:
        return self._domain.histogram(self._name, self._labels_dict(), buckets=self._bounds,
                                      documentation=self._documentation, unit=self._unit)

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Record one observation. ``exemplar`` is accepted and not stored."""
        try:
            self._h.observe(amount)
        except (InvalidType, MetricRemoved) as exc:
            self._retry(exc, "observe", amount)

    def time(self) -> _Block:
        """A context manager and decorator that observes the block's duration in seconds."""
        self._check_observable()
        return _Block(self.observe)


# -- the collector -----------------------------------------------------------------------------


def _family_of(name: str, kind: str) -> str:
    if kind == "counter" and name.endswith("_total") and len(name) > 6:
        return name[:-6]
    return name


def _claimed(family: Metric) -> set[str]:
    """Every name a family's lines use (its own and its samples')."""
    names = {family.name}
    names.update(s.name for s in family.samples)
    if family.type == "counter":
        names.add(family.name + "_total")
    elif family.type == "summary":
        names.update((family.name + "_count", family.name + "_sum"))
    return names


class PercpuCollector:
    """A prometheus_client collector of every metric of ``domain``.

    ``health=False`` leaves out the ``percpu_domain_*`` health figures. With ``registry``,
    the collector registers itself there (as prometheus_client's own collectors do) unless
    this module registered one of the same domain there already (the drop-in metrics do);
    otherwise pass it to ``registry.register`` yourself. Register one collector per domain
    per registry: two would write every series twice.
    """

    def __init__(self, domain: DomainLike, *, health: bool = True,
                 registry: Any | None = None) -> None:
        self.domain = domain
        self.health = health
        if registry is not None:
            with _served_lock:
                domains = _served.setdefault(registry, weakref.WeakSet())
                if domain in domains:
                    return
                domains.add(domain)
            registry.register(self)

    def describe(self) -> list[Metric]:
        """No names: the series change while the service runs (see the module docstring)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The domain's families, read now."""
        values = self.domain.snapshot()
        meta: dict[str, tuple[str, str]] = {}
        for v in values:
            fam = _family_of(v.name, v.kind)
            doc, unit = getattr(v, "documentation", ""), getattr(v, "unit", "")
            if fam not in meta or (doc and not meta[fam][0]):
                meta[fam] = (doc, unit)
        health = (health_samples(self.domain.stats(), self.domain.arena.stats())
                  if self.health else [])
        families: dict[str, Metric] = {}
        for sample in domain_samples([v for v in values if v.kind != "histogram"], health):
            family = families.get(sample.family)
            if family is None:
                doc, unit = meta.get(sample.family, ("", ""))
                family = families[sample.family] = _metric(
                    sample.family, sample.help.strip() or doc, sample.kind, unit)
            elif not family.documentation and sample.help.strip():
                family.documentation = sample.help.strip()  # the first help given wins
            labels = dict(sample.labels)
            if sample.kind == "counter":
                family.add_sample(sample.family + "_total", labels, sample.value)
            elif sample.kind == "gauge":
                family.add_sample(sample.family, labels, sample.value)
            else:
                family.add_sample(sample.family + "_count", labels, sample.count)
                family.add_sample(sample.family + "_sum", labels, sample.sum)
        dropped = self._add_histograms(families, values, meta, {h.family for h in health})
        if dropped:
            gauge = families[DROPPED_SERIES]
            gauge.samples = [s._replace(value=s.value + dropped) for s in gauge.samples]
        for name in sorted(families):
            family = families[name]
            if family.type != "histogram":  # (histograms: in order already)
                family.samples.sort(key=_series_order(family))
            yield family

    @staticmethod
    def _add_histograms(families: dict[str, Metric], values: Sequence[Any],
                        meta: dict[str, tuple[str, str]], health: set[str]) -> int:
        """Add the histogram families of ``values``; return how many series were dropped."""
        claimed: dict[str, str] = {}  # sample or family name -> the family using it
        for family in families.values():
            for n in _claimed(family):
                claimed[n] = family.name
        dropped = 0
        series: dict[str, list[tuple[Any, list[Sample]]]] = {}
        for v in values:
            if v.kind != "histogram":
                continue
            name = v.name
            found = families.get(name)
            if found is not None and found.type == "histogram":
                family = found
            else:
                uses = {name, name + "_bucket", name + "_count", name + "_sum"}
                owners = {claimed[n] for n in uses if n in claimed}
                if name != DROPPED_SERIES and owners and owners <= health:
                    for owner in owners:  # a health figure gives way to a user metric
                        del families[owner]
                    owners = set()
                if name == DROPPED_SERIES or owners:
                    why = (f"the family {DROPPED_SERIES!r} is the runtime's own"
                           if name == DROPPED_SERIES else
                           f"its names clash with the famil{'ies' if len(owners) > 1 else 'y'} "
                           f"{', '.join(sorted(owners))}")
                    _log.warning("series %s%r left out of the exposition: %s",
                                 name, dict(v.labels), why)
                    dropped += 1
                    continue
                doc, unit = meta.get(name, ("", ""))
                family = families[name] = _metric(name, doc, "histogram", unit)
                for n in uses:
                    claimed[n] = name
            labels = dict(v.labels)
            bucket = name + "_bucket"
            lines = [Sample(bucket, {**labels, "le": _le(le)}, count) for le, count in v.buckets]
            lines.append(Sample(name + "_count", labels, v.count))
            lines.append(Sample(name + "_sum", labels, v.value))
            series.setdefault(name, []).append((v.labels, lines))
        for name, lst in series.items():  # series in label order, each one's lines as made
            lst.sort(key=_first)
            families[name].samples = [line for _, lines in lst for line in lines]
        return dropped


_first = operator.itemgetter(0)


@functools.lru_cache(maxsize=256)
def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``0.1``, ``1.0``, ``+Inf``)."""
    return str(floatToGoString(bound))


def _series_order(family: Metric) -> Callable[[Any], tuple[Any, ...]]:
    """Series in label order; a summary's ``_count`` before its ``_sum`` (as percpu writes)."""
    n = len(family.name)
    order = {"_count": 0, "_sum": 1}
    return lambda s: (sorted(s.labels.items()), order.get(s.name[n:], 0))


def _metric(name: str, documentation: str, kind: str, unit: str) -> Metric:
    """A family; a unit the family's name does not end with (prometheus_client's rule) is
    left off rather than failing the scrape."""
    try:
        return Metric(name, documentation, kind, unit)
    except ValueError:
        return Metric(name, documentation, kind)
