"""Read the kernel's ``struct rseq`` that glibc registers for each thread.

A diagnostic and a placement hint, **never the basis of correctness**: Python cannot run a
restartable sequence, so the CPU read here may be stale by the time it is used (the thread can
migrate right after the read). Use it to pick a likely-uncontended slot, not to own one.

How the struct is found. glibc >= 2.35 registers one ``struct rseq`` per thread with the kernel
and exports ``__rseq_offset`` (its offset from the thread pointer), ``__rseq_size`` (0 when
registration is disabled or failed at start-up) and ``__rseq_flags``. On x86-64 the thread
pointer is the TCB (glibc's ``TLS_TCB_AT_TP``) and ``pthread_self()`` returns exactly that
address, so the struct is at ``pthread_self() + __rseq_offset``. Elsewhere (aarch64, ppc64,
riscv: ``TLS_DTV_AT_TP``) the thread pointer is not reachable from Python without native code,
and this module reports rseq as unavailable; 32-bit x86 and x32 would work the same way as
x86-64 but are untested and also refused.

Layout (offsets in bytes): ``u32 cpu_id_start @0, u32 cpu_id @4, u64 rseq_cs @8, u32 flags @16,
u32 node_id @20, u32 mm_cid @24``. The kernel requires a registered area of at least 32 bytes
(the original ``struct rseq`` with its padding), so the 28 bytes up to ``mm_cid`` are always
memory of the area once ``__rseq_size`` says rseq is registered. Whether the kernel *fills*
``node_id`` and ``mm_cid`` (Linux >= 6.3) is told by ``getauxval(AT_RSEQ_FEATURE_SIZE)``
(>= 24 and >= 28), else by the kernel release. ``__rseq_size`` itself is not used for that: it
is 32 on glibc 2.35-2.39 (active area 20), 20 on 2.40 and on distributions that backported that
change (Debian 12's 2.36 among them), and the feature size from 2.41.

Safety. Every ctypes look-up is made once, at import, and stored as None when missing; the
address is only dereferenced when the architecture is x86-64 with 8-byte pointers, the glibc
symbols exist, ``__rseq_size >= 20``, ``__rseq_offset`` is non-zero and 32-byte aligned, and
``pthread_self()`` is non-zero. Each thread keeps a ctypes view (``c_uint32`` array
``from_address``) of its own struct, made on its first read; a read is then one 28-byte copy.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AT_RSEQ_FEATURE_SIZE",
    "RSEQ_CPU_ID_REGISTRATION_FAILED",
    "RSEQ_CPU_ID_UNINITIALIZED",
    "RseqInfo",
    "available",
    "current_cpu",
    "read",
]

#: ``cpu_id`` of a struct rseq that was never registered.
RSEQ_CPU_ID_UNINITIALIZED = 0xFFFFFFFF
#: ``cpu_id`` glibc stores when registering the thread's struct rseq failed (-2 as a u32).
RSEQ_CPU_ID_REGISTRATION_FAILED = 0xFFFFFFFE
#: The auxiliary vector entry giving the kernel's rseq feature size (Linux >= 6.3).
AT_RSEQ_FEATURE_SIZE = 27

# Byte offset just past each field ("offsetofend"), compared with the kernel's feature size.
_NODE_ID_END = 24
_MM_CID_END = 28
# The feature size of kernels before the extensible ABI: cpu_id_start, cpu_id, rseq_cs, flags.
_ORIGINAL_FEATURE_SIZE = 20
# cpu_id @4, node_id @20, mm_cid @24, native byte order, from a 28-byte copy.
_LAYOUT = struct.Struct("=4xI12xII")
_RSEQ_ALIGN = 32


@dataclass(frozen=True, slots=True)
class RseqInfo:
    """One read of the calling thread's struct rseq.

    Attributes:
        cpu_id: the CPU the thread was running on when it last returned to user space.
        node_id: that CPU's NUMA node, or None where the kernel does not fill it (< 6.3).
        mm_cid: the thread's concurrency id within its process (compact, below the number of
            CPUs the process may use), or None where the kernel does not fill it (< 6.3).
    """

    cpu_id: int
    node_id: int | None
    mm_cid: int | None


# --- look-ups, once at import ----------------------------------------------------------------


def _open_libc() -> ctypes.CDLL | None:
    """The process's global symbol namespace (libc and the dynamic loader), or None."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _variable(
    lib: ctypes.CDLL | None, ctype: type[ctypes.c_ssize_t | ctypes.c_uint], name: str
) -> int | None:
    """The value of the exported variable *name*, or None when *lib* does not export it."""
    if lib is None:
        return None
    try:
        return int(ctype.in_dll(lib, name).value)
    except ValueError:
        return None


def _function(
    lib: ctypes.CDLL | None,
    name: str,
    restype: type[ctypes.c_int | ctypes.c_ulong],
    argtypes: list[type[ctypes.c_ulong]],
) -> Callable[..., int] | None:
    """A fresh ctypes function object for *name* (not the library's shared cached one), or
    None when *lib* does not export it."""
    if lib is None:
        return None
    try:
        fn = lib[name]
    except AttributeError:
        return None
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def _thread_pointer_is_pthread_self(machine: str, pointer_size: int) -> bool:
    """Whether glibc's ``pthread_self()`` is the thread pointer on this machine (x86-64 only)."""
    return machine == "x86_64" and pointer_size == 8


def _kernel_version(release: str) -> tuple[int, int] | None:
    """``(major, minor)`` from ``os.uname().release`` (``"6.1.0-18-amd64"`` gives (6, 1))."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _kernel_feature_size(getauxval: Callable[[int], int] | None, release: str) -> int:
    """The rseq feature size of the running kernel: ``getauxval(AT_RSEQ_FEATURE_SIZE)`` where
    libc has getauxval, else 28 for a kernel release >= 6.3. A kernel without the auxv entry
    (it came in 6.3, with node_id and mm_cid) has the original 20."""
    if getauxval is not None:
        size = getauxval(AT_RSEQ_FEATURE_SIZE)
        return size if size > 0 else _ORIGINAL_FEATURE_SIZE
    version = _kernel_version(release)
    if version is not None and version >= (6, 3):
        return _MM_CID_END
    return _ORIGINAL_FEATURE_SIZE


_libc = _open_libc()
#: ``__rseq_offset`` (bytes from the thread pointer to the struct), None where not exported.
_rseq_offset: int | None = _variable(_libc, ctypes.c_ssize_t, "__rseq_offset")
#: ``__rseq_size``, 0 where not exported (which reads the same as "not registered").
_rseq_size: int = _variable(_libc, ctypes.c_uint, "__rseq_size") or 0
_pthread_self: Callable[[], int] | None = _function(_libc, "pthread_self", ctypes.c_ulong, [])
_sched_getcpu: Callable[[], int] | None = _function(_libc, "sched_getcpu", ctypes.c_int, [])
_getauxval: Callable[[int], int] | None = _function(
    _libc, "getauxval", ctypes.c_ulong, [ctypes.c_ulong]
)
_SUPPORTED_ARCH = _thread_pointer_is_pthread_self(
    os.uname().machine, ctypes.sizeof(ctypes.c_void_p)
)
_FEATURE_SIZE = _kernel_feature_size(_getauxval, os.uname().release)
_HAS_NODE_ID = _FEATURE_SIZE >= _NODE_ID_END
_HAS_MM_CID = _FEATURE_SIZE >= _MM_CID_END


def _static_unavailable_reason() -> str | None:
    """Why the struct cannot be located in this process, or None when it can."""
    if not _SUPPORTED_ARCH:
        return "the thread pointer is only reachable from Python on x86-64"
    if _rseq_offset is None or _pthread_self is None:
        return "libc does not export __rseq_offset / pthread_self (glibc >= 2.35 needed)"
    if _rseq_size < _ORIGINAL_FEATURE_SIZE:
        return f"glibc did not register rseq (__rseq_size = {_rseq_size})"
    if _rseq_offset == 0 or _rseq_offset % _RSEQ_ALIGN:
        return f"implausible __rseq_offset {_rseq_offset}"
    return None


_STATIC_REASON = _static_unavailable_reason()


# --- reading ---------------------------------------------------------------------------------


# The 28 bytes up to mm_cid, as seven u32 (rseq_cs is two of them; it is not read).
_Area = ctypes.c_uint32 * (_MM_CID_END // 4)
_CPU_ID_INDEX = 1
# Per thread: a ctypes view of that thread's struct rseq, made on its first read. The address
# is fixed for the thread's life and survives fork (the child's one thread is the forking
# thread, at the same address, and the kernel keeps the registration across fork).
_local = threading.local()


def _area() -> ctypes.Array[ctypes.c_uint32] | None:
    """A view of the calling thread's struct rseq, or None when it cannot be located."""
    offset = _rseq_offset
    pthread_self = _pthread_self
    if offset is None or pthread_self is None or _STATIC_REASON is not None:
        return None
    try:
        area: ctypes.Array[ctypes.c_uint32] = _local.area
    except AttributeError:
        thread_pointer = pthread_self()
        if not thread_pointer:
            return None
        area = _Area.from_address(thread_pointer + offset)
        _local.area = area
    return area


def _read_raw() -> tuple[int, int, int] | None:
    """``(cpu_id, node_id, mm_cid)`` as the kernel left them, or None when the struct cannot be
    located. The values are not interpreted (cpu_id may be a sentinel). One copy of the 28
    bytes; the thread may still migrate during it, so the fields can come from two CPUs."""
    area = _area()
    if area is None:
        return None
    fields: tuple[int, int, int] = _LAYOUT.unpack(area)
    return fields


def read() -> RseqInfo | None:
    """The calling thread's struct rseq, or None where unavailable: no glibc symbols, rseq not
    registered (``__rseq_size`` 0, or this thread's cpu_id uninitialized / registration
    failed), or an architecture other than x86-64. ``node_id`` and ``mm_cid`` are None where
    the kernel does not fill them."""
    raw = _read_raw()
    if raw is None:
        return None
    cpu_id, node_id, mm_cid = raw
    if cpu_id in (RSEQ_CPU_ID_UNINITIALIZED, RSEQ_CPU_ID_REGISTRATION_FAILED):
        return None
    return RseqInfo(
        cpu_id=cpu_id,
        node_id=node_id if _HAS_NODE_ID else None,
        mm_cid=mm_cid if _HAS_MM_CID else None,
    )


def available() -> bool:
    """Whether :func:`read` works for the calling thread."""
    return read() is not None


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (a hint: it may migrate at once): rseq's cpu_id, else
    libc's ``sched_getcpu()``, else None."""
    area = _area()
    if area is not None:
        cpu_id: int = area[_CPU_ID_INDEX]
        if cpu_id not in (RSEQ_CPU_ID_UNINITIALIZED, RSEQ_CPU_ID_REGISTRATION_FAILED):
            return cpu_id
    sched_getcpu = _sched_getcpu
    if sched_getcpu is None:
        return None
    cpu = sched_getcpu()
    return cpu if cpu >= 0 else None


def _unavailable_reason() -> str | None:
    """Why :func:`read` returns None for the calling thread, or None when it works (for
    diagnostics and test skip messages)."""
    if _STATIC_REASON is not None:
        return _STATIC_REASON
    raw = _read_raw()
    if raw is None:
        return "the rseq symbols were not found"
    if raw[0] == RSEQ_CPU_ID_UNINITIALIZED:
        return "this thread's struct rseq is not registered"
    if raw[0] == RSEQ_CPU_ID_REGISTRATION_FAILED:
        return "registering this thread's struct rseq failed"
    return None
