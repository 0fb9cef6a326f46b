"""Memory for C counters with V ids in use: percpu's pages against prometheus_client's files.

percpu: a shared domain (``max_vcpus=16``) and V live holders (forked processes, see
``bench_snapshot.Holders``) that each increment all C counters once. Figures from
``Domain.stats()``: ``pages`` (one page per id per pageset: the counters' values) and
``arena_used_bytes`` (those pages, plus the registry, the names and the root block), shown
less the used bytes of an empty domain of the same ``max_vcpus``. The arena itself is mapped,
prefaulted and locked whole when it is opened (its size is chosen up front), so the used bytes
say how small an arena this workload fits in, not what the process pays today.

prometheus_client: V interpreters started with ``PROMETHEUS_MULTIPROC_DIR`` set, each
incrementing the same C series once, one ``counter_<pid>.db`` file each. Figures: the sum of
the files' sizes (each is mapped whole by its writer and by every collector), the blocks
they occupy, and the bytes they say they use (their header).

Nothing is timed. Run: ``.venv/bin/python -m pytest bench/bench_memory.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_snapshot import DOMAIN_SIZE, NAME, Holders

import percpu

pytest.importorskip("prometheus_client")

COUNTERS = (100, 1000, 10_000)
IDS = (1, 4, 16)
MAX_VCPUS = 16


@dataclass(frozen=True)
class Row:
    counters: int
    ids: int
    pages: int
    used: int  # arena used bytes less an empty domain's
    used_total: int
    prom_files: int
    prom_size: int  # sum of st_size
    prom_blocks: int  # sum of st_blocks * 512
    prom_used: int  # sum of the files' own "used" headers


ROWS: list[Row] = []


def _percpu_figures(tmp: Path, counters: int, ids: int) -> tuple[int, int, int]:
    """(pages, used bytes less an empty domain's, used bytes) with ``ids`` live holders."""
    with percpu.Domain.create(tmp / "empty.domain", DOMAIN_SIZE, max_vcpus=MAX_VCPUS) as d:
        empty = d.stats().arena_used_bytes
    path = tmp / "memory.domain"
    with percpu.Domain.create(path, DOMAIN_SIZE, max_vcpus=MAX_VCPUS) as d:
        holders = Holders(path, ids, counters)
        try:
            s = d.stats()
        finally:
            holders.close()
    assert s.holders_now == ids and s.metrics == counters, s
    return s.pages, s.arena_used_bytes - empty, s.arena_used_bytes


_WRITER = textwrap.dedent("""
    import os
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"]
    import prometheus_client
    c = prometheus_client.Counter({name!r}, "hits", ["i"], registry=None)
    for k in range({counters}):
        c.labels(i=str(k)).inc()
""")


def _prometheus_figures(tmp: Path, counters: int, ids: int) -> tuple[int, int, int, int]:
    """(files, sum of sizes, sum of allocated bytes, sum of used bytes) for ``ids``
    processes."""
    path = tmp / "prometheus_multiproc"
    path.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(path))
    code = _WRITER.format(name=NAME, counters=counters)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(ids)]
    assert all(p.wait() == 0 for p in procs)
    files = sorted(path.glob("*.db"))
    assert len(files) == ids
    size = blocks = used = 0
    for f in files:
        st = f.stat()
        size += st.st_size
        blocks += st.st_blocks * 512
        with f.open("rb") as fh:
            used += int.from_bytes(fh.read(4), "little")
    return len(files), size, blocks, used


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("counters", COUNTERS)
def test_memory(tmp_path: Path, counters: int, ids: int) -> None:
    pages, used, used_total = _percpu_figures(tmp_path, counters, ids)
    files, size, blocks, prom_used = _prometheus_figures(tmp_path, counters, ids)
    ROWS.append(Row(counters, ids, pages, used, used_total, files, size, blocks, prom_used))


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def report_lines(rows: list[Row]) -> list[str]:
    lines = ["", "memory for C counters with V ids in use (KiB; B/ctr = bytes per counter; "
                 "percpu other = registry, names)",
             f"  {'C':>6} {'V':>3} | {'pages':>5} {'pages KiB':>9} {'other KiB':>9} "
             f"{'used KiB':>9} {'B/ctr':>6} | {'prom files':>10} {'size KiB':>9} {'alloc KiB':>9} "
             f"{'used KiB':>9} {'B/ctr':>6} | {'size/used':>9}"]
    for r in sorted(rows, key=lambda r: (r.counters, r.ids)):
        lines.append(
            f"  {r.counters:>6} {r.ids:>3} | {r.pages:>5} {_kib(r.pages * 4096):>9} "
            f"{_kib(r.used - r.pages * 4096):>9} {_kib(r.used):>9} {r.used / r.counters:>6.0f} "
            f"| {r.prom_files:>10} "
            f"{_kib(r.prom_size):>9} {_kib(r.prom_blocks):>9} {_kib(r.prom_used):>9} "
            f"{r.prom_size / r.counters:>6.0f} | {r.prom_size / r.used:>8.1f}x")
    lines.append("  percpu used = arena used bytes less an empty domain's (max_vcpus=16: "
                 f"{_kib(rows[0].used_total - rows[0].used)} KiB); "
                 f"arena mapped: {_kib(DOMAIN_SIZE)} KiB whatever the load")
    lines.append("  size/used = prometheus files' total size / percpu used")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    ROWS.clear()
    yield
    if not ROWS:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(report_lines(ROWS)))
