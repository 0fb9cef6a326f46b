"""A real Prometheus server scrapes ``python -m percpu serve`` and the gunicorn example.

Real worker processes count into a shared domain file (some exit without releasing anything,
as a killed worker would), before the scrapes start and while they go on. Prometheus (Debian's
``prometheus`` package) runs on loopback with a generated configuration (1 s scrape interval,
its own storage directory); the test reads what it stored through its HTTP query API and
checks that every counter, the summary's count and sum, the histogram's buckets and count and
the in-flight (livesum) gauge are exact, and that ``histogram_quantile`` answers.
Values are compared once Prometheus holds a sample scraped after the last worker exited, so a
later scrape can only repeat them. ``promtool check metrics`` lints both formats of the same
exposition. Every wait has a deadline; every process started is stopped at the end.

Where the ``prometheus`` or ``promtool`` binary is missing the tests skip, saying how to get
them (``.ci/run`` installs the package when apt is available).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _children import log_tail
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

import percpu

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # seconds: the most any start-up, scrape or worker may take on a slow machine
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are not installed (Debian: apt-get install "
           "-y --no-install-recommends prometheus; .ci/run does it where apt is available)")

# One worker: opens the domain, counts, and exits; with "crash", without releasing its id or
# closing the domain (os._exit), as a SIGKILLed worker leaves it.
WORKER = """
import os, sys
import percpu
path, worker, n, crash = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "crash"
d = percpu.Domain.open(path)
jobs = d.counter("jobs_done", {"queue": "default"}, documentation="Jobs done.")
mine = d.counter("jobs_by_worker", {"worker": worker}, documentation="Jobs by worker.")
in_flight = d.gauge("jobs_in_flight", mode="livesum", documentation="Jobs running.")
seconds = d.summary("job_seconds", documentation="Job time.", unit="seconds")
latency = d.histogram("job_latency_seconds", buckets=[0.1, 1], documentation="Job latency.",
                      unit="seconds")
for i in range(n):
    in_flight.inc()
    jobs.inc()
    mine.inc()
    seconds.observe(0.25)
    latency.observe(0.05 if i % 4 else 0.5)  # three in four under 0.1
    in_flight.dec()
if crash:
    os._exit(0)
d.close()
"""

T = TypeVar("T")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _poll(what: str, probe: Callable[[], T | None], diagnose: Callable[[], str]) -> T:
    """``probe()``'s first result that is not None, within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {diagnose()}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with _opener.open(request, timeout=WAIT) as response:
        body: bytes = response.read()
        return body


class Prometheus:
    """A Prometheus server on loopback scraping ``targets`` (job -> host:port) every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in targets.items())
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                          f"scrape_configs:\n{jobs}")
        self.log = open(workdir / "prometheus.log", "w+b")  # noqa: SIM115 - closed in stop
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
        _poll("prometheus to be ready", self._ready, self.output)

    def _ready(self) -> bool | None:
        assert self.proc.poll() is None, f"prometheus exited: {self.output()}"
        try:
            _get(self.base + "/-/ready")
        except (urllib.error.URLError, OSError):
            return None
        return True

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: labels (less ``__name__``, ``instance``) -> value."""
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        data = json.loads(_get(url))
        assert data["status"] == "success", data
        return {tuple(sorted((k, v) for k, v in r["metric"].items()
                             if k not in ("__name__", "instance"))): float(r["value"][1])
                for r in data["data"]["result"]}

    def scraped_after(self, selector: str, t: float) -> None:
        """Wait until every series of ``selector`` has a sample scraped after time ``t``."""
        def probe() -> bool | None:
            stamps = self.query(f"timestamp({selector})")
            return True if stamps and min(stamps.values()) > t else None
        _poll(f"a scrape of {selector} after {t}", probe,
              lambda: f"up: {self.query('up')}; log: {self.output()}")

    def output(self) -> str:
        return log_tail(self.log)

    def stop(self) -> None:
        _stop(self.proc)
        self.log.close()


class Serve:
    """``python -m percpu serve PATH --port 0``; ``url`` from the line it prints."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "percpu", "serve", str(path), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        assert ready, "serve printed nothing"
        banner = self.proc.stdout.readline()
        assert " at http://127.0.0.1:" in banner, banner
        self.url = banner.split(" at ")[1].split()[0]
        self.target = self.url.removeprefix("http://").removesuffix("/metrics")


def _run_workers(path: Path, first: int, count: int, n: int) -> list[subprocess.Popen[Any]]:
    return [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), str(w), str(n), "crash" if w % 2 else "clean"],
        env=_env(), cwd=ROOT) for w in range(first, first + count)]


def _wait_workers(workers: list[subprocess.Popen[Any]]) -> None:
    for w in workers:
        assert w.wait(timeout=WAIT) == 0


def _promtool_problems(body: bytes) -> list[str]:
    """promtool's complaints about ``body``; a parse error fails the test."""
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                            timeout=WAIT)
    out = (result.stdout + result.stderr).decode()
    assert result.returncode in (0, 3), out  # 3: lint problems only; 1: it could not parse
    assert "error" not in out.lower(), out
    return out.splitlines()


@pytest.fixture
def domain_path() -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = Path(tempfile.mkdtemp(prefix="prometheus-", dir=base))
    try:
        yield tmp / "app.domain"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_prometheus_scrapes_exact_counts(domain_path: Path, tmp_path: Path) -> None:
    percpu.Domain.create(domain_path, 1 << 22, max_vcpus=4).close()
    # Before any scrape: four workers, two of which leave without releasing their ids.
    _wait_workers(_run_workers(domain_path, 0, 4, 5_000))
    serve = Serve(domain_path)
    stack = contextlib.ExitStack()
    stack.callback(_stop, serve.proc)
    with stack:
        text = _get(serve.url)
        om = _get(serve.url, OPENMETRICS)
        # promtool 2.x reads the Prometheus text format: every family (the user's, with their
        # documentation, and the runtime's own) passes. On OpenMetrics it must parse;
        # counters' samples (`x_total` under `# TYPE x counter`) then look like families of
        # their own, without help: a limitation of that promtool's parser.
        assert _promtool_problems(text) == []
        assert all(p.endswith(" no help text") for p in _promtool_problems(om))
        assert {f.name for f in parse_om(om.decode())} == {f.name for f in parse_text(
            text.decode())}

        prom = Prometheus(tmp_path, {"percpu": serve.target})
        stack.callback(prom.stop)
        # While it scrapes every second: four more workers, 20,000 jobs each.
        workers = _run_workers(domain_path, 4, 4, 20_000)
        _wait_workers(workers)
        done = time.time()
        prom.scraped_after('jobs_done_total{job="percpu"}', done)

        total = 4 * 5_000 + 4 * 20_000
        assert prom.query('jobs_done_total{job="percpu"}') == {
            (("job", "percpu"), ("queue", "default")): total}
        assert prom.query('jobs_by_worker_total{job="percpu"}') == {
            (("job", "percpu"), ("worker", str(w))): 5_000 if w < 4 else 20_000
            for w in range(8)}
        assert prom.query('job_seconds_count{job="percpu"}') == {(("job", "percpu"),): total}
        assert prom.query('job_seconds_sum{job="percpu"}') == {
            (("job", "percpu"),): total * 0.25}
        assert prom.query('jobs_in_flight{job="percpu"}') == {(("job", "percpu"),): 0}
        buckets = prom.query('job_latency_seconds_bucket{job="percpu"}')
        assert buckets == {(("job", "percpu"), ("le", le)): n for le, n in (
            ("0.1", total * 3 // 4), ("1.0", total), ("+Inf", total))}
        assert prom.query('job_latency_seconds_count{job="percpu"}') == {
            (("job", "percpu"),): total}
        (median,) = prom.query(
            'histogram_quantile(0.5, job_latency_seconds_bucket{job="percpu"})').values()
        assert 0 < median <= 0.1  # half of the observations lie in the first bucket
        assert prom.query('percpu_exposition_dropped_series{job="percpu"}') == {
            (("job", "percpu"),): 0}
        assert prom.query('percpu_domain_ids_ever_used{job="percpu"}')[(("job", "percpu"),)] <= 4
        assert prom.query('up{job="percpu"}') == {(("job", "percpu"),): 1}


def test_prometheus_scrapes_the_gunicorn_example(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    from test_integrations import Gunicorn

    server = Gunicorn(tmp_path / "app.domain")
    stack = contextlib.ExitStack()
    stack.callback(server.log.close)
    stack.callback(server.stop)
    with stack:
        server.wait_for_workers(exclude=set())
        prom = Prometheus(tmp_path, {"gunicorn": f"127.0.0.1:{server.port}"})
        stack.callback(prom.stop)
        for _ in range(25):
            assert server.get("/hello")[0] == 200
        for _ in range(2):
            assert server.get("/nowhere")[0] == 404
        done = time.time()
        prom.scraped_after('http_requests_total{job="gunicorn",route="/hello"}', done)

        requests = prom.query('http_requests_total{job="gunicorn"}')
        assert requests[(("job", "gunicorn"), ("route", "/hello"))] == 25
        assert requests[(("job", "gunicorn"), ("route", "other"))] == 2
        assert requests[(("job", "gunicorn"), ("route", "/metrics"))] >= 1  # its own scrapes
        responses = prom.query('http_responses_total{job="gunicorn"}')
        assert responses[(("code", "404"), ("job", "gunicorn"))] == 2
        assert prom.query('up{job="gunicorn"}') == {(("job", "gunicorn"),): 1}
        # Each scrape counts itself in flight (the example's gauge is incremented around it).
        assert prom.query('http_requests_in_flight{job="gunicorn"}') == {
            (("job", "gunicorn"),): 1}
