"""Count celery tasks across prefork pool processes in one shared percpu domain.

A celery application whose broker is a directory (kombu's filesystem transport) and whose
results are files, so it runs without a broker server::

    pip install celery percpu-arena
    cd examples && celery -A celery_app worker --pool=prefork --concurrency=4 -O fair
    python -c 'import celery_app; print(celery_app.process.delay(1000).get(timeout=10))'
    python -m percpu serve /dev/shm/percpu-celery-$(id -u).domain --port 9464   # scrape it

(With a real broker, set ``broker_url`` and ``result_backend`` as usual: nothing else changes.)

How it fits together:

* The worker's main process creates the domain file (removing one a previous run left behind)
  in the ``worker_init`` signal, before it starts the pool, registers every metric
  (:class:`Metrics`) and gives its vcpu id back (``Domain.release``). The prefork pool forks
  its processes from it: each inherits the open domain and the handles, and its first update
  leases the lowest free vcpu id of its own (a forked child never inherits its parent's id).
* A pool process that dies, even by SIGKILL, loses its id to the kernel; the process the pool
  starts in its place takes the id over and counts on top of the dead one's slots. The task
  it was running fails with ``WorkerLostError`` (unless ``task_acks_late`` and
  ``task_reject_on_worker_lost`` make the broker deliver it again: then it is counted as
  started twice, and done once).
* ``celery_tasks_in_flight`` is a ``livesum`` gauge: a dead process's running task drops out
  of it at once; the next holder of its id starts that part from zero.
* The main process removes the file in ``worker_shutdown`` (``PERCPU_KEEP_DOMAIN=1`` keeps it).

Settings come from the environment: ``PERCPU_DOMAIN`` (the file), ``PERCPU_CELERY_DIR`` (the
broker's and the results' directory, default ``/tmp/percpu-celery-<uid>``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown

import percpu

DOMAIN_PATH = os.environ.get("PERCPU_DOMAIN", f"/dev/shm/percpu-celery-{os.getuid()}.domain")
DOMAIN_SIZE = 1 << 20  # bytes: room for a few hundred metrics with 8 pool processes
DATA = os.environ.get("PERCPU_CELERY_DIR", f"/tmp/percpu-celery-{os.getuid()}")
GATE_WAIT = 60.0  # seconds a task waits for its gate file at most
GATE_POLL = 0.01  # seconds between two looks at it

for _sub in ("queue", "control", "results"):
    os.makedirs(os.path.join(DATA, _sub), exist_ok=True)

app = Celery("celery_app", broker="filesystem://", backend=f"file://{DATA}/results")
app.conf.broker_transport_options = {
    "data_folder_in": f"{DATA}/queue", "data_folder_out": f"{DATA}/queue",
    "control_folder": f"{DATA}/control", "polling_interval": 0.05}
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_prefetch_multiplier = 1  # a pool process takes a task when it is free
app.conf.task_track_started = True
# How long the pool waits for the result of a process that died before it fails the task with
# WorkerLostError (default 10 s); a warm shutdown waits for that too.
app.conf.worker_lost_wait = 2.0


class Metrics:
    """The pool's handles, registered once in the main process and inherited by the pool."""

    def __init__(self, domain: percpu.Domain) -> None:
        self.domain = domain
        self.started = domain.counter("celery_tasks_started", {"task": "process"},
                                      documentation="Tasks started, by task.")
        self.done = domain.counter("celery_tasks_done", {"task": "process"},
                                   documentation="Tasks finished, by task.")
        self.items = domain.counter("celery_items_processed",
                                    documentation="Items the tasks processed.")
        self.in_flight = domain.gauge("celery_tasks_in_flight", mode="livesum",
                                      documentation="Tasks running in live pool processes.")


_metrics: Metrics | None = None


@worker_init.connect
def _create(**_: Any) -> None:
    """In the worker's main process, before the pool starts: a fresh domain file, the
    metrics registered, and this process's vcpu id given back (it runs no task)."""
    global _metrics
    with contextlib.suppress(FileNotFoundError):
        os.unlink(DOMAIN_PATH)  # a previous run's file: start counting from zero
    domain = percpu.Domain.create(DOMAIN_PATH, DOMAIN_SIZE, lock="auto")
    _metrics = Metrics(domain)
    domain.release()


@worker_shutdown.connect
def _remove(**_: Any) -> None:
    """In the worker's main process, at shutdown: remove the file (unless asked to keep it)."""
    if not os.environ.get("PERCPU_KEEP_DOMAIN"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DOMAIN_PATH)


def _open() -> Metrics:
    """The inherited handles (or, in a pool that does not fork, the file opened by path)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(percpu.Domain.open(DOMAIN_PATH))
    return _metrics


@app.task(name="celery_app.process")
def process(items: int, gate: str | None = None) -> int:
    """Process ``items`` items (one count each), once the file ``gate`` exists if one is
    given (a task that waits on something outside: an upload landing, say). Returns the pid
    of the pool process that ran it."""
    m = _open()
    m.started.inc()
    m.in_flight.inc()
    try:
        if gate is not None:
            deadline = time.monotonic() + GATE_WAIT
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(GATE_POLL)
        for _ in range(items):
            m.items.inc()
        m.done.inc()
        return os.getpid()
    finally:
        m.in_flight.dec()
