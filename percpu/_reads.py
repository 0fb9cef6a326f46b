"""Reads of one metric's value that need more than one word per id: gauges of every mode
but ``sum``, and histograms (``Counter.value`` and a sum gauge's stay on the domain's
inlined path, ``Domain._read_sum``).

Invariant: a live-mode read asks the lease locks which ids are live under the domain lock,
then reads the copies; an id that dies or appears in between is counted as it was at the
lock query (a hint, as every live read is). Values of a batch of moves in flight are paired
by the compaction runtime (``Moves.read``) for the movable kinds; the others never move.
"""

from __future__ import annotations

import operator
from typing import Any, Protocol

from ._gauges import gauge_value
from ._layout import LIVE_KINDS, MOVABLE_KINDS


class Host(Protocol):
    """What the reads take of the domain they belong to (``Domain`` implements it)."""

    _max: int
    _lock: Any
    _pagesets: Any
    _holder: Any
    _lease: Any
    _grace: Any
    _moves: Any


class Reads:
    """Multi-word reads of one domain (see the module docstring)."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom

    def live_ids(self) -> frozenset[int]:
        """The ids with a live holder now (the overflow id when a holder shares it)."""
        dom = self._dom
        mine = dom._lease.vcpu
        with dom._lock:
            live = set(dom._holder.live(mine))
            if dom._lease.on_overflow() or dom._holder.other_overflow_holders(
                    dom._grace.epoch()):  # on_overflow: a thread of ours may share it
                live.add(dom._max)
        return frozenset(live)

    def others_alive(self) -> bool:
        """True when a holder other than this one is alive: on an id, or sharing the overflow
        id. Domain lock held."""
        dom = self._dom
        if dom._holder.live(dom._lease.vcpu) not in ([], [dom._lease.vcpu]):
            return True
        return bool(dom._holder.other_overflow_holders(dom._grace.epoch()))

    def gauge(self, ref: int, kind: int) -> int | float:
        """The value of the gauge of ``kind`` in slot ``ref``."""
        live = self.live_ids() if kind in LIVE_KINDS else None
        copies = self._dom._pagesets.slot_copies
        if kind in MOVABLE_KINDS:  # livesum: old and new slots' parts add up while moving
            value: int | float = self._dom._moves.read(
                ref, lambda r: gauge_value(kind, copies(r), live), operator.add)
            return value
        return gauge_value(kind, copies(ref), live)

    def histogram(self, ref: int, buckets: int) -> tuple[list[int], float]:
        """The bucket counts (``buckets`` finite ones, then +Inf) and sum of slot ``ref``."""
        return self._dom._pagesets.slot_words(ref, buckets + 1)  # type: ignore[no-any-return]
