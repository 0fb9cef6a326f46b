"""Which handle's ``_cells[_index]`` an update of a metric handle stores to, in either lease
mode: tests that look at the word itself use it, so they hold on a free-threaded build too."""

from __future__ import annotations

from typing import Any

from percpu._handles import THREAD_VARIANT

#: The handle classes of per-thread mode (a raw object, PerCpu, is its own variant).
_PER_THREAD_CLASSES = frozenset(v for k, v in THREAD_VARIANT.items() if v is not k)


def writer(h: Any) -> Any:
    """``h`` itself when its process is one holder (the GIL build's mode); in per-thread mode
    (``percpu._lease.ThreadLeases``) the calling thread's private handle of ``h``, which holds
    the word, made on the thread's first update of ``h``."""
    if type(h) not in _PER_THREAD_CLASSES:
        return h
    mine = getattr(h._tl, "h", None)
    if mine is None:
        raise AssertionError(f"{h!r}: this thread has not updated it yet (per-thread mode)")
    return mine
