"""Count requests across gunicorn workers in one shared percpu domain, and serve /metrics.

This one file is both the gunicorn configuration and the WSGI application::

    pip install gunicorn percpu-arena
    gunicorn -c examples/gunicorn_app.py                      # 3 sync workers on :8000
    gunicorn -c examples/gunicorn_app.py --preload            # the app loaded before fork
    gunicorn -c examples/gunicorn_app.py -k gthread --threads 4 [--preload]
    curl http://127.0.0.1:8000/hello
    curl --data-binary @file http://127.0.0.1:8000/upload     # reads the body, says its size
    curl http://127.0.0.1:8000/metrics                        # the totals of every worker
    python -m percpu serve /dev/shm/percpu-gunicorn-$(id -u).domain --port 9464  # or this

How it fits together:

* The master creates the domain file (removing one a previous run left behind) before it
  forks any worker: in :func:`on_starting`, or, under ``--preload``, earlier, when it imports
  the application (gunicorn loads a preloaded application before it runs ``on_starting``).
  The preloading master also registers every metric (:class:`Metrics`) and then gives its vcpu
  id back (``Domain.release``), so the workers inherit the open domain and the handles, and
  the master is not a holder.
* Without ``--preload``, each worker imports this module as the application and opens the
  file on its first request (:func:`_open`). Either way, a worker's first update leases the
  lowest free vcpu id (a forked child never inherits its parent's id); the kernel releases
  the lease if the worker dies, even by SIGKILL, and the worker gunicorn starts in its place
  takes the id over and counts on top of the dead worker's slots: no count is lost.
* ``http_requests_in_flight`` is a ``livesum`` gauge: the sum over the workers alive, so the
  requests a SIGKILLed worker had in flight drop out of it at once, and its replacement
  starts that id's part from zero.
* ``/metrics`` renders the sum over every worker, alive or dead, in the Prometheus text
  format (or OpenMetrics when the scraper asks), from whichever worker answers the request.
* The master removes the file in :func:`on_exit` (set ``PERCPU_KEEP_DOMAIN=1`` to keep it).

Settings come from the environment: ``PERCPU_DOMAIN`` (the file), ``GUNICORN_BIND``
(default ``127.0.0.1:8000``), ``GUNICORN_WORKERS`` (default 3); gunicorn's own flags
(``-k gthread --threads N``, ``--preload``, ``-w``, ``-b``) override the settings below.
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
ROUTES = ("/", "/hello", "/upload", "/metrics")  # known routes get their own label, others "other"
MAX_UPLOAD = 1 << 20  # bytes: a larger body is refused (413)
# The master's pid, set when gunicorn executes this file as its configuration (in the master,
# before anything else): lets the application's import tell a preloading master from a worker.
MASTER_ENV = "PERCPU_GUNICORN_MASTER"
CREATED_ENV = "PERCPU_GUNICORN_CREATED"  # the pid of the master that created the file

# -- gunicorn settings (read when this file is given with -c; other names are ignored) --------

wsgi_app = "gunicorn_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
worker_class = "sync"
control_socket_disable = True  # gunicorn >= 25: no control socket under ~/.gunicorn
if __name__ == "__config__":  # gunicorn's name for a configuration file it executes
    os.environ[MASTER_ENV] = str(os.getpid())


def _create_once() -> percpu.Domain | None:
    """In the master: create the domain file afresh, the first time only; None if this
    master already did (under ``--preload`` the application's import comes first)."""
    if os.environ.get(CREATED_ENV) == str(os.getpid()):
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(DOMAIN_PATH)  # a previous run's file: start counting from zero
    domain = percpu.Domain.create(DOMAIN_PATH, DOMAIN_SIZE, lock="auto")
    os.environ[CREATED_ENV] = str(os.getpid())
    return domain


def on_starting(server: Any) -> None:
    """In the master, before any worker is forked: create the shared domain file (unless the
    preloaded application already has)."""
    domain = _create_once()
    if domain is not None:
        domain.close()
    server.log.info("percpu domain at %s", DOMAIN_PATH)


def on_exit(server: Any) -> None:
    """In the master, at shutdown: remove the domain file (unless asked to keep it)."""
    if not os.environ.get("PERCPU_KEEP_DOMAIN"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DOMAIN_PATH)


# -- the application (imported in each worker, or once in the master under --preload) ----------

class Metrics:
    """This process's handles, registered once (registering takes the domain lock; using a
    handle never does)."""

    def __init__(self, domain: percpu.Domain) -> None:
        self.domain = domain
        self.requests = {route: domain.counter("http_requests", {"route": route},
                                               documentation="Requests received, by route.")
                         for route in (*ROUTES, "other")}
        self.responses = {code: domain.counter("http_responses", {"code": code},
                                               documentation="Responses sent, by status code.")
                          for code in ("200", "404", "413")}
        self.in_flight = domain.gauge("http_requests_in_flight", mode="livesum",
                                      documentation="Requests being handled by live workers.")
        self.duration = domain.summary("http_request_duration_seconds", unit="seconds",
                                       documentation="Time spent handling a request.")


_metrics: Metrics | None = None


def _open() -> Metrics:
    """This worker's metrics on the shared domain (opened on first use, once per process;
    under ``--preload`` inherited from the master)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(percpu.Domain.open(DOMAIN_PATH))
    return _metrics


def _preload() -> None:
    """Under ``--preload``, in the master: create the domain, register the metrics, and give
    the master's vcpu id back before the workers are forked."""
    global _metrics
    domain = _create_once()
    if domain is None:  # imported again in the same master (a reload): reopen
        domain = percpu.Domain.open(DOMAIN_PATH)
    _metrics = Metrics(domain)
    domain.release()  # the master counts nothing; each worker leases its own id


if os.environ.get(MASTER_ENV) == str(os.getpid()):
    _preload()


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI application: counts every request by route on arrival and every response by
    code, times it, keeps the in-flight gauge, serves ``/metrics`` and ``/upload``."""
    m = _open()
    started = time.perf_counter()
    path = environ.get("PATH_INFO") or "/"
    route = path if path in ROUTES else "other"
    m.requests[route].inc()  # first: a request seen in flight has been counted
    m.in_flight.inc()
    try:
        content_type = "text/plain; charset=utf-8"
        status = "200 OK"
        if path == "/metrics":
            body, content_type = exposition(m.domain, environ.get("HTTP_ACCEPT"))
        elif path == "/upload":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length > MAX_UPLOAD:
                body, status = b"too large\n", "413 Content Too Large"
            else:  # blocks while the client is still sending
                body = f"{len(environ['wsgi.input'].read(length))} bytes\n".encode()
        elif route == "other":
            body, status = b"not found\n", "404 Not Found"
        else:
            body = b"hello\n"
        m.responses[status[:3]].inc()
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(body))),
                                ("X-Worker-Pid", str(os.getpid()))])
        return [body]
    finally:
        m.in_flight.dec()
        m.duration.observe(time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit("run me with gunicorn: gunicorn -c examples/gunicorn_app.py")
