"""percpu.prometheus's drop-in Counter, Gauge, Histogram and Summary.

The same application code runs against prometheus_client and against percpu.prometheus, and
both expositions, parsed by prometheus_client's own parsers, must carry the same families,
types, help texts, units and values; misuse raises the same kind of error on both sides; the
domain comes from ``PERCPU_DOMAIN`` in real worker processes, whose counts add up exactly; and
a SIGKILLed worker's in-flight gauge drops out in mode ``livesum`` (and stays in mode ``all``,
which is what the mode is for).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import validation as prom_validation
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

import percpu
import percpu.prometheus as pp
from percpu._exposition import DROPPED_SERIES

ROOT = Path(__file__).resolve().parent.parent

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Parsed = dict[str, tuple[str, str, str, Series]]  # family -> (type, help, unit, samples)


def parsed(families: Any) -> Parsed:
    """Families less prometheus_client's ``_created`` samples and percpu's own series."""
    out: Parsed = {}
    for f in families:
        if f.name.startswith(("percpu_domain_", DROPPED_SERIES)) or f.name.endswith("_created"):
            continue  # (the text parser gives each _created sample a gauge family)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples
                   if not s.name.endswith("_created")}
        out[f.name] = (f.type, f.documentation, getattr(f, "unit", ""), samples)
    return out


def both_formats(registry: CollectorRegistry) -> tuple[Parsed, Parsed]:
    return (parsed(parse_text(generate_latest(registry).decode())),
            parsed(parse_om(generate_openmetrics(registry).decode())))


@pytest.fixture
def domain() -> Iterator[percpu.Domain]:
    d = percpu.Domain(1 << 22, max_vcpus=2, lock=False)
    yield d
    d.close()


# -- the same application, twice ---------------------------------------------------------------


def application(m: Any, registry: CollectorRegistry, extra: dict[str, Any]) -> None:
    """Instrumented code as a prometheus_client user writes it; ``m`` is the module."""
    requests = m.Counter("http_requests_total", "Requests served.", ["method", "route"],
                         namespace="shop", subsystem="api", registry=registry, **extra)
    requests.labels("get", "/").inc()
    requests.labels(method="post", route="/cart").inc(2.5)
    requests.labels("get", "/").inc(3)
    requests.labels("get", "/gone").inc()
    requests.remove("get", "/gone")
    sent = m.Counter("sent", "Bytes sent.", unit="bytes", registry=registry, **extra)
    sent.inc(0.25)
    sent.inc(1024)
    errors = m.Counter("errors", "Errors raised.", ["kind"], registry=registry, **extra)
    for _ in range(2):
        try:
            with errors.labels("value").count_exceptions(ValueError):
                raise ValueError
        except ValueError:
            pass

    def fails() -> None:
        raise KeyError

    boom = errors.labels("any").count_exceptions()(fails)  # as a decorator
    with pytest.raises(KeyError):
        boom()
    with errors.labels("none").count_exceptions():
        pass

    depth = m.Gauge("queue_depth", "Jobs waiting.", ["queue"], registry=registry, **extra)
    depth.labels("a").set(7)
    depth.labels("a").inc()
    depth.labels("a").dec(0.5)
    depth.labels("b").set(-3)
    depth.labels("b").inc(1.25)
    in_flight = m.Gauge("in_flight", "Requests in progress.", registry=registry,
                        multiprocess_mode="livesum", **extra)
    with in_flight.track_inprogress():
        in_flight.inc(2)

    def five() -> int:
        return 5

    assert in_flight.track_inprogress()(five)() == 5  # as a decorator
    scratch = m.Gauge("scratch", "Cleared.", ["k"], registry=registry, **extra)
    scratch.labels("1").set(1)
    scratch.clear()
    scratch.labels("2").set(2)

    latency = m.Histogram("latency", "Request latency.", ["route"], unit="seconds",
                          buckets=(0.01, 0.1, 1, 10), registry=registry, **extra)
    for x in (0.005, 0.05, 0.5, 5, 50, 0.1, 0.01):
        latency.labels("/").observe(x)
    latency.labels("/cart").observe(2)
    size = m.Histogram("size", "Default buckets.", registry=registry, **extra)
    for x in (0.003, 0.2, 7, 11, 0.75):
        size.observe(x)
    payload = m.Summary("payload", "Payload sizes.", registry=registry, **extra)
    payload.observe(1.5)
    payload.observe(2)


def test_the_same_code_gives_the_same_exposition(domain: percpu.Domain) -> None:
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    application(prometheus_client, theirs_registry, {})
    application(pp, ours_registry, {"domain": domain})
    theirs, ours = both_formats(theirs_registry), both_formats(ours_registry)
    assert ours[0] == theirs[0]  # text format 0.0.4
    assert ours[1] == theirs[1]  # OpenMetrics, units included
    # The comparison is not vacuous: the families and a few values are there.
    om = ours[1]
    assert om["latency_seconds"][:3] == ("histogram", "Request latency.", "seconds")
    assert om["latency_seconds"][3][("latency_seconds_bucket", (("le", "0.1"), ("route", "/")))
                                   ] == 4.0
    assert om["sent_bytes"][3][("sent_bytes_total", ())] == 1024.25
    assert om["queue_depth"][3][("queue_depth", (("queue", "a"),))] == 7.5
    assert om["in_flight"][3][("in_flight", ())] == 2.0  # the inc(2) inside the block stays
    assert ("scratch", (("k", "1"),)) not in om["scratch"][3]
    assert ("shop_api_http_requests_total", (("method", "get"), ("route", "/gone"))
            ) not in om["shop_api_http_requests"][3]
    assert om["errors"][3][("errors_total", (("kind", "value"),))] == 2.0


def test_time_measures_a_block(domain: percpu.Domain) -> None:
    h = pp.Histogram("job_seconds", "Job time.", registry=None, domain=domain)
    s = pp.Summary("step_seconds", "Step time.", registry=None, domain=domain)
    g = pp.Gauge("last_job_seconds", "Last job.", registry=None, domain=domain)
    with h.time() as timer, s.time(), g.time():
        pass

    @h.time()
    def job() -> str:
        return "done"

    assert job() == "done"
    assert timer.duration is not None and timer.duration >= 0
    assert h._h.count == 2 and s._h.count == 1
    assert g._h.value >= 0


# -- misuse: the same kind of error on both sides ----------------------------------------------


def _unlabelled_labels(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", registry=r, **e).labels("x")


def _wrong_count(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a", "b"], registry=r, **e).labels("x")


def _wrong_names(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a"], registry=r, **e).labels(b="x")


def _args_and_kwargs(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a", "b"], registry=r, **e).labels("x", b="y")


def _chained(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a"], registry=r, **e).labels("x").labels("y")


def _parent_inc(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a"], registry=r, **e).inc()


def _parent_set(m: Any, r: Any, e: Any) -> None:
    m.Gauge("g", "d", ["a"], registry=r, **e).set(1)


def _parent_observe(m: Any, r: Any, e: Any) -> None:
    m.Histogram("h", "d", ["a"], registry=r, **e).observe(1)


def _parent_track(m: Any, r: Any, e: Any) -> None:
    m.Gauge("g", "d", ["a"], registry=r, **e).track_inprogress()


def _negative_inc(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", registry=r, **e).inc(-1)


def _le_label(m: Any, r: Any, e: Any) -> None:
    m.Histogram("h", "d", ["le"], registry=r, **e)


def _quantile_label(m: Any, r: Any, e: Any) -> None:
    m.Summary("s", "d", ["quantile"], registry=r, **e)


def _reserved_label(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["__a"], registry=r, **e)


def _invalid_label(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a-b"], registry=r, **e)


def _invalid_name(m: Any, r: Any, e: Any) -> None:
    m.Counter("1c", "d", registry=r, **e)


def _empty_name(m: Any, r: Any, e: Any) -> None:
    m.Counter("", "d", registry=r, **e)


def _unsorted_buckets(m: Any, r: Any, e: Any) -> None:
    m.Histogram("h", "d", buckets=(1, 0.5), registry=r, **e)


def _one_bucket(m: Any, r: Any, e: Any) -> None:
    m.Histogram("h", "d", buckets=(float("inf"),), registry=r, **e)


def _bad_mode(m: Any, r: Any, e: Any) -> None:
    m.Gauge("g", "d", multiprocess_mode="average", registry=r, **e)


def _mostrecent_inc(m: Any, r: Any, e: Any) -> None:
    m.Gauge("g", "d", multiprocess_mode="mostrecent", registry=r, **e).inc()


def _remove_wrong_count(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", ["a"], registry=r, **e).remove("x", "y")


def _remove_unlabelled(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", registry=r, **e).remove()


def _duplicate(m: Any, r: Any, e: Any) -> None:
    m.Counter("c", "d", registry=r, **e)
    m.Gauge("c_total", "d", registry=r, **e)


MISUSES = [_unlabelled_labels, _wrong_count, _wrong_names, _args_and_kwargs, _chained,
           _parent_inc, _parent_set, _parent_observe, _parent_track, _negative_inc, _le_label,
           _quantile_label, _reserved_label, _invalid_label, _invalid_name, _empty_name,
           _unsorted_buckets, _one_bucket, _bad_mode, _mostrecent_inc, _remove_wrong_count,
           _remove_unlabelled, _duplicate]
BUILTINS = (RuntimeError, TypeError, ValueError, KeyError)


@pytest.fixture
def legacy_names() -> Iterator[None]:
    """prometheus_client's legacy name rules, the ones the Prometheus text format carries
    unquoted and the domain keeps (0.26 accepts any UTF-8 name by default)."""
    was = prom_validation.get_legacy_validation()
    prom_validation.enable_legacy_validation()
    yield
    if not was:
        prom_validation.disable_legacy_validation()


def _raised(fn: Callable[[], None]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # the point is to look at it
        return exc
    raise AssertionError("no error raised")


@pytest.mark.parametrize("misuse", MISUSES, ids=lambda f: f.__name__.strip("_"))
def test_misuse_raises_the_same_kind_of_error(misuse: Any, domain: percpu.Domain,
                                              legacy_names: None) -> None:
    theirs = _raised(lambda: misuse(prometheus_client, CollectorRegistry(), {}))
    ours = _raised(lambda: misuse(pp, CollectorRegistry(), {"domain": domain}))
    kinds = [k for k in BUILTINS if isinstance(theirs, k)]
    assert kinds, f"prometheus_client raised {theirs!r}"
    assert isinstance(ours, kinds[0]), (theirs, ours)
    assert str(ours)


def test_a_mode_that_prometheus_client_lacks_is_refused_too(domain: percpu.Domain) -> None:
    with pytest.raises(ValueError, match="multiprocess mode"):
        pp.Gauge("g", "d", multiprocess_mode="livesum ", registry=None, domain=domain)


def test_gauge_modes_map_as_documented(domain: percpu.Domain) -> None:
    modes = {"all": "sum", "liveall": "livesum", "sum": "sum", "livesum": "livesum",
             "max": "max", "livemax": "livemax", "min": "min", "livemin": "livemin",
             "mostrecent": "mostrecent", "livemostrecent": "livemostrecent"}
    for theirs, ours in modes.items():
        g = pp.Gauge(f"g_{theirs}", "d", multiprocess_mode=theirs, registry=None, domain=domain)
        assert g._h.mode == ours
    assert set(modes) == set(prometheus_client.Gauge._MULTIPROC_MODES)


def test_names_are_built_as_prometheus_client_builds_them(domain: percpu.Domain) -> None:
    cases = [("counter", "jobs_total", "ns", "sub", ""), ("counter", "x_total", "", "", "bytes"),
             ("gauge", "temp", "", "", "celsius"), ("gauge", "t_celsius", "a", "", "celsius"),
             ("histogram", "lat", "", "db", "seconds")]
    cls = {"counter": pp.Counter, "gauge": pp.Gauge, "histogram": pp.Histogram}
    theirs_cls = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
                  "histogram": prometheus_client.Histogram}
    for kind, name, ns, sub, unit in cases:
        ours = cls[kind](name, "d", namespace=ns, subsystem=sub, unit=unit, registry=None,
                         domain=domain)
        theirs = theirs_cls[kind](name, "d", namespace=ns, subsystem=sub, unit=unit,
                                  registry=None)
        assert ours._name == theirs._name
        assert ours._h.name == theirs._name


def test_a_removed_series_a_child_still_uses_comes_back(domain: percpu.Domain) -> None:
    c = pp.Counter("jobs", "Jobs.", ["q"], registry=None, domain=domain)
    held = c.labels("a")
    held.inc(5)
    c.remove("a")
    assert [m for m in domain.snapshot() if m.name == "jobs"] == []
    held.inc()  # no MetricRemoved: registered again, from zero
    assert [(m.labels, m.value) for m in domain.snapshot() if m.name == "jobs"] == [
        ((("q", "a"),), 1)]
    c.remove("nothing-there")  # as in prometheus_client: no error


def test_values_are_converted_like_prometheus_client(domain: percpu.Domain) -> None:
    c = pp.Counter("flags", "d", registry=None, domain=domain)
    c.inc(True)
    c.inc(False)
    g = pp.Gauge("g", "d", registry=None, domain=domain)
    g.set("2.5")  # type: ignore[arg-type]  # prometheus_client takes float(value) too
    assert (c._h.value, g._h.value) == (1, 2.5)
    with pytest.raises(ValueError):
        g.set(float("nan"))  # refused: it would poison a shared sum for good
    with pytest.raises(NotImplementedError):
        c.reset()
    with pytest.raises(NotImplementedError):
        g.set_function(lambda: 1.0)


def test_histogram_clash_is_dropped_and_counted(domain: percpu.Domain) -> None:
    domain.gauge("a_count").set(1)
    domain.histogram("a").observe(1)
    domain.histogram("b").observe(1)
    families = {f.name: f for f in pp.PercpuCollector(domain, health=False).collect()}
    assert "a" not in families and "b" in families and "a_count" in families
    assert families[DROPPED_SERIES].samples[0].value == 1


# -- the domain from the environment -------------------------------------------------------------


def test_no_domain_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(pp.ENV_VAR, raising=False)
    with pytest.raises(pp.NoDomain, match="PERCPU_DOMAIN"):
        pp.Counter("c", "d", registry=None)
    monkeypatch.setenv(pp.ENV_VAR, str(tmp_path / "missing.domain"))
    with pytest.raises(pp.NoDomain, match=r"no such domain file.*Domain\.create"):
        pp.Counter("c", "d", registry=None)


def test_the_environment_domain_is_opened_once(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    path = tmp_path / "app.domain"
    percpu.Domain.create(path, 1 << 20, max_vcpus=2).close()
    monkeypatch.setenv(pp.ENV_VAR, str(path))
    first = pp.default_domain()
    try:
        assert pp.default_domain() is first
        assert pp.Counter("c", "d", registry=None)._domain is first
    finally:
        first.close()


def test_importing_percpu_does_not_import_prometheus_client() -> None:
    code = "import sys, percpu; assert 'prometheus_client' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


# -- real processes --------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    from percpu.prometheus import Counter, Gauge, Histogram
    requests = Counter("requests_total", "Requests.", ["route"])
    latency = Histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0))
    in_flight = Gauge("in_flight", "In progress.", multiprocess_mode="livesum")
    for i in range({n}):
        with in_flight.track_inprogress():
            requests.labels("/" + str(i % 3)).inc()
            latency.observe(0.5 if i % 2 else 0.05)
""")


def _env(path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{pp.ENV_VAR: str(path)})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _scrape(d: percpu.Domain) -> dict[str, Series]:
    registry = CollectorRegistry()
    pp.PercpuCollector(d, registry=registry, health=False)
    return {k: v[3] for k, v in parsed(parse_text(generate_latest(registry).decode())).items()}


def test_worker_processes_count_into_one_domain(tmp_path: Path) -> None:
    path = tmp_path / "app.domain"
    workers, n = 4, 300
    with percpu.Domain.create(path, 1 << 22, max_vcpus=8) as d:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(n=n)], env=_env(path))
                 for _ in range(workers)]
        assert [p.wait(timeout=120) for p in procs] == [0] * workers
        got = _scrape(d)
        assert got["requests"] == {("requests_total", (("route", f"/{k}"),)): workers * n / 3
                                   for k in range(3)}
        lat = got["latency_seconds"]
        assert lat[("latency_seconds_count", ())] == workers * n
        assert lat[("latency_seconds_bucket", (("le", "0.1"),))] == workers * n / 2
        assert lat[("latency_seconds_sum", ())] == pytest.approx(workers * n / 2 * 0.55)
        assert got["in_flight"] == {("in_flight", ()): 0.0}
        # clear() removes the label sets the workers made, in the whole domain.
        pp.Counter("requests_total", "Requests.", ["route"], registry=None, domain=d).clear()
        assert "requests" not in _scrape(d)


HOLDER = textwrap.dedent("""
    import sys
    from percpu.prometheus import Gauge
    live = Gauge("in_flight", "In progress.", multiprocess_mode="livesum")
    every = Gauge("in_flight_all", "In progress, dead workers too.")  # mode 'all'
    with live.track_inprogress(), every.track_inprogress():
        print("in", flush=True)
        sys.stdin.readline()
    print("out", flush=True)
    sys.stdin.readline()
""")


def test_a_sigkilled_workers_livesum_gauge_drops_out(tmp_path: Path) -> None:
    path = tmp_path / "app.domain"
    with percpu.Domain.create(path, 1 << 22, max_vcpus=8) as d:
        procs = [subprocess.Popen([sys.executable, "-c", HOLDER], env=_env(path), text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for _ in range(3)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline() == "in\n"

            def gauges() -> tuple[float, float]:
                got = _scrape(d)
                return (got["in_flight"][("in_flight", ())],
                        got["in_flight_all"][("in_flight_all", ())])

            assert gauges() == (3, 3)
            procs[0].send_signal(signal.SIGKILL)  # killed inside the block
            assert procs[0].wait(timeout=30) == -signal.SIGKILL
            assert gauges() == (2, 3)  # livesum: the dead worker is gone; 'all' keeps it
            for p in procs[1:]:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("\n")
                p.stdin.flush()
                assert p.stdout.readline() == "out\n"
            assert gauges() == (0, 1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=30)


def test_the_module_namespace_matches_prometheus_clients() -> None:
    for name in ("Counter", "Gauge", "Histogram", "Summary"):
        ours, theirs = getattr(pp, name), getattr(prometheus_client, name)
        assert isinstance(ours, type) and isinstance(theirs, type)
        for method in ("labels", "remove", "clear", "describe", "collect"):
            assert callable(getattr(ours, method)), (name, method)
    assert isinstance(pp, types.ModuleType)
