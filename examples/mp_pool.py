"""multiprocessing.Pool workers incrementing shared per-cpu counters; the total is exact.

Run::

    python examples/mp_pool.py                 # 4 workers, 200 tasks of 5,000 increments
    python examples/mp_pool.py --workers 8 --tasks 1000 --per-task 1000

The domain is made before the pool forks its workers (``Domain(shared=True)``: an anonymous
shared file that children inherit), and the counter handles with it, so every worker uses the
same counters without registering anything. ``maxtasksperchild`` makes the pool replace its
workers as it goes: each new worker leases the lowest free vcpu id and carries on from the
slots a finished worker left, so memory follows the workers alive at once, not the number
ever started. Prints the total, what was expected, and the domain's figures; exits 1 if a
single increment is missing or extra.

``pool_tasks_in_flight`` is a ``livesum`` gauge: a worker that dies in the middle of a task
(SIGKILL, the OOM killer) drops out of it at once, and the worker that takes its vcpu id over
starts that part from zero. A task can be held at its start until a file appears
(:func:`install`'s ``gate``: a path; not a ``multiprocessing.Event``, whose ``set()`` waits
for every waiter to wake, forever if one was killed): ``tests/test_servers.py`` holds one
in every worker, SIGKILLs one of them, and checks the counters and the gauge.
(multiprocessing.Pool replaces a dead worker, but the task it was running never returns:
wait for results with a timeout.)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import percpu

DOMAIN_SIZE = 1 << 20  # bytes of arena
GATE_WAIT = 60.0  # seconds a held task waits for its gate at most
GATE_POLL = 0.01  # seconds between two looks at the gate

_items: percpu.Counter | None = None  # set in the parent before the fork, inherited
_tasks: percpu.Counter | None = None
_work: percpu.Summary | None = None
_started: percpu.Counter | None = None
_in_flight: percpu.Gauge | None = None
_gate: str | None = None


def install(domain: percpu.Domain, gate: str | None = None) -> None:
    """Register the pool's metrics in ``domain`` (before the pool forks: the workers inherit
    the handles); ``gate``: the file whose appearance releases held tasks."""
    global _items, _tasks, _work, _started, _in_flight, _gate
    _items = domain.counter("pool_items_processed", documentation="Items the tasks processed.")
    _tasks = domain.counter("pool_tasks_done", documentation="Tasks finished.")
    _work = domain.summary("pool_task_items", documentation="Items per task.")
    _started = domain.counter("pool_tasks_started", documentation="Tasks started.")
    _in_flight = domain.gauge("pool_tasks_in_flight", mode="livesum",
                              documentation="Tasks running in live workers.")
    _gate = gate


def work(task: tuple[int, int] | tuple[int, int, bool]) -> tuple[int, int]:
    """One task: ``per_task`` increments of the shared counter, after waiting for the gate if
    the task says ``held``. Returns (task, pid)."""
    number, per_task, held = (*task, False)[:3]
    assert _items is not None and _tasks is not None and _work is not None
    assert _started is not None and _in_flight is not None
    _started.inc()
    _in_flight.inc()
    try:
        if held and _gate is not None:
            deadline = time.monotonic() + GATE_WAIT
            while not os.path.exists(_gate) and time.monotonic() < deadline:
                time.sleep(GATE_POLL)
        items = _items
        for _ in range(per_task):
            items.inc()
        _tasks.inc()
        _work.observe(per_task)
    finally:
        _in_flight.dec()
    return number, os.getpid()


def main(argv: list[str] | None = None) -> int:
    """Run the pool; print the totals; 0 when they are exact."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4, help="pool processes (default 4)")
    p.add_argument("--tasks", type=int, default=200, help="tasks (default 200)")
    p.add_argument("--per-task", type=int, default=5000, help="increments a task (default 5000)")
    p.add_argument("--maxtasksperchild", type=int, default=10,
                   help="tasks before a worker is replaced (default 10; 0: never)")
    args = p.parse_args(argv)

    domain = percpu.Domain(DOMAIN_SIZE, max_vcpus=max(2, args.workers), lock="auto",
                           shared=True)
    install(domain)
    assert _items is not None and _tasks is not None and _work is not None
    # "fork": the children inherit the domain and the handles (the default on Linux up to
    # Python 3.13; 3.14 defaults to "forkserver", which would not inherit them).
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers, maxtasksperchild=args.maxtasksperchild or None) as pool:
        done = pool.map(work, [(i, args.per_task) for i in range(args.tasks)], chunksize=1)
    pids = {pid for _, pid in done}

    expected = args.tasks * args.per_task
    total = _items.value
    s = domain.stats()
    print(f"{args.tasks} tasks x {args.per_task:,} increments by {len(pids)} worker processes "
          f"({args.workers} at a time)")
    print(f"pool_items_processed = {total:,} (expected {expected:,}): "
          f"{'exact' if total == expected else 'WRONG'}")
    print(f"pool_tasks_done = {_tasks.value} (expected {args.tasks}); task sizes observed: "
          f"{_work.count} tasks, sum {_work.sum:,.0f}")
    ids_ever = getattr(s, "ids_ever_used", s.highest_id_used)
    print(f"vcpu ids: {ids_ever} ever used for {len(pids)} processes started; leased fresh "
          f"{s.fresh_ids}, reused {s.reused_ids}, reclaimed {s.reclaimed_ids}")
    print(f"memory: {s.pages} pages ({s.pages * 4096:,} bytes) for {s.metrics} metrics")
    ok = total == expected and _tasks.value == args.tasks and _work.count == args.tasks
    domain.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
