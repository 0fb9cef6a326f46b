"""Tests for percpu._exposition: samples, both text formats (checked with prometheus_client's
parsers), content negotiation and the HTTP endpoint."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus_text

from percpu._errors import InvalidArgument, InvalidType
from percpu._exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_PROMETHEUS,
    DROPPED_SERIES,
    MetricSample,
    domain_samples,
    exposition,
    health_samples,
    make_server,
    negotiate,
    render_openmetrics,
    render_prometheus,
)

# prometheus_client's OpenMetrics parser has no type hints.
parse_openmetrics_text: Callable[[str], Iterable[Any]] = (
    openmetrics_parser.text_string_to_metric_families
)

# A parsed exposition: family name -> (type, help, {(sample name, labels): value}).
Parsed = dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def _collect_parsed(families: Iterable[Any]) -> Parsed:
    parsed: Parsed = {}
    for family in families:
        assert family.name not in parsed, f"family {family.name} split in two"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        assert len(samples) == len(family.samples), "a series appears twice"
        parsed[family.name] = (family.type, family.documentation, samples)
    return parsed


def parse_prometheus(data: bytes) -> Parsed:
    return _collect_parsed(parse_prometheus_text(data.decode("utf-8")))


def parse_openmetrics(data: bytes) -> Parsed:
    return _collect_parsed(parse_openmetrics_text(data.decode("utf-8")))


def parse_both(samples: list[MetricSample]) -> tuple[Parsed, Parsed]:
    return parse_prometheus(render_prometheus(samples)), parse_openmetrics(
        render_openmetrics(samples)
    )


def counter(
    name: str, value: float, labels: dict[str, str] | None = None, **kw: Any
) -> MetricSample:
    return MetricSample(name, "counter", tuple((labels or {}).items()), value, **kw)


def gauge(name: str, value: float, labels: dict[str, str] | None = None, **kw: Any) -> MetricSample:
    return MetricSample(name, "gauge", tuple((labels or {}).items()), value, **kw)


def summary(
    name: str, count: int, total: float, labels: dict[str, str] | None = None, **kw: Any
) -> MetricSample:
    return MetricSample(name, "summary", tuple((labels or {}).items()), 0, count, total, **kw)


# ------------------------------------------------------------------------------------------
# MetricSample


def test_sample_labels_are_validated_and_sorted() -> None:
    sample = MetricSample("m", "gauge", (("b", "2"), ("a", "1")), 1)
    assert sample.labels == (("a", "1"), ("b", "2"))
    assert sample == MetricSample("m", "gauge", (("a", "1"), ("b", "2")), 1)


def test_sample_is_frozen() -> None:
    sample = gauge("m", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.value = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("requests", "requests"),
        ("requests_total", "requests"),
        ("a_total_total", "a_total"),
        ("_total", "_total"),
        (":_total", ":"),
    ],
)
def test_counter_family_strips_total(name: str, family: str) -> None:
    assert counter(name, 1).family == family


def test_gauge_and_summary_keep_total() -> None:
    assert gauge("x_total", 1).family == "x_total"
    assert summary("x_total", 1, 1.0).family == "x_total"


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: gauge("1bad", 1), InvalidArgument, "metric name"),
        (lambda: gauge(b"m", 1), InvalidType, "metric name"),  # type: ignore[arg-type]
        (lambda: MetricSample("m", "untyped", (), 1), InvalidArgument, "kind"),  # type: ignore[arg-type]
        (lambda: MetricSample("m", "histogram", (), 1), InvalidArgument, "buckets"),
        (lambda: MetricSample("m", 3, (), 1), InvalidArgument, "kind"),  # type: ignore[arg-type]
        (lambda: MetricSample("m", "gauge", (("a", "1"), ("a", "2")), 1), InvalidArgument, "twice"),
        (lambda: MetricSample("m", "gauge", (("__a", "1"),), 1), InvalidArgument, "__"),
        (lambda: MetricSample("m", "gauge", (("a", 1),), 1), InvalidType, "str"),  # type: ignore[arg-type]
        (lambda: gauge("m", True), InvalidType, "bool"),
        (lambda: gauge("m", "1"), InvalidType, "str"),  # type: ignore[arg-type]
        (lambda: gauge("m", 2**64), InvalidArgument, "64 bits"),
        (lambda: gauge("m", -(2**63) - 1), InvalidArgument, "64 bits"),
        (lambda: counter("m", -1), InvalidArgument, "negative"),
        (lambda: counter("m", float("nan")), InvalidArgument, "NaN"),
        (lambda: counter("m", -0.5), InvalidArgument, "-0.5"),
        (lambda: summary("m", -1, 0.0), InvalidArgument, "count"),
        (lambda: summary("m", 1, float("nan")), InvalidArgument, "sum"),
        (lambda: summary("m", 1, -2.0), InvalidArgument, "sum"),
        (lambda: MetricSample("m", "summary", (), 0, 1.5, 0.0), InvalidType, "count"),  # type: ignore[arg-type]
        (lambda: summary("m", 1, 1.0, {"quantile": "0.5"}), InvalidArgument, "quantile"),
        (lambda: gauge("m", 1, help=None), InvalidType, "help"),
        (lambda: gauge("m", 1, help="\ud800"), InvalidArgument, "UTF-8"),
    ],
)
def test_sample_rejects(
    make: Callable[[], MetricSample], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_sample_accepts_edge_values() -> None:
    gauge("m", -(2**63))
    gauge("m", 2**64 - 1)
    gauge("m", float("nan"))
    gauge("m", float("-inf"))
    counter("m", float("inf"))
    counter("m", 0)
    summary("m", 0, 0.0)
    summary("m", 2**63 - 1, 1e300)
    gauge("m", 1, {"quantile": "0.5"})  # only summaries reserve it


# ------------------------------------------------------------------------------------------
# Rendering: structure


def test_empty() -> None:
    assert render_prometheus([]) == b""
    assert render_openmetrics([]) == b"# EOF\n"
    assert parse_openmetrics(b"# EOF\n") == {}


def test_counter_text_format() -> None:
    data = render_prometheus([counter("jobs", 3, {"queue": "a"}, help="Jobs done.")])
    assert data == (
        b'# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total{queue="a"} 3\n'
    )


def test_counter_openmetrics() -> None:
    data = render_openmetrics([counter("jobs", 3, {"queue": "a"}, help="Jobs done.")])
    assert data == (
        b'# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total{queue="a"} 3\n# EOF\n'
    )


def test_gauge_and_summary_lines() -> None:
    samples = [gauge("temp", -4.5), summary("latency", 7, 0.25, {"op": "read"})]
    assert render_prometheus(samples) == (
        b"# TYPE latency summary\n"
        b'latency_count{op="read"} 7\n'
        b'latency_sum{op="read"} 0.25\n'
        b"# TYPE temp gauge\n"
        b"temp -4.5\n"
    )
    assert render_openmetrics(samples).endswith(b"temp -4.5\n# EOF\n")


@pytest.mark.parametrize("name", ["requests", "requests_total"])
def test_total_suffix(name: str) -> None:
    text, om = parse_both([counter(name, 5)])
    assert text == {"requests": ("counter", "", {("requests_total", ()): 5})}
    assert om == text
    assert b"# TYPE requests_total counter\n" in render_prometheus([counter(name, 5)])
    assert b"# TYPE requests counter\n" in render_openmetrics([counter(name, 5)])
    assert b"_total_total" not in render_prometheus([counter(name, 5)])


def test_total_and_plain_name_are_one_family() -> None:
    samples = [counter("hits", 1, {"a": "1"}), counter("hits_total", 2, {"a": "2"})]
    for data in (render_prometheus(samples), render_openmetrics(samples)):
        assert data.count(b"# TYPE") == 1
    text, om = parse_both(samples)
    assert (
        text
        == om
        == {
            "hits": (
                "counter",
                "",
                {("hits_total", (("a", "1"),)): 1, ("hits_total", (("a", "2"),)): 2},
            )
        }
    )


def test_gauge_named_total_is_kept() -> None:
    text, om = parse_both([gauge("queue_total", 4)])
    assert om == {"queue_total": ("gauge", "", {("queue_total", ()): 4})}
    assert text == om


def test_many_families_grouped_and_order_independent() -> None:
    samples = []
    for i in range(5):
        samples.append(counter("c", i, {"i": str(i)}, help="a counter"))
        samples.append(gauge("g", -i, {"i": str(i)}, help="a gauge"))
        samples.append(summary("s", i, i / 2, {"i": str(i)}, help="a summary"))
    expected_text = render_prometheus(samples)
    expected_om = render_openmetrics(samples)
    rng = random.Random(1)
    for _ in range(5):
        rng.shuffle(samples)
        assert render_prometheus(samples) == expected_text
        assert render_openmetrics(samples) == expected_om
    for data in (expected_text, expected_om):
        assert data.count(b"# TYPE") == 3
        assert data.count(b"# HELP") == 3
    text, om = parse_both(samples)
    assert text == om
    assert set(om) == {"c", "g", "s"}
    assert om["c"][0] == "counter" and om["g"][0] == "gauge" and om["s"][0] == "summary"
    assert om["s"][2][("s_sum", (("i", "3"),))] == 1.5
    assert om["s"][2][("s_count", (("i", "3"),))] == 3
    assert om["g"][2][("g", (("i", "4"),))] == -4


def test_help_taken_from_first_sample_that_has_it() -> None:
    samples = [gauge("g", 1, {"a": "1"}), gauge("g", 2, {"a": "2"}, help="second")]
    text, om = parse_both(samples)
    assert text["g"][1] == om["g"][1] == "second"


def test_accepts_any_iterable() -> None:
    def generate() -> Iterator[MetricSample]:
        yield gauge("g", 1)

    assert render_prometheus(generate()) == b"# TYPE g gauge\ng 1\n"
    assert render_openmetrics(generate()) == b"# TYPE g gauge\ng 1\n# EOF\n"


# ------------------------------------------------------------------------------------------
# Rendering: refusals


@pytest.mark.parametrize("render", [render_prometheus, render_openmetrics])
@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([counter("x", 1), gauge("x", 1)], "both as a counter and as a gauge"),
        ([gauge("x", 1, {"a": "1"}), summary("x", 1, 1.0)], "both"),
        ([gauge("x", 1, {"a": "1"}), gauge("x", 2, {"a": "1"})], "twice"),
        ([counter("x", 1), counter("x_total", 2)], "twice"),
        ([counter("a", 1), gauge("a_total", 1)], "'a_total'"),
        ([counter("a", 1), gauge("a_created", 1)], "'a_created'"),
        ([summary("s", 1, 1.0), gauge("s_count", 1)], "'s_count'"),
        ([summary("s", 1, 1.0), counter("s_sum", 1)], "'s_sum'"),
    ],
)
def test_ambiguous_input_refused(
    render: Callable[[Iterable[MetricSample]], bytes], samples: list[MetricSample], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        render(samples)


@pytest.mark.parametrize("render", [render_prometheus, render_openmetrics])
def test_non_sample_refused(render: Callable[[Iterable[Any]], bytes]) -> None:
    with pytest.raises(InvalidType, match="MetricSample"):
        render([("m", "gauge", (), 1)])


# ------------------------------------------------------------------------------------------
# Rendering: escaping and values

TRICKY_VALUES = [
    "",
    'say "hi"',
    "back\\slash",
    "trailing\\",
    "\\n is not a newline",
    "new\nline",
    "\n",
    '\\"\n',
    "ünïcödé ✓ 𝄞 中文",
    "braces } { and , = #",
    " spaces ",
    "tab\tand\rcr",
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_tricky_label_values_survive_both_parsers(value: str) -> None:
    samples = [counter("c", 1, {"v": value, "w": "x"}), gauge("g", 2, {"v": value})]
    text, om = parse_both(samples)
    assert text == om
    assert om["c"][2] == {("c_total", (("v", value), ("w", "x"))): 1}
    assert om["g"][2] == {("g", (("v", value),)): 2}


def test_label_escaping_bytes() -> None:
    data = render_prometheus([gauge("g", 1, {"v": 'a\\b"c\nd✓'})])
    assert data.endswith(b'g{v="a\\\\b\\"c\\nd\xe2\x9c\x93"} 1\n')
    assert render_openmetrics([gauge("g", 1, {"v": 'a\\b"c\nd'})]).endswith(
        b'g{v="a\\\\b\\"c\\nd"} 1\n# EOF\n'
    )


def test_help_escaping_differs_between_formats() -> None:
    sample = gauge("g", 1, help='a\\b "q"\nnext')
    assert b'# HELP g a\\\\b "q"\\nnext\n' in render_prometheus([sample])
    assert b'# HELP g a\\\\b \\"q\\"\\nnext\n' in render_openmetrics([sample])
    text, om = parse_both([sample])
    assert text["g"][1] == om["g"][1] == 'a\\b "q"\nnext'


@pytest.mark.parametrize("help_text", ["Plain.", "Ünïcödé ✓", "# not a comment", "two\n\nlines"])
def test_help_text_round_trips(help_text: str) -> None:
    text, om = parse_both([counter("c", 1, help=help_text)])
    assert text["c"][1] == om["c"][1] == help_text


@pytest.mark.parametrize("help_text", ["", " ", "\n\t "])
def test_no_help_line_when_blank(help_text: str) -> None:
    assert b"# HELP" not in render_prometheus([gauge("g", 1, help=help_text)])
    assert b"# HELP" not in render_openmetrics([gauge("g", 1, help=help_text)])


def test_help_whitespace_is_trimmed() -> None:
    samples = [gauge("g", 1, {"a": "1"}, help="  "), gauge("g", 2, {"a": "2"}, help=" Two\n ")]
    assert render_prometheus(samples).startswith(b"# HELP g Two\n# TYPE g gauge\n")
    text, om = parse_both(samples)
    assert text["g"][1] == om["g"][1] == "Two"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (0, "0"),
        (7, "7"),
        (2**53 + 1, "9007199254740993"),
        (2**63 - 1, "9223372036854775807"),
        (2**64 - 1, "18446744073709551615"),
        (-5, "-5"),
        (-(2**63), "-9223372036854775808"),
        (0.5, "0.5"),
        (-0.25, "-0.25"),
        (1e300, "1e+300"),
        (1.5e-7, "1.5e-07"),
        (5e-324, "5e-324"),
        (123456789.125, "123456789.125"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_gauge_values(value: int | float, written: str) -> None:
    sample = gauge("g", value)
    assert render_prometheus([sample]) == f"# TYPE g gauge\ng {written}\n".encode()
    text, om = parse_both([sample])
    for parsed in (text, om):
        got = parsed["g"][2][("g", ())]
        if math.isnan(value):
            assert math.isnan(got)
        else:
            assert got == value
            assert type(got) is type(value)  # ints are exact, not rounded through float


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1, 2**64 - 1, 0.125, float("inf")])
def test_counter_values(value: int | float) -> None:
    text, om = parse_both([counter("c", value)])
    assert text["c"][2] == om["c"][2] == {("c_total", ()): value}


def test_summary_values() -> None:
    sample = summary("s", 2**63 - 1, 1e-3, {"op": "w"})
    text, om = parse_both([sample])
    assert (
        text
        == om
        == {
            "s": (
                "summary",
                "",
                {("s_count", (("op", "w"),)): 2**63 - 1, ("s_sum", (("op", "w"),)): 1e-3},
            )
        }
    )


def test_output_is_utf8_bytes() -> None:
    samples = [gauge("g", 1, {"v": "✓"}, help="é")]
    for data in (render_prometheus(samples), render_openmetrics(samples)):
        assert isinstance(data, bytes)
        assert "✓".encode() in data and "é".encode() in data


label_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=150)
@given(
    values=st.lists(label_text, min_size=1, max_size=4, unique=True),
    help_text=label_text,
    number=st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False),
    ),
)
def test_parsers_agree_with_input(values: list[str], help_text: str, number: int | float) -> None:
    samples = [gauge("g", number, {"v": v}, help=help_text) for v in values]
    om = parse_openmetrics(render_openmetrics(samples))
    # Whitespace around a help text is not written (see test_help_whitespace_is_trimmed).
    expected = {"g": ("gauge", help_text.strip(), {("g", (("v", v),)): number for v in values})}
    assert om == expected
    assert parse_prometheus(render_prometheus(samples)) == expected


# ------------------------------------------------------------------------------------------
# negotiate

PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("text/plain;version=0.0.4", False),
        ("text/html,application/xhtml+xml,*/*;q=0.8", False),
        ("application/*", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        ("application/openmetrics-text;version=0.0.1", True),
        ("APPLICATION/OpenMetrics-Text;Version=1.0.0", True),
        (" application/openmetrics-text ; q=0.3 ", True),
        ("text/plain, application/openmetrics-text", True),
        (PROMETHEUS_2_ACCEPT, True),
        (PROMETHEUS_3_ACCEPT, True),
        ("application/openmetrics-text;q=0", False),
        ("application/openmetrics-text;q=0.000", False),
        ("application/openmetrics-text;q=0, text/plain", False),
        ("application/openmetrics-text;q=0, */*", False),
        ("application/openmetrics-text;version=2.0.0", False),
        ("text/plain;q=0.9, application/openmetrics-text;q=0.5", False),
        ("application/openmetrics-text;q=0.5, text/plain;q=0.5", True),
        ("application/openmetrics-text;q=0.5, */*", False),
        ("application/openmetrics-text;q=0.5, text/plain;q=0, */*", True),
        ("application/openmetrics-text;q=abc", False),
        ("application/openmetrics-text;q=2", False),
        ("application/openmetrics-text;q=nan", False),
        ("!!!;;;,,,/;=", False),
        ("application/openmetrics-text;;;", True),
    ],
)
def test_negotiate(accept: str | None, openmetrics: bool) -> None:
    render, content_type = negotiate(accept)
    if openmetrics:
        assert (render, content_type) == (render_openmetrics, CONTENT_TYPE_OPENMETRICS)
    else:
        assert (render, content_type) == (render_prometheus, CONTENT_TYPE_PROMETHEUS)


def test_content_types() -> None:
    assert CONTENT_TYPE_PROMETHEUS == "text/plain; version=0.0.4; charset=utf-8"
    assert CONTENT_TYPE_OPENMETRICS == "application/openmetrics-text; version=1.0.0; charset=utf-8"


@given(st.text(max_size=200))
def test_negotiate_never_fails(accept: str) -> None:
    assert negotiate(accept)[1] in (CONTENT_TYPE_PROMETHEUS, CONTENT_TYPE_OPENMETRICS)


# ------------------------------------------------------------------------------------------
# HTTP endpoint

Fetch = Callable[..., tuple[int, dict[str, str], bytes]]


class Source:
    """What the server's collect callback returns, changeable by a test."""

    def __init__(self) -> None:
        self.samples: list[MetricSample] = [
            counter("served", 3, {"path": 'a"b'}, help="Requests served."),
            gauge("temperature", -1.5),
        ]
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> list[MetricSample]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.samples


def _serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    # A short poll interval only makes shutdown() return sooner.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    return thread


@pytest.fixture
def served() -> Iterator[tuple[Source, Fetch]]:
    source = Source()
    server = make_server(source)
    assert server.server_address[0] == "127.0.0.1"
    port = server.server_address[1]
    assert port != 0
    thread = _serve_in_thread(server)
    thread.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(
        path: str = "/metrics", method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {}
        )
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()

    try:
        yield source, fetch
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_server_prometheus_text(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    status, headers, body = fetch()
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_PROMETHEUS
    assert headers["Content-Length"] == str(len(body))
    assert "Accept" in headers["Vary"]
    assert body == render_prometheus(source.samples)
    parsed = parse_prometheus(body)
    assert parsed["served"] == (
        "counter",
        "Requests served.",
        {("served_total", (("path", 'a"b'),)): 3},
    )
    assert parsed["temperature"] == ("gauge", "", {("temperature", ()): -1.5})


def test_server_openmetrics(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    status, headers, body = fetch(headers={"Accept": PROMETHEUS_2_ACCEPT})
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_OPENMETRICS
    assert body.endswith(b"# EOF\n")
    assert parse_openmetrics(body) == parse_prometheus(render_prometheus(source.samples))


def test_server_root_and_query(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    for path in ("/", "/metrics?name[]=x"):
        status, _, body = fetch(path)
        assert status == 200
        assert body == render_prometheus(source.samples)


def test_server_head(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    status, headers, body = fetch(method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(len(render_prometheus(source.samples)))


def test_server_not_found(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    for path in ("/metricsx", "/metrics/", "/favicon.ico", "/../metrics/x"):
        status, headers, body = fetch(path)
        assert status == 404, path
        assert headers["Content-Type"].startswith("text/plain")
        assert b"/metrics" in body
    assert source.calls == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_server_method_not_allowed(served: tuple[Source, Fetch], method: str) -> None:
    source, fetch = served
    status, headers, _ = fetch(method=method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert source.calls == 0


def test_server_collect_error(
    served: tuple[Source, Fetch],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    source, fetch = served
    source.error = RuntimeError("secret detail")
    with caplog.at_level(logging.ERROR, logger="percpu._exposition"):
        status, headers, body = fetch()
    assert status == 500
    assert headers["Content-Type"].startswith("text/plain")
    assert b"secret" not in body
    assert 0 < len(body) < 100
    assert any(
        record.exc_info is not None and "secret detail" in str(record.exc_info[1])
        for record in caplog.records
    )
    # The server keeps serving once collect works again.
    source.error = None
    assert fetch()[0] == 200
    assert capfd.readouterr().err == ""


def test_server_render_error_is_500(served: tuple[Source, Fetch]) -> None:
    source, fetch = served
    source.samples = [counter("x", 1), gauge("x", 1)]
    assert fetch()[0] == 500


def test_server_writes_nothing_to_stderr(
    served: tuple[Source, Fetch], capfd: pytest.CaptureFixture[str]
) -> None:
    _, fetch = served
    fetch()
    fetch("/nope")
    fetch(method="POST")
    fetch(method="HEAD")
    assert capfd.readouterr().err == ""


def test_server_client_disconnect_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    server = make_server(lambda: [gauge("g", 1)])
    thread = _serve_in_thread(server)
    thread.start()
    try:
        for payload in (b"", b"GET /metrics HTTP/1.0\r\n", b"garbage\r\n\r\n"):
            with socket.create_connection(
                ("127.0.0.1", server.server_address[1]), timeout=10
            ) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert capfd.readouterr().err == ""


def test_server_ipv6_loopback() -> None:
    try:
        server = make_server(lambda: [gauge("g", 1)], host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    thread = _serve_in_thread(server)
    thread.start()
    try:
        port = server.server_address[1]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://[::1]:{port}/metrics", timeout=10) as response:
            assert response.read() == b"# TYPE g gauge\ng 1\n"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# A domain's snapshot and health figures as samples


@dataclasses.dataclass(frozen=True)
class Value:
    """Stands for percpu.MetricValue (what Domain.snapshot returns)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    kind: str
    value: int | float
    count: int = 0


def _values_of(samples: list[MetricSample]) -> dict[tuple[str, str, tuple[tuple[str, str], ...]],
                                                    MetricSample]:
    return {(s.name, s.kind, s.labels): s for s in samples}


def test_domain_samples_maps_each_kind() -> None:
    samples = domain_samples([
        Value("requests", (("route", "/"),), "counter", 5),
        Value("temperature", (), "gauge", -3),
        Value("latency", (), "summary", 1.5, 4),
    ])
    by_key = _values_of(samples)
    assert by_key[("requests", "counter", (("route", "/"),))].value == 5
    assert by_key[("temperature", "gauge", ())].value == -3
    lat = by_key[("latency", "summary", ())]
    assert (lat.count, lat.sum) == (4, 1.5)
    assert by_key[(DROPPED_SERIES, "gauge", ())].value == 0
    prom, om = parse_both(samples)
    assert prom["latency"][2] == {("latency_count", ()): 4, ("latency_sum", ()): 1.5}
    assert om["requests"][2] == {("requests_total", (("route", "/"),)): 5}


def test_domain_samples_drops_what_the_formats_cannot_carry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = [
        Value("ok", (), "counter", 1),
        Value("wrapped", (), "counter", -1),  # a counter below zero
        Value("refunds", (), "summary", -2.5, 1),  # a summary with a negative sum
        Value("a", (), "counter", 1),
        Value("a_total", (), "counter", 2),  # the same series as `a`
        Value("a_total", (), "gauge", 3),  # the name `a` already writes
        Value("b", (("x", "1"),), "counter", 1),
        Value("b", (("x", "2"),), "gauge", 1),  # family `b` as two kinds
        Value("s", (), "summary", 1.0, 1),
        Value("s_count", (), "gauge", 9),  # a name the summary `s` writes
    ]
    with caplog.at_level(logging.WARNING, logger="percpu._exposition"):
        samples = domain_samples(values)
    kept = {(s.name, s.kind, s.labels) for s in samples}
    assert kept == {
        ("ok", "counter", ()), ("a", "counter", ()), ("b", "counter", (("x", "1"),)),
        ("s", "summary", ()), (DROPPED_SERIES, "gauge", ()),
    }
    assert _values_of(samples)[(DROPPED_SERIES, "gauge", ())].value == 6
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 6
    prom, om = parse_both(samples)  # what is left renders and parses
    assert prom["a"][2] == {("a_total", ()): 1}
    assert om[DROPPED_SERIES][2] == {(DROPPED_SERIES, ()): 6}


def test_domain_samples_user_metrics_win_over_health() -> None:
    health = [MetricSample("percpu_domain_pages", "gauge", (), 4, help="Pages.")]
    samples = domain_samples([Value("percpu_domain_pages", (), "counter", 1)], health)
    assert _values_of(samples)[("percpu_domain_pages", "counter", ())].value == 1
    assert ("percpu_domain_pages", "gauge", ()) not in _values_of(samples)
    assert _values_of(samples)[(DROPPED_SERIES, "gauge", ())].value == 1


def test_health_samples_skip_missing_figures() -> None:
    @dataclasses.dataclass
    class Stats:
        holders_now: int = 2
        pages: int = 12
        bytes_per_metric: float = 4096.0
        fresh_ids: int = 3
        reclaimed_ids: int = 1

    @dataclasses.dataclass
    class ArenaFigures:
        failed_allocations: int = 7

    samples = health_samples(Stats(), ArenaFigures())
    names = {(s.name, s.labels): s.value for s in samples}
    assert names == {
        ("percpu_domain_ids_in_use", ()): 2,
        ("percpu_domain_pages", ()): 12,
        ("percpu_domain_bytes_per_metric", ()): 4096.0,
        ("percpu_domain_leases", (("path", "fresh"),)): 3,
        ("percpu_domain_leases", (("path", "reclaimed"),)): 1,
        ("percpu_domain_arena_failed_allocations", ()): 7,
    }
    assert all(s.help for s in samples)
    prom, om = parse_both(samples)
    assert om["percpu_domain_leases"][0] == "counter"
    assert prom["percpu_domain_arena_failed_allocations"][2] == {
        ("percpu_domain_arena_failed_allocations_total", ()): 7}


def test_exposition_of_a_real_domain() -> None:
    import percpu

    with percpu.Domain(1 << 20, max_vcpus=2, lock=False) as d:
        d.counter("requests", {"path": 'a"b\\c\nd'}).add(41)
        d.counter("requests", {"path": "/"}).inc()
        d.gauge("queue_depth").sub(4)
        s = d.summary("request_seconds")
        s.observe(0.5)
        s.observe(2)
        body, content_type = exposition(d)
        assert content_type == CONTENT_TYPE_PROMETHEUS
        prom = parse_prometheus(body)
        body, content_type = exposition(d, "application/openmetrics-text; version=1.0.0")
        assert content_type == CONTENT_TYPE_OPENMETRICS
        assert body.endswith(b"# EOF\n")
        om = parse_openmetrics(body)
        bare, _ = exposition(d, health=False)
        stats = d.stats()
    for parsed in (prom, om):
        assert parsed["requests"][0] == "counter"
        assert parsed["requests"][2] == {
            ("requests_total", (("path", 'a"b\\c\nd'),)): 41,
            ("requests_total", (("path", "/"),)): 1,
        }
        assert parsed["queue_depth"][2] == {("queue_depth", ()): -4}
        assert parsed["request_seconds"][0] == "summary"
        assert parsed["request_seconds"][2] == {
            ("request_seconds_count", ()): 2, ("request_seconds_sum", ()): 2.5}
        assert parsed["percpu_domain_metrics"][2] == {("percpu_domain_metrics", ()): 4}
        assert parsed["percpu_domain_pages"][2] == {("percpu_domain_pages", ()): stats.pages}
    assert set(parse_prometheus(bare)) == {
        "requests", "queue_depth", "request_seconds", DROPPED_SERIES}
