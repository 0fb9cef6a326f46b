"""The races of issue 12, each forced at its exact point and pinned by a test.

Every test here injects the interleaving it is about (a patched primitive that pauses, runs
another holder or kills the process at the point in question) instead of hoping that a
scheduler produces it, and each failed on the code before its fix (the commit that added it
says how). Tests run on one shared domain file per test (``shared`` fixture: two ids, the
background quiescer off, so that grace periods happen only where a test asks for them).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _children import Child, run_in_child
from _writer import writer
from conftest import shm_dir

import percpu
import percpu._domain as domain_mod
import percpu._holder as holder_mod
import percpu._moves as moves_mod
import percpu._pending as pending_mod
from arena.locks import lock as real_lock
from arena.locks import unlock as real_unlock
from percpu import Counter, Domain, DomainClosed, MetricRemoved
from percpu._compact import copy_moves, plan_compaction
from percpu._layout import D_MV_GEN, L_SEQ, LEASE_LOCK_BASE, MOVE_CAP, OVERFLOW_LOCK, lease_base
from percpu._metrics import Metrics
from percpu._moves import Moves
from percpu._pagesets import Pagesets
from percpu._registry import Registry

SIZE = 1 << 20


def pause_in(monkeypatch: pytest.MonkeyPatch, owner: Any, method: str, thread: str,
             after: bool = False) -> tuple[threading.Event, threading.Event]:
    """Patch ``owner.method`` so that its first call from the thread named ``thread`` stops
    (before the real call, or ``after`` it) until the test sets ``resume``; ``inside`` is set
    when it stops. Returns (inside, resume)."""
    inside, resume = threading.Event(), threading.Event()
    real = getattr(owner, method)

    def paused(self: Any, *args: Any) -> Any:
        first = threading.current_thread().name == thread and not inside.is_set()
        if first and not after:
            inside.set()
            resume.wait(10)
        out = real(self, *args)
        if first and after:
            inside.set()
            resume.wait(10)
        return out

    monkeypatch.setattr(owner, method, paused)
    return inside, resume


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

    monkeypatch.setattr(holder_mod, "unlock", unlock_then_race)
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
    # Where each read is paused: past its open check, before it touches the mapping or the
    # descriptor (stats: before it takes the domain lock).
    owner: Any = type(d.arena) if read == "stats" else Pagesets
    target = {"value": "slot_sum", "snapshot": "sums", "stats": "stats"}[read]
    inside, resume = pause_in(monkeypatch, owner, target, "reader")
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


# -- 3. a compactor killed between its commit and the registry update -----------------------


def _spread(d: Domain, hot: int, tag: str, n: int = 1200) -> list[Counter]:
    """``hot`` counters spread over the pagesets of ``n`` registrations (the rest removed and
    their grace period over): a compaction moves all but one pageset's worth of them."""
    step = n // hot
    chosen = set(range(step // 2, n, step)[:hot])
    out = [c for j in range(n) if (c := d.counter(tag, {"j": str(j)})) and j in chosen]
    for j in range(n):
        if j not in chosen:
            d.remove(tag, {"j": str(j)})
    assert d.synchronize(5)
    return out


def test_remove_after_a_compactor_died_before_updating_the_registry(
        shared: tuple[str, list[Domain]]) -> None:
    """The compactor publishes a batch (the commit) and is SIGKILLed before it points the
    registry at the new refs. ``remove`` must retire the handles (which follow the move) and
    free the slot once: the removed handle raises, nothing is freed twice, the grace periods
    go on."""
    path, holders = shared
    d = holders[0]
    hot = _spread(d, 4, "h")
    for k, c in enumerate(hot):
        c.add(100 + k)

    def die_after_commit() -> None:
        dc = Domain.open(path)
        publish, table = Moves.publish, Registry.table
        inside = [False]

        def publishing(self: Moves, *args: Any) -> None:
            inside[0] = True
            publish(self, *args)

        def table_or_die(self: Registry, seg: int) -> memoryview:
            if inside[0] and int(dc._root[D_MV_GEN]) & 1:
                os.kill(os.getpid(), signal.SIGKILL)  # committed, registry not updated
            return table(self, seg)

        Moves.publish = publishing  # type: ignore[method-assign, assignment]
        Registry.table = table_or_die  # type: ignore[method-assign]
        dc.compact(timeout=1)

    child = Child(die_after_commit)
    status = child.reap()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert int(d._root[D_MV_GEN]) & 1  # the batch is in flight, its registry half not done
    moving = [c for c in hot if d._moves.current(c._ref) != c._ref]
    assert moving
    victim = moving[0]
    assert d.remove("h", dict(victim.labels))
    with pytest.raises(MetricRemoved):
        victim.inc()
    assert d.compact(timeout=2).pending_moves == 0  # the dead compactor's batch completes
    assert d.synchronize(2)
    assert [c.value for c in hot if c is not victim] == [
        100 + k for k, c in enumerate(hot) if c is not victim]
    assert d._pagesets.double_frees == 0
    report = d.check()
    assert report.ok, report.problems
    fresh = [d.counter("after", {"i": str(i)}) for i in range(40)]
    assert all(c.value == 0 for c in fresh)  # no reused slot kept a value


# -- 4. an overflow holder counts its own acknowledgement ----------------------------------


def test_an_overflow_holder_never_reclaims_a_slot_it_still_uses(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """d3 shares the overflow id and still counts into ``m`` when another holder removes it;
    when the queue is full, d3's own removal must not reuse ``m``'s slot before d3 has
    acknowledged (``F_OFD_GETLK`` never shows a process its own acknowledgement lock)."""
    monkeypatch.setattr(pending_mod, "PENDING_CAP", 4)
    path, holders = shared
    d1 = holders[0]
    d2, d3 = Domain.open(path), Domain.open(path)
    holders += [d2, d3]
    assert (d1.vcpu_id(), d2.vcpu_id(), d3.vcpu_id()) == (0, 1, 2)  # 2 is the overflow id
    m = d3.counter("m")
    m.add(1000)
    d3.counter("g")  # registered now: registering later would acknowledge first
    for i in range(3):
        d1.counter("f", {"i": str(i)})
        d1.remove("f", {"i": str(i)})
    d1.remove("m")  # the queue is full now; d1 has acknowledged
    d2._quiesce()  # so has d2; d3 has not
    d3.remove("g")  # d3 publishes one more with the queue full, before acknowledging
    with pytest.raises(MetricRemoved):
        m.inc()
    d2._quiesce()
    d3._quiesce()
    assert d1.synchronize(2)
    fresh = [d1.counter("new", {"i": str(i)}) for i in range(20)]
    assert [c.value for c in fresh] == [0] * 20


# -- 5. remove() never waits for another holder --------------------------------------------


def test_remove_with_a_full_queue_and_a_stopped_holder_does_not_wait(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """One holder is SIGSTOPped (it cannot acknowledge); another process removes more metrics
    than the pending queue holds, with its own quiescer running. Every remove returns; the
    slots wait until the stopped holder resumes and acknowledges."""
    monkeypatch.setattr(pending_mod, "PENDING_CAP", 4)
    path, holders = shared
    d = holders[0]
    for i in range(12):
        d.counter("x", {"i": str(i)}).inc()

    def stopped_holder() -> None:
        Domain._background_quiescer = True
        ds = Domain.open(path)
        ds.counter("x", {"i": "0"}).inc()  # takes id 1, acknowledges, starts its quiescer
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(0.2)  # after SIGCONT: its quiescer acknowledges the removals
        ds.close()

    def remover() -> int:
        Domain._background_quiescer = True
        dr = Domain.open(path)  # the overflow id: ids 0 and 1 are held
        for i in range(12):
            assert dr.remove("x", {"i": str(i)})
        pending = dr.stats().pending_frees
        dr.close()
        return pending

    stopped = Child(stopped_holder)
    _wait_state(stopped.pid, "T")
    rm = Child(remover)
    try:
        finished = _wait_state(rm.pid, "Z", timeout=10, fail=False)
    finally:
        if not finished:
            os.kill(rm.pid, signal.SIGKILL)
        os.kill(stopped.pid, signal.SIGCONT)
    assert finished, "remove() waited for a stopped holder"
    assert rm.result() > 4  # more slots wait than the queue's inline part holds
    stopped.result()
    assert d.synchronize(5)
    assert d.stats().pending_frees == 0


def _wait_state(pid: int, state: str, timeout: float = 10, fail: bool = True) -> bool:
    """Wait until process ``pid`` is in ``state`` ("T" stopped, "Z" exited, not yet reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == state:
                return True
        time.sleep(0.005)
    if fail:
        raise AssertionError(f"process {pid} did not reach state {state}")
    return False


# -- 6. fork while a quiescer has handles out of its table --------------------------------


@pytest.mark.parametrize("pause", [0.3, 3 * getattr(domain_mod, "FORK_LOCK_WAIT", 0.5)])
def test_a_fork_never_falls_inside_a_retirement(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch, pause: float) -> None:
    """A thread acknowledges a removal: it has taken the removed metric's handles out of the
    table and is about to retire them when another thread forks. In the child the handle must
    be retired (or unbound), never left bound to the parent's id. A short pause: the fork
    waits for the process lock; a long one (a section stuck behind a stopped holder): the
    fork goes ahead after FORK_LOCK_WAIT and the child recovers the handle."""
    path, holders = shared
    d1 = holders[0]
    h = d1.counter("gone")
    h.add(5)
    d2 = Domain.open(path)
    holders.append(d2)
    d2.remove("gone")
    inside = threading.Event()
    retire = Domain._retire

    def slow_retire(self: Domain, handle: Any) -> None:
        if threading.current_thread().name == "acker":
            inside.set()
            time.sleep(pause)  # the fork is asked for meanwhile
        retire(self, handle)

    monkeypatch.setattr(Domain, "_retire", slow_retire)
    acker = threading.Thread(target=d1._quiesce, name="acker")
    acker.start()
    assert inside.wait(10)

    def in_child() -> str:
        try:
            h.add(1000)
        except MetricRemoved:
            return "removed"
        return f"counted on id {d1.stats().vcpu_id}"

    outcome = run_in_child(in_child)
    acker.join(10)
    assert outcome == "removed"


# -- 7. snapshot() validates the registry list it read, not another thread's -------------


def test_a_snapshot_checks_the_generation_of_the_list_it_read(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A reads the registry list and is paused; thread B compacts (the metrics move, the
    old slots are zeroed) and snapshots (caching a newer list). A resumes: it must not take
    B's generation for its own list's and report every moved counter as 0."""
    _path, holders = shared
    d = holders[0]
    hot = _spread(d, 4, "s")
    for k, c in enumerate(hot):
        c.add(10 + k)
    expected = {c.labels: 10 + k for k, c in enumerate(hot)}
    d.snapshot()
    paused, resume = pause_in(monkeypatch, Metrics, "entries_at", "A", after=True)
    got: list[dict[Any, Any]] = []
    a = threading.Thread(name="A", target=lambda: got.append(
        {m.labels: m.value for m in d.snapshot() if m.name == "s"}))
    a.start()
    assert paused.wait(10)
    assert d.compact(timeout=2).moved >= 2
    d.snapshot()  # caches the list of the new generation
    resume.set()
    a.join(10)
    assert got == [expected]


# -- the fork class: a child must not keep its parent's locks alive ------------------------


def test_a_child_does_not_keep_a_dead_parents_lease(shared: tuple[str, list[Domain]]) -> None:
    """A holder forks a child and is SIGKILLed while the child lives on. The kernel drops the
    holder's locks only when no descriptor of its open file description is left: the child
    must hold none (``mmap`` keeps a dup of the descriptor it maps; that one is inherited)."""
    path, holders = shared
    d = holders[0]
    pid_file = path + ".grandchild"

    def holder_that_forks_then_dies() -> None:
        dh = Domain.open(path)
        dh.counter("x").inc()  # leases id 0
        if os.fork() == 0:  # the at-fork handlers have run when fork returns here
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pid_file + ".tmp", pid_file)
            time.sleep(30)  # lives on after its parent's death (killed by the test)
            os._exit(0)
        while not os.path.exists(pid_file):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    child = Child(holder_that_forks_then_dies)
    status = child.reap()
    assert os.WIFSIGNALED(status)
    with open(pid_file) as f:
        grandchild = int(f.read())
    try:
        assert d.online_vcpus() == frozenset()  # the dead holder's lease is free
        assert d.vcpu_id() == 0
    finally:
        os.kill(grandchild, signal.SIGKILL)
        os.unlink(pid_file)


# -- binding a handle while a compaction batch publishes -----------------------------------


def test_a_handle_bound_while_a_batch_publishes_stays_live(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a release, the first use of a handle binds it: it follows the moves, then checks
    that the registry still names its slot. A batch published between the two (by another
    holder) must not make the live metric look removed."""
    path, holders = shared
    d1 = holders[0]
    hot = _spread(d1, 4, "b")
    for k, c in enumerate(hot):
        c.add(10 + k)
    with d1._lock:
        infos, _live = d1._moves.inventory()
        moving = {m.old for m in plan_compaction(infos, MOVE_CAP).moves}
    victim = next(c for c in hot if c._ref in moving)
    d1.release()
    d2 = Domain.open(path)
    holders.append(d2)
    follow = Moves.follow
    published: list[bool] = []

    def follow_then_publish(self: Moves, h: Any) -> None:
        follow(self, h)
        if self is d1._moves and not published:
            t = threading.Thread(target=lambda: published.append(
                d2.compact(timeout=0.3).pending_moves > 0))
            t.start()
            t.join(0.2)  # it publishes now unless bind holds the domain lock (then: after)

    monkeypatch.setattr(Moves, "follow", follow_then_publish)
    victim.inc()  # binds: must neither raise MetricRemoved nor lose the update
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while not published and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d1.compact(timeout=2).pending_moves == 0
    assert {c.labels: c.value for c in hot} == {
        c.labels: 10 + k + (c is victim) for k, c in enumerate(hot)}


# -- 2. the overflow id's interrupted copy is finished only under the overflow lock -------


def test_a_locked_read_never_finishes_the_overflow_copy_under_an_overflow_writer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One id; the overflow id's copies are being moved by a compactor that dies right after
    it makes the id's sequence odd. An overflow writer holds the overflow lock and is between
    reading and storing a word of the moved metric when a reader falls back to its locked
    read. The reader must not move the overflow id's values under the writer's feet."""
    monkeypatch.setattr(Domain, "_background_quiescer", False)
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_races-")
    path = os.path.join(tmp, "domain")
    d1 = Domain.create(path, SIZE, max_vcpus=1)  # id 0
    dv, dc, dw = Domain.open(path), Domain.open(path), Domain.open(path)  # overflow holders
    try:
        hot = _spread(d1, 4, "o")
        mine = [dv.counter("o", dict(c.labels)) for c in hot]
        for k, (c, v) in enumerate(zip(hot, mine, strict=True)):
            c.add(100 + k)
            v.add(1000 + 10 * k)  # the overflow id's copies
        assert dc.compact(timeout=0.05).pending_moves > 0  # published; waits for acks
        for d in (d1, dv, dw):
            d._quiesce()  # everyone rebinds and acknowledges

        seq_word = dc._moves._root_q + lease_base(1, 1) + L_SEQ

        def die_at_the_overflow_copy(q: Any, d: Any, state: int, seq: int, *args: Any) -> int:
            if seq == seq_word:
                q[seq] = q[seq] | 1  # odd: the copy has begun ...
                raise _Died  # ... and its copier is gone
            return copy_moves(q, d, state, seq, *args)

        monkeypatch.setattr(moves_mod, "copy_moves", die_at_the_overflow_copy)
        with pytest.raises(_Died):
            dc.compact(timeout=1)
        dc._abandon()
        monkeypatch.setattr(moves_mod, "copy_moves", copy_moves)
        assert d1._q[seq_word] & 1

        victim = next(c for c in mine if d1._moves.current(c._ref) == c._ref and c._ref in
                      d1._moves.batch(int(d1._root[D_MV_GEN])).pairs)  # a moved metric's new ref
        if dv._lease.threads is not None:
            victim.add(0)  # per-thread mode: the quiescent point unbound its private handle
        word = writer(victim)._index  # the overflow id's word of it, as a writer adds to it
        fd = dw.arena.fd
        assert fd is not None
        real_lock(fd, OVERFLOW_LOCK)  # the writer, inside its operation:
        seen = int(d1._q[word])  # ... reads the word
        before = victim.value  # a reader: the lock-free tries see the odd count, then locked
        d1._q[word] = seen + 5  # ... and stores its add
        real_unlock(fd, OVERFLOW_LOCK)
        assert d1.compact(timeout=2).pending_moves == 0
        assert [c.value for c in hot] == [1100 + 11 * k + 5 * (v is victim)
                                          for k, v in enumerate(mine)]
        assert victim.value == before + 5
    finally:
        for d in (dw, dc, dv, d1):
            d.close()
        shutil.rmtree(tmp)


class _Died(Exception):
    """A copier's death, in process (the state it leaves is what a SIGKILL leaves)."""


def test_a_rebind_that_close_overtakes_raises_domain_closed(
        shared: tuple[str, list[Domain]], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unbound handle's first use takes a lease, then binds under the domain lock; a
    close() in between must not leave the bind locking a descriptor that is closed (or
    reused by then): DomainClosed, found by the torture test as a raw EBADF."""
    _path, holders = shared
    d = holders[0]
    c = d.counter("c")
    c.inc()
    d.release()
    took, resume = pause_in(monkeypatch, Domain, "vcpu_id", "T", after=True)
    outcome: list[BaseException | None] = []

    def count() -> None:
        try:
            c.inc()
            outcome.append(None)
        except BaseException as exc:  # the outcome is what is checked
            outcome.append(exc)

    t = threading.Thread(target=count, name="T")
    t.start()
    assert took.wait(10)
    d.close()
    resume.set()
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], DomainClosed), outcome


# -- snapshot() through entries that went stale under it ----------------------------------


def test_snapshot_values_of_stale_entries_do_not_raise(shared: tuple[str, list[Domain]]) -> None:
    """A snapshot reads the registry, then the pagesets; meanwhile a summary is removed, its
    pageset given back by compaction and reused for counters. The stale read must not raise
    (it is discarded: the registry generation moved), found by a five-minute torture run as
    an IndexError in a reader."""
    _path, holders = shared
    d = holders[0]
    s = d.summary("sm")
    s.observe(2.5)
    ps = s._ref >> 16
    _gen, stale = d._metrics.entries_at()
    assert d.remove("sm") and d.synchronize(2)
    d.compact(timeout=2)
    cs = [d.counter("after", {"i": str(i)}) for i in range(8)]
    assert any(c._ref >> 16 == ps for c in cs)  # the summary's pageset now holds counters
    d._snapshots.values(stale)  # stale, so its values mean nothing; it must not raise
    assert {m.name for m in d.snapshot()} == {"after"}
