"""Cost of vcpu-id leases (issue 3): taking and releasing one, and first use in a new process.

* ``ofd_lock_pair``: ``try_lock`` + ``unlock`` of one byte of the domain file, the two ``fcntl``
  calls at the heart of a lease (the floor).
* ``take_release_shared``: ``d.vcpu_id(); d.release()`` on a file-backed domain. Taking records
  the lease under the domain lock, acknowledges the epoch and starts the process's quiescer
  thread; releasing frees the id and joins that thread. A process pays it once in its life (or
  once per ``release``); the hot path never does.
* ``take_release_private``: the same on a private domain (no file, no lock, no quiescer).
* ``fork_bare``: ``fork``, the child ``os._exit(0)``s, the parent reaps it. The baseline.
* ``fork_first_inc_inherited``: the pre-fork server case: the domain and the counter handle
  were made before ``fork``; the child's first ``inc`` takes a lease and binds the handle.
* ``fork_open_first_inc``: the child maps the domain itself: ``Domain.open(path)`` (defaults:
  prefault, lock "auto"), ``counter(...)`` and a first ``inc``.

The fork figures are end to end, measured in the parent, child exit and reaping included; the
extra cost of first use is the difference with ``fork_bare``, printed after the table.

Run: ``.venv/bin/python -m pytest bench/bench_leases.py --benchmark-enable -q``
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import percpu
from arena._locks import try_lock, unlock
from percpu._layout import LEASE_LOCK_BASE

GROUP_LEASE = "lease take+release"
GROUP_FORK = "first use in a new process (end to end)"
FORK_ROUNDS = 60  # forks of the pytest process are slow: keep the sample modest
MAX_VCPUS = 8

RESULTS: dict[str, tuple[float, float]] = {}  # name -> (median, min) seconds per call


def _record(benchmark: Any, name: str) -> None:
    if benchmark.stats:  # None when benchmarks are disabled
        s = benchmark.stats.stats
        RESULTS[name] = (s.median, s.min)


@pytest.fixture
def domain_path(shm_dir: Path) -> Iterator[Path]:
    path = shm_dir / "leases.domain"
    d = percpu.Domain.create(path, max_vcpus=MAX_VCPUS)
    d.close()
    yield path
    path.unlink(missing_ok=True)


def _fork_and_reap(child: Callable[[], object]) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child exited with status {status}")


# -- take and release ---------------------------------------------------------------------------


def test_ofd_lock_pair(benchmark: Any, domain_path: Path) -> None:
    fd = os.open(domain_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        def pair() -> None:
            if not try_lock(fd, LEASE_LOCK_BASE):
                raise RuntimeError("lease byte 0 is taken")
            unlock(fd, LEASE_LOCK_BASE)

        benchmark.group = GROUP_LEASE
        benchmark(pair)
        _record(benchmark, "ofd_lock_pair")
    finally:
        os.close(fd)


def test_take_release_shared(benchmark: Any, domain_path: Path) -> None:
    d = percpu.Domain.open(domain_path)
    try:
        def take_release() -> None:
            d.vcpu_id()
            d.release()

        benchmark.group = GROUP_LEASE
        benchmark(take_release)
        _record(benchmark, "take_release_shared")
        s = d.stats()
        assert s.highest_id_used == 0 and s.reclaimed_ids == 0  # always id 0, always clean
    finally:
        d.close()


def test_take_release_private(benchmark: Any) -> None:
    d = percpu.Domain(1 << 22, max_vcpus=MAX_VCPUS)
    try:
        def take_release() -> None:
            d.vcpu_id()
            d.release()

        benchmark.group = GROUP_LEASE
        benchmark(take_release)
        _record(benchmark, "take_release_private")
    finally:
        d.close()


# -- first use in a new process -------------------------------------------------------------


def test_fork_bare(benchmark: Any) -> None:
    benchmark.group = GROUP_FORK
    benchmark.pedantic(_fork_and_reap, args=(lambda: None,), rounds=FORK_ROUNDS, warmup_rounds=3)
    _record(benchmark, "fork_bare")


def test_fork_first_inc_inherited(benchmark: Any, domain_path: Path) -> None:
    d = percpu.Domain.open(domain_path)
    try:
        c = d.counter("requests")  # registered in the parent (which takes id 0 for that)
        d.release()  # the parent holds no id while its children run: each child gets id 0
        children: list[int] = []

        def one_child() -> None:
            _fork_and_reap(c.inc)
            children.append(1)

        benchmark.group = GROUP_FORK
        benchmark.pedantic(one_child, rounds=FORK_ROUNDS, warmup_rounds=3)
        _record(benchmark, "fork_first_inc_inherited")
        assert c.value == len(children)  # every child's first inc counted, none lost
        assert d.stats().highest_id_used == 0  # one child at a time: always id 0
    finally:
        d.close()


def test_fork_open_first_inc(benchmark: Any, domain_path: Path) -> None:
    def child() -> None:
        d = percpu.Domain.open(domain_path)
        d.counter("requests").inc()

    benchmark.group = GROUP_FORK
    benchmark.pedantic(_fork_and_reap, args=(child,), rounds=FORK_ROUNDS, warmup_rounds=3)
    _record(benchmark, "fork_open_first_inc")
    with percpu.Domain.open(domain_path) as d:
        assert d.stats().highest_id_used == 0  # one child at a time: always id 0


# -- the report ---------------------------------------------------------------------------------


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f}"


def report_lines(results: dict[str, tuple[float, float]]) -> list[str]:
    lines = ["", "vcpu-id leases: us per call (median, min)",
             f"  {'':28} {'median':>10} {'min':>10}"]
    for name, (med, best) in results.items():
        lines.append(f"  {name:28} {_us(med)} {_us(best)}")
    bare = results.get("fork_bare")
    if bare is not None:
        lines.append("first use in a new process, beyond a bare fork+exit (medians):")
        for name in ("fork_first_inc_inherited", "fork_open_first_inc"):
            if name in results:
                extra = results[name][0] - bare[0]
                lines.append(f"  {name:28} {_us(extra)} us  ({results[name][0] / bare[0]:.2f}x "
                             "the bare fork)")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module's benchmarks, print the figures computed from their statistics."""
    RESULTS.clear()
    yield
    if not RESULTS:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(report_lines(RESULTS)))
