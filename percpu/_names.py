"""Validation of metric names and labels, and their canonical byte encoding.

Guarantees:

* :func:`validate_metric_name` and :func:`validate_labels` accept exactly the names and labels
  that the Prometheus text format and OpenMetrics 1.0 can carry without quoting: a metric name
  matches ``[a-zA-Z_:][a-zA-Z0-9_:]*`` (1 to 200 characters), a label name matches
  ``[a-zA-Z_][a-zA-Z0-9_]*`` (1 to 200 characters) and does not start with ``__`` (reserved by
  Prometheus), a label value is any string of at most 1024 characters that UTF-8 can encode
  (no lone surrogates). Anything else raises :class:`~percpu._errors.InvalidType` (wrong type)
  or :class:`~percpu._errors.InvalidArgument` (wrong value); the message names the value given
  and what is accepted.
* :func:`encode_key` maps a name and its labels to one canonical byte string: two calls give
  equal bytes exactly when the name and the set of labels are equal (label order in the input
  does not matter).
* :func:`decode_key` is the exact inverse of :func:`encode_key` and treats its input as
  untrusted (it comes from shared memory that another process may have written): it parses
  with explicit bounds checks, re-validates every name and value, accepts only the canonical
  encoding (so ``encode_key(*decode_key(b)) == b`` for every ``b`` it accepts) and raises
  :class:`~percpu._errors.InvalidArgument` -- a :class:`ValueError` -- on anything else. It
  never evaluates or unpickles anything.

Key layout (all integers big-endian, unsigned)::

    u8   format tag, always 0x01
    u8   length of the metric name in bytes (1..200), then the name (ASCII)
    u16  number of labels, then for each label, sorted by name, names strictly increasing:
         u8  length of the label name in bytes (1..200), then the name (ASCII)
         u16 length of the label value in bytes (0..4096), then the value (UTF-8)

Nothing may follow the last label.

Speed (a new scraper decodes every key of a domain once): names and label names found valid
are remembered, as ``str`` (:func:`validate_metric_name` and the label checks answer a known
one with one set lookup) and as the bytes they were decoded from (:func:`decode_key` turns a
known name's bytes into its ``str`` with one dict lookup). Only exact ``str`` and ``bytes``
objects are remembered, so equality is content equality, and the tables are bounded (emptied
when full). :func:`decode_key` parses the common case in one pass with these tables and
``str.isascii``; anything it does not accept on that pass goes to the full parser, which
accepts exactly the same keys and says what is wrong with the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from ._errors import InvalidArgument, InvalidType

__all__ = [
    "MAX_LABEL_NAME_LEN",
    "MAX_LABEL_VALUE_LEN",
    "MAX_METRIC_NAME_LEN",
    "Labels",
    "canonical_labels",
    "decode_key",
    "encode_key",
    "validate_labels",
    "validate_metric_name",
]

MAX_METRIC_NAME_LEN = 200
"""Longest metric name accepted, in characters (all ASCII, so also in bytes)."""

MAX_LABEL_NAME_LEN = 200
"""Longest label name accepted, in characters (all ASCII, so also in bytes)."""

MAX_LABEL_VALUE_LEN = 1024
"""Longest label value accepted, in characters (at most four UTF-8 bytes each)."""

_MAX_LABELS_IN_KEY = 0xFFFF
_KEY_FORMAT = 0x01

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[tuple[str, str], ...]

_KNOWN_MAX = 1 << 16  # entries per table of names found valid (emptied when full)
_good_metric_names: set[str] = set()
_good_label_names: set[str] = set()
_raw_metric_names: dict[bytes, str] = {}  # the bytes of a valid name -> the name
_raw_label_names: dict[bytes, str] = {}


def _remember(table: set[str] | dict[bytes, str], key: str | bytes, value: str) -> None:
    if len(table) >= _KNOWN_MAX:
        table.clear()
    if isinstance(table, set):
        table.add(value)
    else:
        assert isinstance(key, bytes)
        table[key] = value


def _show(value: object, limit: int = 80) -> str:
    """A repr of ``value`` short enough for an error message."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def validate_metric_name(name: object) -> str:
    """Return ``name`` if it is a usable metric name, else raise.

    Accepted: a ``str`` of 1 to 200 characters matching ``[a-zA-Z_:][a-zA-Z0-9_:]*``.
    Raises :class:`InvalidType` for a non-``str`` and :class:`InvalidArgument` otherwise.
    """
    if name.__class__ is str and name in _good_metric_names:
        return name  # an exact str found valid before
    if not isinstance(name, str):
        raise InvalidType(f"metric name must be a str, got {type(name).__name__} {_show(name)}")
    if not name:
        raise InvalidArgument(
            "metric name must not be empty; accepted: 1 to "
            f"{MAX_METRIC_NAME_LEN} characters matching [a-zA-Z_:][a-zA-Z0-9_:]*"
        )
    if len(name) > MAX_METRIC_NAME_LEN:
        raise InvalidArgument(
            f"metric name {_show(name)} is {len(name)} characters long; "
            f"accepted: at most {MAX_METRIC_NAME_LEN}"
        )
    if _METRIC_NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"metric name {_show(name)} is not valid; accepted: "
            "[a-zA-Z_:][a-zA-Z0-9_:]* (ASCII letters, digits, '_' and ':', "
            "not starting with a digit)"
        )
    if name.__class__ is str:
        _remember(_good_metric_names, name, name)
    return name


def _validate_label_name(name: object) -> str:
    if name.__class__ is str and name in _good_label_names:
        return name  # an exact str found valid before
    if not isinstance(name, str):
        raise InvalidType(f"label name must be a str, got {type(name).__name__} {_show(name)}")
    if not name or len(name) > MAX_LABEL_NAME_LEN:
        raise InvalidArgument(
            f"label name {_show(name)} is {len(name)} characters long; "
            f"accepted: 1 to {MAX_LABEL_NAME_LEN}"
        )
    if _LABEL_NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"label name {_show(name)} is not valid; accepted: [a-zA-Z_][a-zA-Z0-9_]* "
            "(ASCII letters, digits and '_', not starting with a digit)"
        )
    if name.startswith("__"):
        raise InvalidArgument(
            f"label name {_show(name)} starts with '__', which Prometheus reserves; "
            "accepted: a name not starting with '__'"
        )
    if name.__class__ is str:
        _remember(_good_label_names, name, name)
    return name


def _validate_label_value(name: str, value: object) -> str:
    if value.__class__ is str and len(value) <= MAX_LABEL_VALUE_LEN and value.isascii():
        return value  # ASCII: UTF-8 encodes it
    if not isinstance(value, str):
        raise InvalidType(
            f"value of label {name!r} must be a str, got {type(value).__name__} {_show(value)}"
        )
    if len(value) > MAX_LABEL_VALUE_LEN:
        raise InvalidArgument(
            f"value of label {name!r} is {len(value)} characters long ({_show(value)}); "
            f"accepted: at most {MAX_LABEL_VALUE_LEN}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"value of label {name!r} ({_show(value)}) cannot be encoded as UTF-8 "
            "(it holds a lone surrogate); accepted: text UTF-8 can encode"
        ) from None
    return value


def validate_labels(labels: object) -> Labels:
    """Return ``labels`` as a tuple of ``(name, value)`` pairs sorted by name, else raise.

    Accepted: ``None`` (no labels, gives ``()``) or a :class:`~collections.abc.Mapping` from
    label names to label values, both ``str``. A name matches ``[a-zA-Z_][a-zA-Z0-9_]*``, has
    1 to 200 characters and does not start with ``__``; a value has at most 1024 characters
    and can be encoded as UTF-8 (it may be empty and may hold any other character, quotes,
    backslashes and newlines included). Raises :class:`InvalidType` for a wrong type and
    :class:`InvalidArgument` for a wrong value.
    """
    if labels is None:
        return ()
    if not isinstance(labels, Mapping):
        raise InvalidType(
            "labels must be None or a Mapping[str, str], "
            f"got {type(labels).__name__} {_show(labels)}"
        )
    pairs: list[tuple[str, str]] = []
    for name, value in labels.items():
        checked_name = _validate_label_name(name)
        pairs.append((checked_name, _validate_label_value(checked_name, value)))
    pairs.sort()
    return tuple(pairs)


def canonical_labels(labels: object) -> Labels:
    """Like :func:`validate_labels`, but also accepts a tuple or list of ``(name, value)``
    pairs (such as :func:`validate_labels` returns) in any order, names distinct.

    Returns the pairs validated and sorted by name.
    """
    if labels.__class__ is tuple:
        fast = _sorted_pairs(labels)
        if fast is not None:
            return fast
    if isinstance(labels, tuple | list):
        as_dict: dict[str, object] = {}
        for pair in labels:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidType(f"each label must be a (name, value) tuple, got {_show(pair)}")
            name = _validate_label_name(pair[0])
            if name in as_dict:
                raise InvalidArgument(
                    f"label name {name!r} is given twice; accepted: distinct names"
                )
            as_dict[name] = pair[1]
        return validate_labels(as_dict)
    return validate_labels(labels)


def _sorted_pairs(labels: tuple[object, ...]) -> Labels | None:
    """``labels`` itself when it is already what :func:`validate_labels` returns (exact
    tuples of valid names and values, names strictly increasing); None to take the long way
    (which also says what is wrong)."""
    previous = ""
    for pair in labels:
        if pair.__class__ is not tuple or len(pair) != 2:
            return None
        name, value = pair
        if (name.__class__ is not str or name not in _good_label_names or name <= previous
                or value.__class__ is not str or len(value) > MAX_LABEL_VALUE_LEN
                or not value.isascii()):
            return None
        previous = name
    return labels  # type: ignore[return-value]


_FAMILY_FORMAT = 0x02  # a family key's first byte: never a series key's (``_KEY_FORMAT``)


def family_key(name: str) -> bytes:
    """The registry key of the metric family ``name`` (already validated): distinct from
    every series key, never decoded as one."""
    raw = name.encode("ascii")
    return bytes((_FAMILY_FORMAT, len(raw))) + raw


def encode_key(name: object, labels: object = None) -> bytes:
    """Encode a metric name and its labels as one canonical byte string (layout above).

    ``labels`` is anything :func:`validate_labels` accepts, or a tuple/list of
    ``(name, value)`` pairs such as :func:`validate_labels` returns (in any order, names
    distinct). Everything is validated first; invalid input raises as the validators do.
    """
    checked_name = validate_metric_name(name)
    pairs = canonical_labels(labels)
    if len(pairs) > _MAX_LABELS_IN_KEY:
        raise InvalidArgument(f"{len(pairs)} labels given; accepted: at most {_MAX_LABELS_IN_KEY}")
    out = bytearray()
    out.append(_KEY_FORMAT)
    raw_name = checked_name.encode("ascii")
    out.append(len(raw_name))
    out += raw_name
    out += len(pairs).to_bytes(2, "big")
    for label_name, label_value in pairs:
        raw_label = label_name.encode("ascii")
        raw_value = label_value.encode("utf-8")
        out.append(len(raw_label))
        out += raw_label
        out += len(raw_value).to_bytes(2, "big")
        out += raw_value
    return bytes(out)


class _Reader:
    """Bounds-checked sequential reader over an untrusted byte string."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(
            f"malformed metric key {_show(self._data)}: {what} at byte {self._pos}; "
            "accepted: bytes produced by encode_key"
        )

    def take(self, count: int, what: str) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise self.error(f"{what} needs {count} bytes but {len(self._data) - self._pos} remain")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise self.error(f"{len(self._data) - self._pos} trailing bytes")

    def reject(self, what: str, cause: Exception) -> InvalidArgument:
        return self.error(f"{what} ({cause})")


def decode_key(data: bytes | bytearray | memoryview) -> tuple[str, Labels]:
    """Decode and validate bytes made by :func:`encode_key`; return ``(name, labels)``.

    ``data`` is untrusted. Raises :class:`InvalidType` if it is not bytes-like and
    :class:`InvalidArgument` (a ``ValueError``) if it is anything but a canonical key.
    """
    if data.__class__ is not bytes:
        if isinstance(data, memoryview | bytearray):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidType(
                f"metric key must be bytes, got {type(data).__name__} {_show(data)}")
        data = bytes(data)  # an exact bytes object: the tables compare by content
    fast = _decode_fast(data)
    return fast if fast is not None else _decode_full(data)


def _decode_fast(data: bytes) -> tuple[str, Labels] | None:
    """The one-pass decoder: the key's (name, labels) when every part is one it can vouch
    for (names found valid before or now, ASCII or UTF-8 values within their limit, label
    names strictly increasing, nothing left over); None to let the full parser decide. It
    accepts no key that the full parser refuses."""
    n = len(data)
    if n < 4 or data[0] != _KEY_FORMAT:
        return None
    pos = 2 + data[1]
    name = _raw_metric_names.get(data[2:pos])
    if name is None:
        name = _learn(data[2:pos], validate_metric_name, _raw_metric_names)
        if name is None:
            return None
    if pos + 2 > n:
        return None
    count = data[pos] << 8 | data[pos + 1]
    pos += 2
    pairs = []
    previous = ""
    for _ in range(count):
        if pos >= n:
            return None
        end = pos + 1 + data[pos]
        raw = data[pos + 1 : end]
        label = _raw_label_names.get(raw)
        if label is None:
            label = _learn(raw, _validate_label_name, _raw_label_names)
            if label is None:
                return None
        if label <= previous or end + 2 > n:
            return None
        pos = end + 2 + (data[end] << 8 | data[end + 1])
        if pos > n:
            return None
        raw = data[end + 2 : pos]
        if raw.isascii():
            value = raw.decode("ascii")
        else:
            try:
                value = raw.decode("utf-8")  # strict: never a lone surrogate
            except UnicodeDecodeError:
                return None
        if len(value) > MAX_LABEL_VALUE_LEN:
            return None
        pairs.append((label, value))
        previous = label
    if pos != n:
        return None
    return name, tuple(pairs)


def _learn(raw: bytes, check: Callable[[object], str], table: dict[bytes, str]) -> str | None:
    """The name ``raw`` decodes to when ``check`` accepts it (remembered), else None."""
    if not raw.isascii():
        return None
    try:
        name = check(raw.decode("ascii"))
    except InvalidArgument:
        return None
    _remember(table, raw, name)
    return name


def _decode_full(data: bytes) -> tuple[str, Labels]:
    """The full parser: every bound checked in turn, an error that says where and why."""
    reader = _Reader(data)
    tag = reader.uint(1, "format tag")
    if tag != _KEY_FORMAT:
        raise reader.error(f"format tag {tag:#04x} (expected {_KEY_FORMAT:#04x})")

    name_len = reader.uint(1, "metric name length")
    raw_name = reader.take(name_len, "metric name")
    try:
        name = validate_metric_name(raw_name.decode("ascii"))
    except (UnicodeDecodeError, InvalidArgument) as exc:
        raise reader.reject("invalid metric name", exc) from None

    count = reader.uint(2, "label count")
    pairs: list[tuple[str, str]] = []
    previous = ""
    for _ in range(count):
        label_len = reader.uint(1, "label name length")
        raw_label = reader.take(label_len, "label name")
        value_len = reader.uint(2, "label value length")
        raw_value = reader.take(value_len, "label value")
        try:
            label = _validate_label_name(raw_label.decode("ascii"))
            value = _validate_label_value(label, raw_value.decode("utf-8"))
        except (UnicodeDecodeError, InvalidArgument) as exc:
            raise reader.reject("invalid label", exc) from None
        if pairs and label <= previous:
            raise reader.error(
                f"label {label!r} after {previous!r} (names must be strictly increasing)"
            )
        pairs.append((label, value))
        previous = label
    reader.finish()
    return name, tuple(pairs)
