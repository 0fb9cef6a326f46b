"""Scrape cost as the workload ages: percpu against prometheus_client's multiprocess mode.

The workload, the same for both: ``COUNTERS`` counters (one name, a label ``i``), registered
in the parent before it forks, as a pre-fork server does. Short-lived workers are then forked
in waves of ``WAVE`` at a time; each increments every counter ``INCS`` times and exits (one in
``CRASH_EVERY`` without any clean-up, as a SIGKILLed worker would), and the next wave starts
when the whole wave has exited. The scrape is timed at several ages of the workload: after
the first wave, and after 100, 250, 500 and 1,000 workers have come and gone.

* percpu: one shared domain file. Each worker leases the lowest free vcpu id and counts on top
  of the slots the previous holder of that id left, so the domain holds at most ``WAVE`` ids'
  pages however many workers came and went. The scrape is what ``python -m percpu serve``
  does for one request: ``snapshot()`` and the Prometheus text rendering
  (``render_prometheus(collect_domain(d, health=False))``); a second line adds the health
  figures (``exposition(d)``, the default of ``serve``).
* prometheus_client: ``PROMETHEUS_MULTIPROC_DIR`` mode. Each worker writes its own
  ``counter_<pid>.db``; the files of dead workers must stay (deleting them would lose their
  counts; ``mark_process_dead`` only removes live-gauge files), so the directory gains a file
  per worker ever started and ``MultiProcessCollector`` reads every one of them on every
  scrape. The scrape is ``generate_latest`` over a registry holding that collector.

Before timing, each benchmark checks that every counter reads exactly ``workers * INCS`` on
both sides. The report prints, per age, the median scrape of each, their ratio, the files in
the prometheus directory and the bytes each side keeps on /dev/shm. Nothing asserts a timing.

Run: ``.venv/bin/python -m pytest bench/bench_scrape.py --benchmark-enable -q``
(without ``--benchmark-enable``: a quick smoke run at smaller ages).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import percpu
from percpu._exposition import collect_domain, exposition, render_prometheus

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client import values as prom_values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

COUNTERS = 50
NAME = "scrape_hits"
WAVE = 16  # workers alive at once
INCS = 20  # increments of each counter by each worker
CRASH_EVERY = 10  # one worker in this many exits without releasing anything
AGES = (WAVE, 100, 250, 500, 1000)  # workers come and gone when the scrape is timed
SMOKE_AGES = (WAVE, 2 * WAVE)  # without --benchmark-enable
DOMAIN_SIZE = 4 * 1024 * 1024  # bytes
ROUNDS = 7  # timed scrapes per benchmark
SHM = Path("/dev/shm")

# (side, age) -> figures of that benchmark; read by the report
RESULTS: dict[tuple[str, int], dict[str, float]] = {}


def _labels(k: int) -> dict[str, str]:
    return {"i": str(k)}


def _scratch_dir(prefix: str) -> Path:
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` really occupy (allocated blocks, not apparent size)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


class Workload:
    """Forks workers in waves, each running ``work`` once; tracks how many have gone."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.work = work
        self.workers = 0

    def advance_to(self, age: int) -> None:
        while self.workers < age:
            n = min(WAVE, age - self.workers)
            pids = []
            for i in range(n):
                crash = (self.workers + i) % CRASH_EVERY == CRASH_EVERY - 1
                pid = os.fork()
                if pid == 0:  # the worker
                    status = 1
                    try:
                        self.work()
                        status = 0
                    finally:
                        if not crash:
                            _clean_exit()
                        os._exit(status)
                pids.append(pid)
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                assert status == 0, f"worker {pid} failed ({status:#x})"
            self.workers += n


_clean_exits: list[Callable[[], None]] = []


def _clean_exit() -> None:
    for fn in _clean_exits:
        fn()


# -- percpu ------------------------------------------------------------------------------------


class PercpuSide:
    def __init__(self) -> None:
        self.dir = _scratch_dir("percpu-scrape-")
        self.path = self.dir / "scrape.domain"
        self.domain = percpu.Domain.create(self.path, DOMAIN_SIZE, max_vcpus=WAVE, lock="auto")
        self.counters = [self.domain.counter(NAME, _labels(k)) for k in range(COUNTERS)]
        self.domain.release()  # the parent keeps the handles but no vcpu id
        self.workload = Workload(self._work)

    def _work(self) -> None:
        for c in self.counters:
            for _ in range(INCS):
                c.inc()

    def scrape(self) -> bytes:
        return render_prometheus(collect_domain(self.domain, health=False))

    def scrape_with_health(self) -> bytes:
        return exposition(self.domain)[0]

    def check(self) -> None:
        values = [m for m in self.domain.snapshot() if m.name == NAME]
        want = self.workload.workers * INCS
        assert len(values) == COUNTERS and all(m.value == want for m in values), (
            want, sorted({m.value for m in values}))

    def close(self) -> None:
        self.domain.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- prometheus_client --------------------------------------------------------------------------


class PrometheusSide:
    """prometheus_client in multiprocess mode, in this process (its value class is chosen when
    ``prometheus_client.values`` is imported, so it is installed here and undone in close)."""

    def __init__(self) -> None:
        self.dir = _scratch_dir("prometheus-scrape-")
        self._saved_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._saved_class = prom_values.ValueClass
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.dir)
        prom_values.ValueClass = prom_values.MultiProcessValue()
        family = prometheus_client.Counter(NAME, "hits", ["i"], registry=None)
        self.counters = [family.labels(**_labels(k)) for k in range(COUNTERS)]
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(self.dir))
        self.workload = Workload(self._work)

    def _work(self) -> None:
        for c in self.counters:
            for _ in range(INCS):
                c.inc()

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def files(self) -> int:
        return len(list(self.dir.glob("*.db")))

    def check(self) -> None:
        want = float(self.workload.workers * INCS)
        samples = [s for f in MultiProcessCollector(None, path=str(self.dir)).collect()
                   for s in f.samples if s.name == NAME + "_total"]
        assert len(samples) == COUNTERS and all(s.value == want for s in samples), (
            want, sorted({s.value for s in samples}))

    def close(self) -> None:
        prom_values.ValueClass = self._saved_class
        if self._saved_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._saved_env
        shutil.rmtree(self.dir, ignore_errors=True)


# -- fixtures and benchmarks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def percpu_side() -> Iterator[PercpuSide]:
    side = PercpuSide()
    try:
        yield side
    finally:
        side.close()


@pytest.fixture(scope="module")
def prometheus_side() -> Iterator[PrometheusSide]:
    side = PrometheusSide()
    try:
        yield side
    finally:
        side.close()


def _ages(config: pytest.Config) -> tuple[int, ...]:
    enabled = config.getoption("benchmark_enable", default=False)
    return AGES if enabled else SMOKE_AGES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "age" in metafunc.fixturenames:
        metafunc.parametrize("age", _ages(metafunc.config))


def _time(benchmark: Any, fn: Callable[[], bytes], side: str, age: int, **extra: float) -> bytes:
    benchmark.group = f"scrape of {COUNTERS} counters after N short-lived workers"
    benchmark.extra_info.update({"workers": age, **extra})
    body: bytes = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = float(stats.stats.median)
    else:  # benchmarks disabled: one plain timing, for the smoke report
        t = time.perf_counter()
        fn()
        median = time.perf_counter() - t
    RESULTS[side, age] = {"median": median, "bytes": len(body), **extra}
    return body


def test_percpu_scrape(benchmark: Any, percpu_side: PercpuSide, age: int) -> None:
    percpu_side.workload.advance_to(age)
    percpu_side.check()
    s = percpu_side.domain.stats()
    ids_ever = int(getattr(s, "ids_ever_used", s.highest_id_used))
    assert ids_ever <= WAVE and s.holders_now == 0, s
    body = _time(benchmark, percpu_side.scrape, "percpu", age,
                 disk_bytes=_disk_bytes(percpu_side.path), pages=s.pages, ids_ever=ids_ever)
    assert body.count(f"{NAME}_total{{".encode()) == COUNTERS


def test_percpu_scrape_with_health(benchmark: Any, percpu_side: PercpuSide, age: int) -> None:
    percpu_side.workload.advance_to(age)
    percpu_side.check()
    body = _time(benchmark, percpu_side.scrape_with_health, "percpu+health", age)
    assert b"percpu_domain_pages " in body


def test_prometheus_scrape(benchmark: Any, prometheus_side: PrometheusSide, age: int) -> None:
    prometheus_side.workload.advance_to(age)
    prometheus_side.check()
    # One file per worker ever started, and the parent's (made when it created the series).
    assert prometheus_side.files() == age + 1
    body = _time(benchmark, prometheus_side.scrape, "prometheus", age,
                 files=prometheus_side.files(), disk_bytes=_disk_bytes(prometheus_side.dir))
    assert body.count(f"{NAME}_total{{".encode()) == COUNTERS


# -- the report ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module's benchmarks, print the scrape figures by age, from this run."""
    RESULTS.clear()
    yield
    ages = sorted({age for _, age in RESULTS})
    if not ages:
        return
    enabled = request.config.getoption("benchmark_enable", default=False)
    lines = ["", f"scrape of {COUNTERS} counters as short-lived workers come and go "
                 f"({WAVE} at a time, {INCS} increments of each counter each)"
             + ("" if enabled else "  [smoke run: single timings, not measurements]"),
             f"  {'workers':>8} {'percpu':>10} {'+health':>10} {'prometheus':>11} "
             f"{'prom/percpu':>12} {'prom files':>11} {'percpu pages':>13} {'prom shm':>10}"]
    for age in ages:
        ours = RESULTS.get(("percpu", age), {})
        health = RESULTS.get(("percpu+health", age), {})
        theirs = RESULTS.get(("prometheus", age), {})
        ratio = (theirs["median"] / ours["median"]) if ours and theirs else None
        lines.append(
            f"  {age:>8,} {_ms(ours.get('median')):>10} {_ms(health.get('median')):>10} "
            f"{_ms(theirs.get('median')):>11} "
            f"{'-' if ratio is None else f'{ratio:,.1f}x':>12} "
            f"{int(theirs.get('files', 0)):>11,} {_kib(ours.get('pages', 0) * 4096):>13} "
            f"{_kib(theirs.get('disk_bytes')):>10}")
    lines.append(f"  (percpu pages: pageset pages in the domain, which grow with the ids in use "
                 f"at once; its file is {DOMAIN_SIZE // 1024:,} KiB, reserved once. prom shm: "
                 "blocks the prometheus directory occupies)")
    first, last = ages[0], ages[-1]
    for side in ("percpu", "prometheus"):
        a, b = RESULTS.get((side, first)), RESULTS.get((side, last))
        if a and b:
            lines.append(f"  {side}: scrape after {last:,} workers / after {first:,} = "
                         f"{b['median'] / a['median']:.2f}x")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f} ms"


def _kib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:,.0f} KiB"
