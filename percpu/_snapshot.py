"""Reading every metric at once: the per-metric plan of a snapshot and its values.

Invariant: a snapshot's values are those of the registry entries it was planned from; the
caller (``Domain.snapshot``) keeps a result only if the registry generation and the move
batch are unchanged across the read, and reads under the domain lock after a few tries, so a
metric removed meanwhile (its slot reused) is never reported with another's value.

The plan (pageset, word, decoded name and labels of each entry) is computed once per
registry generation, so the per-metric loop is a dictionary lookup and a constructor call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ._errors import damaged
from ._family import FamilyMeta
from ._gauges import gauge_value
from ._layout import (
    KIND_COUNTER,
    KIND_GAUGE,
    KIND_HISTOGRAM,
    KIND_NAMES,
    KIND_SUMMARY,
    LIVE_KINDS,
    PAGE,
    SIZE_CLASSES,
    STAMPED_KINDS,
    histogram_size,
    split_ref,
)
from ._moves import Moves
from ._names import decode_key
from ._pagesets import Pagesets
from ._registry import Entry
from ._results import MetricValue

# (pageset, word, name, labels, kind, exposition kind, the family's metadata)
Row = tuple[int, int, str, tuple[tuple[str, str], ...], int, str, FamilyMeta | None]
Families = Callable[[list[str]], dict[str, FamilyMeta]]
_FLOAT_KINDS = frozenset((KIND_SUMMARY, KIND_HISTOGRAM))  # every float word matters


_PLAIN_SUMS = frozenset((KIND_COUNTER, KIND_GAUGE))  # summed over every id


class SnapshotReader:
    """Values of registry entries, read from the pagesets (and a batch in flight).
    ``families(names)`` gives the metadata of metric names (help, unit, buckets), ``live()``
    the ids with a live holder (for the live gauge modes)."""

    def __init__(self, pagesets: Pagesets, moves: Moves, families: Families,
                 live: Callable[[], frozenset[int]]) -> None:
        self._pagesets = pagesets
        self._moves = moves
        self._families = families
        self._live = live
        self._decoded: dict[bytes, tuple[str, tuple[tuple[str, str], ...]]] = {}
        # (entries, their rows, pageset -> float sums needed, pagesets read per id): made
        # once a generation
        self._plan: tuple[list[Entry], list[Row], dict[int, bool], frozenset[int]] | None = None

    def values(self, entries: list[Entry]) -> list[MetricValue]:
        """The value of each of ``entries`` (in order), old slots of a batch in flight added."""
        plan = self._plan
        if plan is None or plan[0] is not entries:  # the registry changed: plan again
            rows = self._rows(entries)
            # Float sums by the entries' kinds: the pageset's own class word may already say
            # otherwise when the entries are stale (the pageset given back and reused
            # meanwhile; the caller then discards this read).
            floats: dict[int, bool] = {}
            for row in rows:
                floats[row[0]] = floats.get(row[0], False) or row[4] in _FLOAT_KINDS
            per_id = frozenset(row[0] for row in rows if row[4] in STAMPED_KINDS
                               or row[4] in LIVE_KINDS)
            plan = self._plan = (entries, rows, floats, per_id)
        _entries, rows, floats, per_id = plan
        sums = {ps: self._pagesets.sums(ps, f) for ps, f in floats.items()}
        copies = {ps: self._pagesets.page_rows(ps) for ps in per_id}
        live = self._live() if per_id else frozenset()
        out: list[MetricValue] = []
        append = out.append
        for ps, word, name, labels, kind, kname, meta in rows:
            q, d = sums[ps]
            doc, unit = (meta.documentation, meta.unit) if meta is not None else ("", "")
            if kind in _PLAIN_SUMS:
                f = d[word + 1]
                append(MetricValue(name, labels, kname, q[word] + f if f else q[word],
                                   documentation=doc, unit=unit))
            elif kind == KIND_SUMMARY:
                append(MetricValue(name, labels, kname, d[word + 1], q[word],
                                   documentation=doc, unit=unit))
            elif kind == KIND_HISTOGRAM:
                assert meta is not None
                nb = len(meta.buckets)
                cumulative = list(itertools.accumulate(q[word : word + nb + 1]))
                append(MetricValue(name, labels, kname, d[word + nb + 1], cumulative[-1],
                                   tuple(zip((*meta.buckets, math.inf), cumulative,
                                             strict=True)), doc, unit))
            else:  # a gauge read per id
                value = gauge_value(kind, ((k, rq[word], rd[word + 1])
                                           for k, rq, rd in copies[ps]), live)
                append(MetricValue(name, labels, kname, value, documentation=doc, unit=unit))
        return self._moves.adjust(entries, out, sums)  # compaction: add old slots in flight

    def _rows(self, entries: list[Entry]) -> list[Row]:
        if len(self._decoded) > 2 * len(entries) + 64:  # names removed since: forget them
            keep = {key for _kind, _cls, _ref, key in entries}
            self._decoded = {k: v for k, v in self._decoded.items() if k in keep}
        rows = []
        names: list[str] = []
        for kind, cls, ref, key in entries:  # kinds and classes: checked by the registry
            # The slot against the entry's own class, not the pageset's: a stale entry (its
            # pageset given back and reused for another class meanwhile) is no damage, and
            # the caller discards its read.
            ps, slot = split_ref(ref)
            size = SIZE_CLASSES[cls]
            if slot >= PAGE // size:
                raise damaged(f"ref {ref:#x} names no slot of a {size}-byte pageset")
            decoded = self._decoded.get(key)
            if decoded is None:
                try:
                    decoded = self._decoded[key] = decode_key(key)
                except ValueError:  # InvalidArgument: not a name and labels we wrote
                    raise damaged(f"a registry key {key[:40]!r} does not decode") from None
            names.append(decoded[0])
            rows.append((ps, slot * size // 8, decoded[0], decoded[1], kind, KIND_NAMES[kind]))
        metas = self._families(sorted(set(names)))
        out: list[Row] = []
        for (ps, word, name, labels, kind, kname), (_k, cls, _r, _key) in zip(
                rows, entries, strict=True):
            meta = metas.get(name)
            if kind == KIND_HISTOGRAM and (meta is None or meta.kind != kind or histogram_size(
                    len(meta.buckets)) > SIZE_CLASSES[cls]):
                raise damaged(f"histogram {name}'s family does not fit its slot")
            out.append((ps, word, name, labels, kind, kname, meta))
        return out


def with_fix(entries: list[Entry], out: list[MetricValue],
             fix: dict[int, Any]) -> list[MetricValue]:
    """``out`` corrected for the overflow id's interrupted move (``Moves.finish_dead``)."""
    for i, (_kind, _cls, ref, _key) in enumerate(entries):
        if ref in fix:
            v = out[i]
            if v.kind == "summary":
                out[i] = replace(v, count=v.count + fix[ref][0], value=v.value + fix[ref][1])
            else:
                out[i] = replace(v, value=v.value + fix[ref])
    return out
