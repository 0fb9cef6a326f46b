"""Shared machinery of the benchmarks: collection, percentiles, and the end-of-run summary.

The benchmarks report, they never assert a timing. Each one records what it measured in its
pytest-benchmark ``extra_info`` (so ``--benchmark-json`` keeps it) and in the session's
:class:`Summary`, which prints the ratios the issues ask about after pytest-benchmark's own
table. Every figure is computed from this run's measurements; none is written down in advance.

Collection: the test suite's ``python_files`` is the default ``test_*.py`` and ``testpaths`` is
``tests``, so a plain ``pytest`` never comes here. A file named on the command line is collected
whatever its name; :func:`pytest_collect_file` makes ``pytest bench/`` collect ``bench_*.py``
too. Benchmarks run only with ``--benchmark-enable`` (pyproject's addopts disable them); without
it each test is a quick smoke run whose figures are printed but mean nothing.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent
SHM_DIR = Path("/dev/shm")  # tmpfs: a shared arena file there never waits on a disk


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench/bench_*.py`` when the directory (not the file) is named."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == BENCH_DIR
            and not parent.session.isinitpath(file_path)):  # named files: pytest collects them
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# -- statistics -------------------------------------------------------------------------------


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def describe(samples: Sequence[int]) -> dict[str, int]:
    """Count, p50, p99, p99.9 and max of latency samples in nanoseconds."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_ns": percentile(ordered, 50),
        "p99_ns": percentile(ordered, 99),
        "p99_9_ns": percentile(ordered, 99.9),
        "max_ns": ordered[-1],
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the divisor is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt_ns(value: float | None) -> str:
    """A duration in ns, printed in the unit that keeps it short."""
    if value is None:
        return "-"
    if value < 10_000:
        return f"{value:,.0f} ns"
    if value < 10_000_000:
        return f"{value / 1000:,.1f} us"
    return f"{value / 1e6:,.1f} ms"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


# -- shared fixtures --------------------------------------------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A private directory for shared arena files: under /dev/shm when it exists, else tmp."""
    if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="arena-bench-", dir=SHM_DIR))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture(autouse=True)
def _quiet_memlock_warning() -> Iterator[None]:
    """``lock="auto"`` warns when RLIMIT_MEMLOCK is too low; the figures record ``locked``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="could not lock the arena", category=Warning)
        yield


@pytest.fixture
def measuring(benchmark: Any) -> bool:
    """True when pytest-benchmark is enabled: run full sample counts, else a smoke run."""
    return bool(benchmark.enabled)


# -- the summary ------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the benchmarks measured in this session, printed at the end as ratio tables.

    ``pairs``: group -> label -> pytest-benchmark median seconds of one call, and per group
    the labels of the ``"baseline"`` (bytearray), the ``"peer"`` (multiprocessing.heap) and
    the ``"floor"`` (the least a Python-level allocator pays).
    ``interleaved``: label -> (best, median) ns per call of the interleaved pair rounds.
    ``fill``: one row per (arena kind, fill level). ``pool``: one row per (item kind, mode).
    The benchmark modules reach this through the ``summary`` fixture and import nothing from
    here.
    """

    measuring: bool = False
    pairs: dict[str, dict[str, float]] = field(default_factory=dict)
    pair_roles: dict[tuple[str, str], str] = field(default_factory=dict)
    interleaved: dict[str, tuple[float, float]] = field(default_factory=dict)
    fill: list[dict[str, Any]] = field(default_factory=list)
    pool: list[dict[str, Any]] = field(default_factory=list)

    describe = staticmethod(describe)
    ratio = staticmethod(ratio)
    fmt_ns = staticmethod(fmt_ns)

    def record_pair(self, group: str, label: str, benchmark: Any, role: str = "") -> None:
        """Keep a pytest-benchmark result (nothing when benchmarks are disabled).

        ``role`` is ``"baseline"`` (ratios are taken to it), ``"peer"`` (the slow
        competitor: speed-ups are taken from it), ``"floor"`` (what every row costs above it
        is printed too), or empty.
        """
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            self.pairs.setdefault(group, {})[label] = float(stats.stats.median)
        if role:
            self.pair_roles[group, role] = label

    def fill_row(self, kind: str, level: float) -> dict[str, Any] | None:
        for row in self.fill:
            if row["kind"] == kind and row["fill"] == level:
                return row
        return None

    def fill_ratio(self, kind: str, what: str, low: float, high: float) -> float | None:
        """p99.9 of ``what`` ("alloc" or "pair") at fill ``high`` over that at ``low``."""
        lo, hi = self.fill_row(kind, low), self.fill_row(kind, high)
        if lo is None or hi is None:
            return None
        return ratio(hi[what].get("p99_9_ns"), lo[what].get("p99_9_ns"))

    def pool_row(self, items: str, mode: str) -> dict[str, Any] | None:
        for row in self.pool:
            if row["items"] == items and row["mode"] == mode:
                return row
        return None

    def render(self) -> list[str]:
        lines: list[str] = []
        if not self.measuring:
            lines.append("benchmarks disabled (smoke run): the figures below are not "
                         "measurements; run with --benchmark-enable")
        lines += self._render_pairs()
        lines += self._render_interleaved()
        lines += self._render_fill()
        lines += self._render_pool()
        return lines

    def _render_pairs(self) -> list[str]:
        lines: list[str] = []
        for group, results in self.pairs.items():
            base_label = self.pair_roles.get((group, "baseline"), "")
            peer_label = self.pair_roles.get((group, "peer"), "")
            floor = results.get(self.pair_roles.get((group, "floor"), ""))
            base, slow = results.get(base_label), results.get(peer_label)
            lines += ["", f"{group}: median of one call (pytest-benchmark)",
                      f"  {'':44} {'median':>10} {'/ ' + base_label:>16} "
                      f"{peer_label.rsplit('.', 1)[-1] + ' /':>20} {'- floor':>10}"]
            for label, median in results.items():
                above = None if floor is None else (median - floor) * 1e9
                lines.append(f"  {label:44} {fmt_ns(median * 1e9):>10} "
                             f"{fmt_ratio(ratio(median, base)):>16} "
                             f"{fmt_ratio(ratio(slow, median)):>20} {fmt_ns(above):>10}")
            lines.append("  (targets, issue 2: arena within 3x of bytearray(64); "
                         "at least 30x faster than multiprocessing.heap)")
        return lines

    def _render_interleaved(self) -> list[str]:
        if not self.interleaved:
            return []
        base = self.interleaved.get("bytearray(64)", (0.0, 0.0))[0]
        slow = self.interleaved.get("BufferWrapper(64)", (0.0, 0.0))[0]
        floor = self.interleaved.get("floor", (0.0, 0.0))[0]
        lines = ["", "alloc+free 64 B, interleaved rounds (ns per call; ratios of best rounds)",
                 f"  {'':20} {'best':>9} {'median':>9} {'/ bytearray':>12} "
                 f"{'BufferWrapper /':>16} {'- floor':>9}"]
        for label, (best, median) in self.interleaved.items():
            lines.append(f"  {label:20} {fmt_ns(best):>9} {fmt_ns(median):>9} "
                         f"{fmt_ratio(ratio(best, base)):>12} {fmt_ratio(ratio(slow, best)):>16} "
                         f"{fmt_ns(best - floor if floor else None):>9}")
        return lines

    def _render_fill(self) -> list[str]:
        if not self.fill:
            return []
        lines = ["", "alloc latency by fill (perf_counter_ns per call, random sizes; "
                 "pair = alloc + free)",
                 f"  {'arena':8} {'fill':>5} {'n':>8} {'alloc p50':>10} {'alloc p99.9':>12} "
                 f"{'pair p50':>10} {'pair p99.9':>11} {'failed':>7} {'frag':>5} {'locked':>6}"]
        for row in sorted(self.fill, key=lambda r: (r["kind"], r["fill"])):
            lines.append(
                f"  {row['kind']:8} {row['fill']:>5.0%} {row['alloc']['n']:>8} "
                f"{fmt_ns(row['alloc'].get('p50_ns')):>10} "
                f"{fmt_ns(row['alloc'].get('p99_9_ns')):>12} "
                f"{fmt_ns(row['pair'].get('p50_ns')):>10} "
                f"{fmt_ns(row['pair'].get('p99_9_ns')):>11} {row['failed']:>7} "
                f"{row['fragmentation']:>5.2f} {row['locked']!s:>6}")
        for kind in sorted({r["kind"] for r in self.fill}):
            levels = sorted(r["fill"] for r in self.fill if r["kind"] == kind)
            if len(levels) < 2:
                lines.append(f"  {kind}: one fill level only; run them all for the ratio")
                continue
            for what in ("alloc", "pair"):
                r = self.fill_ratio(kind, what, levels[0], levels[-1])
                lines.append(f"  {kind}: {what} p99.9 @ {levels[-1]:.0%} / p99.9 @ "
                             f"{levels[0]:.0%} = {fmt_ratio(r)}  (target, issue 2: <= 2x)")
        return lines

    def _render_pool(self) -> list[str]:
        if not self.pool:
            return []
        lines = ["", "latency of one item during a burst (perf_counter_ns per call, every "
                 "thread of both processes)",
                 f"  {'items':8} {'how':34} {'n':>7} {'p50':>10} {'p99':>10} {'p99.9':>10} "
                 f"{'max':>10} {'slow gets':>9} {'refilled':>8}"]
        for row in self.pool:
            d = row["latency"]
            lines.append(
                f"  {row['items']:8} {row['label']:34} {d['n']:>7} {fmt_ns(d.get('p50_ns')):>10} "
                f"{fmt_ns(d.get('p99_ns')):>10} {fmt_ns(d.get('p99_9_ns')):>10} "
                f"{fmt_ns(d.get('max_ns')):>10} {row.get('slow_gets', '-')!s:>9} "
                f"{row.get('items_refilled', '-')!s:>8}")
        for items in dict.fromkeys(r["items"] for r in self.pool):
            pool, direct = self.pool_row(items, "pool"), self.pool_row(items, "on-demand")
            r = None if pool is None or direct is None else ratio(
                pool["latency"].get("p99_9_ns"), direct["latency"].get("p99_9_ns"))
            lines.append(f"  {items}: p99.9(pool get) / p99.9(on demand) = {fmt_ratio(r)}  "
                         "(target, issue 6: <= 0.1)")
        return lines


_SUMMARY_KEY = pytest.StashKey[Summary]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY_KEY] = Summary()


@pytest.fixture
def summary(request: pytest.FixtureRequest, measuring: bool) -> Summary:
    """The session's :class:`Summary` (printed after pytest-benchmark's table)."""
    s = request.config.stash[_SUMMARY_KEY]
    s.measuring = s.measuring or measuring
    return s


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    s = config.stash.get(_SUMMARY_KEY, None)
    if s is None or not (s.pairs or s.interleaved or s.fill or s.pool):
        return
    terminalreporter.write_sep("=", "arena benchmarks: ratios")
    terminalreporter.write_line(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
                                f"load average {os.getloadavg()[0]:.2f}")
    for line in s.render():
        terminalreporter.write_line(line)
