"""The value of a gauge from its per-id copies, for every mode (pure).

A gauge of mode ``sum`` is the sum of its copies' int and float parts; ``livesum`` the same
over the ids with a live holder. The stamped modes keep, per id, the time of the last set
(int64 ns, 0 = never) and the value: ``max``/``min`` take the largest/smallest value of the
ids that set one, ``mostrecent`` the value of the latest stamp (ties: the larger value, so
that the result does not depend on the order of the ids); their ``live`` variants look only
at ids with a live holder. With no such id the value is 0.0, as prometheus_client writes a
gauge no live process has set.

Invariant: the functions here read nothing but their arguments; which ids are live is the
caller's answer (the lease locks, read under the domain lock).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from ._layout import (
    KIND_GAUGE,
    KIND_GAUGE_LIVEMAX,
    KIND_GAUGE_LIVEMIN,
    KIND_GAUGE_LIVESUM,
    KIND_GAUGE_MAX,
    KIND_GAUGE_MIN,
    LIVE_KINDS,
)

Copy = tuple[int, int, float]  # (id, int64 word, float64 word)


def gauge_value(kind: int, copies: Iterable[Copy], live: Collection[int] | None) -> int | float:
    """The value of a gauge of ``kind`` whose copies are ``copies``; ``live``: the ids with a
    live holder (needed for the ``live*`` kinds only)."""
    if kind in LIVE_KINDS:
        assert live is not None
        copies = [c for c in copies if c[0] in live]
    if kind in (KIND_GAUGE, KIND_GAUGE_LIVESUM):
        total = 0
        fraction = 0.0
        for _k, n, x in copies:
            total += n
            fraction += x
        return total + fraction if fraction else total
    stamped = [(stamp, x) for _k, stamp, x in copies if stamp]
    if not stamped:
        return 0.0
    if kind in (KIND_GAUGE_MAX, KIND_GAUGE_LIVEMAX):
        return max(x for _s, x in stamped)
    if kind in (KIND_GAUGE_MIN, KIND_GAUGE_LIVEMIN):
        return min(x for _s, x in stamped)
    return max(stamped)[1]  # mostrecent, livemostrecent
