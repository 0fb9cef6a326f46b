"""Grace periods of one process: acknowledging epochs and reclaiming slots nobody uses.

``remove`` publishes a slot in the pending queue under a new epoch (:meth:`Grace.publish`).
A process *acknowledges* an epoch (:meth:`Grace.acknowledge`) at a quiescent point: holding
its process lock and the GIL, so no thread of it is inside a hot-path statement, it follows
the compaction batch in flight, retires its handles of every slot that went pending since its
last acknowledgement, and records the epoch (its lease record's ``L_ACK``, or its overflow
acknowledgement lock). The quiescer thread does that every ``QUIESCE_INTERVAL``.

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
from ._layout import D_EPOCH, D_MV_GEN, L_ACK, lease_base
from ._pagesets import Pagesets
from ._pending import PendingQueue

QUIESCE_INTERVAL = 0.005  # seconds between the quiescer's looks at the epoch
EPOCH_LIMIT = 1 << 62  # an epoch word above it is damage (a remove a nanosecond: 146 years)


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

    def publish(self, ref: int) -> None:
        """Queue ``ref`` for reuse after a grace period (the caller reserved room in the
        queue). Domain lock held."""
        r = self._root
        self._pending.reserve()
        r[D_EPOCH] = self.epoch() + 1
        self._pending.push(ref, int(r[D_EPOCH]))

    def epoch(self) -> int:
        """The current epoch, checked (its OFD lock byte must fit the file offset range)."""
        epoch = int(self._root[D_EPOCH])
        if epoch >= EPOCH_LIMIT:
            raise damaged(f"epoch {epoch}")
        return epoch

    def acknowledge(self) -> None:
        """Acknowledge the current epoch (see the module docstring); reclaim what is due."""
        dom = self._dom
        with dom._plock, self._lock:
            dom._moves.sync()  # compaction first: then handles are keyed by their current ref
            r = self._root
            epoch = self.epoch()
            for ref, since in self._pending.entries():
                if since > self.ack:
                    for h in dom._by_ref.pop(ref, ()):
                        dom._retire(h)
            self.ack = epoch
            vcpu = dom._lease.vcpu
            if vcpu is not None and vcpu < self._max:
                r[lease_base(self._max, vcpu) + L_ACK] = epoch
            elif vcpu == self._max:
                dom._holder.set_ack(epoch)
            if self._pending.count():
                self.reclaim()

    def reclaim(self) -> int:
        """Zero and return every pending slot whose grace period is over (invariant 1); the
        slots reclaimed. Never waits. Domain lock held."""
        dom = self._dom
        r = self._root
        epoch = self.epoch()
        acks = [int(r[lease_base(self._max, k) + L_ACK]) for k in dom._holder.live(dom._lease.vcpu)]
        if any(a > epoch for a in acks):  # a holder past the epoch would release slots early
            raise damaged(f"a holder acknowledged an epoch after the current one ({epoch})")
        for ref, since in self._pending.entries():  # every entry, before any is taken out
            if not 1 <= since <= epoch or not self._pagesets.is_taken(ref):
                raise damaged(f"pending entry ({ref:#x}, epoch {since})")
        oldest = min(min(acks, default=epoch), self.ack)
        oldest = dom._holder.oldest_ack(oldest)  # holders sharing the overflow id
        due = self._pending.take_due(oldest, dom._moves.moving_refs())
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
        while not stop.wait(QUIESCE_INTERVAL):
            try:
                if root[D_EPOCH] != self.ack or self._pending.count():
                    self.acknowledge()
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
