"""The one-pass key decoder and the remembered names (``percpu._names``): they accept exactly
what the full parser and the validators accept, and the first snapshot of a new reader does
a bounded amount of work per metric (counted, not timed).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from percpu import Domain, InvalidArgument, _names
from percpu._names import (
    _decode_fast,
    _decode_full,
    canonical_labels,
    decode_key,
    encode_key,
    validate_metric_name,
)

names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,12}", fullmatch=True)
values = st.text(max_size=30)
labels = st.dictionaries(label_names, values, max_size=4)


def _full_or_error(data: bytes) -> object:
    try:
        return _decode_full(data)
    except InvalidArgument:
        return "refused"


def _agrees(data: bytes) -> None:
    fast = _decode_fast(data)
    full = _full_or_error(data)
    assert fast is None or fast == full  # the fast pass never accepts what the full refuses
    assert (decode_key(data) if full != "refused" else "refused") == full


@settings(max_examples=300, deadline=None)
@given(names, labels, st.randoms(use_true_random=False))
def test_the_fast_decoder_agrees_with_the_full_parser_on_keys_and_their_mutants(
        name: str, labs: dict[str, str], rnd: random.Random) -> None:
    key = encode_key(name, labs)
    assert _decode_fast(key) == _decode_full(key) == (name, tuple(sorted(labs.items())))
    for _ in range(20):
        b = bytearray(key)
        how = rnd.randrange(4)
        if how == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif how == 1:
            del b[rnd.randrange(len(b) + 1):]
        elif how == 2:
            b.insert(rnd.randrange(len(b) + 1), rnd.randrange(256))
        else:  # a length byte or a value byte set to one that changes the key's meaning
            b[rnd.randrange(len(b))] = rnd.choice((0, 1, 0x5F, 0x80, 0xED, 0xFF))
        _agrees(bytes(b))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_the_fast_decoder_agrees_on_random_bytes(data: bytes) -> None:
    _agrees(data)
    _agrees(b"\x01" + data)


@pytest.mark.parametrize("key", [
    encode_key("a", {"x": "v"})[:-1] + b"\xed",  # a cut UTF-8 sequence
    b"\x01\x01a\x00\x01\x02__\x00\x00",  # a reserved label name
    b"\x01\x01a\x00\x02\x01b\x00\x00\x01a\x00\x00",  # label names out of order
    b"\x01\x01a\x00\x01\x01b\x00\x03\xed\xa0\x80",  # an encoded lone surrogate
    b"\x01\x01a\x00\x01\x01b" + (1025).to_bytes(2, "big") + b"v" * 1025,  # a value too long
    b"\x01\x00\x00\x00",  # an empty name
    b"\x01\x01" + b"9" + b"\x00\x00",  # a name that starts with a digit
])
def test_keys_the_fast_decoder_leaves_to_the_full_parser(key: bytes) -> None:
    assert _decode_fast(key) is None
    with pytest.raises(InvalidArgument):
        decode_key(key)


def test_remembered_names_are_exact_strs_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Sly(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    validate_metric_name("known_name")
    with pytest.raises(InvalidArgument):
        validate_metric_name(Sly("not valid!"))  # a str subclass is checked in full
    monkeypatch.setattr(_names, "_KNOWN_MAX", 4)
    for i in range(10):
        validate_metric_name(f"n{i}")
        assert len(_names._good_metric_names) <= 4
    assert canonical_labels((("a", "1"), ("b", "2"))) == (("a", "1"), ("b", "2"))
    with pytest.raises(InvalidArgument):
        canonical_labels((("b", "1"), ("b", "2")))
    assert canonical_labels((("b", "2"), ("a", "1"))) == (("a", "1"), ("b", "2"))


def test_a_new_readers_first_snapshot_decodes_each_key_once(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    n = 3000
    with Domain(1 << 22, max_vcpus=2) as d:
        for i in range(n):
            d.counter(f"req_{i % 7}_total", {"path": f"/p/{i}", "code": "200"}).inc()
        calls = {"fast": 0, "full": 0}
        real_fast, real_full = _names._decode_fast, _names._decode_full

        def fast(data: bytes) -> object:
            calls["fast"] += 1
            return real_fast(data)

        def full(data: bytes) -> object:
            calls["full"] += 1
            return real_full(data)

        monkeypatch.setattr(_names, "_decode_fast", fast)
        monkeypatch.setattr(_names, "_decode_full", full)
        d._snapshots._decoded.clear()
        d._snapshots._plan = None
        first = d.snapshot()
        assert calls == {"fast": n, "full": 0}  # every key on the one pass, none twice
        assert d.snapshot() == first and calls == {"fast": n, "full": 0}  # later: none
