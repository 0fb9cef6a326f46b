"""The metric model against prometheus_client (issue 15): observe, set, and scrapes of histograms.

Every contender runs in the same pytest session, so the ratios printed at the end compare
figures of one run on one machine:

* ``Histogram.observe`` and ``Gauge.set``, ``BATCH`` calls a round: percpu's own handle
  (``Domain.histogram``/``Domain.gauge`` on a shared domain file), the drop-in
  ``percpu.prometheus`` class over the same domain, prometheus_client in one process, and
  prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set and
  ``values.MultiProcessValue()`` installed as ``values.ValueClass`` while the metric is made,
  which is what importing prometheus_client with the variable set does; undone afterwards).
  Targets: >= 3x faster than one-process prometheus_client, >= 8x than its multiprocess mode.
* A scrape of ``HISTOGRAMS`` histograms (one name, a label ``i``) x ``HOLDERS`` live holders:
  forked processes that each observe once into every histogram, then wait. percpu:
  ``generate_latest`` over a registry holding a ``PercpuCollector`` (health figures off), and
  ``snapshot()`` alone; prometheus_client: ``generate_latest`` over a registry holding a
  ``MultiProcessCollector`` of the ``HOLDERS`` processes' files. Target: >= 20x faster.
* The same scrape after ``AGED_WORKERS`` short-lived workers came and went, ``HOLDERS`` at a
  time, one in ten exiting without any clean-up (``os._exit`` before ``release``), each
  observing once into each of ``AGED_HISTOGRAMS`` histograms. prometheus_client keeps one file
  per worker ever started; percpu reuses the vcpu ids. ``AGED_HISTOGRAMS`` is smaller than
  ``HISTOGRAMS`` so that prometheus_client's side (1,000 files) stays within minutes.

Each scrape benchmark first checks that both sides count exactly what was observed. Timings
are reported, never asserted.

Run: ``.venv/bin/python -m pytest bench/bench_metric_model.py --benchmark-enable -s``
(without ``--benchmark-enable``: a quick smoke run, smaller workloads, figures meaningless).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import percpu
from percpu._exposition import DomainExposition

prometheus_client = pytest.importorskip("prometheus_client")
from bench_snapshot import Holders  # noqa: E402  (its sibling: bench/ is on sys.path)
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client import values as prom_values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

import percpu.prometheus as pp  # noqa: E402

BATCH = 1000  # calls per timed round of observe / set
HISTOGRAMS = 1000
HOLDERS = 16
AGED_HISTOGRAMS = 100
AGED_WORKERS = 1000
CRASH_EVERY = 10
DOMAIN_SIZE = 64 * 1024 * 1024
NAME = "bench_latency_seconds"
SHM = Path("/dev/shm")
ROUNDS = {"percpu": 15, "prometheus": 3}

RESULTS: dict[str, float] = {}  # name -> median seconds (per call for the op benchmarks)


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable", default=False))


def _scratch(prefix: str) -> Path:
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# -- the contenders of one call -----------------------------------------------------------------


@pytest.fixture(scope="module")
def domain() -> Iterator[percpu.Domain]:
    path = _scratch("percpu-model-")
    d = percpu.Domain.create(path / "model.domain", DOMAIN_SIZE)
    yield d
    d.close()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def multiproc() -> Iterator[Path]:
    """prometheus_client's multiprocess mode while the fixture lives (metrics made meanwhile
    get the mmap-file value class)."""
    path = _scratch("prometheus-model-")
    patch = pytest.MonkeyPatch()
    patch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    value_class = prom_values.MultiProcessValue()
    patch.setattr(prom_values, "ValueClass", value_class)
    try:
        yield path
    finally:
        value_class.close_all_files()
        patch.undo()
        shutil.rmtree(path, ignore_errors=True)


def _batch(op: Callable[[float], Any], x: float) -> Callable[[], None]:
    calls = range(BATCH)

    def run() -> None:
        for _ in calls:
            op(x)
    return run


def _bench(benchmark: Any, group: str, name: str, op: Callable[[float], Any], x: float) -> None:
    benchmark.group = group
    benchmark.name = name
    benchmark(_batch(op, x))
    if benchmark.stats:
        RESULTS[name] = benchmark.stats.stats.median / BATCH


OBSERVE = "Histogram.observe (one call)"
SET = "Gauge.set (one call)"


def test_observe_percpu(benchmark: Any, domain: percpu.Domain) -> None:
    h = domain.histogram("obs_native_seconds")
    _bench(benchmark, OBSERVE, "observe: percpu handle", h.observe, 0.3)
    assert h.count > 0


def test_observe_dropin(benchmark: Any, domain: percpu.Domain) -> None:
    h = pp.Histogram("obs_dropin_seconds", "d", registry=None, domain=domain)
    _bench(benchmark, OBSERVE, "observe: percpu.prometheus", h.observe, 0.3)
    assert h._h.count > 0


def test_observe_prometheus(benchmark: Any) -> None:
    h = prometheus_client.Histogram("obs_prom_seconds", "d", registry=None)
    _bench(benchmark, OBSERVE, "observe: prometheus_client", h.observe, 0.3)


def test_observe_prometheus_multiproc(benchmark: Any, multiproc: Path) -> None:
    h = prometheus_client.Histogram("obs_mp_seconds", "d", registry=None)
    assert h._sum._multiprocess, "the histogram did not get the multiprocess value"
    _bench(benchmark, OBSERVE, "observe: prometheus_client multiprocess", h.observe, 0.3)


def test_set_percpu(benchmark: Any, domain: percpu.Domain) -> None:
    g = domain.gauge("set_native")
    _bench(benchmark, SET, "set: percpu handle", g.set, 2.5)
    assert g.value == 2.5


def test_set_percpu_livesum(benchmark: Any, domain: percpu.Domain) -> None:
    g = domain.gauge("set_native_live", mode="livesum")
    _bench(benchmark, SET, "set: percpu handle, livesum", g.set, 2.5)


def test_set_dropin(benchmark: Any, domain: percpu.Domain) -> None:
    g = pp.Gauge("set_dropin", "d", registry=None, domain=domain)
    _bench(benchmark, SET, "set: percpu.prometheus", g.set, 2.5)
    assert g._h.value == 2.5


def test_set_prometheus(benchmark: Any) -> None:
    g = prometheus_client.Gauge("set_prom", "d", registry=None)
    _bench(benchmark, SET, "set: prometheus_client", g.set, 2.5)


def test_set_prometheus_multiproc(benchmark: Any, multiproc: Path) -> None:
    g = prometheus_client.Gauge("set_mp", "d", registry=None, multiprocess_mode="livesum")
    assert g._value._multiprocess
    _bench(benchmark, SET, "set: prometheus_client multiprocess", g.set, 2.5)


# -- a scrape of many histograms with live holders ----------------------------------------------


def _observe_all(handles: list[Any]) -> None:
    for k, h in enumerate(handles):
        h.observe(0.001 * (k % 100))


_PROM_WRITER = textwrap.dedent("""
    import prometheus_client
    h = prometheus_client.Histogram({name!r}, "latency", ["i"], registry=None)
    for k in range({count}):
        h.labels(i=str(k)).observe(0.001 * (k % 100))
""")


def _sizes(config: pytest.Config) -> tuple[int, int]:
    return (HISTOGRAMS, HOLDERS) if _enabled(config) else (50, 4)


@pytest.fixture(scope="module")
def live_domain(request: pytest.FixtureRequest) -> Iterator[tuple[percpu.Domain, int, int]]:
    count, holders = _sizes(request.config)
    path = _scratch("percpu-hist-")
    d = percpu.Domain.create(path / "hist.domain", DOMAIN_SIZE, max_vcpus=holders)
    h = Holders(path / "hist.domain", holders, 0, work=lambda dom: _observe_all(
        [dom.histogram(NAME, {"i": str(k)}) for k in range(count)]))
    try:
        yield d, count, holders
    finally:
        h.close()
        d.close()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def live_prom_dir(request: pytest.FixtureRequest) -> Iterator[tuple[Path, int, int]]:
    count, holders = _sizes(request.config)
    path = _scratch("prometheus-hist-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(path))
    code = _PROM_WRITER.format(name=NAME, count=count)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(holders)]
    assert all(p.wait() == 0 for p in procs)
    yield path, count, holders
    shutil.rmtree(path, ignore_errors=True)


def _counts(families: Any) -> tuple[int, float]:
    """(series with a _count sample, sum of those counts)."""
    counts = [s.value for f in families for s in f.samples if s.name == NAME + "_count"]
    return len(counts), sum(counts)


def _time(benchmark: Any, group: str, name: str, fn: Callable[[], Any], rounds: int) -> None:
    benchmark.group = group
    benchmark.name = name
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    if benchmark.stats:
        RESULTS[name] = benchmark.stats.stats.median


LIVE = f"scrape of {HISTOGRAMS:,} histograms x {HOLDERS} holders"


def test_scrape_live_percpu(benchmark: Any, live_domain: tuple[percpu.Domain, int, int]) -> None:
    d, count, holders = live_domain
    registry = CollectorRegistry()
    collector = pp.PercpuCollector(d, registry=registry, health=False)
    assert _counts(collector.collect()) == (count, count * holders)
    _time(benchmark, LIVE, "live scrape: percpu collector + generate_latest",
          lambda: generate_latest(registry), ROUNDS["percpu"])


def test_scrape_live_percpu_exposition(benchmark: Any,
                                       live_domain: tuple[percpu.Domain, int, int]) -> None:
    d, count, _ = live_domain
    e = DomainExposition(d, health=False)
    assert e.render()[0].count(b"_count") == count
    _time(benchmark, LIVE, "live scrape: percpu exposition (text)", e.render, ROUNDS["percpu"])


def test_scrape_live_percpu_snapshot(benchmark: Any,
                                     live_domain: tuple[percpu.Domain, int, int]) -> None:
    d, count, _ = live_domain
    assert len(d.snapshot()) == count
    _time(benchmark, LIVE, "live scrape: percpu snapshot() alone", d.snapshot, ROUNDS["percpu"])


def test_scrape_live_prometheus(benchmark: Any, live_prom_dir: tuple[Path, int, int]) -> None:
    path, count, holders = live_prom_dir
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    assert _counts(MultiProcessCollector(None, path=str(path)).collect()) == (
        count, count * holders)
    _time(benchmark, LIVE, "live scrape: prometheus_client MultiProcessCollector",
          lambda: generate_latest(registry), ROUNDS["prometheus"])


# -- the same after many short-lived workers ------------------------------------------------------


def _waves(work: Callable[[], None], release: Callable[[], None], workers: int, wave: int
           ) -> None:
    done = 0
    while done < workers:
        pids = []
        for i in range(min(wave, workers - done)):
            crash = (done + i) % CRASH_EVERY == CRASH_EVERY - 1
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    work()
                    if not crash:
                        release()
                    status = 0
                finally:
                    os._exit(status)
            pids.append(pid)
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        done += len(pids)


def _aged(config: pytest.Config) -> tuple[int, int]:
    return (AGED_HISTOGRAMS, AGED_WORKERS) if _enabled(config) else (20, 32)


AGED = f"scrape of {AGED_HISTOGRAMS} histograms after {AGED_WORKERS:,} workers came and went"


def test_scrape_aged_percpu(benchmark: Any, request: pytest.FixtureRequest) -> None:
    count, workers = _aged(request.config)
    path = _scratch("percpu-aged-")
    d = percpu.Domain.create(path / "aged.domain", DOMAIN_SIZE, max_vcpus=HOLDERS)
    try:
        handles = [d.histogram(NAME, {"i": str(k)}) for k in range(count)]
        d.release()  # the parent keeps its handles, not an id
        _waves(lambda: _observe_all(handles), d.release, workers, HOLDERS)
        registry = CollectorRegistry()
        collector = pp.PercpuCollector(d, registry=registry, health=False)
        assert _counts(collector.collect()) == (count, count * workers)
        assert d.stats().ids_ever_used <= HOLDERS
        _time(benchmark, AGED, "aged scrape: percpu collector + generate_latest",
              lambda: generate_latest(registry), ROUNDS["percpu"])
    finally:
        d.close()
        shutil.rmtree(path, ignore_errors=True)


def test_scrape_aged_prometheus(benchmark: Any, request: pytest.FixtureRequest) -> None:
    count, workers = _aged(request.config)
    path = _scratch("prometheus-aged-")
    patch = pytest.MonkeyPatch()
    patch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    value_class = prom_values.MultiProcessValue()
    patch.setattr(prom_values, "ValueClass", value_class)
    try:
        family = prometheus_client.Histogram(NAME, "latency", ["i"], registry=None)
        handles = [family.labels(i=str(k)) for k in range(count)]
        _waves(lambda: _observe_all(handles), lambda: None, workers, HOLDERS)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(path))
        assert _counts(MultiProcessCollector(None, path=str(path)).collect()) == (
            count, count * workers)
        files = len(list(path.glob("*.db")))
        assert files >= workers
        RESULTS["aged: prometheus_client files"] = files
        _time(benchmark, AGED, "aged scrape: prometheus_client MultiProcessCollector",
              lambda: generate_latest(registry), ROUNDS["prometheus"])
    finally:
        value_class.close_all_files()
        patch.undo()
        shutil.rmtree(path, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------------


RATIOS = [
    ("observe: percpu handle", "observe: prometheus_client", 3),
    ("observe: percpu handle", "observe: prometheus_client multiprocess", 8),
    ("observe: percpu.prometheus", "observe: prometheus_client", 3),
    ("observe: percpu.prometheus", "observe: prometheus_client multiprocess", 8),
    ("set: percpu handle", "set: prometheus_client", 3),
    ("set: percpu handle", "set: prometheus_client multiprocess", 8),
    ("set: percpu handle, livesum", "set: prometheus_client multiprocess", 8),
    ("set: percpu.prometheus", "set: prometheus_client", 3),
    ("set: percpu.prometheus", "set: prometheus_client multiprocess", 8),
    ("live scrape: percpu collector + generate_latest",
     "live scrape: prometheus_client MultiProcessCollector", 20),
    ("live scrape: percpu exposition (text)",
     "live scrape: prometheus_client MultiProcessCollector", 20),
    ("live scrape: percpu snapshot() alone",
     "live scrape: prometheus_client MultiProcessCollector", 20),
    ("aged scrape: percpu collector + generate_latest",
     "aged scrape: prometheus_client MultiProcessCollector", 20),
]


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    RESULTS.clear()
    yield
    if not RESULTS:
        return
    smoke = "" if _enabled(request.config) else "  [smoke run: figures mean nothing]"
    lines = ["", "metric model against prometheus_client (medians)" + smoke]
    for name, value in RESULTS.items():
        shown = f"{value:,.0f}" if name.endswith("files") else (
            f"{value * 1e9:,.0f} ns" if value < 1e-4 else f"{value * 1e3:,.2f} ms")
        lines.append(f"  {name:<58} {shown:>12}")
    for ours, theirs, target in RATIOS:
        if ours in RESULTS and theirs in RESULTS:
            r = RESULTS[theirs] / RESULTS[ours]
            verdict = "met" if r >= target else "missed"
            lines.append(f"  {theirs} / {ours}: {r:,.1f}x (target {target}x: {verdict})")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))
