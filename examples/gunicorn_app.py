"""Count requests across gunicorn workers in one shared percpu domain, and serve /metrics.

This one file is both the gunicorn configuration and the WSGI application::

    pip install gunicorn percpu-arena
    gunicorn -c examples/gunicorn_app.py          # 3 workers on 127.0.0.1:8000
    curl http://127.0.0.1:8000/hello
    curl http://127.0.0.1:8000/metrics            # the totals of every worker
    python -m percpu stats /dev/shm/percpu-gunicorn-$(id -u).domain

How it fits together:

* The master runs :func:`on_starting` before it forks any worker: it creates the domain file
  (removing one a previous run left behind), so every worker finds it.
* Each worker imports this module as the application and opens the file (:func:`_open`). Its
  first counter update leases the lowest free vcpu id; the kernel releases that lease if the
  worker dies, even by SIGKILL, and the worker gunicorn starts in its place takes the id over
  and counts on top of the dead worker's slots: no count is lost.
* ``/metrics`` renders the sum over every worker, alive or dead, in the Prometheus text
  format (or OpenMetrics when the scraper asks), from whichever worker answers the request.
* The master removes the file in :func:`on_exit` (set ``PERCPU_KEEP_DOMAIN=1`` to keep it).

Settings come from the environment: ``PERCPU_DOMAIN`` (the file), ``GUNICORN_BIND``
(default ``127.0.0.1:8000``), ``GUNICORN_WORKERS`` (default 3). Do not combine with
``--preload``: the application must open the file in each worker, after ``on_starting``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import percpu
from percpu import exposition

DOMAIN_PATH = os.environ.get("PERCPU_DOMAIN", f"/dev/shm/percpu-gunicorn-{os.getuid()}.domain")
DOMAIN_SIZE = 1 << 20  # bytes: room for a few hundred metrics with 8 workers
ROUTES = ("/", "/hello", "/metrics")  # known routes get their own label; the rest are "other"

# -- gunicorn settings (read when this file is given with -c; other names are ignored) --------

wsgi_app = "gunicorn_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
worker_class = "sync"
control_socket_disable = True  # gunicorn >= 25: no control socket under ~/.gunicorn


def on_starting(server: Any) -> None:
    """In the master, before any worker is forked: create the shared domain file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(DOMAIN_PATH)  # a previous run's file: start counting from zero
    percpu.Domain.create(DOMAIN_PATH, DOMAIN_SIZE, lock="auto").close()
    server.log.info("percpu domain at %s", DOMAIN_PATH)


def on_exit(server: Any) -> None:
    """In the master, at shutdown: remove the domain file (unless asked to keep it)."""
    if not os.environ.get("PERCPU_KEEP_DOMAIN"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DOMAIN_PATH)


# -- the application (imported in each worker) -------------------------------------------------

class Metrics:
    """This worker's handles, registered once (registering takes the domain lock; using a
    handle never does)."""

    def __init__(self, domain: percpu.Domain) -> None:
        self.domain = domain
        self.requests = {route: domain.counter("http_requests", {"route": route})
                         for route in (*ROUTES, "other")}
        self.responses: dict[str, percpu.Counter] = {}
        self.in_flight = domain.gauge("http_requests_in_flight")
        self.duration = domain.summary("http_request_duration_seconds")

    def response(self, code: str) -> percpu.Counter:
        counter = self.responses.get(code)
        if counter is None:
            counter = self.responses[code] = self.domain.counter("http_responses",
                                                                 {"code": code})
        return counter


_metrics: Metrics | None = None


def _open() -> Metrics:
    """This worker's metrics on the shared domain (opened on first use, once per process)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(percpu.Domain.open(DOMAIN_PATH))
    return _metrics


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI application: counts every request by route, times it, serves /metrics."""
    m = _open()
    started = time.perf_counter()
    path = environ.get("PATH_INFO") or "/"
    route = path if path in ROUTES else "other"
    m.in_flight.inc()
    try:
        m.requests[route].inc()  # before rendering, so /metrics counts itself
        if path == "/metrics":
            body, content_type = exposition(m.domain, environ.get("HTTP_ACCEPT"))
            status = "200 OK"
        elif route == "other":
            body, content_type = b"not found\n", "text/plain; charset=utf-8"
            status = "404 Not Found"
        else:
            body, content_type = b"hello\n", "text/plain; charset=utf-8"
            status = "200 OK"
        m.response(status[:3]).inc()
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(body))),
                                ("X-Worker-Pid", str(os.getpid()))])
        return [body]
    finally:
        m.in_flight.dec()
        m.duration.observe(time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit("run me with gunicorn: gunicorn -c examples/gunicorn_app.py")
