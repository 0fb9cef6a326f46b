"""Pool benchmarks (issue 6): tail latency of ``Pool.get()`` in a burst vs making items on demand.

A burst is ``THREADS`` threads in this process and as many in a second process, released at
once, each taking ``GETS_PER_THREAD`` items back to back and timing every call with
``time.perf_counter_ns`` (samples kept per thread). It is repeated ``BURSTS`` times; between
bursts every item is given back (untimed) and the processes meet again.

``items="blocks"``: 64-byte blocks of one shared file-backed arena (under /dev/shm) that both
processes map. On demand is ``arena.alloc(64)``, which takes the arena's thread lock and its
cross-process OFD lock (the analogue of cgroup_mutex). With a pool, each process has its own
``Pool.of_blocks`` on that arena: ``get()`` takes no lock, while its replenisher allocates
from the same arena under the same locks.

``items="objects"``: the factory builds a big object (a dict of ``OBJECT_ENTRIES`` entries,
about 100 us of pure Python; its measured cost is printed). On demand calls it; the pool
hands out ready ones.

Every pool is sized for the burst (``THREADS * GETS_PER_THREAD`` ready items), its
``low_watermark`` is its size and its ``refill_delay`` 0: the first ``get()`` wakes the
replenisher, which then refills while the burst runs, competing with it for the GIL, the CPUs
and the arena's locks. That is the hardest case for the pool; the default delay (50 ms) would
let a burst this short finish first.

The pytest-benchmark figure of each test is the time the threads of this process took to
finish one burst. The summary prints p50, p99, p99.9 and max over every sample of both
processes, and p99.9(pool) / p99.9(on demand). Nothing here asserts a timing.

This file is also the second process: ``python bench/bench_pool.py --child '<json>'`` runs one
side of the benchmark and talks to the parent over stdin/stdout (``ready`` / ``go`` before each
burst, a JSON line of samples at the end).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import arena

try:
    from arena import Pool
except ImportError:  # issue 6 names it arena.Pool; until __init__ re-exports it
    from arena._pool import Pool

THREADS = 8  # per process
GETS_PER_THREAD = 200
BURSTS = 15
SMOKE_THREADS, SMOKE_GETS, SMOKE_BURSTS = 4, 20, 1  # when pytest-benchmark is disabled
BLOCK_BYTES = 64
ARENA_BYTES = 4 << 20
OBJECT_ENTRIES = 700  # the factory's dict: ~100 us to build on an idle machine
REFILL_DELAY = 0.0  # seconds: the replenisher refills during the burst (see the docstring)
BARRIER_TIMEOUT = 120.0  # seconds: a stuck thread fails the run instead of hanging it
CHILD_TIMEOUT = 300.0  # seconds
SETTLE = 0.02  # seconds between bursts, after the items are given back

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_big_object() -> dict[str, int]:
    """The on-demand factory: a large object built in pure Python (holds the GIL throughout)."""
    return {str(i): i for i in range(OBJECT_ENTRIES)}


class Side:
    """One process's source of items for the burst: a pool, or the on-demand path."""

    def __init__(self, items: str, mode: str, path: str, n_items: int, create: bool) -> None:
        self.arena: arena.Arena | None = None
        self.pool: Pool[Any] | None = None
        if items == "blocks":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="could not lock the arena")
                self.arena = (arena.Arena.create(path, ARENA_BYTES) if create
                              else arena.Arena.open(path))
        if mode == "pool":
            if self.arena is not None:
                self.pool = Pool.of_blocks(
                    self.arena, BLOCK_BYTES, size=n_items, low_watermark=n_items,
                    refill_delay=REFILL_DELAY, name=f"bench-{os.getpid()}")
            else:
                self.pool = Pool(make_big_object, size=n_items, low_watermark=n_items,
                                       refill_delay=REFILL_DELAY, name=f"bench-{os.getpid()}")
            self.get: Callable[[], Any] = self.pool.get
            self._give_back: Callable[[Any], None] = self.pool.put
        elif self.arena is not None:
            self.get = functools.partial(self.arena.alloc, BLOCK_BYTES)
            self._give_back = self.arena.free
        else:
            self.get = make_big_object
            self._give_back = _drop

    def give_back(self, items: list[list[Any]]) -> None:
        """Return every item of a burst (untimed), then let the replenisher settle."""
        for kept in items:
            for item in kept:
                self._give_back(item)
            kept.clear()
        time.sleep(SETTLE)

    def pool_figures(self) -> dict[str, Any]:
        if self.pool is None:
            return {}
        st = self.pool.stats()
        return {"slow_gets": st.slow_gets, "fast_gets": st.fast_gets, "refills": st.refills,
                "items_refilled": st.items_refilled, "lowest_ready": st.lowest_ready,
                "refill_seconds": st.refill_seconds}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.arena is not None:
            self.arena.close()


def _drop(item: object) -> None:
    del item


class Burst:
    """``threads`` threads parked at a barrier; :meth:`run` releases them and waits."""

    def __init__(self, get: Callable[[], Any], threads: int, gets: int) -> None:
        self.barrier = threading.Barrier(threads + 1, timeout=BARRIER_TIMEOUT)
        self.samples: list[list[int]] = [[] for _ in range(threads)]
        self.items: list[list[Any]] = [[] for _ in range(threads)]
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._worker, args=(get, gets, self.samples[i],
                                                        self.items[i]),
                             name=f"burst-{i}", daemon=True)
            for i in range(threads)]
        for t in self.threads:
            t.start()

    def _worker(self, get: Callable[[], Any], gets: int, lat: list[int],
                keep: list[Any]) -> None:
        ns = time.perf_counter_ns
        try:
            self.barrier.wait()
            for _ in range(gets):
                t0 = ns()
                item = get()
                t1 = ns()
                lat.append(t1 - t0)
                keep.append(item)
        except BaseException as exc:
            self.errors.append(exc)
            self.barrier.abort()

    def run(self) -> None:
        self.barrier.wait()
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def run_child(config: dict[str, Any]) -> None:
    """The second process: the same bursts on its own side, driven by the parent."""
    side = Side(config["items"], config["mode"], config["path"], config["n_items"],
                create=False)
    samples: list[int] = []
    try:
        for _ in range(config["bursts"]):
            burst = Burst(side.get, config["threads"], config["gets"])
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("bench_pool child: expected 'go' from the parent")
            burst.run()
            for lat in burst.samples:
                samples.extend(lat)
            side.give_back(burst.items)
        figures = side.pool_figures()
    finally:
        side.close()
    print(json.dumps({"samples": samples, "pool": figures}), flush=True)


# -- the test ---------------------------------------------------------------------------------


def _factory_cost_ns(n: int = 200) -> int:
    """Median cost of one ``make_big_object()`` call, alone (no burst)."""
    ns = time.perf_counter_ns
    costs = []
    for _ in range(n):
        t0 = ns()
        make_big_object()
        costs.append(ns() - t0)
    costs.sort()
    return costs[n // 2]


def _labels(items: str, mode: str) -> str:
    if items == "blocks":
        return ("Pool.of_blocks(shared arena).get()" if mode == "pool"
                else f"shared Arena.alloc({BLOCK_BYTES})")
    return "Pool(factory).get()" if mode == "pool" else "factory()"


def _start_child(config: dict[str, Any]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env=env)


def _expect(child: subprocess.Popen[str], word: str) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"the second process exited (rc {child.wait()}) before '{word}'")
    if word and line.strip() != word:
        raise RuntimeError(f"the second process said {line.strip()[:200]!r}, not {word!r}")
    return line


@pytest.mark.parametrize("mode", ["pool", "on-demand"])
@pytest.mark.parametrize("items", ["blocks", "objects"])
def test_burst_latency(benchmark: Any, summary: Any, measuring: bool, shm_dir: Path,
                       items: str, mode: str) -> None:
    threads, gets, bursts = ((THREADS, GETS_PER_THREAD, BURSTS) if measuring
                             else (SMOKE_THREADS, SMOKE_GETS, SMOKE_BURSTS))
    n_items = threads * gets  # a pool sized for the whole burst of one process
    path = str(shm_dir / "pool.arena")
    factory_ns = _factory_cost_ns() if items == "objects" else None
    side = Side(items, mode, path, n_items, create=True)
    config = {"items": items, "mode": mode, "path": path, "n_items": n_items,
              "threads": threads, "gets": gets, "bursts": bursts}
    child = _start_child(config)
    mine: list[int] = []
    pending: list[Burst] = []
    try:
        def prepare() -> tuple[tuple[Burst], dict[str, Any]]:
            while pending:  # give back the previous burst's items before the next one
                done = pending.pop()
                for lat in done.samples:
                    mine.extend(lat)
                side.give_back(done.items)
            burst = Burst(side.get, threads, gets)
            pending.append(burst)
            _expect(child, "ready")
            return (burst,), {}

        def go(burst: Burst) -> None:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            burst.run()

        benchmark.group = f"burst of {threads}x{gets} gets x 2 processes ({items})"
        benchmark.pedantic(go, setup=prepare, rounds=bursts)
        last = pending.pop()
        for lat in last.samples:
            mine.extend(lat)
        side.give_back(last.items)
        result = json.loads(_expect(child, ""))
        child.wait(timeout=CHILD_TIMEOUT)
        parent_figures = side.pool_figures()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        side.close()

    theirs: list[int] = result["samples"]
    child_figures: dict[str, Any] = result["pool"]
    everything = mine + theirs
    row: dict[str, Any] = {
        "items": items, "mode": mode, "label": _labels(items, mode),
        "latency": summary.describe(everything), "parent": summary.describe(mine),
        "child": summary.describe(theirs),
    }
    if mode == "pool":
        row["slow_gets"] = parent_figures["slow_gets"] + child_figures["slow_gets"]
        row["refills"] = parent_figures["refills"] + child_figures["refills"]
        row["items_refilled"] = (parent_figures["items_refilled"]
                                 + child_figures["items_refilled"])
    summary.pool.append(row)
    benchmark.extra_info.update(
        threads_per_process=threads, gets_per_thread=gets, bursts=bursts,
        processes=2, refill_delay=REFILL_DELAY, switch_interval=sys.getswitchinterval(),
        **{f"all_{k}": v for k, v in row["latency"].items()},
        **{f"parent_{k}": v for k, v in row["parent"].items()},
        **{f"child_{k}": v for k, v in row["child"].items()})
    if factory_ns is not None:
        benchmark.extra_info["factory_alone_median_ns"] = factory_ns
    if mode == "pool":
        benchmark.extra_info.update({f"parent_pool_{k}": v for k, v in parent_figures.items()})
        benchmark.extra_info.update({f"child_pool_{k}": v for k, v in child_figures.items()})
        other = summary.pool_row(items, "on-demand")
    else:
        other = summary.pool_row(items, "pool")
    if other is not None:
        pool_row, direct_row = (row, other) if mode == "pool" else (other, row)
        benchmark.extra_info["p99_9_pool_over_on_demand"] = summary.ratio(
            pool_row["latency"].get("p99_9_ns"), direct_row["latency"].get("p99_9_ns"))
    d = row["latency"]
    cost = (f"; factory alone {summary.fmt_ns(factory_ns)}" if factory_ns is not None else "")
    print(f"\n{row['label']} ({items}, {mode}): n {d['n']}, p50 {summary.fmt_ns(d['p50_ns'])}, "
          f"p99 {summary.fmt_ns(d['p99_ns'])}, p99.9 {summary.fmt_ns(d['p99_9_ns'])}, "
          f"max {summary.fmt_ns(d['max_ns'])}{cost}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: run by pytest (see bench/README.md); "
                         "'--child <json>' is the second process")
