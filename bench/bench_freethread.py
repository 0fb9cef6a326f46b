"""Counter.inc on a free-threaded build against its floor, a lock + int and prometheus_client.

Run with the interpreter under test (``python bench/bench_freethread.py``): ops/s with 1 and 2
threads, each thread on its own handle lookups of one shared Counter, or on the thread's own
handle of it (``Counter.for_thread()``, taken once per thread). The *floor* is the bare
hot-path statement on a per-thread memoryview (what no lookup can beat); ``lock + int`` is the
usual hand-made counter. Figures are printed, never asserted (a shared CI machine's are noise).
"""

from __future__ import annotations

import mmap
import sys
import threading
import time
from collections.abc import Callable

N = 300_000


class _Floor:
    __slots__ = ("_cells", "_index")

    def __init__(self) -> None:
        self._cells = memoryview(mmap.mmap(-1, 4096)).cast("q")
        self._index = 0

    def inc(self) -> None:
        self._cells[self._index] += 1


class _LockedInt:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def inc(self) -> None:
        with self._lock:
            self._value += 1


def rate(threads: int, setup: Callable[[], Callable[[], None]]) -> float:
    """Updates per second of ``threads`` threads, each calling what ``setup()`` gave it."""
    barrier = threading.Barrier(threads + 1)
    took: list[float] = []

    def work() -> None:
        inc = setup()
        inc()
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(N):
            inc()
        took.append(time.perf_counter() - t0)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    for t in ts:
        t.join()
    return threads * N / max(took)


def main() -> None:
    from percpu import Domain

    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    d = Domain(4 << 20, lock=False)
    c = d.counter("bench_total")
    locked = _LockedInt()
    cases: dict[str, Callable[[], Callable[[], None]]] = {
        "floor (own view, own object)": lambda: _Floor().inc,
        "lock + int (shared)": lambda: locked.inc,
        "percpu Counter.inc (shared handle)": lambda: c.inc,
        "percpu c.for_thread().inc": lambda: c.for_thread().inc,
    }
    try:
        import prometheus_client

        pc = prometheus_client.Counter("bench_pc", "bench", registry=None)
        cases["prometheus_client Counter.inc"] = lambda: pc.inc
    except ImportError:
        print("prometheus_client: not installed")
    print(f"{sys.version.split()[0]} gil={gil} cpus={len(__import__('os').sched_getaffinity(0))}")
    for name, setup in cases.items():
        one = min((rate(1, setup) for _ in range(3)), key=lambda r: -r)
        two = max(rate(2, setup) for _ in range(3))
        print(f"{name:38s} 1 thread {1e9 / one:7.0f} ns/op   2 threads {two / one:4.2f}x")
    d.close()


if __name__ == "__main__":
    main()
