"""The metric model (issue 15): floats, gauge modes, histograms, help text and units, each
across holders (in-process holders of one shared file, and real processes that are SIGKILLed),
through the overflow id, a release and a compaction."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from typing import Any

import pytest
from _children import Child
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from percpu import (
    Domain,
    InvalidArgument,
    InvalidType,
    KindMismatch,
    MetricRemoved,
)
from percpu._exposition import DomainExposition

SIZE = 1 << 21


# -- floats ---------------------------------------------------------------------------------


def test_counters_take_fractional_amounts_and_stay_ints_without_them() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        whole = d.counter("events")
        whole.add(3)
        whole.inc()
        assert whole.value == 4 and type(whole.value) is int
        seconds = d.counter("busy_seconds", unit="seconds")
        for _ in range(4):
            seconds.add(0.25)
        seconds.add(2)
        assert seconds.value == 3.0 and type(seconds.value) is float
        for bad, error in ((-0.5, InvalidArgument), (math.nan, InvalidArgument),
                           (math.inf, InvalidArgument), ("0.5", InvalidType)):
            with pytest.raises(error):
                seconds.add(bad)  # type: ignore[arg-type]
        assert seconds.value == 3.0
        assert {v.name: v.value for v in d.snapshot()} == {"events": 4, "busy_seconds": 3.0}


def test_a_float_sum_is_as_exact_as_float64() -> None:
    """The float part is one float64 per id: a million additions of 0.1 drift as float64
    additions do (relative error ~1e-12 here), the int part stays exact."""
    with Domain(SIZE, max_vcpus=2) as d:
        c = d.counter("c")
        for _ in range(100_000):
            c.add(0.1)
            c.inc()
        assert math.isclose(c.value, 100_000 + 10_000.0, rel_tol=1e-12)


# -- gauge modes ----------------------------------------------------------------------------


def holders(path: str, n: int) -> list[Domain]:
    return [Domain.open(path) for _ in range(n)]


def test_set_sets_this_holders_part_of_a_sum_gauge(shared: tuple[str, list[Domain]]) -> None:
    path, hs = shared
    hs += holders(path, 1)
    a, b = (h.gauge("queue") for h in hs)
    a.set(5)
    b.set(2.5)
    a.inc()
    assert a.value == b.value == 8.5
    b.set(-1)
    assert a.value == 5
    assert a.mode == "sum"


@pytest.mark.parametrize(("mode", "want"), [("max", 7.0), ("min", -2.0), ("mostrecent", 3.0)])
def test_stamped_modes(shared: tuple[str, list[Domain]], mode: str, want: float) -> None:
    path, hs = shared
    hs += holders(path, 1)
    a, b = (h.gauge("g", mode=mode) for h in hs)
    assert a.value == 0.0  # nobody has set it
    a.set(7)
    time.sleep(0.001)
    b.set(-2)
    time.sleep(0.001)
    a.set(3) if mode == "mostrecent" else None
    assert a.value == b.value == want
    assert {m.value for m in hs[0].snapshot() if m.name == "g"} == {want}


@pytest.mark.parametrize(("mode", "alive", "dead"), [
    ("livesum", 3, 13), ("livemax", 3.0, 10.0), ("livemin", 3.0, 3.0),
    ("livemostrecent", 3.0, 10.0)])
def test_live_modes_drop_a_dead_holders_part(shared: tuple[str, list[Domain]], mode: str,
                                             alive: float, dead: float) -> None:
    path, hs = shared
    survivor, doomed = hs[0], Domain.open(path)
    g_live, g_doomed = survivor.gauge("g", mode=mode), doomed.gauge("g", mode=mode)
    g_live.set(3)
    time.sleep(0.001)
    g_doomed.set(10)
    assert g_live.value == (13 if mode == "livesum" else dead)
    doomed._abandon()  # as a SIGKILL: the kernel drops its lease lock, nothing else changes
    assert g_live.value == alive
    assert {m.value for m in survivor.snapshot() if m.name == "g"} == {alive}
    # The next holder of the dead id starts from zero, never on top of the dead one's part.
    heir = Domain.open(path)
    hs.append(heir)
    assert heir.vcpu_id() == 1 and heir.last_lease_path is not None
    assert heir.last_lease_path.value == "reclaimed"
    assert heir.gauge("g", mode=mode).value == alive
    if mode == "livesum":
        heir.gauge("g", mode=mode).inc()
        assert g_live.value == 4


def test_a_killed_workers_in_flight_count_drops_out(tmp_path: Any) -> None:
    """Real processes: two workers each enter a request (track_inprogress), one is
    SIGKILLed inside it. The livesum gauge shows the survivor only; a worker that takes the
    dead one's id later starts from zero."""
    path = str(tmp_path / "d")
    parent = Domain.create(path, SIZE, max_vcpus=4)
    try:
        inflight = parent.gauge("inflight", mode="livesum")
        requests = parent.counter("requests")
        r, w = os.pipe()

        def worker() -> None:
            d = Domain.open(path)
            with d.gauge("inflight", mode="livesum").track_inprogress():
                d.counter("requests").inc()
                os.write(w, b"x")
                time.sleep(60)  # killed in here

        child = Child(worker)
        assert os.read(r, 1) == b"x"
        with inflight.track_inprogress():
            assert inflight.value == 2
            child.kill()
            assert inflight.value == 1
            requests.inc()
        assert inflight.value == 0 and requests.value == 2
        os.close(r)
        os.close(w)
    finally:
        parent.close()


def test_one_kind_a_name_and_modes_do_not_mix(shared: tuple[str, list[Domain]]) -> None:
    path, hs = shared
    d = hs[0]
    d.gauge("g", {"a": "1"}, mode="max")
    other = Domain.open(path)
    hs.append(other)
    for call in (lambda: other.gauge("g", {"a": "2"}), lambda: other.counter("g", {"a": "3"}),
                 lambda: other.histogram("g")):
        with pytest.raises(KindMismatch):
            call()
    assert other.gauge("g", {"a": "2"}, mode="max").mode == "max"
    with pytest.raises(InvalidArgument, match="mode"):
        d.gauge("h", mode="average")


def test_gauge_helpers() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        g = d.gauge("busy")
        with g.track_inprogress():
            assert g.value == 1
        assert g.value == 0

        @g.track_inprogress()
        def work() -> int:
            return int(g.value)

        assert work() == 1 and g.value == 0
        t = d.gauge("last_run_seconds", mode="mostrecent")
        t.set_to_current_time()
        assert abs(t.value - time.time()) < 60
        took = d.gauge("took_seconds")
        with took.time():
            time.sleep(0.01)
        assert took.value >= 0.01


def test_count_exceptions() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        errors = d.counter("errors")
        with pytest.raises(KeyError), errors.count_exceptions(KeyError):
            raise KeyError("x")
        with pytest.raises(ValueError), errors.count_exceptions(KeyError):
            raise ValueError("not counted")

        @errors.count_exceptions()
        def fails() -> None:
            raise RuntimeError

        with pytest.raises(RuntimeError):
            fails()
        assert errors.value == 2


# -- histograms -----------------------------------------------------------------------------


def test_histogram_buckets_count_and_sum() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        h = d.histogram("latency_seconds", buckets=[0.1, 1, 10], unit="seconds")
        for x in (0.05, 0.1, 0.5, 3, 30, -1):
            h.observe(x)
        buckets, count, total = h.value
        assert buckets == [(0.1, 3), (1.0, 4), (10.0, 5), (math.inf, 6)]
        assert (count, total) == (6, 32.65) and h.count == 6
        (v,) = d.snapshot()
        assert v.kind == "histogram" and v.count == 6 and math.isclose(v.value, 32.65)
        assert v.buckets == ((0.1, 3), (1.0, 4), (10.0, 5), (math.inf, 6))
        for bad in (math.nan, math.inf):
            with pytest.raises(InvalidArgument):
                h.observe(bad)
        with pytest.raises(InvalidType):
            h.observe("1")  # type: ignore[arg-type]
        assert h.count == 6
        with h.time():
            pass
        assert h.count == 7 and h.buckets == (0.1, 1.0, 10.0)


def test_default_buckets_are_prometheus_clients() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        h = d.histogram("h")
        assert h.buckets == (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                             5.0, 7.5, 10.0)


@pytest.mark.parametrize("buckets", [[], [1, 1], [2, 1], [math.nan], list(range(63)), "1,2",
                                     [True]])
def test_bad_buckets_are_refused(buckets: Any) -> None:
    with Domain(SIZE, max_vcpus=2) as d, pytest.raises((InvalidArgument, InvalidType)):
        d.histogram("h", buckets=buckets)


def test_a_histogram_name_keeps_its_buckets(shared: tuple[str, list[Domain]]) -> None:
    path, hs = shared
    hs[0].histogram("h", {"a": "1"}, buckets=[1, 2])
    other = Domain.open(path)
    hs.append(other)
    with pytest.raises(KindMismatch, match="buckets"):
        other.histogram("h", {"a": "2"}, buckets=[1, 3])
    assert other.histogram("h", {"a": "2"}, buckets=[1, 2.0]).buckets == (1.0, 2.0)
    with pytest.raises(InvalidArgument):
        hs[0].histogram("h", {"a": "1"}, buckets=[5])


def test_the_largest_histogram_fits_one_512_byte_slot() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        bounds = [float(i) for i in range(1, 63)]
        h = d.histogram("wide", buckets=bounds)
        for x in range(0, 70):
            h.observe(x)
        buckets, count, _ = h.value
        assert count == 70 and buckets[0] == (1.0, 2) and buckets[-1] == (math.inf, 70)


# -- every path of an update: overflow id, unbound after release, removed ------------------


def test_new_kinds_on_the_overflow_id(tmp_path: Any) -> None:
    path = str(tmp_path / "d")
    with Domain.create(path, SIZE, max_vcpus=1) as a, Domain.open(path) as b:
        assert a.vcpu_id() == 0 and b.vcpu_id() == 1  # b shares the overflow id
        for d in (a, b):
            d.histogram("h", buckets=[1]).observe(0.5)
            d.gauge("m", mode="max").set(4 if d is a else 9)
            d.gauge("s").set(2.5)
            d.counter("c").add(0.5)
        assert a.histogram("h", buckets=[1]).value == ([(1.0, 2), (math.inf, 2)], 2, 1.0)
        assert a.gauge("m", mode="max").value == 9.0
        assert a.gauge("s").value == 5.0 and a.counter("c").value == 1.0
        assert b.stats().shared_id_operations >= 4


def test_new_kinds_after_a_release_and_once_removed() -> None:
    with Domain(SIZE, max_vcpus=2) as d:
        h, m, c = d.histogram("h", buckets=[1]), d.gauge("m", mode="min"), d.counter("c")
        observe, set_, add = h.observe, m.set, c.add  # bound methods cached by the caller
        d.release()
        observe(2)
        set_(-3)
        add(0.5)
        assert h.value[1] == 1 and m.value == -3.0 and c.value == 0.5
        assert d.remove("h") and d.remove("m")
        with pytest.raises(MetricRemoved):
            observe(1)
        with pytest.raises(MetricRemoved):
            set_(1)


def test_compaction_moves_float_parts_and_leaves_histograms(
        shared: tuple[str, list[Domain]]) -> None:
    _path, hs = shared
    d = hs[0]
    keep = {i: d.counter("c", {"i": str(i)}) for i in range(0, 600, 40)}
    for i, c in keep.items():
        c.add(i + 0.25)
    others = [d.counter("c", {"i": str(i)}) for i in range(600) if i not in keep]
    h = d.histogram("h", buckets=[1])
    h.observe(0.5)
    m = d.gauge("m", mode="max")
    m.set(7)
    for c in others:
        d.remove(c.name, dict(c.labels))
    d.synchronize(2)
    result = d.compact(timeout=5)
    assert result.moved > 0
    assert {i: c.value for i, c in keep.items()} == {i: i + 0.25 for i in keep}
    assert h.value[1] == 1 and m.value == 7.0
    assert d.check().ok


# -- help text, units, exposition -----------------------------------------------------------


def test_documentation_and_units_reach_the_exposition(tmp_path: Any) -> None:
    path = str(tmp_path / "d")
    with Domain.create(path, SIZE, max_vcpus=2) as d:
        d.counter("requests", documentation="Requests served.").inc()
        d.histogram("latency_seconds", documentation="Latency.", unit="seconds",
                    buckets=[0.1]).observe(0.05)
        d.gauge("inflight", mode="livesum", documentation="In flight.").inc()
        d.summary("size_bytes", unit="bytes", documentation="Sizes.").observe(10)
        with Domain.open(path) as other:  # the first registration's text wins
            other.counter("requests", documentation="Something else.").inc()
        text, _ = DomainExposition(d, health=False).render()
        om, _ = DomainExposition(d, health=False).render("application/openmetrics-text")
    body = text.decode()
    assert "# HELP requests_total Requests served.\n" in body
    assert "requests_total 2\n" in body
    assert 'latency_seconds_bucket{le="0.1"} 1\n' in body
    assert 'latency_seconds_bucket{le="+Inf"} 1\n' in body
    assert "latency_seconds_count 1\nlatency_seconds_sum 0.05\n" in body
    assert "# UNIT latency_seconds seconds\n" in om.decode()
    assert "# UNIT" not in body
    with pytest.raises(InvalidArgument, match="_seconds"):
        Domain(SIZE, max_vcpus=2).counter("busy", unit="seconds")
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


# -- a state machine of the new kinds across holders -----------------------------------------


class ModelMachine(RuleBasedStateMachine):
    """Two to three holders of one shared file observe, set and add to a histogram, a
    livesum gauge, a max gauge and a float counter; holders die (as by SIGKILL) and new ones
    take their ids; compaction runs. Every read matches a model of each holder's part."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        from conftest import shm_dir
        self.tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_metric_model_sm-")
        self.path = os.path.join(self.tmp, "d")
        self.holders: list[Domain] = [Domain.create(self.path, SIZE, max_vcpus=3)]
        self.parts: dict[int, dict[str, Any]] = {}  # id -> its holder's parts, by metric
        self.buckets = [0, 0, 0]  # le 1, le 10, +Inf (every holder, dead ones included)
        self.hsum = 0.0
        self.counter = 0.0

    def teardown(self) -> None:
        for d in self.holders:
            d.close()
        shutil.rmtree(self.tmp)

    def _part(self, d: Domain) -> dict[str, Any]:
        return self.parts.setdefault(d.vcpu_id(), {"live": 0, "max": None})

    @rule(data=st.data(), x=st.integers(-8, 80).map(lambda i: i / 4))
    def observe(self, data: st.DataObject, x: float) -> None:
        d = data.draw(st.sampled_from(self.holders))
        d.histogram("h", buckets=[1, 10]).observe(x)
        self.buckets[0 if x <= 1 else 1 if x <= 10 else 2] += 1
        self.hsum += x

    @rule(data=st.data(), n=st.integers(-3, 3))
    def live_add(self, data: st.DataObject, n: int) -> None:
        d = data.draw(st.sampled_from(self.holders))
        d.gauge("live", mode="livesum").add(n)
        self._part(d)["live"] += n

    @rule(data=st.data(), v=st.integers(-100, 100))
    def max_set(self, data: st.DataObject, v: int) -> None:
        d = data.draw(st.sampled_from(self.holders))
        d.gauge("top", mode="max").set(v)
        self._part(d)["max"] = float(v)

    @rule(data=st.data(), x=st.integers(0, 40).map(lambda i: i / 8))
    def count(self, data: st.DataObject, x: float) -> None:
        d = data.draw(st.sampled_from(self.holders))
        d.counter("c").add(x)
        self.counter += x

    @precondition(lambda self: len(self.holders) > 1)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(self.holders[1:]))
        self.holders.remove(d)
        vcpu = d._lease.vcpu
        d._abandon()
        if vcpu is not None:
            # A dead holder's livesum part drops out; its max value stays (mode max).
            self.parts.setdefault(vcpu, {"live": 0, "max": None})["live"] = 0
            self.parts[vcpu]["dead"] = True

    @precondition(lambda self: len(self.holders) < 3)
    @rule()
    def join(self) -> None:
        d = Domain.open(self.path)
        self.holders.append(d)
        part = self._part(d)
        part["live"] = 0  # the heir of a dead id starts from zero
        part.pop("dead", None)

    @rule()
    def compact(self) -> None:
        self.holders[0].compact(timeout=0)

    @invariant()
    def reads_match_the_model(self) -> None:
        d = self.holders[0]
        live_ids = {h._lease.vcpu for h in self.holders if h._lease.vcpu is not None}
        cumulative = [sum(self.buckets[: i + 1]) for i in range(3)]
        h = d.histogram("h", buckets=[1, 10])
        buckets, count, total = h.value
        assert [n for _le, n in buckets] == cumulative and count == cumulative[-1]
        assert math.isclose(total, self.hsum, abs_tol=1e-9)
        want_live = sum(p["live"] for k, p in self.parts.items() if k in live_ids)
        assert d.gauge("live", mode="livesum").value == want_live
        maxes = [p["max"] for p in self.parts.values() if p["max"] is not None]
        assert d.gauge("top", mode="max").value == (max(maxes) if maxes else 0.0)
        assert d.counter("c").value == self.counter
        values = {m.name: m for m in d.snapshot()}
        assert values["h"].count == cumulative[-1]
        assert values["live"].value == want_live
        assert values["c"].value == self.counter


TestModelMachine = ModelMachine.TestCase
TestModelMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
