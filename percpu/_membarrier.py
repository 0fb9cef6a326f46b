"""membarrier(2) through ctypes: the asymmetric fence of compaction's rare path.

Why it exists (the full argument is in ``_compact``'s docstring): a reader sums a counter's
slots without any lock, checking a batch generation and per-id sequence counts before and after.
That check relies on the reader's loads happening in program order. x86-64 (TSO) and s390x keep
loads in order with each other and stores in order with each other, so nothing is needed there:
:data:`STRATEGY` is ``"tso"`` and :func:`fence` does nothing. On weakly ordered CPUs (arm64,
POWER, RISC-V) loads may be reordered; instead of a fence on every read, the rare writer (a
value copy during a move, the end of a batch) calls ``membarrier``, which makes every running
thread of every registered process execute a full barrier (liburcu's "memb" flavour).

Strategies, best first, chosen once at import (:func:`choose_strategy`, pure):

* ``"tso"``: the CPU orders what the readers need; no syscall.
* ``"global-expedited"``: ``MEMBARRIER_CMD_GLOBAL_EXPEDITED`` (IPIs to CPUs running processes
  that registered with ``MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED``; every process that maps a
  domain registers in :func:`register`). Microseconds.
* ``"global"``: ``MEMBARRIER_CMD_GLOBAL`` (no registration; waits for an RCU grace period,
  milliseconds). Used when registering is refused.
* ``"lock"``: no usable membarrier (old kernel, seccomp, ``nohz_full``): readers take the domain
  lock instead (correct by the kernel lock's acquire/release; slower reads).

``MEMBARRIER_CMD_PRIVATE_EXPEDITED`` orders the threads of *one* process only; the threads of a
process are already ordered by the GIL hand-off (a mutex), so it has no use here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable

MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1 << 0
MEMBARRIER_CMD_GLOBAL_EXPEDITED = 1 << 1
MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2
MEMBARRIER_CMD_PRIVATE_EXPEDITED = 1 << 3
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4

#: syscall numbers of membarrier by ``platform.machine()`` (the generic table for the rest)
SYSCALL_NUMBERS = {
    "x86_64": 324, "amd64": 324, "i386": 375, "i686": 375,
    "aarch64": 283, "arm64": 283, "riscv64": 283, "loongarch64": 283,
    "ppc64": 365, "ppc64le": 365, "s390x": 356, "armv7l": 389, "armv8l": 389,
}
#: CPUs whose memory model keeps loads ordered with loads and stores with stores (TSO or
#: stronger), which is all the lock-free readers need
TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "s390x"})

STRATEGIES = ("tso", "global-expedited", "global", "lock")


def choose_strategy(machine: str, supported: int | None, registered: bool) -> str:
    """The fence strategy for a CPU ``machine``, the ``MEMBARRIER_CMD_QUERY`` mask
    (None when the syscall is missing or refused) and whether registering for the expedited
    command succeeded."""
    if machine in TSO_MACHINES:
        return "tso"
    if supported is None:
        return "lock"
    if registered and supported & MEMBARRIER_CMD_GLOBAL_EXPEDITED:
        return "global-expedited"
    if supported & MEMBARRIER_CMD_GLOBAL:
        return "global"
    return "lock"


def _lookup_syscall() -> Callable[[int], int] | None:
    """``membarrier(cmd, 0, 0)`` as a callable returning the result (-errno on failure), or
    None when this platform has no way to call it."""
    number = SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long

    def membarrier(cmd: int) -> int:
        ret = int(syscall(ctypes.c_long(number), ctypes.c_int(cmd), ctypes.c_uint(0),
                          ctypes.c_int(0)))
        return -ctypes.get_errno() if ret < 0 else ret

    return membarrier


_membarrier = _lookup_syscall()


def query() -> int | None:
    """The mask of commands the kernel supports, or None (no syscall, ENOSYS, EPERM...)."""
    if _membarrier is None:
        return None
    ret = _membarrier(MEMBARRIER_CMD_QUERY)
    return ret if ret >= 0 else None


_SUPPORTED = query()
_registered_pid = 0


def register() -> bool:
    """Register this process for the expedited global command (once per process; again in a
    forked child). True when registered; nothing to do (True) for the other strategies."""
    global _registered_pid
    if STRATEGY != "global-expedited" or _registered_pid == os.getpid():
        return True
    assert _membarrier is not None
    ok = _membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0
    if ok:
        _registered_pid = os.getpid()
    return ok


def _initial_strategy() -> str:
    machine = platform.machine()
    if machine in TSO_MACHINES or _membarrier is None or _SUPPORTED is None:
        return choose_strategy(machine, _SUPPORTED, False)
    registered = bool(_SUPPORTED & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) and (
        _membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0)
    return choose_strategy(machine, _SUPPORTED, registered)


#: the strategy of this process (see the module docstring)
STRATEGY = _initial_strategy()
if STRATEGY == "global-expedited":
    _registered_pid = os.getpid()


def membarrier(cmd: int) -> None:
    """Issue ``membarrier(cmd)``; raises OSError when the kernel refuses it."""
    if _membarrier is None:
        raise OSError(errno.ENOSYS, "membarrier is not available on this platform")
    ret = _membarrier(cmd)
    if ret < 0:
        raise OSError(-ret, f"membarrier({cmd}): {os.strerror(-ret)}")


def fence() -> None:
    """The writer's side of the asymmetric fence: after it returns, every running thread of
    every process that maps a domain has executed a full memory barrier (or the CPU needs
    none). Called only on compaction's rare path, never on the hot path or by readers."""
    if STRATEGY == "tso" or STRATEGY == "lock":
        return
    membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED if STRATEGY == "global-expedited"
               else MEMBARRIER_CMD_GLOBAL)


#: True when lock-free readers are unsafe (no fence available on a weakly ordered CPU):
#: the domain then reads under its lock
READ_UNDER_LOCK = STRATEGY == "lock"
#: True when :func:`fence` issues a syscall (a weakly ordered CPU with membarrier)
NEEDS_FENCE = STRATEGY in ("global-expedited", "global")
