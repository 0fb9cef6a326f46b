"""Cross-process locks on byte ranges of a file: Linux open-file-description (OFD) locks.

Why OFD locks: the kernel drops them when the last descriptor of the open file description
closes, which includes the death of the holder by SIGKILL, so a lock can never be left held by a
dead process. They belong to the open file description, not to the process, so:

- two threads sharing one descriptor do NOT exclude each other: :class:`SharedLock` adds a
  thread lock in front;
- a child after ``fork`` shares its parent's description and therefore its locks: the owner of a
  descriptor must open the file again in the child (``reopen_fd``) before locking.

Invariant: while a thread is inside ``with shared_lock:``, no other thread of any process
holding the same file (through its own description) is inside it for the same byte.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Callable
from types import TracebackType

# struct flock on Linux 64-bit: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("hhqqi4x")


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)  # pid must be 0 for OFD locks


def try_lock(fd: int, start: int, length: int = 1) -> bool:
    """Take an exclusive OFD lock on ``length`` bytes at ``start`` without waiting."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, start, length))
    except (BlockingIOError, PermissionError):
        return False
    return True


def lock(fd: int, start: int, length: int = 1) -> None:
    """Take an exclusive OFD lock, waiting for it (EINTR is retried by Python)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, start, length))


def read_lock(fd: int, start: int, length: int = 1) -> None:
    """Take a shared OFD read lock without waiting (``BlockingIOError`` if a write lock is
    held there). Several descriptions may hold read locks on the same bytes at once."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, start, length))


def unlock(fd: int, start: int, length: int = 1) -> None:
    """Release an OFD lock held through ``fd``'s open file description."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, start, length))


def is_locked(fd: int, start: int, length: int = 1) -> bool:
    """True when another open file description holds a lock overlapping the range."""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
    return bool(_FLOCK.unpack(out)[0] != fcntl.F_UNLCK)


def reopen_fd(fd: int, path: str | None) -> int:
    """A new open file description of the same file as ``fd`` (for a child after fork).

    Opened through ``/proc/self/fd/<fd>``, which reaches the very inode even when its name was
    unlinked or replaced since (a memfd has no name at all); where /proc is missing, a
    path-backed file is reopened by ``path`` (O_NOFOLLOW). Either way the result is checked to
    be the same inode.
    """
    flags = os.O_RDWR | os.O_CLOEXEC
    before = os.fstat(fd)
    try:
        new = os.open(f"/proc/self/fd/{fd}", flags)
    except OSError:
        if not path:
            raise
        new = os.open(path, flags | os.O_NOFOLLOW)
    after = os.fstat(new)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(new)
        raise OSError(f"{path} was replaced after it was opened; refusing to lock another file")
    return new


class SharedLock:
    """A re-entrant lock over threads of this process and processes sharing the file.

    Lock order: the thread lock first, then the OFD lock; released in reverse. ``fd`` may be
    None for a private structure, and is replaced after fork by its owner (``set_fd``).
    ``on_acquire`` runs each time the outermost acquisition completes, whoever takes the lock
    (the arena's own methods or a layer above through ``Arena.locked_section``): the arena uses
    it to repair an operation that a dead holder left half done. If it raises, the lock is
    released again and the exception propagates.
    """

    __slots__ = ("_depth", "_fd", "_lock_request", "_mutex", "_on_acquire", "_unlock_request")

    def __init__(self, fd: int | None, start: int,
                 on_acquire: Callable[[], object] | None = None) -> None:
        self._fd = fd
        self._on_acquire = on_acquire
        # The two fcntl requests, packed once: every operation of a shared arena makes both.
        self._lock_request = _flock(fcntl.F_WRLCK, start, 1)
        self._unlock_request = _flock(fcntl.F_UNLCK, start, 1)
        # Guards _depth and, with the OFD lock, whatever the owner protects; held by one thread.
        self._mutex = threading.RLock()
        self._depth = 0

    def set_fd(self, fd: int | None) -> None:
        """Point at a new descriptor (after fork); resets the thread state of the dead parent."""
        self._fd = fd
        self._mutex = threading.RLock()
        self._depth = 0

    def acquire(self) -> bool:
        """Take the lock; True when this is the outermost acquisition."""
        self._mutex.acquire()
        if self._depth == 0 and self._fd is not None:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, self._lock_request)  # lock(), inlined
            except BaseException:
                self._mutex.release()
                raise
        self._depth += 1
        if self._depth == 1:
            if self._on_acquire is not None:
                try:
                    self._on_acquire()
                except BaseException:
                    self.release()
                    raise
            return True
        return False

    def try_acquire(self) -> bool:
        """Take the lock only if no thread or process holds it now; True when taken."""
        if not self._mutex.acquire(blocking=False):
            return False
        if self._depth == 0 and self._fd is not None:
            try:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._lock_request)
            except BaseException:
                self._mutex.release()
                return False
        self._depth += 1
        if self._depth == 1 and self._on_acquire is not None:
            try:
                self._on_acquire()
            except BaseException:
                self.release()
                raise
        return True

    def release(self) -> None:
        """Release one level; the OFD lock goes with the outermost level."""
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._unlock_request)  # unlock(), inlined
        self._mutex.release()

    @property
    def thread_lock(self) -> threading.RLock:
        """The thread lock in front (replaced by ``set_fd``). Without a descriptor it is the
        whole lock: an owner may take it directly to skip this wrapper, provided it runs the
        ``on_acquire`` check itself, and takes nothing else through the wrapper meanwhile
        that needs ``on_acquire`` to see a consistent state."""
        return self._mutex

    @property
    def held(self) -> bool:
        """True when the calling thread holds the lock (for assertions)."""
        return self._depth > 0 and self._mutex._is_owned()  # type: ignore[attr-defined]

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
