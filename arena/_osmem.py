"""The OS side of an arena: mappings, prefaulting, memory locking, shared files, fault counts.

Everything here is a thin wrapper over one system facility, so the allocator logic stays pure.
Platform look-ups happen once, at import; a missing facility is None and callers test for it.

Security rules for shared files (the data in them is never trusted before validation):
created with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 (fchmod'ed too, whatever the umask);
opened with O_NOFOLLOW|O_NONBLOCK|O_NOCTTY (a FIFO or a terminal planted at the path can neither
block the opener nor become its terminal), then refused unless it is a regular file owned by
this user and not writable by group or others.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import BadArenaFile

MCL_CURRENT = 1
MCL_FUTURE = 2


def _libc_function(name: str) -> Callable[..., int] | None:
    """A libc function with errno capture, or None where libc lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn: Callable[..., int] = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return fn


_mlock = _libc_function("mlock")
_munlock = _libc_function("munlock")
_mlockall = _libc_function("mlockall")
_munlockall = _libc_function("munlockall")
if _mlock is not None:
    _mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]  # type: ignore[attr-defined]
if _munlock is not None:
    _munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]  # type: ignore[attr-defined]

_MAP_POPULATE: int | None = getattr(mmap, "MAP_POPULATE", None)


def buffer_address(mm: mmap.mmap) -> int:
    """Virtual address of the first byte of ``mm`` (the ctypes export is dropped at once)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def map_private(size: int, populate: bool) -> mmap.mmap:
    """A private anonymous read-write mapping of ``size`` bytes."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate and _MAP_POPULATE is not None:
        flags |= _MAP_POPULATE
    return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def map_shared(fd: int, size: int, populate: bool) -> mmap.mmap:
    """A shared read-write mapping of the first ``size`` bytes of ``fd``.

    ``mmap.mmap`` keeps a ``dup`` of the descriptor it maps for as long as the mapping lives,
    and a dup shares the open file description, hence its OFD locks. A child forked later
    would inherit that dup and keep the parent's locks (its lease, the domain lock) alive
    after the parent died, for ever. So the mapping is made through a second open file
    description of the same file (``/proc/self/fd``), which never takes a lock.
    """
    flags = mmap.MAP_SHARED
    if populate and _MAP_POPULATE is not None:
        flags |= _MAP_POPULATE
    try:
        lockless = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # no /proc: map through fd itself (forks then keep the parent's locks)
        lockless = os.dup(fd)
    try:
        if os.path.samestat(os.fstat(lockless), os.fstat(fd)):
            return mmap.mmap(lockless, size, flags=flags,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        raise OSError(f"descriptor {fd} could not be reopened as the same file")
    finally:
        os.close(lockless)


def touch_pages(mm: mmap.mmap, write: bool) -> None:
    """Fault in every page. Writes (same value back) only where nobody else can be writing:
    a private mapping at creation. Shared mappings are read-touched (mlock does the rest)."""
    step = mmap.PAGESIZE
    if write:
        for i in range(0, len(mm), step):
            mm[i] = mm[i]
    else:
        total = 0
        for i in range(0, len(mm), step):
            total += mm[i]


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (resource.RLIM_INFINITY when unlimited)."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


def mlock(mm: mmap.mmap) -> int:
    """Lock ``mm`` in RAM. Returns 0 on success, else the errno (ENOMEM/EPERM/ENOSYS)."""
    if _mlock is None:
        return 38  # ENOSYS
    if _mlock(buffer_address(mm), len(mm)) == 0:
        return 0
    return ctypes.get_errno()


def munlock(mm: mmap.mmap) -> None:
    """Unlock ``mm`` (best effort: unmapping unlocks anyway)."""
    if _munlock is not None:
        _munlock(buffer_address(mm), len(mm))


def mlockall(current: bool = True, future: bool = True) -> None:
    """Lock all of this process's memory (``mlockall(MCL_CURRENT|MCL_FUTURE)``).

    With ``future`` every later mapping is locked too, so the process never page-faults on
    memory it already has, nor on memory it maps later (which must then fit RLIMIT_MEMLOCK).
    Raises OSError with the limit in the message when the kernel refuses.
    """
    if _mlockall is None:
        raise OSError(38, "mlockall is not available in this C library")
    flags = (MCL_CURRENT if current else 0) | (MCL_FUTURE if future else 0)
    if _mlockall(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlockall failed: {os.strerror(err)}; RLIMIT_MEMLOCK is "
                           f"{format_limit(memlock_limit())} (raise it with `ulimit -l`, "
                           "systemd LimitMEMLOCK=, or grant CAP_IPC_LOCK)")


def munlockall() -> None:
    """Undo :func:`mlockall`."""
    if _munlockall is not None:
        _munlockall()


def format_limit(value: int) -> str:
    """A limit for humans: 'unlimited' or bytes with KiB."""
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{value} bytes ({value // 1024} KiB)"


@dataclass(frozen=True)
class FaultCounts:
    """Page faults of this process so far (getrusage)."""

    minor: int
    major: int


def fault_counts() -> FaultCounts:
    """This process's minor and major page faults since it started."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return FaultCounts(usage.ru_minflt, usage.ru_majflt)


def create_file(path: str, size: int) -> int:
    """Create ``path`` exclusively, 0600, never through a symlink; reserve ``size`` bytes.

    Returns the descriptor. On any failure the file is removed again.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        try:
            # Reserve the pages now: on tmpfs a later shortage would be SIGBUS, not an error.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: filesystem cannot preallocate
                raise
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def open_file(path: str) -> tuple[int, int]:
    """Open an existing shared file after the ownership and mode checks; (fd, size).

    Refusals raise :class:`BadArenaFile`; a path that does not exist raises FileNotFoundError.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symbolic link
            raise BadArenaFile(exc.errno, f"{path} is a symbolic link; refusing it") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            raise BadArenaFile(exc.errno, f"{path}: not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        problem = file_problem(st, os.geteuid())
        if problem:
            raise BadArenaFile(errno.EPERM, f"{path}: {problem}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def file_problem(st: os.stat_result, euid: int) -> str | None:
    """Why a shared file must not be trusted, or None. Pure, for tests."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != euid:
        return f"owned by uid {st.st_uid}, not by this user (uid {euid})"
    if st.st_mode & 0o022:
        return f"mode {stat.S_IMODE(st.st_mode):04o} is writable by group or others (want 0600)"
    return None


def memfd(name: str, size: int) -> int:
    """An anonymous shared file (memfd) of ``size`` bytes, inherited by children across fork."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
