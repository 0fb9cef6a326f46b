"""Tests for percpu._names: name/label validation and the canonical registry key encoding."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from percpu._errors import InvalidArgument, InvalidType, PercpuError
from percpu._names import (
    MAX_LABEL_VALUE_LEN,
    MAX_METRIC_NAME_LEN,
    canonical_labels,
    decode_key,
    encode_key,
    validate_labels,
    validate_metric_name,
)

# ------------------------------------------------------------------------------------------
# Strategies

metric_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,40}", fullmatch=True).filter(
    lambda name: not name.startswith("__")
)
label_values = st.text(st.characters(codec="utf-8"), max_size=MAX_LABEL_VALUE_LEN)
label_maps = st.dictionaries(label_names, label_values, max_size=6)


# ------------------------------------------------------------------------------------------
# validate_metric_name


@pytest.mark.parametrize(
    "name",
    ["a", "A", "_", ":", "a:b", "http_requests", "a1_b2:c3", "_:_", "x" * MAX_METRIC_NAME_LEN],
)
def test_metric_name_accepted(name: str) -> None:
    assert validate_metric_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "1abc",
        "a-b",
        "a b",
        "a.b",
        "é",
        "abc\n",
        "\nabc",
        "a\x00",
        "a{b}",
        "x" * (MAX_METRIC_NAME_LEN + 1),
    ],
)
def test_metric_name_rejected_value(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_metric_name(name)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PercpuError)
    # The message names the value (possibly shortened) and what is accepted.
    assert repr(name)[:20] in str(info.value)


def test_metric_name_empty() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        validate_metric_name("")


def test_metric_name_message_says_what_is_accepted() -> None:
    with pytest.raises(InvalidArgument, match=r"\[a-zA-Z_:\]\[a-zA-Z0-9_:\]\*"):
        validate_metric_name("9lives")
    with pytest.raises(InvalidArgument, match="at most 200"):
        validate_metric_name("a" * 201)


@pytest.mark.parametrize("name", [None, b"abc", 1, ["a"], 1.5])
def test_metric_name_rejected_type(name: object) -> None:
    with pytest.raises(InvalidType) as info:
        validate_metric_name(name)
    assert isinstance(info.value, TypeError)
    assert type(name).__name__ in str(info.value)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_metric_name("-" * 100_000)
    assert len(str(info.value)) < 400


# ------------------------------------------------------------------------------------------
# validate_labels


def test_labels_none_and_empty() -> None:
    assert validate_labels(None) == ()
    assert validate_labels({}) == ()


def test_labels_sorted_by_name() -> None:
    labels = {"zone": "z", "app": "a", "_x": "", "Method": "GET"}
    assert validate_labels(labels) == (
        ("Method", "GET"),
        ("_x", ""),
        ("app", "a"),
        ("zone", "z"),
    )


def test_labels_any_mapping() -> None:
    proxy = types.MappingProxyType({"b": "2", "a": "1"})
    assert validate_labels(proxy) == (("a", "1"), ("b", "2"))


@pytest.mark.parametrize(
    "value",
    ["", 'say "hi"', "back\\slash", "new\nline", "tab\tcr\r", "ünïcödé ✓ 𝄞", "\x00", '}{,=\\"'],
)
def test_label_values_any_text(value: str) -> None:
    assert validate_labels({"v": value}) == (("v", value),)


def test_label_value_length_limit() -> None:
    longest = "é" * MAX_LABEL_VALUE_LEN
    assert validate_labels({"v": longest}) == (("v", longest),)
    with pytest.raises(InvalidArgument, match="at most 1024"):
        validate_labels({"v": longest + "x"})


def test_label_value_lone_surrogate_rejected() -> None:
    with pytest.raises(InvalidArgument, match="UTF-8"):
        validate_labels({"v": "a\udc80b"})


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a:b", "é", "a b", "__name__", "__x", "x" * 201])
def test_label_name_rejected(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_labels({name: "v"})
    assert repr(name)[:20] in str(info.value)


def test_label_name_reserved_message() -> None:
    with pytest.raises(InvalidArgument, match="'__'"):
        validate_labels({"__meta": "v"})


@pytest.mark.parametrize("name", ["_", "_a", "a_", "a__b", "A9", "le", "quantile"])
def test_label_name_accepted(name: str) -> None:
    assert validate_labels({name: "v"}) == ((name, "v"),)


@pytest.mark.parametrize(
    "labels",
    [[("a", "b")], "a=b", 5, {"a", "b"}, (("a", "b"),)],
)
def test_labels_must_be_mapping(labels: object) -> None:
    with pytest.raises(InvalidType, match="Mapping"):
        validate_labels(labels)


@pytest.mark.parametrize("labels", [{1: "v"}, {b"a": "v"}, {"a": 1}, {"a": None}, {"a": b"v"}])
def test_label_types(labels: object) -> None:
    with pytest.raises(InvalidType):
        validate_labels(labels)


# ------------------------------------------------------------------------------------------
# canonical_labels


def test_canonical_labels_accepts_pairs_in_any_order() -> None:
    expected = (("a", "1"), ("b", "2"))
    assert canonical_labels([("b", "2"), ("a", "1")]) == expected
    assert canonical_labels((("a", "1"), ("b", "2"))) == expected
    assert canonical_labels({"b": "2", "a": "1"}) == expected
    assert canonical_labels(None) == ()
    assert canonical_labels(()) == ()


def test_canonical_labels_rejects_duplicates_and_bad_pairs() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        canonical_labels([("a", "1"), ("a", "2")])
    with pytest.raises(InvalidType):
        canonical_labels([("a", "1", "x")])
    with pytest.raises(InvalidType):
        canonical_labels(["ab"])
    with pytest.raises(InvalidType):
        canonical_labels([(["unhashable"], "v")])
    with pytest.raises(InvalidArgument):
        canonical_labels([("__a", "1")])


# ------------------------------------------------------------------------------------------
# encode_key / decode_key


def test_key_examples_round_trip() -> None:
    for name, labels in [
        ("a", {}),
        ("http_requests", {"method": "GET", "code": "200"}),
        ("x:y", {"v": 'q"\\\n✓'}),
        ("z" * 200, {"l" * 200: "é" * 1024}),
    ]:
        key = encode_key(name, labels)
        assert isinstance(key, bytes)
        assert decode_key(key) == (name, validate_labels(labels))


def test_key_is_canonical() -> None:
    a = encode_key("m", {"a": "1", "b": "2"})
    b = encode_key("m", {"b": "2", "a": "1"})
    c = encode_key("m", [("b", "2"), ("a", "1")])
    d = encode_key("m", validate_labels({"a": "1", "b": "2"}))
    assert a == b == c == d


def test_key_layout() -> None:
    key = encode_key("ab", {"k": "é"})
    assert key == b"\x01\x02ab\x00\x01\x01k\x00\x02\xc3\xa9"
    assert encode_key("ab") == b"\x01\x02ab\x00\x00"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("ab", {}), ("a", {"b": ""})),
        (("m", {"a": "b,c=d"}), ("m", {"a": "b", "c": "d"})),
        (("m", {"a": ""}), ("m", {})),
        (("m", {"a": "x", "b": ""}), ("m", {"a": "x\x00b"})),
        (("m", {"a": "1"}), ("m", {"a": "1 "})),
    ],
)
def test_key_unambiguous(
    first: tuple[str, dict[str, str]], second: tuple[str, dict[str, str]]
) -> None:
    assert encode_key(*first) != encode_key(*second)


def test_encode_key_validates() -> None:
    with pytest.raises(InvalidArgument):
        encode_key("1bad", {})
    with pytest.raises(InvalidType):
        encode_key(b"name", {})
    with pytest.raises(InvalidArgument):
        encode_key("ok", {"__bad": "v"})
    with pytest.raises(InvalidType):
        encode_key("ok", {"a": 1})


def test_decode_accepts_bytes_like() -> None:
    key = encode_key("m", {"a": "1"})
    assert decode_key(bytearray(key)) == ("m", (("a", "1"),))
    assert decode_key(memoryview(key)) == ("m", (("a", "1"),))


@pytest.mark.parametrize("data", ["text", None, 5, [1, 2]])
def test_decode_rejects_non_bytes(data: object) -> None:
    with pytest.raises(InvalidType):
        decode_key(data)  # type: ignore[arg-type]


def _label(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + len(value).to_bytes(2, "big") + value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "format tag"),
        (b"\x02\x01a\x00\x00", "format tag"),
        (b"\x01", "name length"),
        (b"\x01\x00\x00\x00", "metric name"),
        (b"\x01\x05ab", "needs 5 bytes"),
        (b"\x01\x021a\x00\x00", "metric name"),
        (b"\x01\x02\xc3\xa9\x00\x00", "metric name"),
        (b"\x01\x01a\x00", "label count"),
        (b"\x01\x01a\x00\x00\x00", "trailing"),
        (b"\x01\x01a\x00\x01", "label name length"),
        (b"\x01\x01a\x00\x02" + _label(b"a", b"1"), "label name length"),
        (b"\x01\x01a\x00\x01" + _label(b"__a", b"1"), "invalid label"),
        (b"\x01\x01a\x00\x01" + _label(b"", b"1"), "invalid label"),
        (b"\x01\x01a\x00\x01" + _label(b"a-b", b"1"), "invalid label"),
        (b"\x01\x01a\x00\x01" + _label(b"a", b"\xff"), "invalid label"),
        (b"\x01\x01a\x00\x01" + _label(b"a", b"\xc0\xaf"), "invalid label"),  # overlong '/'
        (b"\x01\x01a\x00\x01" + _label(b"a", b"\xed\xa0\x80"), "invalid label"),  # surrogate
        (b"\x01\x01a\x00\x01" + _label(b"a", b"x" * 1025), "at most 1024"),
        (b"\x01\x01a\x00\x02" + _label(b"b", b"") + _label(b"a", b""), "strictly increasing"),
        (b"\x01\x01a\x00\x02" + _label(b"a", b"1") + _label(b"a", b"2"), "strictly increasing"),
        (b"\x01\x01a\x00\x01\x01a\x00\x05abc", "needs 5 bytes"),
    ],
)
def test_decode_rejects_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as info:
        decode_key(data)
    assert "malformed metric key" in str(info.value)
    assert "encode_key" in str(info.value)


def test_decode_rejects_every_truncation_and_extension() -> None:
    key = encode_key("metric", {"a": "1", "b": "✓✓", "c": ""})
    for end in range(len(key)):
        with pytest.raises(InvalidArgument):
            decode_key(key[:end])
    with pytest.raises(InvalidArgument, match="trailing"):
        decode_key(key + b"\x00")


@given(name=metric_names, labels=label_maps)
def test_round_trip(name: str, labels: dict[str, str]) -> None:
    key = encode_key(name, labels)
    assert decode_key(key) == (name, validate_labels(labels))
    assert encode_key(*decode_key(key)) == key


@given(first=st.tuples(metric_names, label_maps), second=st.tuples(metric_names, label_maps))
def test_distinct_inputs_give_distinct_keys(
    first: tuple[str, dict[str, str]], second: tuple[str, dict[str, str]]
) -> None:
    same = first[0] == second[0] and first[1] == second[1]
    assert (encode_key(*first) == encode_key(*second)) == same


def _decode_or_none(data: bytes) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """Decode ``data``; only InvalidArgument may escape, and what decodes is canonical."""
    try:
        decoded = decode_key(data)
    except InvalidArgument:
        return None
    assert encode_key(*decoded) == data
    return decoded


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_decode_arbitrary_bytes_only_raises_value_error(data: bytes) -> None:
    _decode_or_none(data)
    _decode_or_none(b"\x01" + data)


@settings(max_examples=300)
@given(
    name=metric_names,
    labels=label_maps,
    position=st.integers(min_value=0),
    byte=st.integers(min_value=0, max_value=255),
)
def test_decode_corrupted_keys(name: str, labels: dict[str, str], position: int, byte: int) -> None:
    key = bytearray(encode_key(name, labels))
    key[position % len(key)] = byte
    _decode_or_none(bytes(key))
    _decode_or_none(bytes(key[: position % len(key)]))
    _decode_or_none(bytes(key) + bytes([byte]))
