"""The overflow path (issue 17) beside a leased ``inc``, in the same run.

* ``leased_inc``: ``Counter.inc`` of a holder with an id of its own (the lock-free statement).
* ``overflow_inc``: ``Counter.inc`` of a holder that found every id taken (``max_vcpus=1``, a
  second holder): process lock, overflow lock (two ``fcntl``), the count, the add.
* ``ofd_lock_pair``: the two ``fcntl`` calls of the overflow lock alone (the floor of the
  overflow path while it keeps a cross-process lock).
* ``handed_over_inc``: the same overflow holder after the first holder released its id and a
  quiescent point handed it over: back on the lock-free statement.

Best of 5 ``timeit`` repeats, ns per call; one holder per process mode (``Lease.per_thread``
off, the GIL build's mode), so it also runs on a free-threaded build. The figures are
printed, never asserted.

Run: ``python bench/bench_overflow.py`` (or ``pytest bench/bench_overflow.py -q -s``, a
quick run whose figures mean little).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import timeit
from collections.abc import Callable

from percpu import Domain
from percpu._holder import _OVF_LOCK, _OVF_UNLOCK
from percpu._lease import Lease


def best_ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def measure(number: int) -> dict[str, float]:
    """The four figures of the module docstring (ns per call)."""
    saved = Lease.per_thread
    Lease.per_thread = False
    tmp = tempfile.mkdtemp(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        path = os.path.join(tmp, "overflow.domain")
        a = Domain.create(path, 4 << 20, max_vcpus=1)
        a._background_quiescer = False
        o = Domain.open(path)
        o._background_quiescer = False
        try:
            assert (a.vcpu_id(), o.vcpu_id()) == (0, 1)
            ca, co = a.counter("c"), o.counter("c")
            fd = o.arena.fd
            assert fd is not None
            out = {"leased_inc": best_ns(ca.inc, number * 10),
                   "overflow_inc": best_ns(co.inc, number)}
            out["ofd_lock_pair"] = best_ns(lambda: (
                fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _OVF_LOCK),
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _OVF_UNLOCK)), number)
            a.release()
            o._quiesce()  # the quiescent point: o is handed id 0
            assert o.vcpu_id() == 0
            out["handed_over_inc"] = best_ns(co.inc, number * 10)
            return out
        finally:
            o.close()
            a.close()
    finally:
        Lease.per_thread = saved
        shutil.rmtree(tmp)


def report(figures: dict[str, float]) -> str:
    leased = figures["leased_inc"]
    lines = [f"{sys.version.split()[0]} gil={getattr(sys, '_is_gil_enabled', lambda: True)()}"]
    lines += [f"{name:>16}: {ns:8.0f} ns  ({ns / leased:5.1f}x leased inc)"
              for name, ns in figures.items()]
    return "\n".join(lines)


def test_overflow_figures() -> None:
    """A quick run (smoke: the figures of so few calls mean little)."""
    print(report(measure(2000)))


if __name__ == "__main__":
    print(report(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)))
