"""Count requests across uvicorn workers (``--workers``) in one shared percpu domain.

An ASGI application and its launcher in one file::

    pip install uvicorn percpu-arena
    python examples/uvicorn_app.py --workers 3 --port 8000
    curl http://127.0.0.1:8000/hello
    curl --data-binary @file http://127.0.0.1:8000/upload     # reads the body, says its size
    curl http://127.0.0.1:8000/metrics                        # the totals of every worker
    python -m percpu serve /dev/shm/percpu-uvicorn-$(id -u).domain --port 9464  # or this

How it fits together:

* uvicorn starts its workers with the ``spawn`` start method: each is a fresh interpreter that
  imports this module, so nothing made before it starts is inherited. The launcher
  (:func:`main`) therefore creates the domain file before it starts uvicorn's supervisor, and
  each worker opens it by path at ASGI lifespan start-up (or on its first request, under a
  server without lifespan events).
* A worker's first update leases the lowest free vcpu id; the kernel releases the lease if the
  worker dies, even by SIGKILL. uvicorn's supervisor starts a new worker in its place, which
  takes the id over and counts on top of the dead worker's slots: no count is lost.
* ``http_requests_in_flight`` is a ``livesum`` gauge: the requests a SIGKILLed worker had in
  flight drop out of it at once; the next holder of the id starts that part from zero.
* The launcher removes the file when uvicorn stops (``PERCPU_KEEP_DOMAIN=1`` keeps it).

``PERCPU_DOMAIN`` names the file (the launcher sets it for its workers).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import percpu
from percpu import exposition

DEFAULT_PATH = f"/dev/shm/percpu-uvicorn-{os.getuid()}.domain"
DOMAIN_SIZE = 1 << 20  # bytes: room for a few hundred metrics with 8 workers
ROUTES = ("/", "/hello", "/upload", "/metrics")  # known routes get their own label, others "other"
MAX_UPLOAD = 1 << 20  # bytes: a larger body is refused (413)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Metrics:
    """This worker's handles, registered once (registering takes the domain lock; using a
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
    """This worker's metrics on the shared domain (opened once per process)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(percpu.Domain.open(os.environ.get("PERCPU_DOMAIN", DEFAULT_PATH)))
    return _metrics


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body (None if it is larger than ``limit``); waits while the client sends."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                _open()
            except Exception as exc:  # the worker cannot count: refuse to start
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application: counts every request by route on arrival and every response by
    code, times it, keeps the in-flight gauge, serves ``/metrics`` and ``/upload``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    m = _open()
    started = time.perf_counter()
    path = scope.get("path") or "/"
    route = path if path in ROUTES else "other"
    m.requests[route].inc()  # first: a request seen in flight has been counted
    m.in_flight.inc()
    try:
        content_type = "text/plain; charset=utf-8"
        status = 200
        if path == "/metrics":
            accept = dict(scope.get("headers") or ()).get(b"accept", b"").decode("latin-1")
            body, content_type = exposition(m.domain, accept or None)
        elif path == "/upload":
            data = await _read_body(receive, MAX_UPLOAD)
            if data is None:
                body, status = b"too large\n", 413
            else:
                body = f"{len(data)} bytes\n".encode()
        elif route == "other":
            body, status = b"not found\n", 404
        else:
            body = b"hello\n"
        m.responses[str(status)].inc()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"x-worker-pid", str(os.getpid()).encode())]})
        await send({"type": "http.response.body", "body": body})
    finally:
        m.in_flight.dec()
        m.duration.observe(time.perf_counter() - started)


def _listener(args: argparse.Namespace) -> socket.socket:
    """The listening socket: inherited (``--fd``) or bound here (``--port 0``: a free one)."""
    if args.fd is not None:
        return socket.socket(fileno=args.fd)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    return sock


def main(argv: list[str] | None = None) -> int:
    """Create the domain, run uvicorn with ``--workers`` on it, remove the file after."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--fd", type=int, help="listen on this inherited socket instead")
    p.add_argument("--domain", default=os.environ.get("PERCPU_DOMAIN", DEFAULT_PATH),
                   help=f"the domain file (default $PERCPU_DOMAIN or {DEFAULT_PATH})")
    args = p.parse_args(argv)

    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.domain)  # a previous run's file: start counting from zero
    percpu.Domain.create(args.domain, DOMAIN_SIZE, lock="auto").close()
    os.environ["PERCPU_DOMAIN"] = args.domain  # the spawned workers read it
    sock = _listener(args)
    host, port = sock.getsockname()[:2]
    print(f"percpu domain at {args.domain}; listening on {host}:{port}", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)  # the spawned workers get this sys.path and import the app
    config = uvicorn.Config("uvicorn_app:app", workers=args.workers, lifespan="on",
                            log_level="info")
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
        if not os.environ.get("PERCPU_KEEP_DOMAIN"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.domain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
