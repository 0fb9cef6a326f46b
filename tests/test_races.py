"""The races of issue 12, each forced at its exact point and pinned by a test.

Every test here injects the interleaving it is about (a patched primitive that pauses, runs
another holder or kills the process at the point in question) instead of hoping that a
scheduler produces it, and each failed on the code before its fix (the commit that added it
says how). Tests run on one shared domain file per test (``shared`` fixture: two ids, the
background quiescer off, so that grace periods happen only where a test asks for them).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

import percpu
import percpu._domain as domain_mod
from arena._locks import unlock as real_unlock
from percpu import Domain, DomainClosed
from percpu._layout import LEASE_LOCK_BASE

SIZE = 1 << 20


# -- 1. release() gives the id back only after every handle has left it --------------------


def test_release_unbinds_every_handle_before_the_lease_goes(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after the lease byte is unlocked, another holder takes the id and a thread of
    the releasing process counts: its update must not land on the id it no longer holds."""
    path, holders = shared
    d1 = holders[0]
    c = d1.counter("released")
    c.add(5)
    assert d1.vcpu_id() == 0
    seen: dict[str, Any] = {}

    def unlock_then_race(fd: int, start: int, length: int = 1) -> None:
        real_unlock(fd, start, length)
        if start == LEASE_LOCK_BASE and not seen:
            d2 = Domain.open(path)
            holders.append(d2)
            seen["other_id"] = d2.vcpu_id()  # the lowest free id: the one just given back
            t = threading.Thread(target=c.inc)
            t.start()
            t.join(0.3)
            seen["waited"] = t.is_alive()  # it waits for release() to finish, then rebinds
            seen["thread"] = t

    monkeypatch.setattr(domain_mod, "unlock", unlock_then_race)
    d1.release()
    seen["thread"].join(10)
    assert seen["other_id"] == 0
    assert seen["waited"]
    assert d1.stats().vcpu_id == 1  # the update took a lease of its own
    assert c.value == 6


@pytest.mark.parametrize("kind", ["counter", "gauge", "summary"])
def test_a_cached_bound_method_follows_its_handle_after_release(
        shared: tuple[str, list[Domain]], kind: str) -> None:
    """``inc = c.inc`` binds the method to the class of that moment: after a release it must
    still count on an id this process holds, never on the one it gave back."""
    path, holders = shared
    d1 = holders[0]
    h: Any = getattr(d1, kind)("cached")
    update: Callable[[], None] = (
        functools.partial(h.observe, 1.5) if kind == "summary" else h.inc)
    update()
    d1.release()
    d2 = Domain.open(path)
    holders.append(d2)
    assert d2.vcpu_id() == 0  # the other holder now owns id 0
    update()
    assert d1.stats().vcpu_id == 1
    assert h.value == ((2, 3.0) if kind == "summary" else 2)


# -- 8. close() while other threads count or read ------------------------------------------


def _updates(d: Domain) -> list[Callable[[], object]]:
    c, g, s = d.counter("c"), d.gauge("g"), d.summary("s")
    return [c.inc, functools.partial(c.add, 2), g.inc, g.dec, functools.partial(g.add, 3),
            functools.partial(g.sub, 3), functools.partial(s.observe, 0.5)]


def test_an_update_through_a_cached_method_after_close_raises_domain_closed() -> None:
    """A call that returns normally was counted: after close() nothing can be, so it raises."""
    d = Domain(SIZE, max_vcpus=2)
    cached = _updates(d)
    d.close()
    for update in cached:
        with pytest.raises(DomainClosed):
            update()


@pytest.mark.parametrize("read", ["value", "snapshot", "stats"])
def test_a_read_that_close_overtakes_raises_domain_closed(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    """A reader past its open check is paused; another thread closes the domain; the reader
    resumes: DomainClosed, or its value, never a raw ValueError or OSError."""
    _path, holders = shared
    d = holders[0]
    c = d.counter("c")
    c.add(7)
    inside, resume = threading.Event(), threading.Event()
    # Where each read is paused: past its open check, before it touches the mapping or the
    # descriptor (stats: before it takes the domain lock).
    owner: Any = type(d.arena) if read == "stats" else Domain
    target = {"value": "_sum_slot", "snapshot": "_pageset_sums", "stats": "stats"}[read]
    real = getattr(owner, target)

    def paused(self: Any, *args: Any) -> Any:
        if threading.current_thread().name == "reader" and not inside.is_set():
            inside.set()
            resume.wait(10)
        return real(self, *args)

    monkeypatch.setattr(owner, target, paused)
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(c.value if read == "value" else getattr(d, read)())
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=reader, name="reader")
    t.start()
    assert inside.wait(10)
    closer = threading.Thread(target=d.close)
    closer.start()
    closer.join(0.3)  # enough for close() to finish, unless it waits for the call in flight
    resume.set()
    closer.join(10)
    t.join(10)
    assert not closer.is_alive() and not t.is_alive()
    (result,) = outcome
    assert not isinstance(result, BaseException) or isinstance(result, DomainClosed), result
    if read == "value":
        assert result == 7  # the read began before close() and completed
    with pytest.raises(DomainClosed):
        c.inc()
    assert isinstance(percpu.DomainClosed("x"), ValueError)
