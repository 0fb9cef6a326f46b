"""Grace periods of one process: acknowledging epochs and reclaiming slots nobody uses.

``remove`` publishes a slot in the pending queue under a new epoch (:meth:`Grace.publish`).
A process *acknowledges* an epoch (:meth:`Grace.acknowledge`) at a quiescent point: holding
its process lock and the GIL, so no thread of it is inside a hot-path statement, it follows
the compaction batch in flight, retires its handles of every slot that went pending since its
last acknowledgement, and records the epoch (its lease record's ``L_ACK``, or its overflow
acknowledgement lock). The quiescer thread does that every ``QUIESCE_INTERVAL``.

Per-thread mode (no GIL: ``_lease.ThreadLeases``). Holding ``_plock`` no longer keeps the
other threads out of their hot-path statements, so a thread's id is acknowledged (and its
compaction copy made) only after its private handles of the slots concerned were detached
*and the world was stopped once* (``_lease.stop_the_world``): a thread is stopped only at an
eval-breaker check or while detached in C, and an update has neither between its load of
``cells`` and its store: ``cells`` is the last attribute it loads (an attribute load may
block on 3.13t's type-cache lock, and detach while it waits), then it calls no Python code,
makes no backward jump and runs only C that never detaches (memoryview indexing, int and
float arithmetic; ``_handles``, "The hot path"). So once the world has been stopped, no
update that loaded an old binding is still in flight.
What does *not* stop a thread there: ``_plock``, the domain lock, a ``sleep`` or any time
passing (a descheduled thread may sit between the load and the store for any time: the stop
waits for it). ``docs/free-threading.md`` has the whole argument and its tests.

Invariants
----------
1. A pending slot is zeroed and reused (:meth:`Grace.reclaim`) only once every live holder,
   this process included (``ack``: our own overflow acknowledgement lock is invisible to
   ``F_OFD_GETLK``), has acknowledged its epoch, and no compaction batch still moves it.
2. Nothing here waits for another holder: reclamation takes what is due and leaves the
   rest; a holder that never acknowledges (stopped, stuck) delays reuse, never a caller.
3. The quiescer outlives any one failure (it records it in ``errors`` and goes on): a
   quiescer that stopped would stall every grace period of the domain.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from ._errors import damaged
from ._layout import (
    D_EPOCH,
    D_MV_GEN,
    EPOCH_MASK,
    L_ACK,
    MS_DONE,
    lease_base,
    move_state_base,
)
from ._lease import stop_the_world
from ._lease_records import vacancy_hint
from ._pagesets import Pagesets
from ._pending import PendingQueue

QUIESCE_INTERVAL = 0.005  # seconds between the quiescer's looks at the epoch
PROBE_TICKS = 20  # an overflow holder probes the lease locks at least every 20 ticks (0.1 s)
EPOCH_LIMIT = EPOCH_MASK  # an epoch above it is damage (a remove a nanosecond: 9 years)


class Host(Protocol):
    """What grace periods read of the domain they belong to (``Domain`` implements it)."""

    _root: memoryview[int]
    _max: int
    _lock: Any
    _plock: Any  # a threading.RLock, replaced in a forked child
    _lease: Any
    _closed: bool
    _closing: bool
    _background_quiescer: bool
    _pending: PendingQueue
    _pagesets: Pagesets
    _holder: Any
    _moves: Any
    _bindings: Any
    _by_ref: dict[int, list[Any]]

    def _retire(self, h: Any, /) -> None: ...

    def _check_open(self) -> None: ...


class Grace:
    """The grace periods and the quiescer thread of one process of a domain."""

    def __init__(self, dom: Host) -> None:
        self._dom = dom
        self._root, self._max, self._lock = dom._root, dom._max, dom._lock
        self._pending, self._pagesets = dom._pending, dom._pagesets
        self.ack = 0  #: the epoch this process has acknowledged
        self.thread: threading.Thread | None = None  #: the quiescer, while it runs
        self.stop = threading.Event()  #: set to stop the quiescer (and end waits)
        self.errors: list[str] = []  #: what the quiescer survived (the last 16)

    def publish(self, ref: int, cls: int) -> None:
        """Queue ``ref`` for reuse after a grace period (the caller reserved room in the
        queue). Domain lock held."""
        r = self._root
        self._pending.reserve()
        r[D_EPOCH] = self.epoch() + 1
        self._pending.push(ref, int(r[D_EPOCH]), cls)

    def epoch(self) -> int:
        """The current epoch, checked (its OFD lock byte must fit the file offset range)."""
        epoch = int(self._root[D_EPOCH])
        if epoch >= EPOCH_LIMIT:
            raise damaged(f"epoch {epoch}")
        return epoch

    def acknowledge(self, probe: bool = True) -> None:
        """Acknowledge the current epoch (see the module docstring); reclaim what is due;
        then, with ``probe``, hand a freed id to this process's overflow holders, if any
        (``Lease.hand_over``: a quiescent point is where a holder may change ids)."""
        dom = self._dom
        with dom._plock, self._lock:
            if dom._lease.threads is not None:
                dom._lease.threads.reap()  # an ended borrower's id is the process's again
            dom._moves.sync()  # compaction first: then handles are keyed by their current ref
            r = self._root
            epoch = self.epoch()
            gone = set()
            for ref, since in self._pending.entries():
                if since > self.ack:
                    gone.add(ref)
                    for h in dom._by_ref.pop(ref, ()):
                        dom._retire(h)
            if dom._lease.threads is not None:
                self.acknowledge_threads(gone, epoch)
            self.ack = epoch
            vcpu = dom._lease.vcpu
            if vcpu is not None and vcpu < self._max:
                r[lease_base(self._max, vcpu) + L_ACK] = epoch
            if dom._lease.on_overflow():  # our lease, or a thread's (_lease invariant 8)
                dom._holder.set_ack(epoch)
            if self._pending.count():
                self.reclaim()
            if probe and dom._lease.on_overflow():
                dom._lease.hand_over()

    def copy_due(self, k: int | None) -> bool:
        """True when a compaction batch is in flight and id ``k``'s values are not moved yet."""
        gen = int(self._root[D_MV_GEN])
        return bool(gen & 1) and k is not None and k < self._max and int(
            self._root[move_state_base(self._max, k) + MS_DONE]) != gen

    def acknowledge_threads(self, gone: set[int], epoch: int) -> None:
        """Per-thread mode: retire or unbind the private handles concerned, stop the world if
        any changed (see the module docstring), then copy each thread id's moved values and
        acknowledge ``epoch`` for it. ``_plock`` and the domain lock held: no private handle
        binds again before its id's copy is done."""
        dom = self._dom
        threads = dom._lease.threads  # ended threads were reaped first (acknowledge)
        if dom._bindings.quiesce_private(gone):
            stop_the_world()
        r = self._root
        for st in threads.states:
            k = st.vcpu
            if k is not None and k < self._max:
                if self.copy_due(k):
                    dom._moves.adopt(k)
                r[lease_base(self._max, k) + L_ACK] = epoch

    def reclaim(self) -> int:
        """Zero and return every pending slot whose grace period is over (invariant 1); the
        slots reclaimed. Never waits. Domain lock held."""
        dom = self._dom
        r = self._root
        epoch = self.epoch()
        acks = [int(r[lease_base(self._max, k) + L_ACK]) for k in dom._holder.live(dom._lease.vcpu)]
        if any(a > epoch for a in acks):  # a holder past the epoch would release slots early
            raise damaged(f"a holder acknowledged an epoch after the current one ({epoch})")

        def check(ref: int, since: int, cls: int) -> None:  # else it would free live slots
            self._pagesets.check_ref(ref, cls)  # the class it was queued with: zero() uses it
            if not 1 <= since <= epoch or not self._pagesets.is_taken(ref):
                raise damaged(f"pending entry ({ref:#x}, epoch {since})")

        oldest = min(min(acks, default=epoch), self.ack)
        oldest = dom._holder.oldest_ack(oldest)  # holders sharing the overflow id
        due = self._pending.take_due(oldest, dom._moves.moving_refs(), check)
        for ref in due:  # each entry is gone already: a crash from here leaks, never doubles
            self._pagesets.zero(ref)
            self._pagesets.give_back([ref])
        return len(due)

    # -- the quiescer thread ----------------------------------------------------------------

    def start(self) -> None:
        """Start the quiescer unless it runs (or the test hook turned it off)."""
        if not self._dom._background_quiescer:
            return
        if self.thread is not None and self.thread.is_alive():
            return
        self.stop = threading.Event()
        t = threading.Thread(target=self._loop, args=(self.stop,), name="percpu-quiescer",
                             daemon=True)
        self.thread = t
        t.start()

    def detach(self) -> threading.Thread | None:
        """Ask the quiescer to stop and forget it; the thread, for the caller to join (after
        releasing the process lock, which the quiescer may be waiting for)."""
        self.stop.set()
        t, self.thread = self.thread, None
        return t

    def halt(self) -> None:
        """Stop the quiescer and wait for it (not holding the process lock)."""
        t = self.detach()
        if t is not None and t is not threading.current_thread():
            t.join()

    def after_fork(self) -> None:
        """In a forked child: the parent's quiescer does not exist here."""
        self.thread = None
        self.stop = threading.Event()

    def _loop(self, stop: threading.Event) -> None:
        dom = self._dom
        root = self._root
        lease = dom._lease
        threads = lease.threads
        ticks = 0
        while not stop.wait(QUIESCE_INTERVAL):
            ticks += 1
            try:
                # An overflow holder looks for a freed id at every tick where a record has no
                # pid (a clean release), and probes the locks every PROBE_TICKS ticks (a dead
                # holder's record keeps its pid).
                probe = lease.on_overflow() and (ticks % PROBE_TICKS == 0
                                                 or vacancy_hint(root, self._max))
                if probe or root[D_EPOCH] != self.ack or self._pending.count() or (
                        threads is not None and (threads.dead or any(
                            self.copy_due(st.vcpu) for st in list(threads.states)))):
                    self.acknowledge(probe)
                if root[D_MV_GEN] & 1 or root[D_MV_GEN] != dom._moves.seen:
                    dom._moves.tick()  # compaction: follow and drive the batch in flight
            except Exception as exc:  # invariant 3
                if dom._closed or dom._closing or stop.is_set():
                    return  # the domain was closed under us
                self.errors = [*self.errors[-15:], repr(exc)]
                stop.wait(QUIESCE_INTERVAL * 10)

    def synchronize(self, timeout: float | None) -> bool:
        """See :meth:`Domain.synchronize`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._dom._check_open()  # a close() from another thread ends the wait
            self.acknowledge()
            if self._pending.count() == 0:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.stop.wait(QUIESCE_INTERVAL)
