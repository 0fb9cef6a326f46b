"""Capacity and a new scraper's first scrape (issue 14).

* ``test_first_scrape``: a shared domain of ``METRICS`` counters (16 names, labels ``path``
  and ``code``) made once; each round starts a fresh interpreter that opens the file and
  times its first ``snapshot()`` and then the best of five later ones, and a second fresh
  interpreter that does the same for ``percpu.exposition(d)`` (health figures included, as
  ``serve`` renders). The benchmark's own timer covers one round (both interpreters, start-up
  included); the figures that matter, first / later, are printed per round and as medians.
* ``test_fill``: distinct label sets of one name registered until ``DomainFull``, in a
  16 MiB domain with 4 and with 32 ids (and 64 MiB when measuring): the metrics it held, the
  share of the arena in use (reserved pages included: they are arena blocks) and the time
  the fill took.

Nothing asserts a timing. Run: ``.venv/bin/python -m pytest bench/bench_capacity.py
--benchmark-enable -s`` (without ``--benchmark-enable``: 8,192 metrics and one round).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from percpu import Domain, DomainFull

ROOT = Path(__file__).resolve().parent.parent
READER = textwrap.dedent("""
    import json, sys, time
    import percpu
    what = sys.argv[2]
    d = percpu.Domain.open(sys.argv[1])
    call = d.snapshot if what == "snapshot" else (lambda: percpu.exposition(d))
    t = time.perf_counter(); call(); first = time.perf_counter() - t
    later = []
    for _ in range(5):
        t = time.perf_counter(); call(); later.append(time.perf_counter() - t)
    print(json.dumps({"first": first, "later": min(later)}))
""")
RESULTS: dict[str, list[dict[str, float]]] = {"snapshot": [], "exposition": []}
FILLS: list[dict[str, Any]] = []


def _measuring(config: pytest.Config) -> bool:
    """pytest-benchmark's own rule: enabled unless disabled and not enabled again."""
    return bool(config.getoption("benchmark_enable", default=False)
                or not config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="module")
def scrape_domain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[str, int]]:
    n = 65_536 if _measuring(request.config) else 8_192
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path_factory.mktemp("d")
    path = str(base / f"bench_capacity-{os.getpid()}.domain")
    size = Domain.size_for(n, max_vcpus=4, names=16, key_bytes=60)
    with Domain.create(path, size, max_vcpus=4) as d:
        for i in range(n):
            d.counter(f"requests_{i % 16}_total",
                      {"path": f"/api/v1/item/{i}", "code": "200"}).inc()
    try:
        yield path, n
    finally:
        os.unlink(path)


def _fresh_reader(path: str, what: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (
        str(ROOT), os.environ.get("PYTHONPATH")))))
    out = subprocess.run([sys.executable, "-c", READER, path, what], env=env, check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def test_first_scrape(benchmark: Any, request: pytest.FixtureRequest,
                      scrape_domain: tuple[str, int]) -> None:
    path, n = scrape_domain

    def one_round() -> None:
        for what in ("snapshot", "exposition"):
            r = _fresh_reader(path, what)
            RESULTS[what].append(r)
            print(f"\n{what} of {n:,}: first {r['first'] * 1e3:.0f} ms, later "
                  f"{r['later'] * 1e3:.1f} ms, first/later {r['first'] / r['later']:.1f}x")

    benchmark.pedantic(one_round, rounds=5 if _measuring(request.config) else 1, iterations=1)
    for what, rows in RESULTS.items():
        first = statistics.median(r["first"] for r in rows)
        later = statistics.median(r["later"] for r in rows)
        benchmark.extra_info[what] = {"first_s": first, "later_s": later,
                                      "ratio": first / later, "metrics": n}


@pytest.mark.parametrize(("mib", "max_vcpus"), [(16, 4), (16, 32), (64, 4), (64, 33)])
def test_fill(benchmark: Any, request: pytest.FixtureRequest, mib: int, max_vcpus: int
              ) -> None:
    if mib > 16 and not _measuring(request.config):
        pytest.skip("64 MiB only when measuring (--benchmark-enable)")

    def fill() -> None:
        with Domain(mib << 20, max_vcpus=max_vcpus) as d:
            t = time.perf_counter()
            n = 0
            try:
                while True:
                    d.counter("requests_total", {"path": f"/api/v1/item/{n}"}).inc()
                    n += 1
            except DomainFull:
                pass
            a = d.arena.stats()
            row = {"mib": mib, "max_vcpus": max_vcpus, "metrics": n,
                   "in_use": a.used_bytes / a.size, "seconds": time.perf_counter() - t,
                   "size_for": Domain.size_for(n, max_vcpus=max_vcpus, names=1,
                                               key_bytes=40)}
            FILLS.append(row)
            benchmark.extra_info.update(row)
            print(f"\n{mib} MiB, {max_vcpus} ids: DomainFull at {n:,} metrics, "
                  f"{row['in_use']:.1%} of the arena in use, {row['seconds']:.1f} s; "
                  f"size_for({n:,}) = {row['size_for'] / 2**20:.1f} MiB")

    benchmark.pedantic(fill, rounds=1, iterations=1)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    lines = []
    for what, rows in RESULTS.items():
        if rows:
            first = statistics.median(r["first"] for r in rows)
            later = statistics.median(r["later"] for r in rows)
            lines.append(f"  {what}: first {first * 1e3:.0f} ms, later {later * 1e3:.1f} ms "
                         f"(medians of {len(rows)} fresh readers): {first / later:.1f}x")
    lines += [f"  fill {f['mib']} MiB x {f['max_vcpus']} ids: {f['metrics']:,} metrics, "
              f"{f['in_use']:.1%} in use" for f in FILLS]
    if lines:
        print("\ncapacity benchmarks:\n" + "\n".join(lines))
