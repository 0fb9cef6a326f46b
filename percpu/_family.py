"""What a metric name (a family) carries besides its series: kind, help text, unit, buckets.

Prometheus wants one kind per family, one help text and, for a histogram, one set of bucket
bounds for every series. The registry keeps one *family entry* per name (``_registry``); its
block holds, after the family key, the bytes this module writes: the first registration of a
name decides them for every process, and a later registration of the name as another kind,
or as a histogram with other bounds, is refused.

Invariant: :func:`decode` reads shared, hence untrusted, bytes: it returns a
:class:`FamilyMeta` only for bytes :func:`encode` could have written (a known kind, UTF-8
help, a valid unit, strictly increasing finite bounds within ``MAX_BUCKETS``), else raises
``BadDomainFile``. The module is pure.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from dataclasses import dataclass

from ._errors import InvalidArgument, InvalidType, damaged
from ._layout import GAUGE_MODES, KIND_HISTOGRAM, KIND_NAMES, MAX_BUCKETS
from ._names import validate_metric_name

#: prometheus_client's default histogram buckets (the +Inf bucket is implicit).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0)
MAX_HELP_BYTES = 64 * 1024
_FORMAT = 1
_UNIT_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_HEAD = struct.Struct("<BBIBB")  # format, kind, help bytes, unit bytes, buckets


@dataclass(frozen=True)
class FamilyMeta:
    """A family's kind (a ``KIND_*``, the gauge mode included), help text, unit and, for a
    histogram, its finite bucket bounds in increasing order."""

    kind: int
    documentation: str = ""
    unit: str = ""
    buckets: tuple[float, ...] = ()


def check_documentation(documentation: object) -> str:
    """``documentation`` if it is a help text (a str of at most 64 KiB in UTF-8), else raise."""
    if not isinstance(documentation, str):
        raise InvalidType(f"documentation must be a str, got {type(documentation).__name__}")
    if len(documentation.encode("utf-8", "surrogatepass")) > MAX_HELP_BYTES:
        raise InvalidArgument(f"documentation is longer than {MAX_HELP_BYTES} bytes")
    try:
        documentation.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("documentation must be valid Unicode (no lone surrogates)") from None
    return documentation


def check_unit(name: str, unit: object) -> str:
    """``unit`` if it is empty or a valid unit that ends the name (OpenMetrics' rule: a
    family ``request_seconds`` has the unit ``seconds``), else raise."""
    if not isinstance(unit, str):
        raise InvalidType(f"unit must be a str, got {type(unit).__name__}")
    if not unit:
        return unit
    if len(unit) > 64 or _UNIT_RE.fullmatch(unit) is None:
        raise InvalidArgument(f"unit {unit!r} is not valid; accepted: [a-zA-Z_:][a-zA-Z0-9_:]*, "
                              "at most 64 characters")
    if not name.endswith("_" + unit):
        raise InvalidArgument(f"metric {name!r} has the unit {unit!r}, so its name must end "
                              f"with '_{unit}' (OpenMetrics); name it {name}_{unit}")
    return unit


def check_buckets(buckets: object) -> tuple[float, ...]:
    """Finite bucket bounds, strictly increasing (a final ``inf`` is dropped: the +Inf bucket
    is always there), 1 to ``MAX_BUCKETS`` of them; ``None``: the default ones."""
    if buckets is None:
        return DEFAULT_BUCKETS
    if isinstance(buckets, str | bytes) or not hasattr(buckets, "__iter__"):
        raise InvalidType(f"buckets must be a sequence of numbers, got {type(buckets).__name__}")
    out: list[float] = []
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int | float):
            raise InvalidType(f"a bucket bound must be an int or a float, got {b!r}")
        out.append(float(b))
    if out and out[-1] == math.inf:
        out.pop()
    if not 1 <= len(out) <= MAX_BUCKETS:
        raise InvalidArgument(f"a histogram takes 1 to {MAX_BUCKETS} finite bucket bounds, "
                              f"got {len(out)}")
    if any(not math.isfinite(b) for b in out) or any(a >= b for a, b in itertools.pairwise(out)):
        raise InvalidArgument(f"bucket bounds must be finite and strictly increasing: {out}")
    return tuple(out)


def gauge_kind(mode: object) -> int:
    """The kind of a gauge of ``mode`` (one of ``GAUGE_MODES``), else raise."""
    if not isinstance(mode, str):
        raise InvalidType(f"mode must be a str, got {type(mode).__name__}")
    kind = GAUGE_MODES.get(mode)
    if kind is None:
        raise InvalidArgument(f"gauge mode {mode!r} is not known; accepted: "
                              f"{', '.join(sorted(GAUGE_MODES))}")
    return kind


def family(name: object, kind: int, documentation: object, unit: object,
           buckets: tuple[float, ...] = ()) -> FamilyMeta:
    """The checked :class:`FamilyMeta` of a registration of ``name`` (validated too)."""
    checked = validate_metric_name(name)
    return FamilyMeta(kind, check_documentation(documentation), check_unit(checked, unit),
                      buckets)


def encode(meta: FamilyMeta) -> bytes:
    """The bytes of ``meta`` (checked by the caller)."""
    text = meta.documentation.encode("utf-8")
    unit = meta.unit.encode("ascii")
    return (_HEAD.pack(_FORMAT, meta.kind, len(text), len(unit), len(meta.buckets)) + text
            + unit + struct.pack(f"<{len(meta.buckets)}d", *meta.buckets))


def decode(data: bytes) -> FamilyMeta:
    """The :class:`FamilyMeta` of ``data`` (untrusted: see the module docstring)."""
    if len(data) < _HEAD.size:
        raise damaged("a family's metadata is truncated")
    fmt, kind, n_text, n_unit, n_buckets = _HEAD.unpack_from(data)
    end = _HEAD.size + n_text + n_unit + 8 * n_buckets
    if fmt != _FORMAT or kind not in KIND_NAMES or end != len(data) \
            or n_buckets > MAX_BUCKETS or (n_buckets == 0) == (kind == KIND_HISTOGRAM):
        raise damaged("a family's metadata does not decode")
    at = _HEAD.size
    try:
        text = data[at : at + n_text].decode("utf-8")
        unit = data[at + n_text : at + n_text + n_unit].decode("ascii")
    except UnicodeDecodeError:
        raise damaged("a family's help text or unit does not decode") from None
    buckets = struct.unpack_from(f"<{n_buckets}d", data, at + n_text + n_unit)
    if (unit and _UNIT_RE.fullmatch(unit) is None) or any(
            not math.isfinite(b) for b in buckets) or any(
            a >= b for a, b in itertools.pairwise(buckets)):
        raise damaged("a family's unit or bucket bounds are not valid")
    return FamilyMeta(kind, text, unit, tuple(buckets))
