"""Scrapes of a domain: the runtime's own series names, the cached layout, gzip.

* A user metric that claims ``percpu_exposition_dropped_series`` (any kind, any labels) is
  left out and counted; the scrape still answers 200 (it used to be a 500 on every scrape).
* :class:`DomainExposition` renders from a layout kept between scrapes; its bytes are those of
  the plain path (``render_*(domain_samples(...))``) for any input, the fast path is taken
  whenever the numbers allow it, and the layout is remade once per change of the series, not
  once per scrape.
* gzip is sent exactly when the scraper's Accept-Encoding accepts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import gzip
import logging
import math
import threading
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import percpu
from percpu._exposition import _CACHES as CACHES
from percpu._exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_PROMETHEUS,
    DROPPED_SERIES,
    DomainExposition,
    MetricSample,
    accepts_gzip,
    domain_samples,
    encode,
    exposition,
    health_samples,
    make_server,
    render_openmetrics,
    render_prometheus,
)
from percpu._exposition import _cache_for as cache_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@dataclasses.dataclass
class Value:
    """Stands for percpu.MetricValue (what Domain.snapshot returns)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    kind: str
    value: Any
    count: Any = 0
    buckets: tuple[tuple[float, int], ...] = ()


@dataclasses.dataclass
class Stats:
    """A few of DomainStats' fields, enough for health samples of each kind."""

    holders_now: int = 2
    pages: int = 12
    bytes_per_metric: float = 4096.0
    overflow_holders: int = 0
    fresh_ids: int = 3


class Arena:
    def stats(self) -> object:
        return None


class FakeDomain:
    """What DomainExposition reads, with values a real domain cannot hold (NaN, negative
    counters, bools, huge ints)."""

    def __init__(self, values: list[Value], stats: object | None = None) -> None:
        self.values = values
        self._stats = Stats() if stats is None else stats
        self.arena = Arena()

    def snapshot(self) -> list[Value]:
        return list(self.values)

    def stats(self) -> object:
        return self._stats


def plain(domain: FakeDomain | percpu.Domain, openmetrics: bool, health: bool) -> bytes:
    """The plain path: what every scrape rendered before the layout existed."""
    extra = health_samples(domain.stats(), domain.arena.stats()) if health else []
    samples = domain_samples(domain.snapshot(), extra)
    return (render_openmetrics if openmetrics else render_prometheus)(samples)


def parsed_samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


# -- the runtime's own series ------------------------------------------------------------------


@contextlib.contextmanager
def serving(source: Any) -> Iterator[str]:
    """``make_server(source)`` running in a thread; yields its /metrics URL."""
    server = make_server(source)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(url: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with opener.open(request, timeout=30) as response:
        return response.status, dict(response.headers.items()), response.read()


CLAIMS = [  # (kind, labels) of a user metric named DROPPED_SERIES
    ("gauge", None), ("gauge", {"x": "1"}), ("counter", None), ("counter", {"x": "1"}),
    ("summary", None),
]


@pytest.mark.parametrize(("kind", "labels"), CLAIMS)
def test_a_user_metric_named_like_the_dropped_series_gauge_is_left_out(
    kind: str, labels: dict[str, str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    with percpu.Domain(1 << 20, max_vcpus=2, lock=False) as d:
        d.counter("requests").add(5)
        getattr(d, kind)(DROPPED_SERIES, labels)
        with caplog.at_level(logging.WARNING, logger="percpu._exposition"):
            bodies = [exposition(d)[0], exposition(d, OPENMETRICS)[0], plain(d, False, True)]
            with serving(DomainExposition(d)) as url:
                status, _, served = get(url)
            with serving(lambda: domain_samples(d.snapshot())) as url:
                status2, _, served2 = get(url)
    assert status == status2 == 200
    assert bodies[0] == bodies[2] == served
    for body in (bodies[0], served2):
        samples = parsed_samples(body)
        assert samples[("requests_total", ())] == 5
        # The runtime's gauge, alone in its family, says one series was left out.
        assert [k for k in samples if k[0].startswith(DROPPED_SERIES)] == [(DROPPED_SERIES, ())]
        assert samples[(DROPPED_SERIES, ())] == 1
        assert body.count(f"# TYPE {DROPPED_SERIES} gauge".encode()) == 1
    assert bodies[1].count(f"# TYPE {DROPPED_SERIES} gauge".encode()) == 1
    assert any(DROPPED_SERIES in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_health_names_still_yield_to_user_metrics() -> None:
    """Unchanged rule: a health figure (optional) gives way to a user metric of its name."""
    health = [MetricSample("percpu_domain_pages", "gauge", (), 4, help="Pages.")]
    samples = domain_samples([Value("percpu_domain_pages", (), "counter", 1)], health)
    kept = {(s.name, s.kind): s.value for s in samples}
    assert kept == {("percpu_domain_pages", "counter"): 1, (DROPPED_SERIES, "gauge"): 1}


# -- the cached layout gives the plain path's bytes -------------------------------------------

NAMES = ["a", "a_total", "a_count", "a_sum", "b", "s", DROPPED_SERIES, DROPPED_SERIES + "_total",
         "percpu_domain_pages", "percpu_domain_leases", "1bad"]
KINDS = ["counter", "gauge", "summary", "untyped"]  # "untyped": a kind no format takes
LABELS = [("x", "1"), ("x", "2"), ("y", 'q"\\\n'), ("path", "fresh"), ("quantile", "0.5"),
          ("__bad", "v")]
labelsets = st.lists(st.sampled_from(LABELS), max_size=2, unique_by=lambda kv: kv[0]).map(
    lambda kvs: tuple(sorted(kvs)))
any_number = st.one_of(
    st.integers(-(2**65), 2**65), st.floats(), st.just(True), st.just(-0.0))
keys = st.tuples(st.sampled_from(NAMES), labelsets, st.sampled_from(KINDS))


def fast_numbers(kind: str) -> st.SearchStrategy[tuple[Any, Any]]:
    """(value, count) the bulk checks vouch for: the fast path must be taken."""
    if kind == "gauge":
        number = st.one_of(st.integers(-(2**63), 2**64 - 1),
                           st.floats(-9e18, 9e18, allow_nan=False))
        return st.tuples(number, st.just(0))
    non_negative = st.one_of(st.integers(0, 2**64 - 1), st.floats(0, 1.8e19))
    return st.tuples(non_negative, st.integers(0, 2**64 - 1))


def scrape_both(d: FakeDomain, e: DomainExposition, caplog: pytest.LogCaptureFixture) -> None:
    """Every format, cached layout against plain path: same bytes, same warnings."""
    for accept, om in ((None, False), (OPENMETRICS, True)):
        caplog.clear()
        body, content_type = e.render(accept)
        fast_log = [r.getMessage() for r in caplog.records]
        caplog.clear()
        want = plain(d, om, e.health)
        assert body == want
        assert [r.getMessage() for r in caplog.records] == fast_log
        assert content_type == (CONTENT_TYPE_OPENMETRICS if om else CONTENT_TYPE_PROMETHEUS)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), series=st.lists(keys, max_size=12), health=st.booleans())
def test_layout_renders_what_the_plain_path_renders(
    data: st.DataObject, series: list[tuple[str, Any, str]], health: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="percpu._exposition")
    d = FakeDomain([Value(n, lab, k, data.draw(any_number), data.draw(any_number))
                    for n, lab, k in series])
    e = DomainExposition(d, health=health)
    scrape_both(d, e, caplog)
    for v in d.values:  # the same series with other numbers: the same layout serves them
        v.value, v.count = data.draw(any_number), data.draw(any_number)
    scrape_both(d, e, caplog)
    assert e.layout_builds == 1


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), series=st.lists(keys, max_size=12), health=st.booleans())
def test_layout_takes_the_fast_path_when_the_numbers_allow(
    data: st.DataObject, series: list[tuple[str, Any, str]], health: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="percpu._exposition")
    d = FakeDomain([Value(n, lab, k, *data.draw(fast_numbers(k))) for n, lab, k in series])
    e = DomainExposition(d, health=health)
    scrape_both(d, e, caplog)
    for v in d.values:
        v.value, v.count = data.draw(fast_numbers(v.kind))
    scrape_both(d, e, caplog)
    assert (e.layout_builds, e.plain_scrapes) == (1, 0)


def test_histograms_of_other_values_take_the_plain_path(
        caplog: pytest.LogCaptureFixture) -> None:
    """A histogram value that is not a domain's own (whose count is its last bucket's by
    construction) is rendered the plain way, every scrape, and says so in ``plain_scrapes``."""
    buckets = ((1.0, 2), (math.inf, 3))
    d = FakeDomain([Value("c", (), "counter", 4), Value("h", (), "histogram", 2.5, 3)])
    d.values[1].buckets = buckets
    e = DomainExposition(d, health=False)
    scrape_both(d, e, caplog)
    assert (e.layout_builds, e.plain_scrapes) == (0, 2)
    body, _ = e.render()
    assert b'h_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 3\nh_count 3\nh_sum 2.5\n' in body


def test_a_domains_histograms_take_the_layout(caplog: pytest.LogCaptureFixture) -> None:
    """A real domain's histograms are rendered from the layout, to the plain path's bytes,
    in both formats, negative sums included."""
    d = percpu.Domain(1 << 22, max_vcpus=2)
    try:
        h = d.histogram("lat_seconds", {"r": "/"}, buckets=[0.1, 1], documentation="L.",
                        unit="seconds")
        d.counter("c", documentation="C.").inc()
        e = DomainExposition(d, health=False)
        for x in (0.05, 5, -3.0):
            h.observe(x)
            scrape_both(d, e, caplog)  # type: ignore[arg-type]
        assert (e.layout_builds, e.plain_scrapes) == (1, 0)
        body, _ = e.render()
        assert b'lat_seconds_bucket{r="/",le="0.1"} 2\n' in body
        assert b'lat_seconds_count{r="/"} 3\nlat_seconds_sum{r="/"} 2.05\n' in body
    finally:
        d.close()


def test_numbers_the_bulk_checks_cannot_vouch_for_take_the_plain_path() -> None:
    cases: list[list[Value]] = [
        [Value("c", (), "counter", -1)],
        [Value("c", (), "counter", 1), Value("c", (("x", "1"),), "counter", math.nan)],
        [Value("c", (), "counter", 2**64)],
        [Value("g", (), "gauge", True)],
        [Value("g", (), "gauge", -(2**63) - 1)],
        [Value("s", (), "summary", 1.5, 2.0)],  # a float count
        [Value("s", (), "summary", -0.5, 2)],  # a negative sum
    ]
    for values in cases:
        d = FakeDomain(values)
        e = DomainExposition(d)
        body, _ = e.render()
        assert e.plain_scrapes == 1 and body == plain(d, False, True), values
        assert parsed_samples(body)[(DROPPED_SERIES, ())] == len(values) - (len(values) > 1), (
            values)


def test_a_nan_gauge_is_written_by_the_fast_path() -> None:
    d = FakeDomain([Value("g", (("x", "1"),), "gauge", 1),
                    Value("g", (("x", "2"),), "gauge", math.nan),
                    Value("h", (), "gauge", math.inf)])
    e = DomainExposition(d, health=False)
    for accept, om in ((None, False), (OPENMETRICS, True)):
        body, _ = e.render(accept)
        assert body == plain(d, om, False)
        assert b'g{x="2"} NaN\n' in body
    assert e.plain_scrapes == 2  # +Inf in a gauge is beyond int range: the plain path
    d.values.pop()
    body, _ = e.render()
    assert e.plain_scrapes == 2 and b'g{x="2"} NaN\n' in body and body == plain(d, False, False)


# -- the layout is remade per change of series, not per scrape --------------------------------


def test_layout_is_made_once_per_change_of_the_series() -> None:
    with percpu.Domain(1 << 20, max_vcpus=2, lock=False) as d:
        counters = [d.counter("requests", {"route": f"/{i}"}) for i in range(50)]
        d.summary("latency").observe(0.25)
        e = DomainExposition(d)
        for i in range(20):
            counters[i].add(i)
            body, _ = e.render(OPENMETRICS if i % 2 else None)
            assert body == plain(d, bool(i % 2), True)
        assert (e.layout_builds, e.plain_scrapes) == (1, 0)
        d.gauge("queue").inc()
        assert e.render()[0] == plain(d, False, True)
        assert e.layout_builds == 2
        assert d.remove("requests", {"route": "/7"})
        assert e.render()[0] == plain(d, False, True)
        assert e.render()[0] == plain(d, False, True)
        assert (e.layout_builds, e.plain_scrapes) == (3, 0)
        assert parsed_samples(e.render()[0])[("requests_total", (("route", "/19"),))] == 19


def test_exposition_keeps_the_layout_with_the_domain_weakly() -> None:
    gc.collect()
    before = len(CACHES)
    d = percpu.Domain(1 << 20, max_vcpus=2, lock=False)
    d.counter("requests").inc()
    for _ in range(5):
        exposition(d)
        exposition(d, health=False)
    assert len(CACHES) == before + 1
    assert cache_for(d, True).builds == 1 and cache_for(d, False).builds == 1
    gone = weakref.ref(d)
    d.close()
    del d
    gc.collect()
    assert gone() is None  # the cache does not keep the domain alive
    assert len(CACHES) == before  # and goes with it


# -- gzip --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "want"), [
    (None, False), ("", False), ("identity", False), ("gzip", True), ("GZIP", True),
    ("x-gzip", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False), ("gzip; q=0.0", False),
    ("*", True), ("*;q=0", False), ("*, gzip;q=0", False), ("gzip;q=0, *", False),
    ("br, deflate", False), ("gzip;q=nonsense", False), ("gzip;q=2", False), (",,;", False),
])
def test_accepts_gzip(header: str | None, want: bool) -> None:
    assert accepts_gzip(header) is want


Source = Callable[[percpu.Domain], Any]
SOURCES: list[tuple[str, Source]] = [
    ("DomainExposition", DomainExposition),
    ("collect callable", lambda d: lambda: domain_samples(d.snapshot())),
]


@pytest.mark.parametrize("source", [s for _, s in SOURCES], ids=[n for n, _ in SOURCES])
def test_server_gzips_when_the_scraper_accepts_it(source: Source) -> None:
    with percpu.Domain(1 << 20, max_vcpus=2, lock=False) as d:
        for i in range(200):
            d.counter("requests", {"route": f"/{i}"}).add(i)
        with serving(source(d)) as url:
            _, plain_headers, identity = get(url)
            _, headers, zipped = get(url, {"Accept-Encoding": "gzip, deflate"})
            _, om_headers, om_zipped = get(url, {"Accept-Encoding": "gzip",
                                                 "Accept": OPENMETRICS})
            _, refused_headers, refused = get(url, {"Accept-Encoding": "gzip;q=0, *"})
            _, head_headers, head_body = get(url, {"Accept-Encoding": "gzip"}, method="HEAD")
    assert "Content-Encoding" not in plain_headers and "Content-Encoding" not in refused_headers
    assert headers["Content-Encoding"] == om_headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in headers["Vary"] and "Accept" in headers["Vary"]
    assert gzip.decompress(zipped) == identity == refused
    assert int(headers["Content-Length"]) == len(zipped) < len(identity)
    assert gzip.decompress(om_zipped).endswith(b"# EOF\n")
    assert om_headers["Content-Type"] == CONTENT_TYPE_OPENMETRICS
    assert head_body == b"" and head_headers["Content-Encoding"] == "gzip"
    assert parsed_samples(identity)[("requests_total", (("route", "/199"),))] == 199


def test_encode() -> None:
    body = b"x 1\n" * 100
    assert encode(body, "text/plain", None).body is body
    zipped = encode(body, "text/plain", "gzip")
    assert zipped.content_encoding == "gzip" and gzip.decompress(zipped.body) == body
    assert zipped == encode(body, "text/plain", "gzip")  # mtime 0: the same bytes each time
