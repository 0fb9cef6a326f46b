"""The arena: a fixed region mapped once, never grown, from which aligned blocks are handed out.

This module is glue: argument checking, the user's handles (:class:`Block`), locking, statistics
and checks. The allocator itself is :mod:`arena._tlsf` (pure); the OS effects are
:mod:`arena._osmem` and :mod:`arena._locks`.

Invariants
----------
1. Everything the allocator knows lives inside the mapping (header, tags, free links), so a
   file-backed arena is one allocator shared by every process that maps it.
2. Every operation runs under one lock: a thread lock plus, for a shared arena, an OFD lock on
   byte 0 of the file (released by the kernel if the holder dies). ``W_OP`` marks an operation
   in progress; whoever next takes the lock (an arena method or a layer above through
   :meth:`Arena.locked_section`) and finds it set repairs the index first (see ``_tlsf``).
   A private arena's alloc and free take the thread lock directly, not through the wrapper,
   and check ``W_OP`` themselves once they hold it; so does every allocator path of a shared
   arena (a cheap second look after the wrapper's). Whatever they call that takes the wrapper
   again (the drain of the caches) runs with ``W_OP`` clear.
3. A :class:`Block` is valid while this process's ``_live`` table maps its offset to that very
   object. ``free`` checks identity, so a double free, a copied/forged handle or a stale one is
   refused before anything is changed. Offsets that come from outside (``block_at``) and frees
   of blocks another process may have freed are checked against the tags (``Tlsf.used_size``,
   and in a shared arena the owner pid the handle saw, so a block freed and allocated again by
   another process is not freed through an old handle).
4. After ``Arena(...)`` returns, the whole mapping is resident (prefaulted) and, when locking
   succeeded, locked: allocating and using blocks never page-faults.
5. Every word read from the mapping is checked before it is used (``_tlsf`` Rule 4): a damaged
   index or header word makes the operation raise :class:`BadArenaFile` with nothing changed
   (``W_OP`` is put back as it was), never IndexError/ValueError, never a store through it.

Interrupted operations
----------------------
A shared arena sets ``W_OP`` to its pid around every allocator operation (a process killed
inside one leaves it set). A private arena has no other process to outlive it, so its alloc and
free leave ``W_OP`` alone unless the operation raises (KeyboardInterrupt, MemoryError: the
handler's first store marks it; a refusal of damaged words changed nothing and leaves it
clear), and a child after ``fork`` marks it when another thread of its parent held the lock
at the fork (it may have been inside an operation). Either way the next holder finds ``W_OP``
set and rebuilds, as after a death.

Caches
------
A freed block of up to ``cache_max`` bytes is kept, still allocated in the TLSF, on a per-size
list of this process and handed out again without the allocator or its lock: up to 4 KiB on the
quick lists of a private arena (found by the size in bytes; each list bounded by a length,
``_Stack.cap``, so the fast path counts no bytes), above that (and at every size in a shared
arena that asked for it) on lists bounded in bytes by ``cache_bytes``; ``cache_max`` bounds
both. ``stats()``, ``check()``, ``close()`` and (shared arenas) the exit of the process give
every cached block back to the allocator first, so the figures stay exact; an allocation that
finds no run gives back the smallest cached block that holds it, else every cached block when
they would coalesce (with their free neighbours) into a run that holds it, so nothing is refused
while cached memory could serve it; when no such run exists it is refused with every cache
kept (its message gives the figures ``stats()`` would, computed without giving them back). A
shared arena's cache is safe across
processes: a block enters it, under the lock, by setting TAG_CACHED in its start tag with this
process as owner, and keeps the mark while this process hands it out and takes it back (so the
warm pair makes no fcntl call and no store to a tag). A marked block is this process's alone:
another process's ``block_at`` and ``free`` refuse it (StaleBlock), ``keep`` clears the mark,
and once its owner is dead ``check()`` lists it as leaked (``reclaim=True`` frees it). A child
after fork drops the shared caches it inherited (their blocks are its parent's).

Threads and fork: every public method is thread-safe. A child after ``fork`` reopens the file
of a shared arena (a fresh open file description, so its locks are its own), resets the thread
lock that a parent thread may have held at the fork, locks the mapping again when the parent's
was locked (memory locks are not inherited; for a private arena this also copies its pages, so
the child does not take copy-on-write faults later) and restarts its fault counts.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeAlias

from . import _osmem
from ._errors import (
    ArenaClosed,
    ArenaError,
    ArenaExhausted,
    ArenaExists,
    BadArenaFile,
    DoubleFree,
    ForeignBlock,
    InvalidArgument,
    InvalidType,
    MemlockError,
    StaleBlock,
)
from ._layout import (
    MAGIC,
    MAX_GRANULE,
    MAX_GRANULES,
    MIN_GRANULE,
    PAGE_SIZE,
    TAG_CACHED,
    TAG_OWNER_MAX,
    TAG_OWNER_SHIFT,
    TAG_SIZE_MASK,
    TAG_USED,
    VERSION,
    W_ALLOCS,
    W_CREATOR,
    W_FAILED,
    W_FREES,
    W_GRANULE,
    W_HEAP,
    W_MAGIC,
    W_NGRAN,
    W_OP,
    W_RECOVERIES,
    W_ROOT,
    W_TAGS,
    W_TOTAL,
    W_VERSION,
    Layout,
    is_power_of_two,
    layout_for,
    validate_header,
)
from ._locks import SharedLock, reopen_fd
from ._tlsf import CorruptArena, CorruptIndex, Tlsf, add64

LockPolicy: TypeAlias = Literal["auto", "require"] | bool
ARENA_LOCK_BYTE = 0  # OFD lock byte of the allocator; other layers lock other bytes
_LOCK_POLICIES = ("auto", "require", True, False)
# A block's ``_view`` slot is its state: None (live, no view made yet), its memoryview (live),
# or _FREED. One slot for both keeps the hot paths at one store each.
_FREED: memoryview = memoryview(b"")
_FREED.release()
# A private arena keeps freed blocks of every size up to QUICK_MAX_BYTES (and ``cache_max``) on
# a per-size list and hands them out again without the allocator (as glibc's tcache does); a
# table indexed by the size in bytes finds the list in one step, and the bound is a length
# fixed per list (no byte count on the fast path): QUICK_DEPTH blocks a size up to
# QUICK_DEEP_BYTES, above that at most QUICK_SIZE_BYTES and 1/QUICK_HEAP_SHARE of the heap a
# size (at least one block), so that blocks held back cannot scatter a small heap.
QUICK_MAX_BYTES = 4096
QUICK_DEPTH = 64
QUICK_DEEP_BYTES = 1024
QUICK_SIZE_BYTES = 64 << 10
QUICK_HEAP_SHARE = 256
# Above them, up to ``cache_max`` bytes (default CACHE_MAX_BYTES), every arena keeps freed
# blocks on per-size lists bounded in bytes (``cache_bytes``; defaults below), private and
# shared alike (see "Caches" in the module docstring).
CACHE_MAX_BYTES = 1 << 20
CACHE_PRIVATE_SHARE = 4  # default cache_bytes: a quarter of a private heap ...
CACHE_PRIVATE_CAP = 64 << 20  # ... at most 64 MiB
# A shared arena caches only when asked (cache_bytes > 0): what one process caches is used
# memory to the others (their stats, their allocations) until it gives it back.

_MASK64 = (1 << 64) - 1  # a statistics counter wraps in its word (add64)
_make_block = object.__new__  # Block's constructor refuses callers; the arena makes handles


class _Stack(list[int]):
    """The offsets of the freed blocks of one size, last in first out; ``cap`` bounds its
    length (the quick lists: a list subclass, so the fast paths call list's own methods)."""

    __slots__ = ("cap",)
    cap: int


_warned_unlocked = False  # "auto" warns once per process, then stays quiet
_arenas: weakref.WeakSet[Arena] = weakref.WeakSet()  # every open arena, for fork


class Block:
    """A block handed out by :meth:`Arena.alloc`: ``offset`` and ``size`` in bytes, ``view``.

    ``offset`` counts from the start of the arena's heap and is aligned as asked. ``view`` is a
    zero-copy ``memoryview`` of exactly ``size`` bytes, released when the block is freed (so a
    freed block's memory cannot be reached through it). Handles are made only by the arena.
    """

    __slots__ = ("_owner", "_view", "arena", "offset", "size")

    arena: Arena
    offset: int
    size: int
    _view: memoryview | None  # None: live, no view yet; a view: live; _FREED: freed
    # Shared arenas: the start tag's flag and owner bits when this handle was made (TAG_USED,
    # the owner pid, TAG_CACHED); a free goes ahead only while the tag still has them.
    _owner: int

    def __init__(self) -> None:
        raise TypeError("blocks are made by Arena.alloc, not directly")

    @property
    def view(self) -> memoryview:
        """Zero-copy view of the block's bytes (writable)."""
        v = self._view
        if v is None:
            v = self._view = self.arena._heap[self.offset : self.offset + self.size]
        elif v is _FREED:
            if self.arena._closed:
                raise ArenaClosed(f"block at offset {self.offset}: the arena is closed")
            raise DoubleFree(f"block at offset {self.offset} was freed; its view is gone")
        return v

    @property
    def freed(self) -> bool:
        """True once the block has been freed through this handle (or its arena closed)."""
        return self._view is _FREED

    def __repr__(self) -> str:
        state = "freed" if self._view is _FREED else "live"
        return f"<Block offset={self.offset} size={self.size} {state}>"


@dataclass(frozen=True)
class ArenaStats:
    """Health figures of an arena (shared ones count every process's operations)."""

    size: int  #: heap bytes
    block_size: int  #: granule: every block is a multiple of it
    used_bytes: int  #: bytes in allocated blocks (granule-rounded)
    free_bytes: int  #: bytes in free blocks
    largest_free: int  #: bytes in the largest free run: the largest block alloc can return now
    fragmentation: float  #: 1 - largest_free / free_bytes (0 = all free space in one run)
    allocations: int  #: successful allocations, ever
    frees: int  #: frees, ever
    failed_allocations: int  #: allocations refused for want of a large enough free run
    recoveries: int  #: repairs after a process died inside an operation
    locked: bool  #: the mapping is locked in RAM (mlock)
    prefaulted: bool  #: every page was faulted in at start-up
    shared: bool  #: mapped MAP_SHARED (a file or a memfd inherited across fork)
    minor_faults: int  #: minor page faults of this process since the arena was ready
    major_faults: int  #: major page faults of this process since the arena was ready


@dataclass(frozen=True)
class LeakedBlock:
    """An allocated block whose owning process is dead and which nothing kept."""

    offset: int
    size: int  #: bytes (granule-rounded)
    owner_pid: int
    cached: bool = False  #: it sat in (or was handed out from) the dead process's cache


@dataclass(frozen=True)
class CheckReport:
    """What :meth:`Arena.check` found (and repaired or reclaimed when asked)."""

    ok: bool  #: no structural problem and no leak left behind
    blocks: int
    used_blocks: int
    free_blocks: int
    problems: tuple[str, ...]  #: disagreements found in the index (each was repaired)
    leaked: tuple[LeakedBlock, ...]  #: blocks owned by dead processes
    reclaimed_bytes: int  #: bytes freed because ``reclaim=True``


def _check_size(name: str, value: object) -> int:
    if value.__class__ is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidType(f"{name} must be an int, got {type(value).__name__} {value!r}")
    assert isinstance(value, int)
    if value <= 0:
        raise InvalidArgument(f"{name} must be > 0, got {value}")
    return int(value)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead: it can no longer use its blocks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class Arena:
    """A fixed-size arena of aligned blocks, page-fault-free after start-up.

    ``Arena(size)`` maps a private anonymous region of at least ``size`` heap bytes, cut in
    granules of ``block_size`` bytes (a power of two, 16 B..1 MiB). ``shared=True`` backs it
    with a memfd instead, so children forked later share it (create it before forking).
    :meth:`create` and :meth:`open` use a file (for example under ``/dev/shm``) that several
    processes map at once.

    ``prefault=True`` faults every page in before returning. ``lock`` decides ``mlock``:
    ``"require"`` (or True) raises :class:`MemlockError` when the kernel refuses (usually
    RLIMIT_MEMLOCK), ``"auto"`` warns once and carries on unlocked, ``False`` does not lock.

    ``cache_max`` (bytes, default 1 MiB) is the largest block a free keeps in this process's
    cache for the next alloc of its size; ``cache_bytes`` bounds what the cache holds (default:
    a quarter of a private heap, at most 64 MiB; 0 turns the byte-bounded cache off). A shared
    arena caches only when given ``cache_bytes``: until this process gives its cached blocks
    back (stats, check, close, exhaustion, exit), the other processes see them as used. See
    "Caches" in the module docstring.
    """

    def __init__(self, size: int, *, block_size: int = 64, lock: LockPolicy = "auto",
                 prefault: bool = True, shared: bool = False, cache_bytes: int | None = None,
                 cache_max: int = CACHE_MAX_BYTES) -> None:
        layout = _layout_from_args(size, block_size)
        _check_lock_policy(lock)
        caching = _cache_args(cache_bytes, cache_max)
        if shared:
            fd = _osmem.memfd("arena", layout.total)
            try:
                mm = _osmem.map_shared(fd, layout.total, prefault)
                self._setup(mm, fd, None, layout, lock, prefault, fresh=True, caching=caching)
            except BaseException:
                os.close(fd)
                raise
        else:
            mm = _osmem.map_private(layout.total, prefault)
            self._setup(mm, None, None, layout, lock, prefault, fresh=True, caching=caching)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, block_size: int = 64,
               lock: LockPolicy = "auto", prefault: bool = True, cache_bytes: int | None = None,
               cache_max: int = CACHE_MAX_BYTES) -> Arena:
        """Create a new shared arena file at ``path`` (0600, O_EXCL: never an existing file)."""
        layout = _layout_from_args(size, block_size)
        _check_lock_policy(lock)
        caching = _cache_args(cache_bytes, cache_max)
        spath = os.fspath(path)
        try:
            fd = _osmem.create_file(spath, layout.total)
        except FileExistsError:
            raise ArenaExists(errno.EEXIST, f"{spath}: already exists (Arena.open attaches to an "
                              "arena file; remove it first to make a new one)") from None
        try:
            mm = _osmem.map_shared(fd, layout.total, prefault)
            self = cls.__new__(cls)
            self._setup(mm, fd, spath, layout, lock, prefault, fresh=True, caching=caching)
        except BaseException:
            os.close(fd)
            os.unlink(spath)
            raise
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: LockPolicy = "auto",
             prefault: bool = True, cache_bytes: int | None = None,
             cache_max: int = CACHE_MAX_BYTES) -> Arena:
        """Map an existing shared arena file after checking owner, mode and header."""
        _check_lock_policy(lock)
        caching = _cache_args(cache_bytes, cache_max)
        spath = os.fspath(path)
        fd, file_size = _osmem.open_file(spath)
        try:
            if file_size < PAGE_SIZE:
                raise BadArenaFile(22, f"{spath}: {file_size} bytes is too small for an arena")
            import mmap

            with mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_SHARED) as head:
                words = memoryview(head).cast("Q")
                try:
                    layout = validate_header(words, file_size)
                except ValueError as exc:
                    raise BadArenaFile(22, f"{spath}: {exc}") from None
                finally:
                    words.release()
            mm = _osmem.map_shared(fd, layout.total, prefault)
            self = cls.__new__(cls)
            self._setup(mm, fd, spath, layout, lock, prefault, fresh=False, caching=caching)
        except BaseException:
            os.close(fd)
            raise
        return self

    # -- set-up ------------------------------------------------------------------------

    def _setup(self, mm: object, fd: int | None, path: str | None, layout: Layout,
               lock: LockPolicy, prefault: bool, fresh: bool,
               caching: tuple[int | None, int] = (None, CACHE_MAX_BYTES)) -> None:
        import mmap

        assert isinstance(mm, mmap.mmap)
        self._mm = mm
        self._fd = fd
        self.path = path
        self._layout = layout
        self.shared = fd is not None
        self._pid = os.getpid()
        self._closed = False
        self._lock = SharedLock(fd, ARENA_LOCK_BYTE, self._repair_if_interrupted)
        self._set_lock_path()
        self._words = memoryview(mm).cast("Q")
        self._heap = memoryview(mm)[layout.heap_offset : layout.heap_offset + layout.heap_size]
        self._gshift = layout.granule.bit_length() - 1
        self._gmask = layout.granule - 1
        self._gfloor = ~self._gmask  # (size + _gmask) & _gfloor: size rounded up to granules
        self._core = Tlsf(self._words, layout.tags_offset // 8, layout.heap_offset // 8,
                          layout.granule, layout.n_granules)
        self._live: dict[int, Block] = {}  # offset -> the one valid handle (invariant 3)
        self._set_owner_tags()
        # Quick lists (private arenas): offsets of freed blocks up to QUICK_MAX_BYTES, kept
        # allocated for reuse, one list per granule count; _quick_by_size maps a size in bytes
        # to its list, so the hot path indexes once instead of rounding.
        cache_bytes, cache_max = caching
        self._quick: dict[int, _Stack] = {}
        self._quick_by_size: list[_Stack] = []
        quick_max = min(QUICK_MAX_BYTES, cache_max, layout.heap_size)
        if not self.shared and quick_max > 0:
            for n in range(1, ((quick_max + self._gmask) >> self._gshift) + 1):
                quick = self._quick[n] = _Stack()
                nbytes = n << self._gshift
                quick.cap = QUICK_DEPTH if nbytes <= QUICK_DEEP_BYTES else max(1, min(
                    QUICK_DEPTH, min(QUICK_SIZE_BYTES, layout.heap_size // QUICK_HEAP_SHARE)
                    // nbytes))
            self._quick_by_size = [self._quick[1]] + [  # index 0 is never used: size > 0
                self._quick[(size + self._gmask) >> self._gshift]
                for size in range(1, quick_max + 1)]
        self._quick_max_size = len(self._quick_by_size) - 1  # -1: none
        # The byte-bounded cache: block bytes -> offsets, for sizes above the quick lists up
        # to _cache_max bytes. _cached_bytes is what it holds; racing threads may lose an update
        # of it (load, add, store), which moves the bound by a block until the next drain sets
        # it to 0 again. Blocks themselves are never lost or doubled (list append/pop are
        # atomic under the GIL; a free-threaded build needs a lock here).
        if cache_bytes is None:
            cache_bytes = 0 if self.shared else min(layout.heap_size // CACHE_PRIVATE_SHARE,
                                                    CACHE_PRIVATE_CAP)
        self._cache: dict[int, list[int]] = {}
        self._cache_limit = cache_bytes
        self._cache_max = cache_max if cache_bytes else self._quick_max_size
        self._cached_bytes = 0
        # Frees onto a cache (counted in a Python int: cheaper than a shared word) and blocks
        # given back from one (counted under the lock). A drain folds them into the shared
        # counts: the cache's allocations are pushed - given back - still cached. Racing
        # threads may lose an increment of _pushes; that loses one allocation and one free
        # alike, so allocations - frees stays exact.
        self._pushes = 0
        self._drained = 0
        self._folded_frees = 0
        self._folded_allocs = 0
        if fresh:
            with self._lock:
                self._format(layout)
        if prefault:
            _osmem.touch_pages(mm, write=not self.shared)
        self.locked = False
        if lock:
            err = _osmem.mlock(mm)
            if err == 0:
                self.locked = True
            else:
                self._refuse_or_warn_unlocked(lock, layout, err)
        self.prefaulted = prefault
        _arenas.add(self)
        self._faults_at_ready = _osmem.fault_counts()

    def _refuse_or_warn_unlocked(self, lock: LockPolicy, layout: Layout, err: int) -> None:
        global _warned_unlocked
        limit = _osmem.format_limit(_osmem.memlock_limit())
        total = layout.total
        msg = (f"could not lock the arena in memory: mlock of {total} bytes (a "
               f"{layout.heap_size}-byte heap plus its header and tags) failed with "
               f"{os.strerror(err)}; RLIMIT_MEMLOCK is {limit}. Raise it (`ulimit -l "
               f"{(total + 1023) // 1024}` or more in the shell, LimitMEMLOCK= in a systemd "
               "unit, memlock in /etc/security/limits.conf) or grant CAP_IPC_LOCK")
        if lock == "auto":
            if not _warned_unlocked:
                _warned_unlocked = True
                warnings.warn(msg + "; carrying on unlocked", RuntimeWarning, stacklevel=4)
            return
        self._release_mapping()
        self._mm.close()  # the caller closes the descriptor
        raise MemlockError(err, msg)

    def _format(self, layout: Layout) -> None:
        w = self._words
        w[W_MAGIC] = 0  # the magic goes in last: an opener never trusts a half-made header
        w[W_VERSION] = VERSION
        w[W_TOTAL] = layout.total
        w[W_GRANULE] = layout.granule
        w[W_NGRAN] = layout.n_granules
        w[W_TAGS] = layout.tags_offset
        w[W_HEAP] = layout.heap_offset
        w[W_CREATOR] = os.getpid()
        self._core.format()
        w[W_MAGIC] = MAGIC

    # -- properties --------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Heap bytes (the sum of all block sizes can never exceed it)."""
        return self._layout.heap_size

    @property
    def block_size(self) -> int:
        """Granule in bytes: allocations are rounded up to a multiple of it."""
        return self._layout.granule

    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped in all: header + tags (8 bytes a granule) + heap."""
        return self._layout.total

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def heap(self) -> memoryview:
        """Zero-copy view of the whole heap; a block's bytes are ``heap[offset:offset+size]``."""
        self._check_open()
        return self._heap

    @property
    def fd(self) -> int | None:
        """Descriptor of the backing file (None for a private arena). Changes after fork."""
        return self._fd

    def locked_section(self) -> SharedLock:
        """The arena's lock, re-entrant, for layers that group operations atomically."""
        return self._lock

    # -- the operations ----------------------------------------------------------------

    def _repair_if_interrupted(self) -> None:
        """Run by the lock on each outermost acquisition: if a holder died (or raised) inside
        an operation, rebuild the index (Rule 2) before anything else reads it."""
        if self._words[W_OP]:
            self._rebuild()

    def _rebuild(self) -> None:
        """Rebuild the index from the start tags (lock held); BadArenaFile, with ``W_OP`` as it
        was and nothing else written, if the tags themselves are broken."""
        op = int(self._words[W_OP])
        self._words[W_OP] = self._pid  # a rebuild killed half way is done again
        try:
            self._core.rebuild()
        except CorruptArena as exc:
            self._words[W_OP] = op
            raise BadArenaFile(117, f"arena is corrupt and cannot be repaired: {exc}") from None

    def _damaged(self, exc: CorruptArena) -> BadArenaFile:
        """The refusal of an operation that met a word out of its bounds (``W_OP`` put back:
        the operation wrote nothing)."""
        self._words[W_OP] = 0
        where = f"`python -m arena check {self.path}` rebuilds it" if self.path else \
            "Arena.check() rebuilds it"
        if not isinstance(exc, CorruptIndex):
            where = "it cannot be repaired"
        return BadArenaFile(117, f"arena is damaged ({exc}); nothing was changed; {where}")

    def alloc(self, size: int, align: int | None = None) -> Block:
        """A block of ``size`` bytes at an offset that is a multiple of ``align``.

        ``align`` is any power of two up to the arena size (None: the block size). Raises
        :class:`ArenaExhausted` (a MemoryError) when no free run can hold it; bad arguments
        raise :class:`InvalidArgument` / :class:`InvalidType`. Either way nothing changes.
        """
        if size.__class__ is not int or size <= 0:
            _check_size("size", size)
        if align is None:
            if size <= self._quick_max_size:
                try:  # IndexError: its list is empty
                    offset = self._quick_by_size[size].pop()  # atomic: one thread gets a block
                except IndexError:
                    pass
                else:
                    # _new_handle inlined (a call costs more than the rest; no owner in a
                    # private arena): one handle made, four stores, one table entry.
                    block = _make_block(Block)
                    block.arena = self
                    block.offset = offset
                    block.size = size
                    block._view = None
                    self._live[offset] = block
                    return block
            elif size <= self._cache_max:
                nbytes = (size + self._gmask) & self._gfloor
                try:  # KeyError: no list of this size yet; IndexError: it is empty
                    offset = self._cache[nbytes].pop()
                except (KeyError, IndexError):
                    pass
                else:
                    self._cached_bytes -= nbytes
                    block = _make_block(Block)
                    block.arena = self
                    block.offset = offset
                    block.size = size
                    block._view = None
                    block._owner = self._cached_tag
                    self._live[offset] = block
                    return block
        return self._alloc_slow(size, align)

    def _alloc_slow(self, size: int, align: int | None) -> Block:
        """Everything but a cache hit: an aligned request (a cached block that happens to be
        aligned serves it), then the allocator under the lock, written out in this one call.
        An alignment up to the block size goes to the allocator as before: served from the
        caches it scattered a mixed aligned workload (tests/test_arena_os.py, a million
        operations) until an 8 KiB request found no run with 60% of the heap free."""
        if self._closed:
            raise ArenaClosed("the arena is closed")
        gshift = self._gshift
        n = (size + self._gmask) >> gshift
        ag = 1
        if align is not None:
            ag = self._align_granules(align)
            if ag > 1 and size <= self._cache_max:
                cached = (self._quick_by_size[size] if size <= self._quick_max_size
                          else self._cache.get(n << gshift))
                if cached:
                    try:
                        offset = cached.pop()
                    except IndexError:
                        pass
                    else:
                        if not (offset >> gshift) % ag:
                            if size > self._quick_max_size:
                                self._cached_bytes -= n << gshift
                            return self._new_handle(offset, size, self._cached_tag)
                        cached.append(offset)
        w, core = self._words, self._core
        self._acquire()
        try:
            if w[W_OP]:  # a holder died or raised inside an operation: repair first
                self._rebuild()
            try:
                if self._fd is None:
                    # A private arena marks W_OP only when the operation raised (see
                    # "Interrupted operations" in the module docstring).
                    try:
                        g = core.alloc_tagged(n, ag, self._used_tag)
                    except CorruptArena:
                        raise
                    except BaseException:
                        w[W_OP] = self._pid
                        raise
                else:
                    w[W_OP] = self._pid
                    g = core.alloc_tagged(n, ag, self._used_tag)
                    w[W_OP] = 0
                if g < 0 and ag == 1 and self._cached_count():
                    g = self._refit(n)  # one cached block that holds n granules, given back
                if g < 0 and self._cached_count() and self._drain_could_fit(n, ag):
                    # Cached blocks coalesce into a fit: give them all back (the caches start
                    # again from empty, so the next refusal has few to look at), try again.
                    self._drain_caches()
                    w[W_OP] = self._pid
                    g = core.alloc_tagged(n, ag, self._used_tag)
                    w[W_OP] = 0
            except CorruptArena as exc:
                raise self._damaged(exc) from None
            if g >= 0:
                w[W_ALLOCS] = (w[W_ALLOCS] + 1) & _MASK64  # add64, inlined
                # _new_handle inlined, under the lock (no thread sees the offset before).
                block = _make_block(Block)
                block.arena = self
                block.offset = offset = g << gshift
                block.size = size
                block._view = None
                block._owner = self._used_tag
                self._live[offset] = block
                return block
        finally:
            self._release()
        # Nothing fits even with the caches given back; the failure is counted once the
        # message has its figures.
        exc2 = self._exhausted(size, align)  # BadArenaFile instead if stats meets damage
        with self._lock:
            w[W_FAILED] = add64(w[W_FAILED], 1)
        raise exc2

    def _new_handle(self, offset: int, size: int, owner: int) -> Block:
        block = _make_block(Block)
        block.arena = self
        block.offset = offset
        block.size = size
        block._view = None
        block._owner = owner
        self._live[offset] = block
        return block

    def _set_owner_tags(self) -> None:
        """The start-tag bits of this process's blocks (again after fork: a new pid)."""
        pid = self._pid
        if not 0 < pid <= TAG_OWNER_MAX:
            raise ArenaError(f"pid {pid} does not fit an arena tag")
        self._used_tag = TAG_USED | pid << TAG_OWNER_SHIFT
        # Blocks in (or handed out from) this process's cache; a private arena needs no mark.
        self._cached_tag = self._used_tag | TAG_CACHED if self.shared else self._used_tag

    def _set_lock_path(self) -> None:
        """How alloc and free take the lock (again after fork: a new thread lock). A private
        arena takes its thread lock directly, and runs the repair check of ``on_acquire``
        itself (``if w[W_OP]``); a shared one goes through the wrapper (thread lock + OFD
        lock), whose ``on_acquire`` has run that check already."""
        if self._fd is None:
            mutex = self._lock.thread_lock
            self._acquire: Callable[[], object] = mutex.acquire
            self._release: Callable[[], object] = mutex.release
        else:
            self._acquire, self._release = self._lock.acquire, self._lock.release

    def _cached_count(self) -> int:
        return sum(map(len, self._quick.values())) + sum(map(len, self._cache.values()))

    _quick_count = _cached_count

    def _drain_caches(self) -> None:
        """Give every cached block back to the allocator (coalescing), then fold the caches'
        counts into the shared statistics. Takes the lock."""
        w, gshift, core = self._words, self._gshift, self._core
        with self._lock:
            for cached in (*self._quick.values(), *self._cache.values()):
                while cached:
                    try:
                        offset = cached.pop()
                    except IndexError:
                        break
                    w[W_OP] = self._pid
                    try:
                        core.free(offset >> gshift)
                    except CorruptArena as exc:
                        cached.append(offset)  # still allocated: it stays cached
                        raise self._damaged(exc) from None
                    w[W_OP] = 0
                    self._drained += 1
            self._cached_bytes = 0
            allocs = self._pushes - self._drained - self._cached_count()
            frees = self._pushes
            if frees != self._folded_frees or allocs != self._folded_allocs:
                w[W_FREES] = add64(w[W_FREES], frees - self._folded_frees)
                w[W_ALLOCS] = add64(w[W_ALLOCS], allocs - self._folded_allocs)
                self._folded_frees, self._folded_allocs = frees, allocs

    def _refit(self, n: int) -> int:
        """After the allocator found no run of ``n`` granules: give back the smallest cached
        block that holds ``n`` (lock held, ``W_OP`` clear) and allocate again; -1 when no
        cached block is that large. One free and one alloc, where a drain of every cache
        would cost one free per cached block (a nearly full arena comes here often)."""
        gshift, w, core = self._gshift, self._words, self._core
        best: list[int] | None = None
        best_bytes = 0
        for k, quick in self._quick.items():  # ascending sizes
            if k >= n and quick:
                best = quick
                break
        if best is None:
            for nbytes, cache in self._cache.items():
                if cache and nbytes >= n << gshift and (best is None or nbytes < best_bytes):
                    best, best_bytes = cache, nbytes
        if best is None:
            return -1
        try:
            offset = best.pop()
        except IndexError:  # another thread took it
            return -1
        self._cached_bytes -= best_bytes
        w[W_OP] = self._pid
        try:
            core.free(offset >> gshift)
        except CorruptArena:
            best.append(offset)  # still allocated: it stays cached
            self._cached_bytes += best_bytes
            raise
        self._drained += 1
        g = core.alloc_tagged(n, 1, self._used_tag)
        w[W_OP] = 0
        return g

    def _align_granules(self, align: object) -> int:
        if align.__class__ is not int:
            raise InvalidType(f"align must be an int or None, got {type(align).__name__}")
        assert isinstance(align, int)
        if not is_power_of_two(align):
            raise InvalidArgument(f"align must be a power of two, got {align}")
        if align > self.size:
            raise InvalidArgument(f"align {align} is larger than the arena ({self.size} bytes)")
        return max(1, align >> self._gshift)

    def _cached_runs(self) -> list[tuple[int, int]]:
        """The free runs that giving back every cached block would make, as ``(start, stop)``
        granules; nothing changes (lock held). Only runs that hold a cached block: the others
        are free blocks the allocator already searched."""
        gshift, core = self._gshift, self._core
        parts: list[tuple[int, int]] = []
        for k, quick in self._quick.items():
            for offset in list(quick):  # a copy: other threads pop without the lock
                parts.append(core.merged_extent(offset >> gshift, k))
        for nbytes, cache in self._cache.items():
            for offset in list(cache):
                parts.append(core.merged_extent(offset >> gshift, nbytes >> gshift))
        parts.sort()
        runs: list[tuple[int, int]] = []
        for start, stop in parts:
            if stop <= start:
                continue  # no longer a used block there (damaged): a drain skips it too
            if runs and start <= runs[-1][1]:  # adjacent, or sharing a free neighbour
                runs[-1] = (runs[-1][0], max(runs[-1][1], stop))
            else:
                runs.append((start, stop))
        return runs

    def _drain_could_fit(self, n: int, ag: int) -> bool:
        """After the allocator and :meth:`_refit` found no run of ``n`` granules aligned to
        ``ag``: whether giving every cached block back would make one (lock held, nothing
        changed). When it would not, the request is refused with the caches kept: giving them
        back anyway made every size cold after each refusal at a high fill."""
        return any(-start % ag + n <= stop - start for start, stop in self._cached_runs())

    def _exhausted(self, size: int, align: int | None) -> ArenaExhausted:
        """The refusal, with the figures :meth:`stats` would give (cached blocks count as
        free, coalesced), computed without giving the cached blocks back."""
        self._check_open()
        gshift = self._gshift
        with self._lock:
            try:
                used = self._core.used_count() << gshift
                largest = self._core.largest_free() << gshift
                runs = self._cached_runs()
            except CorruptArena as exc:
                raise self._damaged(exc) from None
        cached = sum(len(q) * k for k, q in self._quick.items()) << gshift
        cached += sum(len(c) * nbytes for nbytes, c in self._cache.items())
        largest = max([largest, *((stop - start) << gshift for start, stop in runs)])
        return ArenaExhausted(
            f"no free run for {size} bytes (align {align or self.block_size}): "
            f"{self.size - used + cached} bytes free, largest free run {largest} bytes, "
            f"arena {self.size} bytes; free blocks or create a larger arena")

    def free(self, block: Block) -> None:
        """Return ``block`` to the arena; its view is released.

        Refuses, changing nothing, a block already freed (:class:`DoubleFree`), of another
        arena (:class:`ForeignBlock`), or a copied, forged or stale handle (:class:`StaleBlock`).
        """
        if block.__class__ is not Block or block.arena is not self:
            raise self._not_mine("free", block)
        offset = block.offset
        live = self._live
        current = live.pop(offset, None)  # atomic under the GIL: one of two racing frees wins
        if current is not block:
            if current is not None:
                live[offset] = current
            raise self._bad_handle(block)
        view = block._view
        block._view = _FREED
        if view is not None:
            try:  # noqa: SIM105 - hot path: contextlib.suppress costs a call
                view.release()
            except BufferError:
                pass  # the user exported it further (e.g. numpy); it stays valid memory
        size = block.size
        if size <= self._quick_max_size:
            quick = self._quick_by_size[size]
            if len(quick) < quick.cap:
                quick.append(offset)
                self._pushes += 1
                return
        elif size <= self._cache_max:
            nbytes = (size + self._gmask) & self._gfloor
            cached = self._cached_bytes + nbytes
            if cached <= self._cache_limit:
                if not self.shared or block._owner == self._cached_tag:
                    try:
                        self._cache[nbytes].append(offset)
                    except KeyError:  # the first block of this size
                        self._cache.setdefault(nbytes, []).append(offset)
                    self._cached_bytes = cached
                    self._pushes += 1
                    return
                if block._owner == self._used_tag:  # ours, not marked yet: mark it
                    self._free_locked(offset >> self._gshift, nbytes >> self._gshift, block,
                                      True)
                    return
        if self._fd is not None:
            self._free_locked(offset >> self._gshift, (size + self._gmask) >> self._gshift,
                              block)
            return
        # A private arena: _free_locked's allocator path, written out here (one call less),
        # W_OP marked only when the operation raised.
        w = self._words
        self._acquire()
        try:
            if w[W_OP]:  # a holder died or raised inside an operation: repair first
                self._rebuild()
            try:
                freed = self._core.free(offset >> self._gshift,
                                        (size + self._gmask) >> self._gshift)
            except CorruptArena as exc:
                raise self._damaged(exc) from None
            except BaseException:
                w[W_OP] = self._pid
                raise
            if not freed:
                raise StaleBlock(f"{block!r} is no longer allocated in the arena")
            w[W_FREES] = (w[W_FREES] + 1) & _MASK64  # add64, inlined
        finally:
            self._release()

    def _free_locked(self, g: int, n: int, block: Block, to_cache: bool = False) -> None:
        """Free through the allocator, or (``to_cache``) mark the block as this process's in
        its start tag and cache it; either only while the tag says what the handle saw."""
        w, core = self._words, self._core
        bits = -1
        if self.shared:
            bits = block._owner
            if bits & TAG_CACHED and bits != self._cached_tag:
                # Only the process that marked a block frees it: this handle came across fork
                # from a parent that cached the block (and hands it out still).
                owner = bits >> TAG_OWNER_SHIFT & TAG_OWNER_MAX
                raise StaleBlock(f"{block!r} is in process {owner}'s cache")
        self._acquire()
        try:
            if w[W_OP]:  # a holder died or raised inside an operation: repair first
                self._rebuild()
            if to_cache:
                if core.used_size(g) != n or core.tag(g) & ~TAG_SIZE_MASK != bits:
                    raise StaleBlock(f"{block!r} is no longer allocated in the shared arena")
                core.set_tag(g, core.tag(g) | TAG_CACHED)  # one store; the end tag stays
                block._owner = self._cached_tag
                cache = self._cache.setdefault(n << self._gshift, [])
                cache.append(g << self._gshift)
                self._cached_bytes += n << self._gshift
                self._pushes += 1
                return
            w[W_OP] = self._pid
            try:
                freed = core.free(g, n, bits)
            except CorruptArena as exc:
                raise self._damaged(exc) from None
            w[W_OP] = 0
            if not freed:
                # Another process freed it (through its own handle) since, and maybe another
                # one allocated it again (a new owner), or cached it. The handle is already
                # retired from _live: it is stale for good. Only a block re-kept since
                # escapes this check.
                raise StaleBlock(f"{block!r} is no longer allocated in the shared arena")
            w[W_FREES] = (w[W_FREES] + 1) & _MASK64  # add64, inlined
        finally:
            self._release()

    @staticmethod
    def _not_mine(method: str, block: object) -> Exception:
        if block.__class__ is Block:
            return ForeignBlock(f"{block!r} belongs to another arena")
        return InvalidType(f"{method}() takes a Block, got {type(block).__name__}")

    def _bad_handle(self, block: Block) -> Exception:
        if self._closed:
            return ArenaClosed(f"{block!r}: the arena is closed")
        if block._view is _FREED:
            return DoubleFree(f"{block!r} was already freed")
        return StaleBlock(f"{block!r} is not a live block of this arena (forged or stale)")

    def block_at(self, offset: int) -> Block:
        """A handle on the allocated block that starts at ``offset`` (allocated by any process).

        Used by layers above to free blocks another process allocated. Returns the existing
        handle if this process has one and the block under it is still the one it was made
        for (in a shared arena another process may have freed it since: such a handle is
        dropped, and a later ``free`` of it raises :class:`StaleBlock`). Raises
        :class:`StaleBlock` when no allocated block starts at ``offset`` (inside a block, a
        free block, a block freed since, a block in a process's cache),
        :class:`InvalidArgument` for an offset off the granule grid or outside the heap.
        """
        if offset.__class__ is not int or offset < 0 or offset & self._gmask:
            raise InvalidArgument(f"offset {offset!r} is not a granule boundary of this arena")
        self._check_open()
        g = offset >> self._gshift
        if g >= self._layout.n_granules:
            raise InvalidArgument(f"offset {offset} is outside the arena ({self.size} bytes)")
        with self._lock:
            known = self._live.get(offset)
            if known is not None:
                if not self.shared or (
                        self._core.used_size(g) == (known.size + self._gmask) >> self._gshift
                        and self._core.tag(g) & ~TAG_SIZE_MASK == known._owner):
                    return known
                # Another process freed the block under this handle (a kept block, say),
                # and maybe the offset was allocated again: the handle is stale for good.
                del self._live[offset]
            n = self._core.used_size(g)
            if not n:
                raise StaleBlock(f"no allocated block starts at offset {offset}")
            tag = self._core.tag(g)
            if tag & TAG_CACHED:
                owner = tag >> TAG_OWNER_SHIFT & TAG_OWNER_MAX
                whose = "this process's" if owner == self._pid else f"process {owner}'s"
                raise StaleBlock(f"the block at offset {offset} is in {whose} cache")
            if not self.shared and any(
                    offset in cached for cached in (*self._quick.values(),
                                                    *self._cache.values())):
                raise StaleBlock(f"no allocated block starts at offset {offset} (it was freed)")
            return self._new_handle(offset, n << self._gshift, tag & ~TAG_SIZE_MASK)

    def keep(self, block: Block) -> None:
        """Mark ``block`` as owned by the shared structure rather than by this process.

        :meth:`check` reports blocks whose owner died; a layer that has recorded a block in
        its own shared tables calls ``keep`` so the block survives its allocator's death. A
        kept block is never cached (its free goes to the allocator).
        """
        if block.__class__ is not Block or block.arena is not self:
            raise self._not_mine("keep", block)
        self._check_open()
        with self._lock:
            if self._live.get(block.offset) is not block:
                raise self._bad_handle(block)
            self._core.set_owner(block.offset >> self._gshift, 0)
            block._owner = TAG_USED

    # -- health ------------------------------------------------------------------------

    def stats(self) -> ArenaStats:
        """Health figures (see :class:`ArenaStats`); takes the lock briefly."""
        self._check_open()
        w = self._words
        self._lock.acquire()
        try:
            self._drain_caches()  # cached blocks count as free, and may coalesce
            try:
                used = self._core.used_count() << self._gshift
                largest = self._core.largest_free() << self._gshift
            except CorruptArena as exc:
                raise self._damaged(exc) from None
            counts = (int(w[W_ALLOCS]), int(w[W_FREES]), int(w[W_FAILED]),
                      int(w[W_RECOVERIES]))
        finally:
            self._lock.release()
        free = self.size - used
        faults = _osmem.fault_counts()
        return ArenaStats(
            size=self.size, block_size=self.block_size, used_bytes=used, free_bytes=free,
            largest_free=largest,
            fragmentation=(1.0 - largest / free) if free else 0.0,
            allocations=counts[0], frees=counts[1], failed_allocations=counts[2],
            recoveries=counts[3], locked=self.locked, prefaulted=self.prefaulted,
            shared=self.shared,
            minor_faults=faults.minor - self._faults_at_ready.minor,
            major_faults=faults.major - self._faults_at_ready.major)

    def check(self, reclaim: bool = False) -> CheckReport:
        """Verify the whole structure, repair its index if needed, and report leaked blocks.

        A leaked block is allocated, owned by a process that is dead, not kept, and not held
        by this process (a handle from :meth:`block_at`, or one inherited across fork); the
        blocks a dead process had cached are among them. With ``reclaim=True`` they are
        freed. Broken start tags cannot be repaired: :class:`BadArenaFile` says so, nothing
        changed. Costs a full walk: an operator's tool, not a hot path.
        """
        self._check_open()
        self._lock.acquire()
        try:
            problems = tuple(self._core.problems())
            if problems:
                self._rebuild()
            self._drain_caches()
            blocks = list(self._core.blocks())
            leaked = []
            live = self._live
            for b in blocks:
                if (b.used and b.owner and b.owner != self._pid
                        and b.start << self._gshift not in live
                        and not _pid_alive(b.owner)):
                    leaked.append(LeakedBlock(b.start << self._gshift, b.size << self._gshift,
                                              b.owner, b.cached))
            reclaimed = 0
            if reclaim and leaked:
                w = self._words
                for leak in leaked:
                    w[W_OP] = self._pid
                    self._core.free(leak.offset >> self._gshift)
                    w[W_FREES] = add64(w[W_FREES], 1)
                    w[W_OP] = 0
                    reclaimed += leak.size
        finally:
            self._lock.release()
        used = sum(1 for b in blocks if b.used)
        return CheckReport(
            ok=not problems and (not leaked or reclaim), blocks=len(blocks), used_blocks=used,
            free_blocks=len(blocks) - used, problems=problems, leaked=tuple(leaked),
            reclaimed_bytes=reclaimed)

    def check_invariants(self) -> None:
        """Raise AssertionError if the index disagrees with the tags (for tests)."""
        self._check_open()
        with self._lock:
            problems = self._core.problems()
        assert not problems, problems

    @property
    def root_offset(self) -> int | None:
        """Offset of the root block of the layer above (e.g. a percpu domain), or None."""
        self._check_open()
        value = int(self._words[W_ROOT])
        return value - 1 if value else None

    @root_offset.setter
    def root_offset(self, offset: int | None) -> None:
        self._check_open()
        self._words[W_ROOT] = 0 if offset is None else offset + 1

    # -- life cycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ArenaClosed("the arena is closed")

    def _release_mapping(self) -> None:
        for block in self._live.values():
            view = block._view
            block._view = _FREED  # every handle is dead from here on
            if view is not None:
                with contextlib.suppress(BufferError):
                    view.release()
        self._words.release()
        self._heap.release()

    def close(self) -> None:
        """Unmap the arena and close its file. Blocks become unusable. Idempotent.

        If the caller still holds views derived from block views, the mapping itself stays
        until the last of them is dropped (it cannot be unmapped under them).
        """
        if self._closed:
            return
        if self.shared and self._cached_count():
            # The cached blocks are this process's alone: give them back to the others. A
            # damaged file keeps them (check() of a later process finds them leaked).
            with contextlib.suppress(ArenaError):
                self._drain_caches()
        self._closed = True
        self._release_mapping()
        self._live.clear()
        self._quick = {}
        self._quick_by_size = []
        self._quick_max_size = -1
        self._cache = {}
        self._cache_max = -1
        with contextlib.suppress(BufferError):
            self._mm.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _arenas.discard(self)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or ("shared memfd" if self.shared else "private")
        return f"<Arena {where} size={self._layout.heap_size} block_size={self.block_size}>"

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        mutex = self._lock.thread_lock
        held = not mutex.acquire(blocking=False)  # by a parent thread the child lacks
        if not held:
            mutex.release()  # free at the fork, or held by the thread that forked
        self._lock.set_fd(None)  # a fresh thread lock; no OFD lock until the fd is our own
        self._set_lock_path()
        if self._closed:
            return
        if held and self._fd is None:
            # A private arena marks W_OP only when an operation raises: an operation that
            # another thread ran at the fork is marked here, so the child rebuilds first.
            self._words[W_OP] = self._pid
        self._set_owner_tags()
        if self.shared:
            # The cached blocks are marked as the parent's, which still hands them out: drop
            # them here, and the counts of the parent's cache with them.
            self._cache = {}
            self._cached_bytes = 0
            self._pushes = self._drained = self._folded_frees = self._folded_allocs = 0
        if self._fd is not None:
            old = self._fd
            try:
                self._fd = reopen_fd(old, self.path)
            except OSError as exc:
                # Locking through the parent's open file description would not exclude the
                # parent: refuse to run unlocked, close the child's copy instead.
                warnings.warn(f"{self!r}: cannot reopen its file in the child after fork "
                              f"({exc}); the arena is closed in this process", RuntimeWarning,
                              stacklevel=2)
                self.close()
                return
            os.close(old)
            self._lock.set_fd(self._fd)
            self._set_lock_path()
        if self.locked and _osmem.mlock(self._mm) != 0:
            self.locked = False  # not inherited, and the child's limit refused it
            warnings.warn(f"{self!r}: could not lock the arena again in the child after fork; "
                          "it runs unlocked", RuntimeWarning, stacklevel=2)
        self._faults_at_ready = _osmem.fault_counts()  # a child's counts start at zero


def _layout_from_args(size: object, block_size: object) -> Layout:
    nbytes = _check_size("size", size)
    granule = _check_size("block_size", block_size)
    if not is_power_of_two(granule) or not MIN_GRANULE <= granule <= MAX_GRANULE:
        raise InvalidArgument(f"block_size must be a power of two in [{MIN_GRANULE}, "
                              f"{MAX_GRANULE}], got {granule}")
    n = (nbytes + granule - 1) // granule
    if n > MAX_GRANULES:
        raise InvalidArgument(f"size {nbytes} needs {n} blocks of {granule} bytes; at most "
                              f"{MAX_GRANULES} are supported: use a larger block_size")
    return layout_for(n, granule)


def _cache_args(cache_bytes: object, cache_max: object) -> tuple[int | None, int]:
    if cache_bytes is not None:
        if cache_bytes.__class__ is not int:
            raise InvalidType(f"cache_bytes must be an int or None, got "
                              f"{type(cache_bytes).__name__}")
        assert isinstance(cache_bytes, int)
        if cache_bytes < 0:
            raise InvalidArgument(f"cache_bytes must be >= 0, got {cache_bytes}")
    if cache_max.__class__ is not int:
        raise InvalidType(f"cache_max must be an int, got {type(cache_max).__name__}")
    assert isinstance(cache_max, int)
    if cache_max < 0:
        raise InvalidArgument(f"cache_max must be >= 0, got {cache_max}")
    return cache_bytes, cache_max


def _check_lock_policy(lock: object) -> None:
    if lock.__class__ not in (str, bool) or lock not in _LOCK_POLICIES:
        raise InvalidArgument(f"lock must be 'auto', 'require', True or False, got {lock!r}")


def _drain_at_exit() -> None:
    """Give the blocks cached by this process in shared arenas back as it exits (a thread
    still inside an arena method keeps that arena's: never wait at exit)."""
    for a in list(_arenas):
        if a.shared and not a._closed and a._cached_count() and a._lock.try_acquire():
            try:
                with contextlib.suppress(Exception):
                    a._drain_caches()
            finally:
                a._lock.release()


atexit.register(_drain_at_exit)


def _reset_after_fork() -> None:
    for a in list(_arenas):
        try:
            a._after_fork_in_child()
        except Exception as exc:  # one arena's trouble must not leave the others unreset
            warnings.warn(f"{a!r}: reset after fork failed: {exc!r}", RuntimeWarning,
                          stacklevel=1)


os.register_at_fork(after_in_child=_reset_after_fork)
