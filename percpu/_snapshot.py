"""Reading every metric at once: the per-metric plan of a snapshot and its values.

Invariant: a snapshot's values are those of the registry entries it was planned from; the
caller (``Domain.snapshot``) keeps a result only if the registry generation and the move
batch are unchanged across the read, and reads under the domain lock after a few tries, so a
metric removed meanwhile (its slot reused) is never reported with another's value.

The plan (pageset, word, decoded name and labels of each entry) is computed once per
registry generation, so the per-metric loop is a dictionary lookup and a constructor call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ._errors import damaged
from ._layout import (
    KIND_NAMES,
    KIND_SIZES,
    KIND_SUMMARY,
    PAGE,
    SIZE_CLASSES,
    class_index,
    split_ref,
)
from ._moves import Moves
from ._names import decode_key
from ._pagesets import Pagesets
from ._registry import Entry
from ._results import MetricValue

Row = tuple[int, int, str, tuple[tuple[str, str], ...], str]  # (pageset, word, name, labels, kind)
_SUMMARY_CLASS = class_index(KIND_SIZES[KIND_SUMMARY])


class SnapshotReader:
    """Values of registry entries, read from the pagesets (and a batch in flight)."""

    def __init__(self, pagesets: Pagesets, moves: Moves) -> None:
        self._pagesets = pagesets
        self._moves = moves
        self._decoded: dict[bytes, tuple[str, tuple[tuple[str, str], ...]]] = {}
        # (entries, their rows, pageset -> whether it holds summaries): made once a generation
        self._plan: tuple[list[Entry], list[Row], dict[int, bool]] | None = None

    def values(self, entries: list[Entry]) -> list[MetricValue]:
        """The value of each of ``entries`` (in order), old slots of a batch in flight added."""
        plan = self._plan
        if plan is None or plan[0] is not entries:  # the registry changed: plan again
            rows = self._rows(entries)
            # Float sums where an entry is a summary, by the entries' kinds: the pageset's own
            # class word may already say otherwise when the entries are stale (the pageset
            # given back and reused meanwhile; the caller then discards this read).
            floats: dict[int, bool] = {}
            for row in rows:
                floats[row[0]] = floats.get(row[0], False) or row[4] == "summary"
            plan = self._plan = (entries, rows, floats)
        _entries, rows, floats = plan
        sums = {ps: self._pagesets.sums(ps, f) for ps, f in floats.items()}
        out: list[MetricValue] = []
        append = out.append
        for ps, word, name, labels, kind in rows:
            q, d = sums[ps]
            if kind == "summary":
                append(MetricValue(name, labels, kind, d[word + 1], q[word]))
            else:
                append(MetricValue(name, labels, kind, q[word]))
        return self._moves.adjust(entries, out, sums)  # compaction: add old slots in flight

    def _rows(self, entries: list[Entry]) -> list[Row]:
        if len(self._decoded) > 2 * len(entries) + 64:  # names removed since: forget them
            keep = {key for _kind, _cls, _ref, key in entries}
            self._decoded = {k: v for k, v in self._decoded.items() if k in keep}
        rows = []
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
            rows.append((ps, slot * size // 8, decoded[0], decoded[1],
                         KIND_NAMES[kind]))
        return rows


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
