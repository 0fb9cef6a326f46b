"""The arena at every size (issue 18): alloc+free pairs from 64 B to 4 MiB against the peers.

For each size (64 B, 4 KiB, 64 KiB, 1 MiB, 4 MiB) and each subject, one sample times one pair
with ``time.perf_counter_ns`` (the timer's own floor, measured in the same run, is subtracted):

* ``bytearray(n)``, ``mmap.mmap(-1, n)`` (made and closed),
  ``multiprocessing.heap.BufferWrapper(n)`` (made and dropped: its finalizer frees it),
  ``SharedMemory(create=True, size=n)`` (created, closed, unlinked);
* ``Arena`` private, warm (the caches serve the pair after the first one);
* ``Arena`` private, allocator path: the same arena type with both caches turned off on the
  instance (``_quick_max_size`` and ``_cache_max`` set to -1), so every pair is a TLSF split
  and merge under the lock: what a first use or a cold size costs;
* ``Arena.create`` (a file in /dev/shm) with ``cache_bytes``, warm: the per-process cache, no
  fcntl call; and without a cache: TLSF plus the OFD lock, two fcntl calls per operation.

Subjects take turns in chunks of samples, round after round, so a burst of load on the machine
falls on all of them alike. The table gives the median and p99.9 of each, minor page faults per
pair (``getrusage`` over the subject's samples), and the ratios the issue asks about: arena over
``bytearray(n)``, the allocator path over the 64 B warm pair, shared over private. Nothing here
asserts a timing; without ``--benchmark-enable`` it is a quick smoke run.
"""

from __future__ import annotations

import math
import mmap
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.heap import BufferWrapper
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import pytest

import arena

SIZES = (64, 4 << 10, 64 << 10, 1 << 20, 4 << 20)
ARENA_BYTES = 64 << 20
CHUNK = 50  # samples a subject takes in one turn
SAMPLES = {64: 20_000, 4 << 10: 20_000, 64 << 10: 10_000, 1 << 20: 3_000, 4 << 20: 1_000}
SMOKE_SAMPLES = 100


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile ``q`` of an ascending, non-empty list."""
    return ordered[min(len(ordered), max(1, math.ceil(q / 100.0 * len(ordered)))) - 1]


def _label(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size >> 10} KiB" if size < 1 << 20 else \
        f"{size >> 20} MiB"


def _timer_floor(n: int = 20_000) -> int:
    ns = time.perf_counter_ns
    gaps = sorted(-ns() + ns() for _ in range(n))
    return gaps[n // 2]


def _arena_pair(a: arena.Arena, size: int) -> Callable[[], object]:
    alloc, free = a.alloc, a.free
    return lambda: free(alloc(size))


def _peers(size: int) -> dict[str, Callable[[], object]]:
    def shm() -> None:
        s = SharedMemory(create=True, size=size)
        s.close()
        s.unlink()

    def anon() -> None:
        mmap.mmap(-1, size).close()

    return {"bytearray(n)": lambda: bytearray(size), "mmap.mmap(-1, n)": anon,
            "BufferWrapper(n)": lambda: BufferWrapper(size),
            "SharedMemory(create=True)": shm}


@pytest.fixture(scope="module")
def arenas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, arena.Arena]]:
    shm = Path("/dev/shm")
    where = Path(tmp_path_factory.mktemp("sizes")) if not shm.is_dir() else shm
    paths = [where / f"bench_sizes_{i}.arena" for i in range(2)]
    for p in paths:
        p.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no memlock here: still prefaulted
        made = {
            "arena private": arena.Arena(ARENA_BYTES, lock="auto"),
            "arena private, allocator path": arena.Arena(ARENA_BYTES, lock="auto"),
            "arena shared, cache": arena.Arena.create(paths[0], ARENA_BYTES, lock="auto",
                                                      cache_bytes=ARENA_BYTES // 2),
            "arena shared, no cache": arena.Arena.create(paths[1], ARENA_BYTES, lock="auto"),
        }
    cold = made["arena private, allocator path"]
    cold._quick_max_size = -1  # both caches off on this instance: every pair is the TLSF's
    cold._cache_max = -1
    yield made
    for a in made.values():
        a.close()
    for p in paths:
        p.unlink(missing_ok=True)


def _measure(subjects: dict[str, Callable[[], object]], samples: int,
             floor: int) -> dict[str, dict[str, float]]:
    ns = time.perf_counter_ns
    times: dict[str, list[int]] = {k: [] for k in subjects}
    faults: dict[str, int] = dict.fromkeys(subjects, 0)
    for fn in subjects.values():  # warm-up: the first pair of an arena size fills its cache
        for _ in range(20):
            fn()
    while len(next(iter(times.values()))) < samples:
        for name, fn in subjects.items():
            out = times[name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(CHUNK):
                t0 = ns()
                fn()
                out.append(ns() - t0 - floor)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    result = {}
    for name, out in times.items():
        out.sort()
        result[name] = {"median_ns": float(percentile(out, 50)),
                        "p999_ns": float(percentile(out, 99.9)),
                        "faults_per_op": faults[name] / len(out)}
    return result


def test_sizes(benchmark: Any, measuring: bool, arenas: dict[str, arena.Arena]) -> None:
    floor = _timer_floor()
    table: dict[int, dict[str, dict[str, float]]] = {}

    def run() -> None:
        for size in SIZES:
            subjects = {name: _arena_pair(a, size) for name, a in arenas.items()}
            subjects.update(_peers(size))
            table[size] = _measure(subjects, SAMPLES[size] if measuring else SMOKE_SAMPLES,
                                   floor)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["sizes"] = {str(k): v for k, v in table.items()}
    benchmark.extra_info["timer_floor_ns"] = floor
    quick64 = table[64]["arena private"]["median_ns"]
    lines = [f"\nalloc+free by size (median / p99.9 ns, minor faults per pair; timer floor "
             f"{floor} ns subtracted; {'measured' if measuring else 'SMOKE RUN: meaningless'})"]
    names = list(table[64])
    lines.append("subject".ljust(32) + "".join(_label(s).rjust(24) for s in SIZES))
    for name in names:
        row = name.ljust(32)
        for size in SIZES:
            r = table[size][name]
            row += (f"{r['median_ns']:.0f}/{r['p999_ns']:.0f} "
                    f"f{r['faults_per_op']:.2f}").rjust(24)
        lines.append(row)
    lines.append("ratios (medians)".ljust(32) + "".join(_label(s).rjust(24) for s in SIZES))
    for label, num, den in (
            ("private / bytearray(n)", "arena private", "bytearray(n)"),
            ("shared cache / private", "arena shared, cache", "arena private"),
            ("shared cache / bytearray(n)", "arena shared, cache", "bytearray(n)"),
            ("shared no cache / private", "arena shared, no cache", "arena private")):
        lines.append(label.ljust(32) + "".join(
            f"{table[s][num]['median_ns'] / max(table[s][den]['median_ns'], 1):.2f}".rjust(24)
            for s in SIZES))
    lines.append("allocator path / 64 B pair".ljust(32) + "".join(
        f"{table[s]['arena private, allocator path']['median_ns'] / max(quick64, 1):.2f}"
        .rjust(24) for s in SIZES))
    print("\n".join(lines))
