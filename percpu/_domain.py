"""The domain: the unit of sharing for per-cpu objects, on top of one arena.

A domain is an arena (private, a memfd inherited across fork, or a file several processes map)
plus a root block that holds the vcpu-id lease records, the pageset directory, the registry of
named metrics and the queue of slots waiting for a grace period. See ``_layout`` for the words.

Invariants
----------
1. A value is the sum of its slots over every vcpu id ever leased in the domain. A dead holder's
   slots keep their values; the next holder of that id continues on top of them.
2. Only the holder of id ``k`` writes id ``k``'s copy of a slot, by the one-statement hot path
   (``_handles``). Everything else (registry, pagesets, caches, leases, the pending queue) is
   written under the domain lock, which is the arena's lock.
3. A slot is reused only after every live holder has acknowledged that it no longer uses it
   (a grace period): ``remove`` publishes the slot in the pending queue with a new epoch; each
   process's quiescer thread, holding the GIL (so no thread of its process is inside a hot-path
   statement), rebinds or retires its handles and stores the epoch in its lease record's
   ``L_ACK``; the slot is zeroed and returned when every live lease has acknowledged. A holder
   that never acknowledges (stopped, stuck in C) delays the reuse, never correctness.
4. Crash safety: each shared update under the lock ends with one commit store (a registry entry
   becomes visible when its hash word is written; a cache pop commits its count before the ref
   is used), so a holder killed mid-update leaks at most a slot, which ``check`` finds.

Pagesets: one page per vcpu id, allocated from the arena the first time that id touches the
pageset, so memory follows the ids in use, not the CPU count. Per-vcpu caches (in the lease
records) hand out slots without taking the domain lock; they refill from and drain to the
pageset layer in batches of ``CACHE_REFILL``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from arena import Arena, ArenaError, ArenaExhausted
from arena._arena import LockPolicy
from arena._locks import is_locked, lock, try_lock, unlock

from . import _cpuset
from ._errors import (
    BadDomainFile,
    DomainClosed,
    DomainFull,
    InvalidArgument,
    InvalidType,
    KindMismatch,
    PercpuError,
)
from ._handles import (
    REMOVED_VARIANT,
    SHARED_VARIANT,
    UNBOUND_VARIANT,
    Counter,
    Gauge,
    PerCpu,
    Summary,
    _Handle,
    base_of,
)
from ._layout import (
    BITMAP_WORDS,
    CACHE_CAP,
    CACHE_REFILL,
    CACHE_WORDS,
    D_EPOCH,
    D_FRESH,
    D_HIGHEST,
    D_MAGIC,
    D_MAX_VCPUS,
    D_OVERFLOW_HOLDERS,
    D_PAGES,
    D_PENDING,
    D_PS_COUNT,
    D_RECLAIMED,
    D_RECOVERED_SLOTS,
    D_REG_CAP,
    D_REG_GEN,
    D_REG_LIVE,
    D_REG_TABLE,
    D_REG_USED,
    D_REUSED,
    D_SHARED_OPS,
    D_VERSION,
    E_HASH,
    E_KEY,
    E_META,
    E_REF,
    ENTRY_WORDS,
    HASH_EMPTY,
    HASH_TOMBSTONE,
    KIND_COUNTER,
    KIND_GAUGE,
    KIND_NAMES,
    KIND_SIZES,
    KIND_SUMMARY,
    L_ACK,
    L_CACHE,
    L_LEASES,
    L_PID,
    LEASE_LOCK_BASE,
    MAGIC,
    MAX_CHUNKS,
    MAX_OBJECT_SIZE,
    OVERFLOW_LOCK,
    P_BITMAP,
    P_CLASS,
    P_PAGES,
    P_TAKEN,
    PAGE,
    PE_EPOCH,
    PE_REF,
    PENDING_CAP,
    PENDING_WORDS,
    PS_PER_CHUNK,
    REG_MIN_CAP,
    SIZE_CLASSES,
    VERSION,
    chunk_table,
    class_index,
    lease_base,
    make_ref,
    pageset_words,
    pending_base,
    root_words,
    slots_per_page,
    split_ref,
)
from ._leases import LeasePath, choose_lowest, classify
from ._names import decode_key, encode_key, validate_labels, validate_metric_name

H = TypeVar("H", bound=_Handle)
DEFAULT_SIZE = 16 * 1024 * 1024  # bytes of arena for a domain made without a size
QUIESCE_INTERVAL = 0.005  # seconds between the quiescer's looks at the epoch
_KIND_CLASS: dict[int, type[_Handle]] = {
    KIND_COUNTER: Counter, KIND_GAUGE: Gauge, KIND_SUMMARY: Summary,
}
_CLASS_KIND = {cls: kind for kind, cls in _KIND_CLASS.items()}
_GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()
_domains: weakref.WeakSet[Domain] = weakref.WeakSet()


@dataclass(frozen=True)
class DomainStats:
    """Health figures of a domain (shared figures count every process)."""

    max_vcpus: int  #: ids that can be leased (plus the shared overflow id)
    vcpu_id: int | None  #: this process's id (None before its first use; max_vcpus = overflow)
    holders_now: int  #: ids held by a live holder right now
    ids_in_use: tuple[int, ...]  #: those ids (seed 000's "online" mask)
    holder_pids: dict[int, int]  #: id -> pid recorded by its live holder
    highest_id_used: int  #: 1 + the highest id ever leased (the peak concurrency)
    fresh_ids: int  #: ids leased for the first time
    reused_ids: int  #: ids leased again after a clean release, inheriting values
    reclaimed_ids: int  #: ids taken over from holders that died
    overflow_holders: int  #: holders that found every id taken
    shared_id_operations: int  #: operations done on the overflow id, under its lock
    metrics: int  #: named metrics registered
    pagesets: int  #: pagesets with at least one slot taken
    pages: int  #: pages allocated to pagesets (each is one id's page of one pageset)
    pending_frees: int  #: slots waiting for a grace period
    epoch: int  #: grace-period epoch
    recovered_cache_slots: int  #: slots recovered from dead holders' caches
    arena_used_bytes: int
    arena_free_bytes: int
    bytes_per_metric: float  #: pages * 4096 / metrics (0 when there are none)
    minor_faults: int  #: minor page faults of this process since its arena was ready
    major_faults: int


@dataclass(frozen=True)
class MetricValue:
    """One metric in a :meth:`Domain.snapshot`."""

    name: str
    labels: tuple[tuple[str, str], ...]
    kind: str  #: "counter", "gauge" or "summary"
    value: int | float  #: counter/gauge value; a summary's sum
    count: int = 0  #: a summary's count


@dataclass(frozen=True)
class DomainCheck:
    """What :meth:`Domain.check` found."""

    ok: bool
    problems: tuple[str, ...]
    unreferenced_slots: int  #: slots taken but in no registry entry, cache or pending queue
    reclaimed_slots: int
    arena: Any  #: the arena's CheckReport


def _key_hash(key: bytes) -> int:
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h if h > HASH_TOMBSTONE else h + 2  # 0 and 1 mean empty and tombstone


class Domain:
    """A set of per-cpu objects indexed by compact vcpu ids; see the module docstring.

    ``Domain()`` is private to the process (``shared=True``: children forked later share it).
    ``Domain.create(path)`` / ``Domain.open(path)`` share one mapping between processes.
    ``max_vcpus`` bounds the ids in use; by default it derives from the CPUs this process may
    run on (affinity and cgroup cpuset) with headroom for pre-fork servers (``_cpuset``).
    """

    def __init__(self, size: int = DEFAULT_SIZE, *, max_vcpus: int | None = None,
                 lock: LockPolicy = "auto", prefault: bool = True, shared: bool = False) -> None:
        bound = _check_max_vcpus(max_vcpus)
        self._attach(Arena(_arena_size(size, bound), lock=lock, prefault=prefault,
                           shared=shared), fresh_bound=bound)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int = DEFAULT_SIZE, *,
               max_vcpus: int | None = None, lock: LockPolicy = "auto",
               prefault: bool = True) -> Domain:
        """Create a shared domain file (0600, never an existing path)."""
        bound = _check_max_vcpus(max_vcpus)
        arena = Arena.create(path, _arena_size(size, bound), lock=lock, prefault=prefault)
        self = cls.__new__(cls)
        try:
            self._attach(arena, fresh_bound=bound)
        except BaseException:
            arena.close()
            os.unlink(path)
            raise
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: LockPolicy = "auto",
             prefault: bool = True) -> Domain:
        """Open a shared domain file made by :meth:`create` (owner, mode and headers checked)."""
        try:
            arena = Arena.open(path, lock=lock, prefault=prefault)
        except ArenaError as exc:
            raise BadDomainFile(getattr(exc, "errno", None) or 22, str(exc)) from None
        self = cls.__new__(cls)
        try:
            self._attach(arena, fresh_bound=None)
        except BaseException:
            arena.close()
            raise
        return self

    # -- set-up ------------------------------------------------------------------------

    def _attach(self, arena: Arena, fresh_bound: int | None) -> None:
        self.arena = arena
        self._lock = arena.locked_section()  # guards every shared word but the slots
        heap = arena.heap
        self._q = heap.cast("q")  # every slot, as int64 words
        self._d = heap.cast("d")  # the same words as float64 (summary sums)
        self._bytes = heap
        with self._lock:
            if fresh_bound is not None:
                root = arena.alloc(root_words(fresh_bound) * 8, align=PAGE)
                arena.keep(root)
                root_off = root.offset
                self._bind_root(root_off, fresh_bound)
                self._root[D_VERSION] = VERSION
                self._root[D_MAX_VCPUS] = fresh_bound
                self._init_registry(REG_MIN_CAP)
                self._root[D_MAGIC] = MAGIC  # last: an opener trusts nothing before it
                arena.root_offset = root_off
            else:
                root_off = self._validate_root(arena)
        self._local: dict[tuple[int, bytes], _Handle] = {}  # (kind, key) -> handle
        self._by_ref: dict[int, list[_Handle]] = {}  # ref -> this process's handles on it
        # Guards this process's lease and cache state; never held across processes.
        self._plock = threading.RLock()
        self._vcpu: int | None = None
        self._ack = 0
        self._closed = False
        self._reg_cache: tuple[int, list[tuple[int, int, int, bytes]]] = (-1, [])
        self._decoded: dict[bytes, tuple[str, tuple[tuple[str, str], ...]]] = {}
        self._quiescer: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = os.getpid()
        _domains.add(self)

    def _bind_root(self, offset: int, bound: int) -> None:
        self._root_off = offset
        self._max = bound
        n = root_words(bound)
        self._root = self._bytes[offset : offset + n * 8].cast("Q")
        self._pending = pending_base(bound)
        self._chunks = chunk_table(bound)
        self._ps_words = pageset_words(bound)

    def _validate_root(self, arena: Arena) -> int:
        off = arena.root_offset
        if off is None or off < 0 or off + 64 > arena.size or off % PAGE:
            raise BadDomainFile(22, "the arena holds no domain (no valid root block)")
        head = self._bytes[off : off + 64].cast("Q")
        magic, version, bound = head[D_MAGIC], head[D_VERSION], head[D_MAX_VCPUS]
        head.release()
        if magic != MAGIC:
            raise BadDomainFile(22, "bad domain magic: not a domain (or its creator died)")
        if version != VERSION:
            raise BadDomainFile(22, f"domain format version {version} is not supported")
        if not 1 <= bound <= _cpuset.MAX_VCPUS_LIMIT or off + root_words(bound) * 8 > arena.size:
            raise BadDomainFile(22, f"bad max_vcpus {bound} in the domain header")
        self._bind_root(off, bound)
        cap, table = self._root[D_REG_CAP], self._root[D_REG_TABLE]
        if cap < REG_MIN_CAP or cap & (cap - 1) or table + cap * ENTRY_WORDS * 8 > arena.size:
            raise BadDomainFile(22, "bad registry table in the domain header")
        return off

    # -- properties --------------------------------------------------------------------

    @property
    def max_vcpus(self) -> int:
        """Ids that can be leased at once; more holders share one id under a lock."""
        return self._max

    @property
    def path(self) -> str | None:
        """The domain's file (None for a private or memfd domain)."""
        return self.arena.path

    @property
    def shared(self) -> bool:
        """True when other processes can map this domain."""
        return self.arena.shared

    # -- leases ------------------------------------------------------------------------

    def vcpu_id(self) -> int:
        """This holder's vcpu id, taking the lease on first use (max_vcpus = overflow)."""
        vcpu = self._vcpu
        if vcpu is None:
            vcpu = self._take_lease()
        return vcpu

    def _take_lease(self) -> int:
        with self._plock:
            if self._vcpu is not None:
                return self._vcpu
            self._check_open()
            fd = self.arena.fd
            if not _GIL_ENABLED:  # no GIL: the hot path is not atomic; lock every operation
                vcpu: int | None = None
            elif fd is None:  # private: this process is the only holder
                vcpu = 0
            else:
                vcpu = choose_lowest(self._max, lambda k: try_lock(fd, LEASE_LOCK_BASE + k))
            with self._lock:
                r = self._root
                if vcpu is None:
                    vcpu = self._max
                    r[D_OVERFLOW_HOLDERS] += 1
                    path = LeasePath.OVERFLOW
                else:
                    base = lease_base(self._max, vcpu)
                    path = classify(int(r[base + L_LEASES]), int(r[base + L_PID]))
                    if path is LeasePath.RECLAIMED:
                        r[D_RECLAIMED] += 1
                        r[D_RECOVERED_SLOTS] += self._cached_slots(vcpu)
                    elif path is LeasePath.REUSED:
                        r[D_REUSED] += 1
                    else:
                        r[D_FRESH] += 1
                    r[base + L_PID] = os.getpid()
                    r[base + L_LEASES] += 1
                    r[base + L_ACK] = r[D_EPOCH]
                    if vcpu + 1 > r[D_HIGHEST]:
                        r[D_HIGHEST] = vcpu + 1
                self._ack = int(r[D_EPOCH])
            self.last_lease_path = path
            self._vcpu = vcpu
            if fd is not None and vcpu < self._max:
                self._start_quiescer()
            return vcpu

    def _cached_slots(self, vcpu: int) -> int:
        base = lease_base(self._max, vcpu) + L_CACHE
        return sum(int(self._root[base + c * CACHE_WORDS]) for c in range(len(SIZE_CLASSES)))

    def release(self) -> None:
        """Give this process's id back now. Handles stay usable: each is bound again, to
        whatever id the process then gets, on its next use (raw objects are freed)."""
        with self._plock:
            vcpu = self._vcpu
            if vcpu is None or self._closed:
                return
            self._stop_quiescer()
            self._vcpu = None
            fd = self.arena.fd
            if vcpu < self._max:
                with self._lock:
                    self._root[lease_base(self._max, vcpu) + L_PID] = 0
                if fd is not None:
                    unlock(fd, LEASE_LOCK_BASE + vcpu)
            self._unbind_all()

    def _unbind_all(self) -> None:
        """Make every handle take a lease and rebind on its next use (lock-free hot path
        stays untouched: the class swap is one atomic store)."""
        for ref, handles in list(self._by_ref.items()):
            keep = []
            for h in handles:
                h.__class__ = UNBOUND_VARIANT[base_of(type(h))]
                if not isinstance(h, PerCpu):
                    keep.append(h)
            if keep:
                self._by_ref[ref] = keep
            else:
                del self._by_ref[ref]

    @contextmanager
    def _overflow_op(self) -> Iterator[None]:
        """The shared-id slow path: one lock per operation, counted."""
        fd = self.arena.fd
        with self._plock:
            if fd is not None:
                lock(fd, OVERFLOW_LOCK)
            try:
                self._root[D_SHARED_OPS] += 1
                if self._root[D_EPOCH] != self._ack:
                    self._quiesce()
                yield
            finally:
                if fd is not None:
                    unlock(fd, OVERFLOW_LOCK)

    # -- pagesets and slots --------------------------------------------------------------

    def _ps_base(self, ps: int) -> int:
        """Byte offset (in the heap) of pageset ``ps``'s entry; its chunk must exist."""
        chunk_off = self._root[self._chunks + ps // PS_PER_CHUNK]
        return int(chunk_off) - 1 + (ps % PS_PER_CHUNK) * self._ps_words * 8

    def _ps_entry(self, ps: int) -> memoryview:
        base = self._ps_base(ps)
        return self._bytes[base : base + self._ps_words * 8].cast("Q")

    def _new_pageset(self, cls: int) -> int:
        """Create (or reuse a given-back entry for) a pageset of class ``cls``. Lock held."""
        r = self._root
        count = int(r[D_PS_COUNT])
        for ps in range(count):
            e = self._ps_entry(ps)
            if e[P_CLASS] == 0:
                e[P_CLASS] = cls + 1
                return ps
        ps = count
        chunk = ps // PS_PER_CHUNK
        if chunk >= MAX_CHUNKS:
            raise DomainFull(f"the domain already has {ps} pagesets, the most it can describe")
        if r[self._chunks + chunk] == 0:
            blk = self._alloc_block(PS_PER_CHUNK * self._ps_words * 8, "a pageset directory chunk")
            self._bytes[blk : blk + PS_PER_CHUNK * self._ps_words * 8] = bytes(
                PS_PER_CHUNK * self._ps_words * 8)
            r[self._chunks + chunk] = blk + 1
        e = self._ps_entry(ps)
        e[P_CLASS] = cls + 1
        r[D_PS_COUNT] = ps + 1
        return ps

    def _alloc_block(self, nbytes: int, what: str, align: int | None = None) -> int:
        """A block kept by the domain (survives its allocator's death); its offset."""
        try:
            blk = self.arena.alloc(nbytes, align=align)
        except ArenaExhausted as exc:
            raise DomainFull(f"no room in the domain's arena for {what}: {exc}") from None
        self.arena.keep(blk)
        return blk.offset

    def _page(self, ps: int, vcpu: int) -> int:
        """Byte offset of id ``vcpu``'s page of pageset ``ps``, allocating it on first touch."""
        e = self._ps_entry(ps)
        page = int(e[P_PAGES + vcpu])
        if page:
            return page - 1
        with self._lock:
            page = int(e[P_PAGES + vcpu])
            if page:
                return page - 1
            off = self._alloc_block(PAGE, "a pageset page", align=PAGE)
            self._bytes[off : off + PAGE] = bytes(PAGE)
            e[P_PAGES + vcpu] = off + 1  # commit
            self._root[D_PAGES] += 1
            return off

    def _take_from_pagesets(self, cls: int, want: int) -> list[int]:
        """Up to ``want`` free refs of class ``cls``, densest pageset first. Lock held."""
        per_page = slots_per_page(cls)
        best, best_taken = -1, -1
        for ps in range(int(self._root[D_PS_COUNT])):
            e = self._ps_entry(ps)
            if e[P_CLASS] == cls + 1 and best_taken < e[P_TAKEN] < per_page:
                best, best_taken = ps, int(e[P_TAKEN])
        if best < 0:
            best = self._new_pageset(cls)
        e = self._ps_entry(best)
        refs: list[int] = []
        for w in range(BITMAP_WORDS):
            if len(refs) == want:
                break
            bits = int(e[P_BITMAP + w])
            for b in range(64):
                slot = w * 64 + b
                if slot >= per_page or len(refs) == want:
                    break
                if not bits >> b & 1:
                    bits |= 1 << b
                    refs.append(make_ref(best, slot))
            e[P_BITMAP + w] = bits
        e[P_TAKEN] += len(refs)
        return refs

    def _return_to_pagesets(self, refs: list[int]) -> None:
        """Give zeroed slots back to their pagesets. Lock held."""
        for ref in refs:
            ps, slot = split_ref(ref)
            e = self._ps_entry(ps)
            e[P_BITMAP + slot // 64] &= ~(1 << (slot % 64)) & 0xFFFFFFFFFFFFFFFF
            e[P_TAKEN] -= 1

    def _cache_pop(self, cls: int) -> int:
        """A ref from this holder's cache of class ``cls``, refilling it in bulk if empty."""
        vcpu = self.vcpu_id()
        with self._plock:
            base = lease_base(self._max, vcpu) + L_CACHE + cls * CACHE_WORDS
            r = self._root
            if vcpu == self._max or r[base] == 0:
                with self._lock:
                    refs = self._take_from_pagesets(cls, CACHE_REFILL)
                    if vcpu == self._max:  # the overflow id keeps no cache
                        self._return_to_pagesets(refs[1:])
                        return refs[0]
                    for i, ref in enumerate(refs):
                        r[base + 1 + i] = ref
                    r[base] = len(refs)  # commit
            n = int(r[base])
            ref = int(r[base + n])
            r[base] = n - 1  # commit before use: a crash now leaks the slot, never doubles it
            return ref

    def _cache_push(self, cls: int, ref: int) -> None:
        """Return a zeroed ref to this holder's cache, draining a batch when it is full."""
        vcpu = self.vcpu_id()
        with self._plock:
            r = self._root
            if vcpu == self._max:
                with self._lock:
                    self._return_to_pagesets([ref])
                return
            base = lease_base(self._max, vcpu) + L_CACHE + cls * CACHE_WORDS
            n = int(r[base])
            if n == CACHE_CAP:
                with self._lock:
                    keep = CACHE_CAP - CACHE_REFILL
                    spill = [int(r[base + 1 + i]) for i in range(keep, CACHE_CAP)]
                    r[base] = keep  # commit
                    self._return_to_pagesets(spill)
                    n = keep
            r[base + 1 + n] = ref
            r[base] = n + 1  # commit

    def _zero_slot(self, ref: int) -> None:
        """Clear every id's copy of a slot (no holder may be using it)."""
        ps, slot = split_ref(ref)
        e = self._ps_entry(ps)
        size = SIZE_CLASSES[int(e[P_CLASS]) - 1]
        zero = bytes(size)
        for vcpu in range(self._max + 1):
            page = e[P_PAGES + vcpu]
            if page:
                off = page - 1 + slot * size
                self._bytes[off : off + size] = zero

    # -- handles -------------------------------------------------------------------------

    def _bind(self, h: _Handle) -> None:
        """Point ``h`` at this holder's copy of its slot (allocating the page if needed)."""
        vcpu = self.vcpu_id()
        ps, slot = split_ref(h._ref)
        size = SIZE_CLASSES[int(self._ps_entry(ps)[P_CLASS]) - 1]
        page = self._page(ps, vcpu)
        h._index = (page + slot * size) // 8
        base = base_of(type(h))
        h.__class__ = SHARED_VARIANT[base] if vcpu == self._max else base

    def _make_handle(self, cls_: type[H], ref: int, name: str,
                     labels: tuple[tuple[str, str], ...]) -> H:
        h = object.__new__(cls_)
        h._domain = self
        h._ref = ref
        h._cells = self._q
        h.name = name
        h.labels = labels
        if isinstance(h, Summary):
            h._floats = self._d
        self._bind(h)
        self._by_ref.setdefault(ref, []).append(h)
        return h

    def counter(self, name: str, labels: dict[str, str] | None = None) -> Counter:
        """The monotonic counter ``name{labels}``: the same one in every process of the domain.

        Registering takes the domain lock once per process and name; using never does.
        """
        return self._metric(KIND_COUNTER, Counter, name, labels)

    def gauge(self, name: str, labels: dict[str, str] | None = None) -> Gauge:
        """The signed gauge ``name{labels}`` (add/sub; its value is the sum over ids)."""
        return self._metric(KIND_GAUGE, Gauge, name, labels)

    def summary(self, name: str, labels: dict[str, str] | None = None) -> Summary:
        """The summary ``name{labels}``: count and sum of observations."""
        return self._metric(KIND_SUMMARY, Summary, name, labels)

    def _metric(self, kind: int, cls_: type[H], name: str,
                labels: dict[str, str] | None) -> H:
        name = validate_metric_name(name)
        lab = validate_labels(labels)
        key = encode_key(name, lab)
        found = self._local.get((kind, key))
        if found is not None:
            return found  # type: ignore[return-value]
        self._check_open()
        with self._plock:
            found = self._local.get((kind, key))
            if found is not None:
                return found  # type: ignore[return-value]
            ref = self._register(kind, key)
            h = self._make_handle(cls_, ref, name, lab)
            self._local[(kind, key)] = h
            return h

    # -- the registry (shared hash table, lock held) --------------------------------------

    def _init_registry(self, cap: int) -> None:
        off = self._alloc_block(cap * ENTRY_WORDS * 8, "the metric registry")
        self._bytes[off : off + cap * ENTRY_WORDS * 8] = bytes(cap * ENTRY_WORDS * 8)
        r = self._root
        r[D_REG_TABLE] = off
        r[D_REG_CAP] = cap
        r[D_REG_USED] = 0
        r[D_REG_LIVE] = 0
        r[D_REG_GEN] += 1

    def _table(self) -> memoryview:
        off, cap = int(self._root[D_REG_TABLE]), int(self._root[D_REG_CAP])
        return self._bytes[off : off + cap * ENTRY_WORDS * 8].cast("Q")

    def _read_key(self, t: memoryview, i: int) -> bytes:
        off = int(t[i * ENTRY_WORDS + E_KEY])
        n = int(t[i * ENTRY_WORDS + E_META]) >> 16
        if off + n > self.arena.size:
            raise BadDomainFile(22, f"registry entry {i} points outside the arena")
        return bytes(self._bytes[off : off + n])

    def _lookup(self, key: bytes, h: int) -> tuple[int, int]:
        """(entry index or -1, first free index on the probe path). Lock held."""
        t = self._table()
        cap = len(t) // ENTRY_WORDS
        i, free = h & (cap - 1), -1
        for _ in range(cap):
            eh = t[i * ENTRY_WORDS + E_HASH]
            if eh == HASH_EMPTY:
                return -1, free if free >= 0 else i
            if eh == HASH_TOMBSTONE:
                if free < 0:
                    free = i
            elif eh == h and self._read_key(t, i) == key:
                return i, free
            i = (i + 1) & (cap - 1)
        return -1, free

    def _register(self, kind: int, key: bytes) -> int:
        """The ref of the metric ``key`` of ``kind``, creating it if needed."""
        h = _key_hash(key)
        size = KIND_SIZES[kind]
        cls = class_index(size)
        # Take the slot before the lock is held for the registry: the cache may need it too.
        spare = self._cache_pop(cls)
        with self._lock:
            idx, free = self._lookup(key, h)
            if idx >= 0:
                t = self._table()
                meta = int(t[idx * ENTRY_WORDS + E_META])
                self._cache_push(cls, spare)
                if meta & 0xFF != kind:
                    raise KindMismatch(f"{decode_key(key)[0]} is registered as a "
                                       f"{KIND_NAMES[meta & 0xFF]}, not a {KIND_NAMES[kind]}")
                return int(t[idx * ENTRY_WORDS + E_REF])
            if (self._root[D_REG_USED] + 1) * 2 > self._root[D_REG_CAP]:
                self._grow_registry()
                _, free = self._lookup(key, h)
            key_off = self._alloc_block(max(len(key), 1), "a metric name")
            self._bytes[key_off : key_off + len(key)] = key
            t = self._table()
            e = free * ENTRY_WORDS
            was_empty = t[e + E_HASH] == HASH_EMPTY
            t[e + E_KEY] = key_off
            t[e + E_META] = kind | cls << 8 | len(key) << 16
            t[e + E_REF] = spare
            t[e + E_HASH] = h  # commit
            r = self._root
            r[D_REG_USED] += 1 if was_empty else 0
            r[D_REG_LIVE] += 1
            r[D_REG_GEN] += 1
            return spare

    def _grow_registry(self) -> None:
        old = self._table()
        old_off = int(self._root[D_REG_TABLE])
        entries = [tuple(int(old[i * ENTRY_WORDS + j]) for j in range(ENTRY_WORDS))
                   for i in range(len(old) // ENTRY_WORDS)]
        live = [e for e in entries if e[E_HASH] > HASH_TOMBSTONE]
        cap = max(REG_MIN_CAP, int(self._root[D_REG_CAP]))
        while len(live) * 4 >= cap:
            cap *= 2
        old.release()
        gen = int(self._root[D_REG_GEN])
        self._init_registry(cap)
        t = self._table()
        for e in live:
            i = e[E_HASH] & (cap - 1)
            while t[i * ENTRY_WORDS + E_HASH] != HASH_EMPTY:
                i = (i + 1) & (cap - 1)
            for j in (E_KEY, E_META, E_REF, E_HASH):
                t[i * ENTRY_WORDS + j] = e[j]
        self._root[D_REG_USED] = len(live)
        self._root[D_REG_LIVE] = len(live)
        self._root[D_REG_GEN] = gen + 1
        self.arena.free(self.arena.block_at(old_off))

    def _entries(self) -> list[tuple[int, int, int, bytes]]:
        """(kind, class, ref, key) of every live metric; cached by registry generation."""
        with self._lock:
            gen = int(self._root[D_REG_GEN])
            if self._reg_cache[0] == gen:
                return self._reg_cache[1]
            t = self._table()
            out = []
            for i in range(len(t) // ENTRY_WORDS):
                if t[i * ENTRY_WORDS + E_HASH] > HASH_TOMBSTONE:
                    meta = int(t[i * ENTRY_WORDS + E_META])
                    out.append((meta & 0xFF, meta >> 8 & 0xFF, int(t[i * ENTRY_WORDS + E_REF]),
                                self._read_key(t, i)))
            self._reg_cache = (gen, out)
            return out

    def remove(self, name: str, labels: dict[str, str] | None = None) -> bool:
        """Remove the metric ``name{labels}`` in every process; False if it does not exist.

        Its handles raise :class:`MetricRemoved` from now on (in other processes, from their
        next quiescent point, within milliseconds); its slot is reused only after every live
        holder has acknowledged (a grace period).
        """
        name = validate_metric_name(name)
        key = encode_key(name, validate_labels(labels))
        self._check_open()
        self.vcpu_id()
        with self._plock, self._lock:
            idx, _ = self._lookup(key, _key_hash(key))
            if idx < 0:
                return False
            t = self._table()
            e = idx * ENTRY_WORDS
            ref = int(t[e + E_REF])
            key_off = int(t[e + E_KEY])
            t[e + E_HASH] = HASH_TOMBSTONE  # commit: the name is gone
            r = self._root
            r[D_REG_LIVE] -= 1
            r[D_REG_GEN] += 1
            self.arena.free(self.arena.block_at(key_off))
            self._publish_pending(ref)
            self._quiesce()
        return True

    # -- grace periods -------------------------------------------------------------------

    def _publish_pending(self, ref: int) -> None:
        """Queue ``ref`` for reuse after a grace period. Lock held."""
        r = self._root
        n = int(r[D_PENDING])
        if n == PENDING_CAP:
            self._reclaim_pending(wait=True)
            n = int(r[D_PENDING])
        r[D_EPOCH] += 1
        p = self._pending + n * PENDING_WORDS
        r[p + PE_REF] = ref
        r[p + PE_EPOCH] = r[D_EPOCH]
        r[D_PENDING] = n + 1  # commit

    def _quiesce(self) -> None:
        """Acknowledge the current epoch: retire handles of every pending slot. The caller
        holds the GIL (it runs Python), so no thread of this process is mid-update."""
        with self._plock, self._lock:
            r = self._root
            epoch = int(r[D_EPOCH])
            for i in range(int(r[D_PENDING])):
                p = self._pending + i * PENDING_WORDS
                if r[p + PE_EPOCH] > self._ack:
                    for h in self._by_ref.pop(int(r[p + PE_REF]), ()):
                        self._retire(h)
            self._ack = epoch
            vcpu = self._vcpu
            if vcpu is not None and vcpu < self._max:
                r[lease_base(self._max, vcpu) + L_ACK] = epoch
            if r[D_PENDING]:
                self._reclaim_pending(wait=False)

    def _retire(self, h: _Handle) -> None:
        base = base_of(type(h))
        h.__class__ = REMOVED_VARIANT[base]
        kind = _CLASS_KIND.get(base)
        if kind is not None:
            self._local.pop((kind, encode_key(h.name, h.labels)), None)

    def _live_holders(self) -> list[int]:
        """Ids whose holder is alive (their lock is held). Lock held."""
        fd = self.arena.fd
        ids = []
        for k in range(self._max):
            recorded = self._root[lease_base(self._max, k) + L_PID]
            if k == self._vcpu or (fd is not None and recorded and is_locked(
                    fd, LEASE_LOCK_BASE + k)):
                ids.append(k)
        return ids

    def _reclaim_pending(self, wait: bool) -> int:
        """Zero and return every pending slot whose grace period is over. Lock held."""
        r = self._root
        while True:
            acks = [int(r[lease_base(self._max, k) + L_ACK]) for k in self._live_holders()]
            oldest = min(acks, default=int(r[D_EPOCH]))
            done = 0
            i = 0
            while i < int(r[D_PENDING]):
                p = self._pending + i * PENDING_WORDS
                if r[p + PE_EPOCH] <= oldest:
                    ref = int(r[p + PE_REF])
                    self._zero_slot(ref)
                    self._return_to_pagesets([ref])
                    last = self._pending + (int(r[D_PENDING]) - 1) * PENDING_WORDS
                    r[p + PE_REF], r[p + PE_EPOCH] = r[last + PE_REF], r[last + PE_EPOCH]
                    r[D_PENDING] -= 1
                    done += 1
                else:
                    i += 1
            if done or not wait:
                return done
            self._lock.release()
            try:
                self._stop.wait(QUIESCE_INTERVAL)
            finally:
                self._lock.acquire()

    def _start_quiescer(self) -> None:
        if self._quiescer is not None and self._quiescer.is_alive():
            return
        self._stop = threading.Event()
        t = threading.Thread(target=self._quiescer_loop, args=(self._stop,),
                             name="percpu-quiescer", daemon=True)
        self._quiescer = t
        t.start()

    def _stop_quiescer(self) -> None:
        self._stop.set()
        t = self._quiescer
        if t is not None and t is not threading.current_thread():
            t.join()
        self._quiescer = None

    def _quiescer_loop(self, stop: threading.Event) -> None:
        """Per-process helper: running Python means holding the GIL, a quiescent state for
        every other thread of the process; acknowledge each new epoch from here."""
        root = self._root
        while not stop.wait(QUIESCE_INTERVAL):
            try:
                if root[D_EPOCH] != self._ack or root[D_PENDING]:
                    self._quiesce()
            except (ValueError, PercpuError, ArenaError):
                return  # the domain was closed under us

    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every pending slot has been reclaimed (a full grace period).

        Returns False if ``timeout`` seconds passed first (a holder has not acknowledged:
        stopped or stuck); the slots stay pending and are reclaimed later.
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._quiesce()
            if self._root[D_PENDING] == 0:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._stop.wait(QUIESCE_INTERVAL)

    # -- raw per-cpu objects ---------------------------------------------------------------

    def alloc(self, size: int) -> PerCpu:
        """A per-cpu object of ``size`` bytes (1..64) from the smallest class that fits.

        Served from this holder's cache without the domain lock (the cache refills in bulk).
        The object belongs to this process: free it with ``obj.free()``.
        """
        if size.__class__ is not int:
            raise InvalidType(f"size must be an int, got {type(size).__name__}")
        if not 1 <= size <= MAX_OBJECT_SIZE:
            raise InvalidArgument(f"size must be in 1..{MAX_OBJECT_SIZE} bytes, got {size}")
        self._check_open()
        cls = class_index(size)
        ref = self._cache_pop(cls)
        h = self._make_handle(PerCpu, ref, "", ())
        h.size = size
        return h

    def _local_view(self, h: PerCpu) -> memoryview:
        off = h._index * 8
        return self._bytes[off : off + h.size]

    def _copies(self, ref: int, size: int) -> dict[int, memoryview]:
        ps, slot = split_ref(ref)
        e = self._ps_entry(ps)
        csize = SIZE_CLASSES[int(e[P_CLASS]) - 1]
        out = {}
        for vcpu in range(self._max + 1):
            page = int(e[P_PAGES + vcpu])
            if page:
                off = page - 1 + slot * csize
                out[vcpu] = self._bytes[off : off + size]
        return out

    def _free_object(self, h: PerCpu) -> None:
        with self._plock:
            handles = self._by_ref.get(h._ref)
            if not handles or h not in handles:
                raise InvalidArgument(f"{h!r} was already freed")
            self._by_ref.pop(h._ref)
            h.__class__ = REMOVED_VARIANT[PerCpu]
            self._zero_slot(h._ref)  # only this process ever wrote it
            self._cache_push(class_index(h.size), h._ref)

    # -- reads ---------------------------------------------------------------------------

    def _read_sum(self, ref: int, size: int) -> int:
        ps, slot = split_ref(ref)
        e = self._ps_entry(ps)
        q = self._q
        word = slot * SIZE_CLASSES[int(e[P_CLASS]) - 1] // 8
        total = 0
        for vcpu in range(self._max + 1):
            page = e[P_PAGES + vcpu]
            if page:
                total += q[(page - 1) // 8 + word]
        return total

    def _read_summary(self, ref: int) -> tuple[int, float]:
        ps, slot = split_ref(ref)
        e = self._ps_entry(ps)
        word = slot * 2
        count, total = 0, 0.0
        for vcpu in range(self._max + 1):
            page = e[P_PAGES + vcpu]
            if page:
                w = (page - 1) // 8 + word
                count += self._q[w]
                total += self._d[w + 1]
        return count, total

    def _pageset_sums(self, ps: int) -> tuple[list[int], list[float]]:
        """Per-word sums over ids of pageset ``ps`` (as int64 and as float64)."""
        e = self._ps_entry(ps)
        n = PAGE // 8
        rows_q, rows_d = [], []
        for vcpu in range(self._max + 1):
            page = e[P_PAGES + vcpu]
            if page:
                w = (page - 1) // 8
                rows_q.append(self._q[w : w + n].tolist())
                rows_d.append(self._d[w : w + n].tolist())
        if not rows_q:
            return [0] * n, [0.0] * n
        return list(map(sum, zip(*rows_q, strict=True))), list(map(sum, zip(*rows_d, strict=True)))

    def snapshot(self) -> list[MetricValue]:
        """Every named metric's value, at a cost proportional to pagesets x ids in use."""
        self._check_open()
        entries = self._entries()
        sums: dict[int, tuple[list[int], list[float]]] = {}
        out = []
        for kind, cls, ref, key in entries:
            ps, slot = split_ref(ref)
            if ps not in sums:
                sums[ps] = self._pageset_sums(ps)
            q, d = sums[ps]
            word = slot * SIZE_CLASSES[cls] // 8
            decoded = self._decoded.get(key)
            if decoded is None:
                decoded = self._decoded[key] = decode_key(key)
            name, labels = decoded
            if kind == KIND_SUMMARY:
                out.append(MetricValue(name, labels, "summary", d[word + 1], q[word]))
            else:
                out.append(MetricValue(name, labels, KIND_NAMES[kind], q[word]))
        return out

    # -- health --------------------------------------------------------------------------

    def stats(self) -> DomainStats:
        """Health figures: ids, path counters, pagesets, memory, page faults."""
        self._check_open()
        a = self.arena.stats()
        with self._lock:
            r = self._root
            live = self._live_holders()
            pids = {k: int(r[lease_base(self._max, k) + L_PID]) for k in live}
            pagesets = sum(1 for ps in range(int(r[D_PS_COUNT]))
                           if self._ps_entry(ps)[P_TAKEN])
            metrics, pages = int(r[D_REG_LIVE]), int(r[D_PAGES])
            figures = {name: int(r[word]) for name, word in (
                ("highest_id_used", D_HIGHEST), ("fresh_ids", D_FRESH),
                ("reused_ids", D_REUSED), ("reclaimed_ids", D_RECLAIMED),
                ("overflow_holders", D_OVERFLOW_HOLDERS),
                ("shared_id_operations", D_SHARED_OPS), ("pending_frees", D_PENDING),
                ("epoch", D_EPOCH), ("recovered_cache_slots", D_RECOVERED_SLOTS))}
        return DomainStats(
            max_vcpus=self._max, vcpu_id=self._vcpu, holders_now=len(live),
            ids_in_use=tuple(live), holder_pids=pids, metrics=metrics, pagesets=pagesets,
            pages=pages, arena_used_bytes=a.used_bytes, arena_free_bytes=a.free_bytes,
            bytes_per_metric=pages * PAGE / metrics if metrics else 0.0,
            minor_faults=a.minor_faults, major_faults=a.major_faults, **figures)

    def check(self, reclaim: bool = False) -> DomainCheck:
        """Verify the domain's shared structures and the arena under it.

        Slots taken from pagesets but held by no metric, cache or pending queue are reported
        (``unreferenced_slots``): a holder died between taking and recording one, or they are
        raw objects (``alloc``) of live processes. With ``reclaim=True`` they are returned, but
        only when no other holder is alive (raw objects of live processes would be hit).
        """
        self._check_open()
        problems: list[str] = []
        with self._plock, self._lock:
            r = self._root
            referenced: set[int] = set()
            for _kind, _cls, ref, _key in self._entries():
                referenced.add(ref)
            for k in range(self._max):
                base = lease_base(self._max, k) + L_CACHE
                for c in range(len(SIZE_CLASSES)):
                    cb = base + c * CACHE_WORDS
                    n = int(r[cb])
                    if n > CACHE_CAP:
                        problems.append(f"id {k} class {c}: cache count {n} > {CACHE_CAP}")
                        continue
                    referenced.update(int(r[cb + 1 + i]) for i in range(n))
            for i in range(int(r[D_PENDING])):
                referenced.add(int(r[self._pending + i * PENDING_WORDS + PE_REF]))
            for refs in self._by_ref.values():
                referenced.update(h._ref for h in refs)
            taken: set[int] = set()
            for ps in range(int(r[D_PS_COUNT])):
                e = self._ps_entry(ps)
                cls = int(e[P_CLASS]) - 1
                if cls < 0:
                    continue
                count = 0
                for slot in range(slots_per_page(cls)):
                    if e[P_BITMAP + slot // 64] >> (slot % 64) & 1:
                        taken.add(make_ref(ps, slot))
                        count += 1
                if count != e[P_TAKEN]:
                    problems.append(f"pageset {ps}: {count} slots taken, counter says "
                                    f"{e[P_TAKEN]}")
                    e[P_TAKEN] = count
            missing = referenced - taken
            if missing:
                problems.append(f"{len(missing)} referenced slots are not marked taken")
            unreferenced = sorted(taken - referenced)
            reclaimed = 0
            alone = self._live_holders() in ([], [self._vcpu])
            if reclaim and unreferenced and alone:
                for ref in unreferenced:
                    self._zero_slot(ref)
                self._return_to_pagesets(unreferenced)
                reclaimed = len(unreferenced)
        arena_report = self.arena.check(reclaim=reclaim)
        return DomainCheck(ok=not problems and arena_report.ok and
                           len(unreferenced) == reclaimed, problems=tuple(problems),
                           unreferenced_slots=len(unreferenced), reclaimed_slots=reclaimed,
                           arena=arena_report)

    # -- life cycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DomainClosed("the domain is closed")

    def close(self) -> None:
        """Release this process's id, stop the quiescer and unmap. Idempotent."""
        if self._closed:
            return
        self.release()
        self._closed = True
        for handles in self._by_ref.values():
            for h in handles:
                h.__class__ = REMOVED_VARIANT[base_of(type(h))]
        self._by_ref.clear()
        self._local.clear()
        for view in (self._root, self._q, self._d):
            view.release()
        self.arena.close()
        _domains.discard(self)

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Domain {self.arena!r} max_vcpus={self._max} vcpu={self._vcpu}>"

    def _after_fork_in_child(self) -> None:
        """The child takes its own id (lazily) and rebinds named handles; raw objects stay the
        parent's (their handles raise in the child)."""
        self._pid = os.getpid()
        self._plock = threading.RLock()
        self._quiescer = None
        self._stop = threading.Event()
        if self._closed:
            return
        inherited = self._vcpu
        self._vcpu = None
        if self.arena.fd is None:
            self._vcpu = inherited  # a private copy: the child owns all of it
            return
        self._unbind_all()


def _check_max_vcpus(max_vcpus: object) -> int:
    if max_vcpus is None:
        return _cpuset.read_cpu_bounds().default_max_vcpus
    if max_vcpus.__class__ is not int:
        raise InvalidType(f"max_vcpus must be an int, got {type(max_vcpus).__name__}")
    assert isinstance(max_vcpus, int)
    if not 1 <= max_vcpus <= _cpuset.MAX_VCPUS_LIMIT:
        raise InvalidArgument(f"max_vcpus must be in 1..{_cpuset.MAX_VCPUS_LIMIT}, "
                              f"got {max_vcpus}")
    return max_vcpus


def _arena_size(size: object, bound: int) -> int:
    if size.__class__ is not int:
        raise InvalidType(f"size must be an int, got {type(size).__name__}")
    assert isinstance(size, int)
    minimum = root_words(bound) * 8 + 16 * PAGE
    if size < minimum:
        raise InvalidArgument(f"size {size} is too small for a domain of {bound} ids: "
                              f"at least {minimum} bytes")
    return size


def _reset_after_fork() -> None:
    for d in list(_domains):
        d._after_fork_in_child()


def _release_at_exit() -> None:
    """Release leases cleanly, so the next holder of each id counts as reused, not reclaimed."""
    for d in list(_domains):
        if d._pid == os.getpid():
            d.release()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_release_at_exit)
