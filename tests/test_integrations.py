"""The shipped examples, run for real: gunicorn with several workers on loopback driven by real
HTTP requests (one worker SIGKILLed on purpose), and the multiprocessing.Pool example."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path

import pytest
from _children import log_tail, stop_group
from prometheus_client.parser import text_string_to_metric_families

import percpu

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORKERS = 3
WAIT = 60.0  # seconds: the most any start-up or replacement may take on a slow machine


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _children(parent: int) -> set[int]:
    """Pids whose parent is ``parent`` (from /proc), zombies left out."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in (b"Z", b"X"):
            found.add(int(entry))
    return found


class Gunicorn:
    """The example app under gunicorn, on a loopback socket this test binds and passes in."""

    def __init__(self, domain_path: Path) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.set_inheritable(True)
        self.port = self.listener.getsockname()[1]
        fd = self.listener.fileno()
        self.log = open(domain_path.with_suffix(".log"), "w+b")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn_app.py")],
            env=_env(PERCPU_DOMAIN=str(domain_path), GUNICORN_BIND=f"fd://{fd}",
                     GUNICORN_WORKERS=str(WORKERS)),
            pass_fds=(fd,), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True)
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.sent: Tally[str] = Tally()  # route label -> requests answered

    def get(self, path: str, accept: str | None = None) -> tuple[int, int, str]:
        """(status, worker pid, body) of one request; every answered request is tallied."""
        headers = {"Accept": accept} if accept else {}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
        try:
            with self.opener.open(request, timeout=WAIT) as response:
                status, pid, body = response.status, response.headers["X-Worker-Pid"], \
                    response.read()
        except urllib.error.HTTPError as error:
            with error:
                status, pid, body = error.code, error.headers["X-Worker-Pid"], error.read()
        self.sent[path if path in ("/", "/hello", "/metrics") else "other"] += 1
        return status, int(pid), body.decode("utf-8")

    def workers(self) -> set[int]:
        return _children(self.proc.pid)

    def wait_for_workers(self, exclude: set[int]) -> set[int]:
        """Wait until the master has WORKERS live workers, none of them in ``exclude``."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            pids = self.workers()
            if len(pids) == WORKERS and not pids & exclude:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"gunicorn did not bring back {WORKERS} workers: {self.output()}")

    def stop(self) -> int:
        """SIGTERM the master (a graceful shutdown) and return its exit status."""
        status = stop_group(self.proc, WAIT)
        self.listener.close()
        return status

    def output(self) -> str:
        return log_tail(self.log)


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Gunicorn]:
    pytest.importorskip("gunicorn")
    server = Gunicorn(tmp_path / "app.domain")
    try:
        yield server
    finally:
        server.stop()
        server.log.close()


def _scrape(server: Gunicorn) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, text = server.get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_gunicorn_request_count_exact_across_a_killed_worker(gunicorn: Gunicorn,
                                                             tmp_path: Path) -> None:
    server = gunicorn
    seen: set[int] = set()
    for _ in range(30):
        status, pid, body = server.get("/hello")
        assert (status, body) == (200, "hello\n")
        seen.add(pid)
    for _ in range(3):
        assert server.get("/nowhere")[0] == 404
    first = server.wait_for_workers(exclude=set())
    assert seen <= first

    victim = min(seen)  # a worker that has counted requests (so it holds a vcpu id)
    os.kill(victim, signal.SIGKILL)
    replaced = server.wait_for_workers(exclude={victim})
    assert len(replaced - first) == 1

    for _ in range(30):
        status, pid, _ = server.get("/")
        assert status == 200 and pid != victim
        seen.add(pid)

    before_scrape = sum(server.sent.values())
    samples = _scrape(server)
    for route in ("/", "/hello", "/metrics", "other"):
        assert samples[("http_requests_total", (("route", route),))] == server.sent[route], route
    # A response is counted once rendered: the scrape's own 200 is not in the scrape.
    assert samples[("http_responses_total", (("code", "200"),))] == 60
    assert samples[("http_responses_total", (("code", "404"),))] == 3
    assert samples[("http_requests_in_flight", ())] == 1  # the scrape itself
    assert samples[("http_request_duration_seconds_count", ())] == before_scrape
    assert samples[("percpu_domain_ids_in_use", ())] <= WORKERS

    # The same figures straight from the domain file, from outside gunicorn (snapshot() and
    # stats() take no vcpu id: this process does not become a holder).
    d = percpu.Domain.open(tmp_path / "app.domain", lock=False, prefault=False)
    try:
        values = {(v.name, v.labels): v for v in d.snapshot()}
        stats = d.stats()
    finally:
        d.close()
    assert values[("http_requests", (("route", "/hello"),))].value == 30
    assert values[("http_requests", (("route", "/"),))].value == 30
    assert values[("http_requests_in_flight", ())].value == 0
    assert values[("http_responses", (("code", "200"),))].value == 61
    assert values[("http_request_duration_seconds", ())].count == before_scrape + 1
    assert set(stats.holder_pids.values()) <= replaced
    assert victim not in stats.holder_pids.values()

    assert server.stop() == 0, server.output()
    assert not (tmp_path / "app.domain").exists()  # on_exit removed it
    assert "was sent SIGKILL" in server.output() or "SIGKILL" in server.output()


def test_gunicorn_serves_openmetrics(gunicorn: Gunicorn) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

    status, _, text = gunicorn.get("/metrics", "application/openmetrics-text; version=1.0.0")
    assert status == 200 and text.endswith("# EOF\n")
    families = {f.name: f for f in parse_om(text)}
    assert families["http_requests"].type == "counter"
    assert families["http_request_duration_seconds"].type == "summary"
    assert {s.labels["route"]: s.value for s in families["http_requests"].samples}["/metrics"] == 1


def test_mp_pool_example_total_is_exact() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "mp_pool.py"), "--workers", "3", "--tasks", "60",
         "--per-task", "2000", "--maxtasksperchild", "4"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "pool_items_processed = 120,000 (expected 120,000): exact" in out
    assert "pool_tasks_done = 60 (expected 60)" in out
    assert "60 tasks, sum 120,000" in out
    started = int(out.split(" worker processes")[0].rsplit(" ", 1)[1])
    assert started >= 60 // 4  # the pool replaced its workers as it went
