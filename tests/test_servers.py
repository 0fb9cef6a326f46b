"""The servers people run, for real, each with a worker SIGKILLed in the middle of requests.

gunicorn (sync and gthread workers, each with and without ``--preload``) and uvicorn
(``--workers``) run the examples on a loopback socket; the test holds uploads open inside the
application (their bodies not yet sent), reads the domain file until every one is counted in
flight, finds from ``/proc`` which worker holds each upload's connection, and SIGKILLs the
worker with the most. Then, read through the domain file (``Domain.open`` + ``snapshot``, an
observer that takes no vcpu id):

* the ``livesum`` in-flight gauge lost exactly the killed worker's requests, while the others'
  are still in flight, and is 0 once they are answered;
* ``http_requests`` (counted on arrival) is every request the clients saw answered plus the
  killed ones, and ``http_responses`` exactly the answered ones: nothing lost, nothing twice.

celery prefork and multiprocessing.Pool do the same with tasks held inside a worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path

import pytest
from _children import log_tail, stop_group
from test_integrations import _children, _env

import percpu

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the examples are imported as the namespace package "examples"
    sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples"
WAIT = 60.0  # seconds: the most a start-up, a replacement or a count may take on a slow machine
BODY = b"hello"  # what each upload sends once released


def _wait(predicate: Callable[[], bool], what: str, alive: Callable[[], str | None]) -> None:
    """Poll ``predicate`` until it holds (at most WAIT s); ``alive`` says why to give up early
    (the server died: its output), or None."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        problem = alive()
        if problem is not None:
            raise AssertionError(f"gave up waiting for {what}: {problem}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None


def _dead(pid: int) -> bool:
    """True once every thread of ``pid`` has exited (gone, or a zombie with no thread left):
    the last one out closed its files, and so dropped its OFD locks. (A multi-threaded
    process's leader can be a zombie while its other threads are still on their way out.)"""
    if _state(pid) not in (None, "Z", "X"):
        return False
    try:
        return os.listdir(f"/proc/{pid}/task") in ([], [str(pid)])
    except OSError:
        return True


def read_domain(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], percpu.MetricValue]:
    """Every metric of the domain file, keyed by (name, labels), read as an observer."""
    d = percpu.Domain.open(path, lock=False, prefault=False)
    try:
        return {(v.name, v.labels): v for v in d.snapshot()}
    finally:
        d.close()


def value(values: dict[tuple[str, tuple[tuple[str, str], ...]], percpu.MetricValue],
          name: str, **labels: str) -> int | float:
    entry = values.get((name, tuple(sorted(labels.items()))))
    return 0 if entry is None else entry.value


def holders(path: Path) -> set[int]:
    """The pids holding a vcpu id of the domain file."""
    d = percpu.Domain.open(path, lock=False, prefault=False)
    try:
        return set(d.stats().holder_pids.values())
    finally:
        d.close()


def _socket_inodes(server_port: int) -> dict[int, int]:
    """Client port -> inode of the server side of each TCP connection to ``server_port`` on
    loopback (from /proc/net/tcp)."""
    found = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.split(":")[1], 16) == server_port and inode:
                found[int(remote.split(":")[1], 16)] = inode
    return found


def connection_owners(server_port: int, client_ports: list[int],
                      candidates: set[int]) -> dict[int, int]:
    """Client port -> pid (among ``candidates``) holding the server side of its connection."""
    inodes = _socket_inodes(server_port)
    wanted = {f"socket:[{inodes[p]}]": p for p in client_ports if p in inodes}
    owners = {}
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    port = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    if port is not None:
                        owners[port] = pid
    return owners


class Http:
    """A tiny HTTP/1.1 client over raw sockets (one connection a request, closed after), so
    that an upload can be held open with its headers sent and its body not yet."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered: Tally[str] = Tally()  # "route code" -> responses the client received

    def open_upload(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(BODY))
        return s

    def finish(self, s: socket.socket, route: str) -> tuple[int, int, bytes] | None:
        """Send the body (if any is due), read the response: (status, worker pid, body), or
        None when the connection ended without one (its worker was killed)."""
        with s:
            try:
                if route == "/upload":
                    s.sendall(BODY)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            except (ConnectionResetError, BrokenPipeError):
                return None
        if not data:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:])
        pid = {k.lower(): v for k, v in headers.items()}["x-worker-pid"]
        self.answered[f"{route} {status}"] += 1
        return status, int(pid), body

    def get(self, path: str) -> tuple[int, int, bytes]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n" % path.encode())
        result = self.finish(s, path if path in ("/", "/hello", "/metrics") else "other")
        assert result is not None, f"no response to GET {path}"
        return result


class Server:
    """A server process in its own session, on a loopback socket this test binds and passes
    in (``fd``), its output in a log file; :meth:`stop` leaves nothing behind."""

    def __init__(self, argv: list[str], log: Path, workers: Callable[[Server], set[int]],
                 **env: str) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)  # (unused by a server that does not listen: celery)
        self.listener.set_inheritable(True)
        self.port = self.listener.getsockname()[1]
        self.fd = self.listener.fileno()
        self.log = open(log, "w+b")  # noqa: SIM115 - closed in stop
        self._workers = workers
        self.proc = subprocess.Popen(
            [a.replace("{fd}", str(self.fd)) for a in argv],
            env=_env(**{k: v.replace("{fd}", str(self.fd)) for k, v in env.items()}),
            pass_fds=(self.fd,), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True)

    def workers(self) -> set[int]:
        return self._workers(self)

    def problem(self) -> str | None:
        return None if self.proc.poll() is None else f"the server exited: {self.output()}"

    def wait_for_workers(self, n: int, exclude: set[int]) -> set[int]:
        """Wait until the server has ``n`` live workers, none of them in ``exclude``."""
        found: set[int] = set()

        def ready() -> bool:
            nonlocal found
            found = self.workers()
            return len(found) == n and not found & exclude

        _wait(ready, f"{n} workers", self.problem)
        return found

    def stop(self) -> int:
        """SIGTERM the server (a graceful shutdown) and return its exit status."""
        status = stop_group(self.proc, WAIT)
        self.listener.close()
        self.log.close()
        return status

    def output(self) -> str:
        return log_tail(self.log)


def kill_mid_request(server: Server, domain: Path, workers: int, uploads: int) -> None:
    """The scenario every HTTP server goes through (see the module docstring)."""
    http = Http(server.port)
    first = server.wait_for_workers(workers, exclude=set())
    for _ in range(20):
        status, pid, body = http.get("/hello")
        assert (status, body) == (200, b"hello\n") and pid in first
    for _ in range(2):
        assert http.get("/nowhere")[0] == 404

    held = [http.open_upload() for _ in range(uploads)]
    try:
        _kill_one(server, domain, http, held, first)
    finally:
        for s in held:  # after a failure: let the server stop at once
            s.close()


def _kill_one(server: Server, domain: Path, http: Http, held: list[socket.socket],
              first: set[int]) -> None:
    uploads, workers = len(held), len(first)
    _wait(lambda: value(read_domain(domain), "http_requests_in_flight") == uploads,
          f"{uploads} uploads in flight", server.problem)
    values = read_domain(domain)
    assert value(values, "http_requests", route="/upload") == uploads  # counted on arrival
    owners = connection_owners(server.port, [s.getsockname()[1] for s in held], first)
    assert len(owners) == uploads, (owners, first)
    victim, killed = Tally(owners.values()).most_common(1)[0]
    assert holders(domain) <= first  # the workers hold ids; the master does not

    os.kill(victim, signal.SIGKILL)
    _wait(lambda: _dead(victim), "the killed worker to exit", server.problem)
    # Its requests dropped out of the in-flight gauge; the others' are still in it.
    assert value(read_domain(domain), "http_requests_in_flight") == uploads - killed

    survivors = 0
    for s in held:
        owner = owners[s.getsockname()[1]]
        result = http.finish(s, "/upload")
        if owner == victim:
            assert result is None  # the client never saw it answered
        else:
            assert result == (200, owner, b"5 bytes\n")
            survivors += 1
    assert survivors == uploads - killed
    replaced = server.wait_for_workers(workers, exclude={victim})
    for _ in range(10):
        status, pid, _ = http.get("/")
        assert status == 200 and pid in replaced

    values = read_domain(domain)
    answered = http.answered
    assert value(values, "http_requests", route="/hello") == answered["/hello 200"] == 20
    assert value(values, "http_requests", route="/") == answered["/ 200"] == 10
    assert value(values, "http_requests", route="other") == answered["other 404"] == 2
    assert value(values, "http_requests", route="/upload") == answered["/upload 200"] + killed
    assert value(values, "http_responses", code="200") == 30 + survivors
    assert value(values, "http_responses", code="404") == 2
    assert value(values, "http_requests_in_flight") == 0
    done = values[("http_request_duration_seconds", ())]
    assert done.count == sum(answered.values())  # the killed requests were never timed
    alive = holders(domain)
    assert victim not in alive and alive <= replaced


# -- gunicorn -----------------------------------------------------------------------------------

GUNICORN_WORKERS = 2


def _gunicorn_workers(server: Server) -> set[int]:
    return _children(server.proc.pid)


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_worker_killed_mid_request(tmp_path: Path, worker_class: str,
                                            preload: bool) -> None:
    pytest.importorskip("gunicorn")
    domain = tmp_path / "app.domain"
    argv = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn_app.py"),
            "-k", worker_class, "--graceful-timeout", "10"]
    if worker_class == "gthread":
        argv += ["--threads", "4"]
    if preload:
        argv.append("--preload")
    server = Server(argv, domain.with_suffix(".log"), _gunicorn_workers,
                    PERCPU_DOMAIN=str(domain), GUNICORN_BIND="fd://{fd}",
                    GUNICORN_WORKERS=str(GUNICORN_WORKERS))
    try:
        # sync: one upload per worker (each holds one request at a time); gthread: three,
        # on whichever workers take them, so the victim may have had one, two or three.
        uploads = GUNICORN_WORKERS if worker_class == "sync" else 3
        kill_mid_request(server, domain, GUNICORN_WORKERS, uploads)
    finally:
        status = server.stop()
    assert status == 0, server.output()
    assert not domain.exists()  # on_exit removed it


# -- uvicorn --------------------------------------------------------------------------------------

UVICORN_WORKERS = 2


def _spawned_workers(server: Server) -> set[int]:
    """The launcher's children started by multiprocessing's spawn (not its resource tracker)."""
    found = set()
    for pid in _children(server.proc.pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.add(pid)
    return found


def test_uvicorn_worker_killed_mid_request(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (extra 'servers')")
    domain = tmp_path / "app.domain"
    server = Server([sys.executable, str(EXAMPLES / "uvicorn_app.py"), "--fd", "{fd}",
                     "--workers", str(UVICORN_WORKERS), "--domain", str(domain)],
                    domain.with_suffix(".log"), _spawned_workers)
    try:
        # Three uploads: each worker's event loop holds any number of them at once.
        kill_mid_request(server, domain, UVICORN_WORKERS, 3)
    finally:
        status = server.stop()
    assert status == 0, server.output()
    assert not domain.exists()  # the launcher removed it


# -- multiprocessing.Pool -------------------------------------------------------------------------

def test_mp_pool_worker_killed_mid_task(tmp_path: Path) -> None:
    import multiprocessing

    from examples import mp_pool

    ctx = multiprocessing.get_context("fork")  # the workers inherit the domain and handles
    path = tmp_path / "pool.domain"
    domain = percpu.Domain.create(path, mp_pool.DOMAIN_SIZE, lock="auto")
    gate = tmp_path / "gate"
    mp_pool.install(domain, str(gate))
    domain.release()  # registering took an id; this process counts nothing itself
    pool = ctx.Pool(3)
    try:
        seen = [pool.apply_async(mp_pool.work, ((i, 100),)) for i in range(30)]
        pids = {r.get(WAIT)[1] for r in seen}
        held = [pool.apply_async(mp_pool.work, ((100 + i, 100, True),)) for i in range(3)]
        _wait(lambda: value(read_domain(path), "pool_tasks_in_flight") == 3,
              "a held task in each worker", lambda: None)
        workers = {p.pid for p in multiprocessing.active_children()
                   if p.name.startswith("ForkPoolWorker") and p.pid is not None}
        assert len(workers) == 3 and pids <= workers
        assert holders(path) <= workers  # this process gave its id back
        victim = min(workers)  # each worker runs one task at a time: every one holds one
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _dead(victim), "the killed worker to exit", lambda: None)
        assert value(read_domain(path), "pool_tasks_in_flight") == 2

        gate.touch()
        _wait(lambda: sum(r.ready() for r in held) == 2, "the other two held tasks",
              lambda: None)
        finished = [r.get(0)[1] for r in held if r.ready()]
        assert victim not in finished
        more = [pool.apply_async(mp_pool.work, ((200 + i, 100),)) for i in range(30)]
        after = {r.get(WAIT)[1] for r in more}
        assert victim not in after
        assert not all(r.ready() for r in held)  # the killed worker's task never returns

        values = read_domain(path)
        received = len(seen) + len(finished) + len(more)
        assert value(values, "pool_tasks_done") == received == 62
        assert value(values, "pool_tasks_started") == received + 1  # the killed one
        assert value(values, "pool_items_processed") == received * 100
        assert values[("pool_task_items", ())].count == received
        assert value(values, "pool_tasks_in_flight") == 0
        assert victim not in holders(path)
    finally:
        pool.terminate()
        pool.join()
        domain.close()


# -- celery ---------------------------------------------------------------------------------------

CELERY_CONCURRENCY = 2


def test_celery_prefork_process_killed_mid_task(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("celery", reason="celery is not installed (extra 'servers')")
    import importlib

    domain, data, gate = tmp_path / "celery.domain", tmp_path / "celery", tmp_path / "gate"
    monkeypatch.setenv("PERCPU_DOMAIN", str(domain))
    monkeypatch.setenv("PERCPU_CELERY_DIR", str(data))
    import examples.celery_app as celery_app  # the client side: sends tasks, reads results

    celery_app = importlib.reload(celery_app)  # with this test's directories
    server = Server([sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                     "--pool=prefork", f"--concurrency={CELERY_CONCURRENCY}", "-O", "fair",
                     "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "--loglevel=INFO"], tmp_path / "celery.log", lambda s: _children(s.proc.pid),
                    PYTHONPATH=f"{ROOT}{os.pathsep}{EXAMPLES}", PERCPU_DOMAIN=str(domain),
                    PERCPU_CELERY_DIR=str(data))
    try:
        first = server.wait_for_workers(CELERY_CONCURRENCY, exclude=set())

        def results(n: int) -> list[int]:
            sent = [celery_app.process.delay(100) for _ in range(n)]
            return [int(r.get(timeout=WAIT, interval=0.02)) for r in sent]

        seen = results(20)
        assert set(seen) <= first
        held = [celery_app.process.delay(100, str(gate)) for _ in range(CELERY_CONCURRENCY)]
        _wait(lambda: domain.exists() and
              value(read_domain(domain), "celery_tasks_in_flight") == CELERY_CONCURRENCY,
              "a held task in each pool process", server.problem)
        assert holders(domain) <= first  # the main process gave its id back
        victim = min(first)  # "-O fair": a busy process takes no task, so each holds one
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _dead(victim), "the killed pool process to exit", server.problem)
        assert value(read_domain(domain), "celery_tasks_in_flight") == CELERY_CONCURRENCY - 1

        gate.touch()
        _wait(lambda: sum(r.state == "SUCCESS" for r in held) == CELERY_CONCURRENCY - 1,
              "the other held tasks", server.problem)
        finished = [int(r.get(timeout=0)) for r in held if r.state == "SUCCESS"]
        assert victim not in finished
        lost = [r for r in held if r.state != "SUCCESS"]
        assert len(lost) == 1
        outcome = lost[0].get(timeout=WAIT, interval=0.02, propagate=False)
        assert lost[0].state == "FAILURE" and "WorkerLostError" in repr(outcome), outcome
        server.wait_for_workers(CELERY_CONCURRENCY, exclude={victim})
        after = results(20)
        assert victim not in after

        values = read_domain(domain)
        received = len(seen) + len(finished) + len(after)
        assert value(values, "celery_tasks_done", task="process") == received == 41
        assert value(values, "celery_tasks_started", task="process") == received + 1
        assert value(values, "celery_items_processed") == received * 100
        assert value(values, "celery_tasks_in_flight") == 0
        assert victim not in holders(domain)
    finally:
        status = server.stop()
    assert status == 0, server.output()
    assert not domain.exists()  # worker_shutdown removed it
