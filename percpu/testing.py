"""Hypothesis state machines for stress-testing code built on a :class:`percpu.Domain`.

:class:`DomainMachine` is a ``RuleBasedStateMachine`` that owns a small private domain and a
plain model: a dict from ``(name, labels)`` to the kind and value each metric should have. Its
own rules register counters, gauges and summaries, add to them, try operations the runtime
must refuse (a negative or non-int add to a counter: it raises and changes nothing), remove
metrics (their handles must raise :class:`~percpu.MetricRemoved`; registering again counts
from zero) and take snapshots. Its invariants check, after every step, that
``Domain.snapshot()`` and every live handle's ``value`` equal the model, that ``stats()``
counts the model's metrics, and that ``Domain.check()`` finds the shared structures
consistent.

Subclass it to stress *your* code on top of the runtime: build your wrapper in :meth:`setup`,
add ``@rule`` methods that drive it, and tell the model what your code should have done with
:meth:`expect_add`, :meth:`expect_observe`, :meth:`expect_registered` and
:meth:`expect_removed`; the built-in invariants then compare the domain with what you
expected. The built-in rules keep running beside yours (on other metric names, ``NAMES``), so
your code shares the domain with churn; set ``BUILTIN_RULES = False`` to run only yours.

Example (it runs in the test suite: ``tests/test_testing.py``)::

    from hypothesis import strategies as st
    from hypothesis.stateful import precondition, rule

    from percpu.testing import DomainMachine

    class RequestMetricsMachine(DomainMachine):
        def setup(self) -> None:
            self.app = RequestMetrics(self.domain)  # your code: one call per request
            for route in ROUTES:
                self.expect_registered("counter", "http_requests", {"route": route})
            self.expect_registered("counter", "http_errors")
            self.expect_registered("gauge", "http_in_flight")
            self.expect_registered("summary", "http_request_seconds")
            self.open = 0

        @rule()
        def start(self) -> None:
            self.app.start()
            self.open += 1
            self.expect_add("http_in_flight", None, 1)

        @precondition(lambda self: self.open > 0)
        @rule(route=st.sampled_from(ROUTES), status=st.sampled_from([200, 404, 500]),
              seconds=st.floats(0, 30))
        def finish(self, route: str, status: int, seconds: float) -> None:
            self.app.finish(route, status, seconds)
            self.open -= 1
            self.expect_add("http_in_flight", None, -1)
            self.expect_add("http_requests", {"route": route}, 1)
            if status >= 500:
                self.expect_add("http_errors", None, 1)
            self.expect_observe("http_request_seconds", None, seconds)

    TestRequestMetrics = RequestMetricsMachine.TestCase  # pytest and unittest collect this

Requires hypothesis (the ``test`` extra: ``pip install 'percpu-arena[test]'``).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        Bundle,
        MultipleResults,
        RuleBasedStateMachine,
        consumes,
        invariant,
        multiple,
        precondition,
        rule,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "percpu.testing needs hypothesis, which is part of the `test` extra: "
        "pip install 'percpu-arena[test]' (or pip install hypothesis)"
    ) from exc

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ._domain import Domain
from ._errors import InvalidArgument, InvalidType, KindMismatch, MetricRemoved
from ._handles import Counter, Gauge, Summary
from ._names import Labels, validate_labels

__all__ = ["DomainMachine", "Expected", "MetricKey"]

KINDS = ("counter", "gauge", "summary")
MetricKey = tuple[str, Labels]  # (name, labels sorted by name)
Handle = Counter | Gauge | Summary


@dataclass
class Expected:
    """What the model says one metric holds."""

    kind: str  #: "counter", "gauge" or "summary"
    value: int | float = 0  #: counter or gauge value; a summary's sum
    count: int = 0  #: a summary's count


def _key(name: str, labels: Mapping[str, str] | Labels | None) -> MetricKey:
    if isinstance(labels, tuple):
        return name, tuple(sorted(labels))
    return name, validate_labels(labels)


class DomainMachine(RuleBasedStateMachine):
    """A private domain, a model of its metrics, rules that use and remove them, and
    invariants that the domain agrees with the model. See the module docstring."""

    DOMAIN_SIZE = 1 << 20  # bytes of arena
    MAX_VCPUS = 2
    NAMES: tuple[str, ...] = ("machine_requests", "machine_bytes", "machine_latency")
    LABEL_VALUES: tuple[str, ...] = ("", "/", "/api", 'we"ird\\value\n')
    BUILTIN_RULES = True  # False: only the subclass's rules run
    FLOAT_TOLERANCE = 1e-9  # relative error allowed on float sums (summaries, float amounts)

    metric_keys: Bundle[MetricKey] = Bundle("metric_keys")

    def __init__(self) -> None:
        super().__init__()
        self.domain = self.make_domain()
        # Invariant: `expected` holds exactly the domain's registered metrics and their values.
        self.expected: dict[MetricKey, Expected] = {}
        self.handles: dict[MetricKey, Handle] = {}  # the latest handle of each key ever used
        # Each name's kind, fixed by its first registration (Prometheus: one kind a family),
        # kept when its series are removed: the domain keeps the family.
        self.family_kinds: dict[str, str] = {}
        self.setup()

    # -- hooks ---------------------------------------------------------------------------

    def make_domain(self) -> Domain:
        """The domain under test (default: private, DOMAIN_SIZE bytes, not locked)."""
        return Domain(self.DOMAIN_SIZE, max_vcpus=self.MAX_VCPUS, lock=False)

    def setup(self) -> None:
        """Called once the domain exists: build the code under test here."""

    def teardown(self) -> None:
        """Close the domain. An override must call ``super().teardown()``."""
        self.domain.close()
        super().teardown()

    # -- the model, for the subclass's rules too -------------------------------------------

    def expect_registered(self, kind: str, name: str,
                          labels: Mapping[str, str] | None = None) -> None:
        """The code under test registered ``name{labels}`` as ``kind`` (a no-op if known)."""
        assert kind in KINDS, kind
        found = self.expected.setdefault(_key(name, labels), Expected(kind))
        assert found.kind == kind, f"{name} is a {found.kind} in the model, not a {kind}"

    def expect_add(self, name: str, labels: Mapping[str, str] | None, n: int) -> None:
        """The code under test added ``n`` to the counter or gauge ``name{labels}``."""
        entry = self.expected[_key(name, labels)]
        assert entry.kind in ("counter", "gauge"), entry
        entry.value += n

    def expect_observe(self, name: str, labels: Mapping[str, str] | None, x: float) -> None:
        """The code under test observed ``x`` in the summary ``name{labels}``."""
        entry = self.expected[_key(name, labels)]
        assert entry.kind == "summary", entry
        entry.value += x
        entry.count += 1

    def expect_removed(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """The code under test removed ``name{labels}``."""
        del self.expected[_key(name, labels)]

    def handle(self, kind: str, name: str, labels: Mapping[str, str] | None = None) -> Handle:
        """Register ``name{labels}`` as ``kind`` in the domain and the model; its handle."""
        d = self.domain
        h: Handle
        if kind == "counter":
            h = d.counter(name, dict(labels) if labels else None)
        elif kind == "gauge":
            h = d.gauge(name, dict(labels) if labels else None)
        else:
            h = d.summary(name, dict(labels) if labels else None)
        self.family_kinds.setdefault(name, kind)
        self.expect_registered(kind, name, labels)
        self.handles[_key(name, labels)] = h
        return h

    # -- built-in rules --------------------------------------------------------------------

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(target=metric_keys, kind=st.sampled_from(KINDS), data=st.data())
    def register(self, kind: str,
                 data: st.DataObject) -> MetricKey | MultipleResults[MetricKey]:
        """Register a metric; the same name and labels as another kind is refused."""
        name = data.draw(st.sampled_from(self.NAMES), label="name")
        value = data.draw(st.sampled_from(self.LABEL_VALUES), label="route")
        labels = {"route": value} if value else None
        key = _key(name, labels)
        known = self.family_kinds.get(name)
        if known is not None and known != kind:
            try:
                self.handle(kind, name, labels)
            except KindMismatch:
                return multiple()
            raise AssertionError(f"{name} registered as a {known} and a {kind}")
        self.handle(kind, name, labels)
        return key

    def _live_handle(self, key: MetricKey) -> Handle | None:
        """The handle of ``key``; None (after checking that it refuses use) if removed."""
        h = self.handles[key]
        if key in self.expected:
            return h
        try:
            if isinstance(h, Summary):
                h.observe(1.0)
            else:
                h.add(1)
        except MetricRemoved:
            return None
        raise AssertionError(f"{h!r} was removed but still accepts updates")

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(key=metric_keys, n=st.integers(0, 1 << 20))
    def add(self, key: MetricKey, n: int) -> None:
        """Add ``n`` to a counter or gauge (subtract from a gauge), observe in a summary."""
        h = self._live_handle(key)
        if h is None:
            return
        entry = self.expected[key]
        if isinstance(h, Summary):
            h.observe(n / 8)
            entry.value += n / 8
            entry.count += 1
        elif isinstance(h, Gauge) and n % 2:
            h.sub(n)
            entry.value -= n
        elif n == 1:
            h.inc()
            entry.value += 1
        else:
            h.add(n)
            entry.value += n

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(key=metric_keys, bad=st.sampled_from([-1, -(1 << 40), 1.5, -0.25, "1", None,
                                                math.nan, math.inf]))
    def refused_update(self, key: MetricKey, bad: object) -> None:
        """A counter refuses a negative add; every kind refuses a non-number, NaN and the
        infinities; a refused update changes nothing (the invariants check the values)."""
        h = self._live_handle(key)
        if h is None:
            return
        numeric = isinstance(bad, int | float) and math.isfinite(bad)
        refused = not numeric or (isinstance(h, Counter) and bad < 0)  # type: ignore[operator]
        try:
            if isinstance(h, Summary):
                h.observe(bad)  # type: ignore[arg-type]
            else:
                h.add(bad)  # type: ignore[arg-type]
        except (InvalidArgument, InvalidType):
            assert refused, f"{h!r} refused {bad!r}"
            return
        assert not refused, f"{h!r} accepted {bad!r}"
        assert isinstance(bad, int | float)
        entry = self.expected[key]
        entry.value += bad
        if isinstance(h, Summary):
            entry.count += 1

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(key=consumes(metric_keys))
    def remove(self, key: MetricKey) -> None:
        """Remove a metric everywhere; its handle refuses use; a second remove is False."""
        name, labels = key
        present = key in self.expected
        assert self.domain.remove(name, dict(labels) or None) == present
        if present:
            self.expect_removed(name, dict(labels) or None)
        assert self._live_handle(key) is None
        assert self.domain.remove(name, dict(labels) or None) is False

    # -- invariants --------------------------------------------------------------------------

    def _same(self, got: int | float, want: int | float) -> bool:
        if isinstance(want, int) and isinstance(got, int):
            return got == want
        return math.isclose(got, want, rel_tol=self.FLOAT_TOLERANCE, abs_tol=1e-9)

    @invariant()
    def snapshot_matches_model(self) -> None:
        """``snapshot()`` holds exactly the model's metrics, with the model's values."""
        seen: dict[MetricKey, Expected] = {}
        for v in self.domain.snapshot():
            key = (v.name, v.labels)
            assert key not in seen, f"{key} appears twice in the snapshot"
            seen[key] = Expected(v.kind, v.value, v.count)
        assert seen.keys() == self.expected.keys(), (
            f"in the domain only: {sorted(seen.keys() - self.expected.keys())}; in the model "
            f"only: {sorted(self.expected.keys() - seen.keys())}")
        for key, want in self.expected.items():
            got = seen[key]
            assert got.kind == want.kind, (key, got, want)
            assert got.count == want.count, (key, got, want)
            assert self._same(got.value, want.value), (key, got, want)

    @invariant()
    def handles_match_model(self) -> None:
        """Every live handle reads the model's value."""
        for key, want in self.expected.items():
            h = self.handles.get(key)
            if h is None:  # registered by the code under test only
                continue
            if isinstance(h, Summary):
                count, total = h.value
                assert count == want.count and self._same(total, want.value), (key, h.value)
            else:
                assert self._same(h.value, want.value), (key, h.value, want)

    @invariant()
    def domain_is_consistent(self) -> None:
        """``stats()`` counts the model's metrics and ``check()`` finds no problem."""
        metrics = self.domain.stats().metrics
        if metrics != len(self.expected):
            in_domain = sorted((v.name, v.labels) for v in self.domain.snapshot())
            raise AssertionError(f"the domain has {metrics} metrics {in_domain}, the model "
                                 f"{len(self.expected)} {sorted(self.expected)}")
        report = self.domain.check()
        assert not report.problems, report.problems
