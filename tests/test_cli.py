"""Tests for ``python -m percpu`` (percpu._cli): every subcommand on real domain files, the
error lines and exit statuses, and ``serve`` over real HTTP in a subprocess."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import types
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

import arena
import percpu
from percpu import _cli

ROOT = Path(__file__).resolve().parent.parent
SIZE = 1 << 20  # bytes of arena for the test domains


def run(*argv: str) -> tuple[int, str]:
    """``main(argv)`` in this process; (status, stdout)."""
    out = io.StringIO()
    status = _cli.main(list(argv), out=out)
    return status, out.getvalue()


def run_process(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "percpu", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def domain_file(tmp_path: Path) -> Iterator[tuple[str, percpu.Domain]]:
    """A shared domain with a few metrics, this process holding id 0."""
    path = str(tmp_path / "app.domain")
    d = percpu.Domain.create(path, SIZE, max_vcpus=4, lock=False)
    d.counter("http_requests", {"route": "/"}).add(7)
    d.counter("http_requests", {"route": 'we"ird\\path\n'}).inc()
    d.gauge("in_flight").add(-2)
    s = d.summary("latency_seconds")
    s.observe(0.5)
    s.observe(0.25)
    try:
        yield path, d
    finally:
        d.close()


class Child:
    """A forked holder of a domain: increments a counter, then waits for a line on a pipe."""

    def __init__(self, d: percpu.Domain, name: str, raw_object: bool = False) -> None:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(ready_r)
                os.close(go_w)
                d.counter(name).inc()
                if raw_object:
                    d.alloc(8)
                os.write(ready_w, b"x")
                os.read(go_r, 1)
                status = 0
            finally:
                os._exit(status)
        os.close(ready_w)
        os.close(go_r)
        self.pid = pid
        self._go = go_w
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)

    def finish(self) -> None:
        os.write(self._go, b"x")
        os.close(self._go)
        assert os.waitpid(self.pid, 0)[1] == 0

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.close(self._go)
        os.waitpid(self.pid, 0)


# -- stats ----------------------------------------------------------------------------------


def test_stats_text(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file
    status, out = run("stats", path)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"domain {path}: arena 1.0 MiB, max_vcpus 4")
    assert "ids in use: 1 of 4; ids ever used 1" in out
    (holder,) = [line for line in lines if line.lstrip().startswith("id ")]
    assert f"pid {os.getpid():>7}" in holder
    assert "faults since start: minor" in holder
    assert "metrics: 4;" in out
    assert "16-byte slots: 1 pagesets" in out  # counters, gauges and summaries alike
    assert "failed allocations 0" in out


def test_stats_json_lists_holders_and_figures(domain_file: tuple[str, percpu.Domain]) -> None:
    path, d = domain_file
    child = Child(d, "child_work")
    try:
        status, out = run("stats", "--json", path)
    finally:
        child.finish()
    assert status == 0
    data = json.loads(out)
    assert data["path"] == path
    dom = data["domain"]
    assert dom["holder_pids"] == {"0": os.getpid(), "1": child.pid}
    assert dom["ids_in_use"] == [0, 1] and dom["holders_now"] == 2
    assert dom["metrics"] == 5
    assert "minor_faults" not in dom and "minor_faults" not in data["arena"]  # the tool's own
    assert [h["pid"] for h in data["holders"]] == [os.getpid(), child.pid]
    mine = data["holders"][0]
    assert mine["command"] and mine["minor_faults"] > 0
    assert data["arena"]["failed_allocations"] == 0
    assert data["arena"]["used_bytes"] + data["arena"]["free_bytes"] == data["arena"]["size"]
    occupancy = data["occupancy"]
    assert sum(c["slots_taken"] for c in occupancy) >= dom["metrics"]
    for c in occupancy:
        assert 0 < c["occupancy"] <= 1 and c["slots"] == 4096 // c["slot_bytes"] * c["pagesets"]
    assert data["compaction_available"] == callable(getattr(d, "compact", None))
    assert data["pending_moves"] is None or data["pending_moves"] >= 0
    # The child has exited cleanly: its id is no longer in use.
    status, out = run("stats", "--json", path)
    assert json.loads(out)["domain"]["holder_pids"] == {"0": os.getpid()}


def test_stats_does_not_take_an_id(tmp_path: Path) -> None:
    path = str(tmp_path / "idle.domain")
    d = percpu.Domain.create(path, SIZE, max_vcpus=2, lock=False)
    d.close()  # nobody holds an id
    status, out = run("stats", "--json", path)
    assert status == 0
    data = json.loads(out)["domain"]
    assert data["holders_now"] == 0 and data["fresh_ids"] == 0


def test_stats_without_pageset_figures(domain_file: tuple[str, percpu.Domain],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = domain_file
    monkeypatch.setattr(_cli, "pageset_occupancy", lambda d: None)
    status, out = run("stats", path)
    assert status == 0 and "pageset occupancy: not available in this version" in out


# -- errors ---------------------------------------------------------------------------------


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m percpu: error: ")
    return lines[0]


def test_missing_file(tmp_path: Path) -> None:
    line = _error_line(run_process("stats", str(tmp_path / "nope.domain")))
    assert "nope.domain: no such file" in line and "Domain.create" in line


def test_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign"
    path.write_bytes(os.urandom(8192))
    path.chmod(0o600)
    line = _error_line(run_process("check", str(path)))
    assert "not usable as a percpu domain" in line and "magic" in line


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    path.chmod(0o600)
    line = _error_line(run_process("stats", str(path)))
    assert "too small" in line


def test_arena_that_is_not_a_domain(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.arena")
    arena.Arena.create(path, 1 << 16, lock=False).close()
    status, _ = run("stats", path)
    assert status == 2


def test_directory(tmp_path: Path) -> None:
    line = _error_line(run_process("top", "--iterations", "1", str(tmp_path)))
    assert "is a directory" in line or "not a regular file" in line
    assert "[Errno" not in line


def test_file_writable_by_others(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file
    os.chmod(path, 0o666)
    line = _error_line(run_process("stats", path))
    assert "writable by group or others" in line and f"chmod 600 {path}" in line


def test_permission_denied(domain_file: tuple[str, percpu.Domain],
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = domain_file

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(percpu.Domain, "open", refuse)
    status, out = run("stats", path)
    assert status == 2 and out == ""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_file_of_another_user(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file
    os.chown(path, 65534, 65534)
    line = _error_line(run_process("stats", path))
    assert "owned by uid 65534" in line and "run this as that user" in line


def test_usage_errors() -> None:
    for argv in (["stats"], ["top", "x", "--interval", "-1"], ["serve", "x", "--port", "70000"],
                 ["frobnicate"]):
        result = run_process(*argv)
        assert result.returncode == 2, argv
        assert "error:" in result.stderr


def test_help_names_every_command() -> None:
    result = run_process("--help")
    assert result.returncode == 0
    for command in ("stats", "top", "serve", "check", "compact", "demo"):
        assert f"    {command}" in result.stdout
    assert "exit status" in result.stdout and "docs/operations.md" in result.stdout
    for command in ("stats", "top", "serve", "check", "compact"):
        sub = run_process(command, "--help")
        assert sub.returncode == 0 and "PATH" in sub.stdout


# -- check ----------------------------------------------------------------------------------


def test_check_ok(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file
    status, out = run("check", path)
    assert status == 0
    assert out.startswith(f"{path}: ok\n")
    status, out = run("check", "--json", path)
    data = json.loads(out)
    assert status == 0 and data["ok"] is True and data["problems"] == []


def test_check_reports_and_repairs_a_dead_holders_slot(tmp_path: Path) -> None:
    path = str(tmp_path / "leak.domain")
    d = percpu.Domain.create(path, SIZE, max_vcpus=4, lock=False)
    try:
        d.counter("work").inc()
        child = Child(d, "work", raw_object=True)  # a raw object: no metric refers to it
        child.kill()
        d.release()  # no holder is alive now, so --repair may reclaim
        status, out = run("check", path)
        assert status == 1
        assert "PROBLEMS FOUND" in out and "unreferenced: 1" in out and "--repair" in out
        status, out = run("check", "--json", "--repair", path)
        data = json.loads(out)
        assert status == 0 and data["reclaimed_slots"] == 1
        status, out = run("check", path)
        assert status == 0 and "unreferenced: 0" in out
        assert d.counter("work").value == 2
    finally:
        d.close()


# -- top ------------------------------------------------------------------------------------


def test_top_frames(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file
    status, out = run("top", "--iterations", "3", "--interval", "0", path)
    assert status == 0
    frames = out.split("\n\n" + "percpu top")
    assert len(frames) == 3
    assert "\x1b[" not in out  # not a terminal: no escapes
    for frame in frames:
        assert f"{os.getpid():>8}" in frame
        assert 'http_requests_total{route="/"}' in frame
        assert 'http_requests_total{route="we\\"ird\\\\path\\n"}' in frame
        assert "2 obs, sum 0.75" in frame
        assert "in_flight" in frame and " -2 " in frame


def test_top_clears_a_terminal(domain_file: tuple[str, percpu.Domain]) -> None:
    path, _ = domain_file

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert _cli.main(["top", "--iterations", "2", "--interval", "0", path], out=out) == 0
    assert out.getvalue().count("\x1b[H\x1b[2J") == 2
    assert _cli.main(["top", "--iterations", "1", "--no-ansi", path], out=Terminal()) == 0


@dataclass(frozen=True)
class Value:
    name: str
    labels: tuple[tuple[str, str], ...]
    kind: str
    value: int | float
    count: int = 0


def test_top_frame_rates_and_order(domain_file: tuple[str, percpu.Domain]) -> None:
    path, d = domain_file
    report = _cli.gather(d, path)
    first = [Value("a", (), "counter", 10), Value("b", (), "counter", 100),
             Value("s", (), "summary", 1.0, 4)]
    second = [Value("a", (), "counter", 30), Value("b", (), "counter", 105),
              Value("s", (), "summary", 2.0, 10), Value("new", (), "gauge", 1)]
    lines, prev = _cli.top_frame(report, first, None, None, 0.0, sort="rate", rows=None,
                                 ansi=False)
    assert prev == {("a", (), "counter"): 10.0, ("b", (), "counter"): 100.0,
                    ("s", (), "summary"): 4.0}
    lines, _ = _cli.top_frame(report, second, prev, None, 2.0, sort="rate", rows=None,
                              ansi=False)
    table = lines[lines.index(next(x for x in lines if x.startswith("METRIC"))) + 1:]
    assert [row.split()[0] for row in table] == ["a_total", "s", "b_total", "new"]
    rates = {row.split()[0]: row.split()[-1] for row in table}
    assert rates == {"a_total": "10.0", "s": "3.0", "b_total": "2.5", "new": "-"}
    lines, _ = _cli.top_frame(report, second, prev, None, 2.0, sort="name", rows=None,
                              ansi=False)
    assert [x.split()[0] for x in lines[-4:]] == ["a_total", "b_total", "new", "s"]
    lines, _ = _cli.top_frame(report, second, prev, None, 2.0, sort="value", rows=12,
                              ansi=False)
    assert len(lines) <= 12 and lines[-1].startswith("... ")


# -- compact and demo -----------------------------------------------------------------------


def test_compact_when_missing_or_present(domain_file: tuple[str, percpu.Domain],
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = domain_file
    if not callable(getattr(percpu.Domain, "compact", None)):
        status, out = run("compact", path)
        assert status == 2 and out == ""
        assert "compaction is not available" in capsys.readouterr().err

    @dataclass(frozen=True)
    class Compaction:
        moved: int
        pages_freed: int

    monkeypatch.setattr(percpu.Domain, "compact", lambda self: Compaction(3, 2), raising=False)
    status, out = run("compact", path)
    assert status == 0 and "moved=3" in out and "pages" in out
    status, out = run("compact", "--json", path)
    assert status == 0 and json.loads(out)["result"] == {"moved": 3, "pages_freed": 2}


@pytest.mark.skipif(not callable(getattr(percpu.Domain, "compact", None)),
                    reason="this version has no Domain.compact()")
def test_compact_for_real(tmp_path: Path) -> None:
    path = str(tmp_path / "sparse.domain")
    d = percpu.Domain.create(path, 4 << 20, max_vcpus=2, lock=False)
    try:
        handles = [d.counter("churn", {"i": str(k)}) for k in range(1500)]
        for k, h in enumerate(handles):
            h.add(k)
        for k in range(1500):
            if k % 10:
                assert d.remove("churn", {"i": str(k)})
        assert d.synchronize(timeout=30)
        before = d.stats()
        status, out = run("compact", "--json", "--timeout", "30", path)
        assert status == 0, out
        data = json.loads(out)
        after = d.stats()
        assert data["pages_before"] == before.pages and data["pages_after"] == after.pages
        assert after.pages < before.pages and after.pagesets == 1
        assert data["result"]["moved"] > 0 and data["result"]["pending_moves"] == 0
        values = {v.labels: v.value for v in d.snapshot()}
        assert values == {(("i", str(k)),): k for k in range(0, 1500, 10)}
        assert handles[10].value == 10  # a live handle still counts, from its new slot
        handles[10].inc()
        assert handles[10].value == 11
        status, out = run("compact", path)  # nothing left to move
        assert status == 0 and "moved 0 slots" in out
    finally:
        d.close()


def test_demo_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_main(argv: list[str] | None = None) -> int:
        calls.append(list(argv or []))
        return 5

    fake = types.ModuleType("percpu._demo")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "percpu._demo", fake)
    monkeypatch.setattr(percpu, "_demo", fake, raising=False)
    assert _cli.main([]) == 5
    assert _cli.main(["demo", "--workers", "2", "x"]) == 5
    assert calls == [[], ["--workers", "2", "x"]]


def test_demo_missing(monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "percpu._demo", None)
    monkeypatch.delattr(percpu, "_demo", raising=False)
    assert _cli.main(["demo"]) == 2
    assert "demo is not available" in capsys.readouterr().err


# -- serve ----------------------------------------------------------------------------------


def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with opener.open(request, timeout=30) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def _families(parsed: Any) -> dict[str, Any]:
    return {f.name: f for f in parsed}


def test_serve_over_http(domain_file: tuple[str, percpu.Domain]) -> None:
    path, d = domain_file
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "percpu", "serve", path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "serve printed nothing"
        banner = proc.stdout.readline()
        assert banner.startswith(f"serving {path} at http://127.0.0.1:"), banner
        url = banner.split(" at ")[1].split()[0]
        assert url.endswith("/metrics")

        d.counter("http_requests", {"route": "/"}).add(3)
        content_type, text = _get(url)
        assert content_type.startswith("text/plain; version=0.0.4")
        fams = _families(text_string_to_metric_families(text))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in fams.values() for s in f.samples}
        assert fams["http_requests"].type == "counter"
        assert samples[("http_requests_total", (("route", "/"),))] == 10
        assert samples[("http_requests_total", (("route", 'we"ird\\path\n'),))] == 1
        assert samples[("in_flight", ())] == -2
        assert samples[("latency_seconds_count", ())] == 2
        assert samples[("latency_seconds_sum", ())] == 0.75
        assert samples[("percpu_domain_ids_in_use", ())] == 1
        assert samples[("percpu_domain_metrics", ())] == 4
        assert samples[("percpu_exposition_dropped_series", ())] == 0

        content_type, text = _get(url, "application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert text.endswith("# EOF\n")
        fams = _families(openmetrics_parser.text_string_to_metric_families(text))
        assert fams["http_requests"].type == "counter"
        assert fams["latency_seconds"].type == "summary"
        assert {s.name: s.value for s in fams["latency_seconds"].samples} == {
            "latency_seconds_count": 2, "latency_seconds_sum": 0.75}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert err == ""


def test_serve_port_in_use(domain_file: tuple[str, percpu.Domain]) -> None:
    import socket

    path, _ = domain_file
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _error_line(run_process("serve", path, "--port", str(port)))
    assert f"cannot listen on 127.0.0.1 port {port}" in line


# -- python -m arena stats|check (arena._cli) -----------------------------------------------


def run_arena(*argv: str) -> tuple[int, str]:
    from arena import _cli as arena_cli

    out = io.StringIO()
    status = arena_cli.main(list(argv), out=out)
    return status, out.getvalue()


def test_arena_stats_and_check(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.arena")
    a = arena.Arena.create(path, 1 << 16, lock=False)
    try:
        blocks = [a.alloc(100) for _ in range(3)]
        status, out = run_arena("stats", path)
        assert status == 0
        assert "heap 65,536 B in blocks of 64 B" in out and "layer above: none" in out
        assert "used 384 B" in out and "failed allocations 0" in out
        status, out = run_arena("stats", "--json", path)
        data = json.loads(out)
        assert data["used_bytes"] == 384 and data["allocations"] == 3
        assert "minor_faults" not in data and data["mapped_bytes"] == a.mapped_bytes
        status, out = run_arena("check", path)
        assert status == 0 and out.startswith(f"{path}: ok")

        pid = os.fork()
        if pid == 0:  # pragma: no cover - a process that allocates, then dies
            a.alloc(1000)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        status, out = run_arena("check", path)
        assert status == 1 and "1 leaked by dead processes" in out and f"pid {pid}" in out
        status, out = run_arena("check", "--repair", "--json", path)
        assert status == 0 and json.loads(out)["reclaimed_bytes"] == 1024
        assert run_arena("check", path)[0] == 0
        for b in blocks:
            a.free(b)
    finally:
        a.close()


def test_arena_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run_arena("stats", str(tmp_path / "missing"))
    err = capsys.readouterr().err
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "no such file" in err and "arena.Arena.create" in err
    (tmp_path / "junk").write_bytes(b"\x01" * 8192)
    os.chmod(tmp_path / "junk", 0o600)
    status, _ = run_arena("check", str(tmp_path / "junk"))
    assert status == 2 and "not usable as a shared arena" in capsys.readouterr().err
