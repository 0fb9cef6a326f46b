"""percpu.prometheus.PercpuCollector: a domain served by prometheus_client's registry,
generate_latest (both formats) and make_wsgi_app, with the samples percpu's own exposition
writes."""

from __future__ import annotations

import subprocess
import sys
import wsgiref.util
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

import percpu
from percpu._exposition import DROPPED_SERIES, exposition
from percpu.prometheus import PercpuCollector

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0"

# family -> (type, help, {(sample name, labels): value})
Parsed = dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def parsed(families: Any) -> Parsed:
    return {f.name: (f.type, f.documentation,
                     {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
            for f in families}


def _domain() -> percpu.Domain:
    d = percpu.Domain(1 << 20, max_vcpus=2, lock=False)
    d.counter("requests", {"route": "/"}).add(41)
    d.counter("requests", {"route": 'we"ird\\path\n'}).inc()
    d.counter("requests").add(2)  # the same family without labels
    d.gauge("queue_depth").sub(4)
    s = d.summary("request_seconds")
    s.observe(0.5)
    s.observe(2)
    return d


def test_generate_latest_writes_what_percpu_writes() -> None:
    with _domain() as d:
        registry = CollectorRegistry()
        registry.register(PercpuCollector(d))
        theirs = parsed(parse_text(generate_latest(registry).decode()))
        ours = parsed(parse_text(exposition(d)[0].decode()))
        theirs_om = parsed(parse_om(generate_openmetrics(registry).decode()))
        ours_om = parsed(parse_om(exposition(d, OPENMETRICS)[0].decode()))
    # Everything but the health figures that move between two reads of the domain.
    moving = {"percpu_domain_arena_used_bytes", "percpu_domain_arena_free_bytes"}
    for a, b in ((theirs, ours), (theirs_om, ours_om)):
        assert {k: v for k, v in a.items() if k not in moving} == {
            k: v for k, v in b.items() if k not in moving}
    assert theirs["requests"][2] == {
        ("requests_total", ()): 2, ("requests_total", (("route", "/"),)): 41,
        ("requests_total", (("route", 'we"ird\\path\n'),)): 1}
    assert theirs["request_seconds"][0] == "summary"
    assert theirs["request_seconds"][2] == {
        ("request_seconds_count", ()): 2, ("request_seconds_sum", ()): 2.5}
    assert theirs["queue_depth"][2] == {("queue_depth", ()): -4}
    assert theirs["percpu_domain_metrics"][1]  # health figures keep their help text
    assert theirs[DROPPED_SERIES][2] == {(DROPPED_SERIES, ()): 0}


def test_each_collect_reads_the_domain_again() -> None:
    with _domain() as d:
        registry = CollectorRegistry()
        PercpuCollector(d, health=False, registry=registry)  # registers itself
        first = parsed(parse_text(generate_latest(registry).decode()))
        d.counter("requests", {"route": "/"}).add(9)
        d.counter("late").inc()
        second = parsed(parse_text(generate_latest(registry).decode()))
    assert first["requests"][2][("requests_total", (("route", "/"),))] == 41
    assert second["requests"][2][("requests_total", (("route", "/"),))] == 50
    assert "late" not in first and second["late"][2] == {("late_total", ()): 1}
    assert not any(name.startswith("percpu_domain_") for name in second)


def test_the_runtime_series_name_is_not_fatal_here_either() -> None:
    with percpu.Domain(1 << 20, max_vcpus=2, lock=False) as d:
        d.counter("requests").inc()
        d.gauge(DROPPED_SERIES).add(7)
        registry = CollectorRegistry()
        registry.register(PercpuCollector(d))
        families = parsed(parse_text(generate_latest(registry).decode()))
    assert families[DROPPED_SERIES][2] == {(DROPPED_SERIES, ()): 1}
    assert families["requests"][2] == {("requests_total", ()): 1}


def test_make_wsgi_app_serves_the_domain() -> None:
    with _domain() as d:
        registry = CollectorRegistry()
        registry.register(PercpuCollector(d))
        app = make_wsgi_app(registry)
        environ: dict[str, Any] = {"HTTP_ACCEPT": OPENMETRICS}
        wsgiref.util.setup_testing_defaults(environ)
        answer: list[Any] = []
        body = b"".join(app(environ, lambda status, headers: answer.append((status, headers))))
    status, headers = answer[0]
    assert status.startswith("200")
    assert dict(headers)["Content-Type"].startswith("application/openmetrics-text")
    families = parsed(parse_om(body.decode()))
    assert families["requests"][2][("requests_total", (("route", "/"),))] == 41


def test_describe_claims_no_names() -> None:
    """Two registrations of collectors of one domain are not refused as duplicates (the
    series are dynamic); each registry still collects once per scrape."""
    with _domain() as d:
        assert PercpuCollector(d).describe() == []
        a, b = CollectorRegistry(), CollectorRegistry()
        a.register(PercpuCollector(d))
        b.register(PercpuCollector(d))
        assert generate_latest(a).count(b"requests_total{") == 2


def test_without_prometheus_client_the_import_names_the_extra() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "try:\n    import percpu.prometheus\n"
            "except ModuleNotFoundError as e:\n    print(e)\n"
            "import percpu; print('core ok', percpu.Domain.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "pip install 'percpu-arena[prometheus]'" in out.stdout
    assert "core ok Domain" in out.stdout
