"""Byte-range OFD locks on a shared file: the helpers layers above the arena build on.

``percpu`` keeps its vcpu-id leases, its domain lock and its grace-period acknowledgements in
bytes of the arena's file (``Arena.fd``), with the same kernel guarantee as the arena's own
lock: a lock dies with the last descriptor of its open file description, so with its holder,
even by SIGKILL. See ``arena._locks`` for the rules (descriptions, not processes, own them;
reopen after fork).
"""

from ._locks import SharedLock, is_locked, lock, read_lock, reopen_fd, try_lock, unlock

__all__ = ["SharedLock", "is_locked", "lock", "read_lock", "reopen_fd", "try_lock", "unlock"]
