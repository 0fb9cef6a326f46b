"""How this process holds its vcpu id: the OFD locks of its lease and of the overflow id.

Holding id ``k`` is holding an OFD write lock on byte ``LEASE_LOCK_BASE + k`` of the domain's
file (``_lease_records`` has the rules and the pure bookkeeping). A holder of the shared overflow id
has no lease record; it publishes the epoch it has acknowledged as a read lock on byte
``OVERFLOW_ACK_BASE + epoch``, moved forward as it acknowledges, and each of its operations
holds the overflow lock (byte ``OVERFLOW_LOCK``).

Invariants
----------
1. The kernel drops every one of these locks when the last descriptor of their open file
   description closes, so a dead holder's id is free again and a dead overflow holder never
   holds back a grace period; the domain's file is mapped through another description
   (``arena._osmem.map_shared``) so that a forked child never keeps them alive.
2. The published overflow acknowledgement never jumps ahead: the new read lock is taken
   before the old one is dropped.
3. ``F_OFD_GETLK`` never reports the caller's own locks: every query here is about the
   *other* holders; the caller adds what it knows of itself.

The descriptor is read from the arena at each call: it changes in a forked child.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Any

from arena.locks import is_locked, read_lock, try_lock, unlock

from ._layout import LEASE_LOCK_BASE, OVERFLOW_ACK_BASE, OVERFLOW_LOCK
from ._lease_records import choose_lowest, live_ids, oldest_mark

# The overflow lock's two ``struct flock`` arguments (Linux 64-bit: short type, short whence,
# off_t start, off_t len, pid_t pid, which must be 0 for an OFD lock), packed once: the
# overflow path takes and drops this lock at every operation.
_FLOCK = struct.Struct("hhqqi4x")
_OVF_LOCK = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, OVERFLOW_LOCK, 1, 0)
_OVF_UNLOCK = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, OVERFLOW_LOCK, 1, 0)
_fcntl, _SETLKW, _SETLK = fcntl.fcntl, fcntl.F_OFD_SETLKW, fcntl.F_OFD_SETLK


class HolderLocks:
    """The lease, acknowledgement and overflow locks of one process on one domain (``arena``
    is the domain's arena: its ``fd`` is None for a private domain, where this process is the
    only holder and every lock is a no-op)."""

    def __init__(self, arena: Any, root: memoryview, max_vcpus: int) -> None:
        self._arena = arena
        self._root = root
        self._max = max_vcpus
        self.ack_byte: int | None = None  #: our overflow acknowledgement's byte, if any
        #: Ids held by this process's threads (per-thread leases, ``_lease.ThreadLeases``):
        #: their locks are on our own description, which ``try_lock`` and ``F_OFD_GETLK``
        #: cannot tell from a free id (invariant 3), so they are skipped and counted here.
        self.threads: set[int] = set()

    def choose(self, exclude: int | None = None) -> int | None:
        """The lowest id whose lease lock we get, skipping ids our threads hold and
        ``exclude`` (our own lease, when a thread chooses; 0 in a private domain whose
        threads hold no id); None: all taken."""
        fd, skip = self._arena.fd, self.threads
        if fd is None:
            return next((k for k in range(self._max) if k not in skip and k != exclude), None)
        return choose_lowest(self._max, lambda k: k not in skip and k != exclude
                             and try_lock(fd, LEASE_LOCK_BASE + k))

    def try_lease(self, k: int) -> bool:
        """Take id ``k``'s lease lock without waiting (to copy a dead holder's values); never
        an id one of our threads holds (it writes that id)."""
        if k in self.threads:
            return False
        fd = self._arena.fd
        return fd is None or try_lock(fd, LEASE_LOCK_BASE + k)

    def unlock_lease(self, k: int) -> None:
        """Drop id ``k``'s lease lock (ours, or taken by :meth:`try_lease`)."""
        fd = self._arena.fd
        if fd is not None:
            unlock(fd, LEASE_LOCK_BASE + k)

    def set_ack(self, epoch: int) -> None:
        """Publish that this overflow holder has acknowledged ``epoch`` (invariant 2)."""
        fd = self._arena.fd
        old, new = self.ack_byte, OVERFLOW_ACK_BASE + epoch
        if fd is None or old == new:
            return
        read_lock(fd, new)
        if old is not None:
            unlock(fd, old)
        self.ack_byte = new

    def clear_ack(self) -> None:
        """This holder no longer shares the overflow id."""
        fd, old = self._arena.fd, self.ack_byte
        self.ack_byte = None
        if fd is not None and old is not None:
            unlock(fd, old)

    def oldest_ack(self, limit: int) -> int:
        """``min(limit, the oldest epoch acknowledged by another live overflow holder)``: a
        binary search over lock queries, about ``log2(limit)`` syscalls."""
        fd = self._arena.fd
        if fd is None:
            return limit
        return oldest_mark(limit, lambda n: is_locked(fd, OVERFLOW_ACK_BASE, n))

    def live(self, mine: int | None) -> list[int]:
        """Ids whose holder is alive: a pid recorded and the lock held (ours, ``mine``, or
        another description's). Domain lock held."""
        fd = self._arena.fd
        threads = self.threads
        return live_ids(self._root, self._max, lambda k: k == mine or k in threads or (
            fd is not None and is_locked(fd, LEASE_LOCK_BASE + k)))

    def other_overflow_holders(self, epoch: int) -> bool:
        """True when another live holder shares the overflow id (each holds its read lock at
        ``OVERFLOW_ACK_BASE`` + an epoch it acknowledged, never beyond ``epoch``)."""
        fd = self._arena.fd
        return fd is not None and is_locked(fd, OVERFLOW_ACK_BASE, epoch + 1)

    def lock_overflow(self) -> None:
        """Wait for the overflow lock (an overflow operation; ``arena.locks.lock`` with its
        argument packed once; EINTR is retried by Python)."""
        fd = self._arena.fd
        if fd is not None:
            _fcntl(fd, _SETLKW, _OVF_LOCK)

    def try_overflow(self) -> bool:
        """Take the overflow lock without waiting (while holding the domain lock)."""
        fd = self._arena.fd
        return fd is None or try_lock(fd, OVERFLOW_LOCK)

    def unlock_overflow(self) -> None:
        fd = self._arena.fd
        if fd is not None:
            _fcntl(fd, _SETLK, _OVF_UNLOCK)
