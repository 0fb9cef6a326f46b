"""Tests for the Arena API (arena._arena): a state machine against a model, every bad input,
the statistics, check(), block views, closing, threads and fork.

OS effects (page faults, memory locking, file security) are in test_arena_os.py; several
processes sharing one arena are in test_arena_processes.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pickle
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _children import run_in_child
from _model import free_runs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

import arena
from arena import (
    Arena,
    ArenaClosed,
    ArenaError,
    ArenaExhausted,
    ArenaStats,
    Block,
    DoubleFree,
    ForeignBlock,
    InvalidArgument,
    InvalidType,
    StaleBlock,
)
from arena._arena import QUICK_DEPTH, QUICK_MAX_BYTES
from arena._layout import W_OP, W_RECOVERIES, W_SL, W_USED

# ------------------------------------------------------------------------------------------
# Helpers


def comparable(st_: ArenaStats) -> ArenaStats:
    """Stats without the process's page-fault counts (which other code moves)."""
    return dataclasses.replace(st_, minor_faults=0, major_faults=0)


@contextlib.contextmanager
def unchanged(a: Arena) -> Iterator[None]:
    """Assert that the block runs no change to the arena: statistics and every mapped byte."""
    before = comparable(a.stats())  # drains the quick lists first, so bytes are stable
    raw = bytes(a._mm)
    live = dict(a._live)
    yield
    assert bytes(a._mm) == raw, "a refused operation changed the mapping"
    assert a._live == live
    assert comparable(a.stats()) == before


@pytest.fixture
def a() -> Iterator[Arena]:
    with Arena(1 << 16, block_size=64, lock=False) as arena_:
        yield arena_


# ------------------------------------------------------------------------------------------
# The state machine


class ArenaMachine(RuleBasedStateMachine):
    """alloc / free / block_at / bad inputs against a dict of live blocks."""

    blocks = Bundle("blocks")

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[Block, int, bytes]] = {}  # offset -> block, bytes, pattern
        self.freed: list[Block] = []
        self.allocs = self.frees = self.failed = 0
        self.serial = 0

    @initialize(size=st.sampled_from([4096, 100 * 64, 1 << 15]),
                block_size=st.sampled_from([16, 64]), shared=st.booleans())
    def setup(self, size: int, block_size: int, shared: bool) -> None:
        self.a = Arena(size, block_size=block_size, lock=False, shared=shared)
        self.g = block_size

    def rounded(self, size: int) -> int:
        return -(-size // self.g) * self.g

    def extents(self) -> dict[int, int]:
        return {off: n for off, (_, n, _) in self.live.items()}

    @rule(target=blocks,
          size=st.integers(1, 3 * 64) | st.integers(1, 1 << 15) | st.sampled_from([16, 64]),
          align=st.none() | st.integers(0, 15).map(lambda k: 1 << k))
    def alloc(self, size: int, align: int | None) -> Any:
        a = self.a
        if align is not None and align > a.size:
            with unchanged(a), pytest.raises(InvalidArgument, match="larger than the arena"):
                a.alloc(size, align)
            return multiple()
        runs = free_runs(self.extents(), a.size)
        try:
            b = a.alloc(size, align)
        except ArenaExhausted as exc:
            self.failed += 1
            assert f"{size} bytes" in str(exc)
            n, step = self.rounded(size), max(align or 1, self.g)
            assert not any(-off % step + n <= length for off, length in runs), (
                "refused although a free run fits")
            return multiple()
        self.allocs += 1
        assert b.size == size and len(b.view) == size and b.arena is a and not b.freed
        assert b.offset % (align or self.g) == 0 and b.offset % self.g == 0
        assert b.offset >= 0 and b.offset + size <= a.size
        n = self.rounded(size)
        for off, m in self.extents().items():
            assert b.offset + n <= off or off + m <= b.offset, "overlapping blocks"
        self.serial += 1
        pattern = (self.serial.to_bytes(4, "little") * (size // 4 + 1))[:size]
        b.view[:] = pattern
        self.live[b.offset] = (b, n, pattern)
        return b

    @rule(b=consumes(blocks))
    def free(self, b: Block) -> None:
        view = b.view
        self.a.free(b)
        self.frees += 1
        del self.live[b.offset]
        assert b.freed
        with pytest.raises(ValueError):
            view.tobytes()  # released: the freed memory cannot be reached through it
        self.freed.append(b)

    @rule(b=consumes(blocks))
    def quick_round_trip(self, b: Block) -> None:
        """Free and at once re-allocate the same size: a private arena's quick list hands
        the very block back (LIFO); either way the new handle is live and the old one not."""
        off, size = b.offset, b.size
        n = self.rounded(size)
        quick = self.a._quick.get(n // self.g)
        # Private arenas keep every size up to 4 KiB (and the heap) on a quick list.
        assert (quick is not None) == (not self.a.shared
                                       and size <= min(QUICK_MAX_BYTES, self.a.size))
        cached = quick is not None and len(quick) < quick.cap
        self.free(b)
        again = self.a.alloc(size)
        self.allocs += 1
        if cached:
            assert again.offset == off
        again.view[:] = b"\x5a" * size
        self.live[again.offset] = (again, n, b"\x5a" * size)
        # The fresh handle is not in the bundle: free it now to keep the bundle honest.
        self.a.free(again)
        self.frees += 1
        del self.live[again.offset]

    @rule(b=blocks)
    def block_at_finds_the_handle(self, b: Block) -> None:
        assert self.a.block_at(b.offset) is b

    @rule(kind=st.sampled_from(["double free", "forged copy", "block_at", "size", "align"]),
          data=st.data())
    def bad_input_is_refused(self, kind: str, data: st.DataObject) -> None:
        """One rule for every refusal (each one drains the quick lists through stats(), so
        they share one rule's weight to leave the quick lists mostly undisturbed)."""
        a = self.a
        if kind == "double free" and self.freed:
            b = data.draw(st.sampled_from(self.freed))
            with unchanged(a), pytest.raises(DoubleFree):
                a.free(b)
            with pytest.raises(DoubleFree):
                b.view  # noqa: B018
        elif kind == "forged copy" and self.live:
            b = self.live[data.draw(st.sampled_from(sorted(self.live)))][0]
            forged = copy.copy(b)
            assert forged is not b and forged.offset == b.offset
            with unchanged(a), pytest.raises(StaleBlock):
                a.free(forged)
        elif kind == "block_at":
            offset = data.draw(st.integers(0, a.size + self.g))
            offset -= offset % self.g
            if offset in self.live:
                assert a.block_at(offset) is self.live[offset][0]
            else:
                with unchanged(a), pytest.raises((StaleBlock, InvalidArgument)):
                    a.block_at(offset)
        elif kind == "size":
            size = data.draw(st.integers(-3, 0) | st.sampled_from([1.0, "8", True, None]))
            exc = InvalidArgument if size.__class__ is int else InvalidType
            with unchanged(a), pytest.raises(exc):
                a.alloc(size)  # type: ignore[arg-type]
        elif kind == "align":
            align = data.draw(st.sampled_from([0, -8, 3, 12, 96, 1.0, True, "64"]))
            exc = InvalidArgument if align.__class__ is int else InvalidType
            with unchanged(a), pytest.raises(exc):
                a.alloc(16, align)  # type: ignore[arg-type]

    @rule()
    def stats_agree_with_the_model(self) -> None:
        s = self.a.stats()
        used = sum(self.extents().values())
        runs = free_runs(self.extents(), self.a.size)
        largest = max((length for _, length in runs), default=0)
        assert (s.used_bytes, s.free_bytes) == (used, self.a.size - used)
        assert s.largest_free == largest
        assert s.fragmentation == pytest.approx(1 - largest / s.free_bytes if s.free_bytes
                                                else 0.0)
        assert (s.allocations, s.frees, s.failed_allocations) == (
            self.allocs, self.frees, self.failed)
        assert s.shared == self.a.shared and not s.locked and s.recoveries == 0
        if largest:  # "the largest block alloc can return now": it can
            self.a.free(self.a.alloc(largest))
            self.allocs += 1
            self.frees += 1

    @invariant()
    def contents_intact_and_index_sound(self) -> None:
        if not hasattr(self, "a"):
            return
        for off, (b, _, pattern) in self.live.items():
            assert b.view.tobytes() == pattern, f"block at {off} was overwritten"
        self.a.check_invariants()  # does not drain the quick lists

    def teardown(self) -> None:
        if not hasattr(self, "a"):
            return
        a = self.a
        for b, _, _ in list(self.live.values()):
            a.free(b)
        s = a.stats()
        assert s.used_bytes == 0 and s.largest_free == a.size and s.fragmentation == 0.0
        assert s.allocations == s.frees == self.allocs
        report = a.check()
        assert report.ok and report.blocks == report.free_blocks == 1
        a.close()


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=100, stateful_step_count=100, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# Constructors and errors


def test_every_error_shares_the_root_and_a_builtin() -> None:
    errors = [getattr(arena, n) for n in arena.__all__
              if isinstance(getattr(arena, n), type) and issubclass(getattr(arena, n), Exception)]
    assert len(errors) >= 12
    for cls in errors:
        assert issubclass(cls, ArenaError)
    assert issubclass(ArenaExhausted, MemoryError)
    assert issubclass(arena.InvalidArgument, ValueError)
    assert issubclass(arena.InvalidType, TypeError)
    assert issubclass(DoubleFree, ValueError) and issubclass(DoubleFree, arena.BadBlock)
    assert issubclass(ForeignBlock, arena.BadBlock) and issubclass(StaleBlock, arena.BadBlock)
    assert issubclass(arena.MemlockError, OSError) and issubclass(arena.BadArenaFile, OSError)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        ((0,), {}, InvalidArgument),
        ((-4096,), {}, InvalidArgument),
        ((4096.0,), {}, InvalidType),
        ((True,), {}, InvalidType),
        (("4096",), {}, InvalidType),
        ((4096,), {"block_size": 48}, InvalidArgument),
        ((4096,), {"block_size": 8}, InvalidArgument),
        ((4096,), {"block_size": 2 << 20}, InvalidArgument),
        ((4096,), {"block_size": 64.0}, InvalidType),
        ((4096,), {"lock": "yes"}, InvalidArgument),
        ((4096,), {"lock": 1}, InvalidArgument),
        ((4096,), {"lock": 1.0}, InvalidArgument),
        ((4096,), {"lock": None}, InvalidArgument),
        ((2**40,), {"block_size": 16}, InvalidArgument),  # more granules than tags can count
    ],
)
def test_constructor_refuses_bad_arguments(args: tuple[Any, ...], kwargs: dict[str, Any],
                                           exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Arena(*args, **kwargs)


def test_blocks_are_made_only_by_the_arena() -> None:
    with pytest.raises(TypeError):
        Block()


def test_sizes_are_rounded_to_granules(a: Arena) -> None:
    assert a.size == 1 << 16 and a.block_size == 64 and a.mapped_bytes > a.size
    b = a.alloc(1)
    assert b.size == 1 and len(b.view) == 1
    assert a.stats().used_bytes == 64
    c = a.alloc(65)
    assert a.stats().used_bytes == 64 + 128 and c.offset % 64 == 0
    odd = Arena(1000, block_size=16, lock=False)
    assert odd.size == 1008  # whole granules, at least what was asked
    odd.close()


def test_exhaustion_is_a_memory_error_that_says_what_was_asked_and_what_is_free(
        a: Arena) -> None:
    big = a.alloc(a.size - 4096)
    before = a.stats()
    with pytest.raises(MemoryError) as info:
        a.alloc(8192, align=4096)
    exc = info.value
    assert isinstance(exc, ArenaExhausted) and isinstance(exc, ArenaError)
    msg = str(exc)
    assert "8192 bytes" in msg and "align 4096" in msg
    assert "4096 bytes free" in msg and "largest free run 4096 bytes" in msg
    after = a.stats()
    assert after.failed_allocations == before.failed_allocations + 1
    assert comparable(dataclasses.replace(after, failed_allocations=0)) == comparable(
        dataclasses.replace(before, failed_allocations=0))
    a.free(big)
    assert a.alloc(a.size).size == a.size  # the whole arena in one block once free


def test_a_block_just_freed_can_be_had_again() -> None:
    with Arena(4096, block_size=16, lock=False) as a:
        b = a.alloc(3201)  # 201 granules: its size class starts at 208
        a.alloc(1)
        off = b.offset
        a.free(b)
        assert a.stats().largest_free == 3216
        assert a.alloc(3201).offset == off
        assert a.stats().failed_allocations == 0


def test_quick_lists_are_given_back_when_nothing_else_fits() -> None:
    with Arena(QUICK_DEPTH * 64, block_size=64, lock=False) as a:
        small = [a.alloc(64) for _ in range(QUICK_DEPTH)]
        with pytest.raises(ArenaExhausted):
            a.alloc(64)
        for b in small:
            a.free(b)  # all kept on the quick list, still allocated in the index
        assert a._quick_count() == QUICK_DEPTH
        whole = a.alloc(a.size)  # fits only once the quick list is given back and coalesced
        assert whole.offset == 0
        s = a.stats()
        assert s.failed_allocations == 1  # the one real failure above, not the retry
        assert (s.allocations, s.frees) == (QUICK_DEPTH + 1, QUICK_DEPTH)
        a.free(whole)
        for _ in range(3):
            a.free(a.alloc(64))  # keeps one block on the quick list
        with pytest.raises(ArenaExhausted):
            a.alloc(a.size + 1)
        assert a.stats().failed_allocations == 2  # one failure counted once, not twice


def test_bad_blocks_are_refused_and_change_nothing(a: Arena) -> None:
    other = Arena(4096, block_size=64, lock=False)
    foreign = other.alloc(64)
    b = a.alloc(100)
    gone = a.alloc(64)
    a.free(gone)
    with unchanged(a):
        with pytest.raises(ForeignBlock):
            a.free(foreign)
        with pytest.raises(InvalidType):
            a.free("block")  # type: ignore[arg-type]
        with pytest.raises(InvalidType):
            a.free(None)  # type: ignore[arg-type]
        with pytest.raises(DoubleFree):
            a.free(gone)
        with pytest.raises(StaleBlock):
            a.free(copy.copy(b))
        with pytest.raises(InvalidType):
            a.keep("block")  # type: ignore[arg-type]
        with pytest.raises(ForeignBlock):
            a.keep(foreign)
        with pytest.raises(DoubleFree):
            a.keep(gone)
    assert other.stats().used_bytes == 64
    other.close()


def test_block_at_refuses_forged_and_stale_offsets() -> None:
    with Arena(1 << 14, block_size=64, lock=False, shared=True) as a:  # no quick lists
        pairs = [a.alloc(128) for _ in range(6)]  # equal neighbours: equal tag words
        a.free(pairs[1])
        a.free(pairs[3])
        a.free(pairs[2])  # coalesced with both neighbours
        with unchanged(a):
            for off in (64, 64 * 3, 128 * 2 + 64, pairs[2].offset, pairs[1].offset,
                        pairs[3].offset, 128 * 8):
                with pytest.raises(StaleBlock):
                    a.block_at(off)
            for bad in (-64, 1, 63, a.size, a.size + 64, 10**12):
                with pytest.raises(InvalidArgument):
                    a.block_at(bad)
            with pytest.raises(InvalidArgument):
                a.block_at(64.0)  # type: ignore[arg-type]
        assert a.block_at(pairs[4].offset) is pairs[4]


def test_block_at_refuses_a_block_on_the_quick_list(a: Arena) -> None:
    b = a.alloc(64)
    off = b.offset
    a.free(b)  # cached: still allocated in the index, but nobody's block
    with pytest.raises(StaleBlock):
        a.block_at(off)
    x, y = a.alloc(64), a.alloc(64)
    assert x.offset == off and y.offset != off  # handed out once, not twice


def test_block_at_gives_a_handle_on_a_block_this_process_forgot(a: Arena) -> None:
    b = a.alloc(200)
    off = b.offset
    del a._live[b.offset >> 6]  # as if another process had allocated it
    h = a.block_at(off)
    assert h is not b and h.offset == off and h.size == 256  # whole granules
    assert a.block_at(off) is h
    a.free(h)
    assert a.stats().used_bytes == 0


# ------------------------------------------------------------------------------------------
# Statistics and check()


def test_stats_fields(a: Arena) -> None:
    s = a.stats()
    assert s == ArenaStats(size=a.size, block_size=64, used_bytes=0, free_bytes=a.size,
                           largest_free=a.size, fragmentation=0.0, allocations=0, frees=0,
                           failed_allocations=0, recoveries=0, locked=False, prefaulted=True,
                           shared=False, minor_faults=s.minor_faults,
                           major_faults=s.major_faults)
    assert s.minor_faults >= 0 and s.major_faults >= 0
    blocks = [a.alloc(64 * 4) for _ in range(8)]
    for b in blocks[::2]:
        a.free(b)
    s = a.stats()
    assert s.used_bytes == 4 * 256 and s.free_bytes == a.size - 1024
    assert s.largest_free == a.size - 8 * 256
    assert s.fragmentation == pytest.approx(1 - s.largest_free / s.free_bytes)
    assert (s.allocations, s.frees) == (8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.used_bytes = 0  # type: ignore[misc]


def test_check_on_a_sound_arena(a: Arena) -> None:
    blocks = [a.alloc(100) for _ in range(5)]
    a.free(blocks[2])
    report = a.check()
    assert report.ok and not report.problems and not report.leaked
    assert report.used_blocks == 4 and report.free_blocks == 2 and report.blocks == 6
    assert a.check(reclaim=True).reclaimed_bytes == 0
    assert a.stats().used_bytes == 4 * 128


def test_check_repairs_a_damaged_index(a: Arena) -> None:
    keep = [a.alloc(100) for _ in range(5)]
    a.free(keep.pop(1))
    a._words[W_SL + 5] ^= 0b1010  # damage the index (not the tags)
    a._words[W_USED] += 3
    report = a.check()
    assert report.problems and not report.ok
    assert a.stats().recoveries == 1
    a.check_invariants()
    assert a.check().ok and a.stats().used_bytes == 4 * 128
    for b in keep:
        a.free(b)
    assert a.stats().largest_free == a.size


def test_a_dirty_op_word_is_repaired_by_whoever_takes_the_lock_next(a: Arena) -> None:
    b = a.alloc(64)
    a._words[W_OP] = 999_999  # an operation was interrupted (a dead process, an exception)
    with a.locked_section():  # a layer above taking the lock repairs before it reads
        assert a._words[W_OP] == 0
        assert a._words[W_RECOVERIES] == 1
        c = a.alloc(64)  # nested: no second repair
    assert a._words[W_RECOVERIES] == 1
    a.free(b)
    a.free(c)
    assert a.check().ok


class _InterruptAt:
    """The arena words, except that store number ``left`` raises KeyboardInterrupt."""

    def __init__(self, words: memoryview, left: int) -> None:
        self.words, self.left = words, left

    def __getitem__(self, i: Any) -> Any:
        return self.words[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        self.words[i] = value


@pytest.mark.parametrize("op", ["alloc", "free"])
def test_a_private_operation_interrupted_at_any_store_is_repaired_next(op: str) -> None:
    # A private arena leaves W_OP alone unless the operation raises: at every store of a
    # split and of a merge, KeyboardInterrupt marks it and the next operation rebuilds.
    for k in range(40):
        with Arena(1 << 16, block_size=64, lock=False, cache_max=0) as a:
            keep = [a.alloc(100) for _ in range(3)]
            a.free(keep.pop(0))  # a free block before keep[0], which a free merges with
            real = a._core.words
            a._core.words = _InterruptAt(real, k)  # type: ignore[assignment]
            try:
                if op == "alloc":
                    keep.append(a.alloc(3000))
                else:
                    a.free(keep.pop(0))
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            finally:
                a._core.words = real
            assert bool(a._words[W_OP]) == interrupted
            more = a.alloc(64)  # rebuilds first when marked
            assert a._words[W_OP] == 0 and a._words[W_RECOVERIES] == interrupted
            a.check_invariants()
            a.free(more)
            if not interrupted:
                break
    assert not interrupted, "every store was tried"


def test_a_fork_while_another_thread_holds_a_private_lock_rebuilds_in_the_child() -> None:
    with Arena(1 << 16, block_size=64, lock=False) as a:
        b = a.alloc(64)
        held, done = threading.Event(), threading.Event()

        def holder() -> None:
            with a.locked_section():  # as if inside an operation at the fork
                held.set()
                done.wait(10)

        t = threading.Thread(target=holder)
        t.start()
        held.wait(10)
        try:
            def child() -> tuple[bool, int, int]:
                marked = bool(a._words[W_OP])
                s = a.stats()  # takes the child's fresh lock: rebuilds first
                return marked, s.recoveries, s.used_bytes

            marked, recoveries, used = run_in_child(child)
        finally:
            done.set()
            t.join()
        assert (marked, recoveries, used) == (True, 1, 64)
        assert a._words[W_OP] == 0 and a.stats().recoveries == 0  # the parent's is its own
        a.free(b)


def test_corrupt_tags_raise_bad_arena_file_and_release_the_lock(a: Arena) -> None:
    a.alloc(64)
    a._core.words[a._core._tags + 1] = 0  # a hole in the partition: not repairable
    report_error = None
    try:
        a.check()
    except arena.BadArenaFile as exc:
        report_error = exc
    assert report_error is not None and "corrupt" in str(report_error)
    assert not a._lock.held  # released exactly once: the lock still works
    with pytest.raises(arena.BadArenaFile):
        a.alloc(64)
    assert not a._lock.held


def test_keep_and_root_offset(a: Arena) -> None:
    b = a.alloc(64)
    a.keep(b)
    owners = [blk.owner for blk in a._core.blocks() if blk.used]
    assert owners == [0]
    assert a.root_offset is None
    a.root_offset = b.offset
    assert a.root_offset == b.offset
    a.root_offset = None
    assert a.root_offset is None


# ------------------------------------------------------------------------------------------
# Views, closing


def test_view_is_zero_copy_and_released_after_free(a: Arena) -> None:
    b = a.alloc(100, align=256)
    v = b.view
    assert v is b.view and len(v) == 100 and not v.readonly
    v[:] = bytes(range(100))
    assert a.heap[b.offset : b.offset + 100].tobytes() == bytes(range(100))
    a.heap[b.offset] = 255
    assert v[0] == 255  # the same memory both ways
    a.free(b)
    with pytest.raises(ValueError):
        v[0]
    with pytest.raises(DoubleFree):
        b.view  # noqa: B018


def test_a_view_exported_further_stays_valid_after_free(a: Arena) -> None:
    """free() releases the block's own view; what was made from it stays valid memory."""
    b = a.alloc(64)
    inner = memoryview(b.view)  # a second view of the same buffer: not an export of b.view
    held = pickle.PickleBuffer(b.view)  # holds an export of b.view: its release() fails
    a.free(b)  # the BufferError is swallowed: the block is freed all the same
    assert b.freed and a.stats().used_bytes == 0
    inner[0] = 1  # still mapped memory: documented, and no crash
    with memoryview(held) as again:
        again[1] = 2
        assert bytes(again[:2]) == b"\x01\x02"
    with pytest.raises(DoubleFree):
        b.view  # noqa: B018


def test_context_manager_and_every_use_after_close() -> None:
    with Arena(4096, block_size=64, lock=False) as a:
        b = a.alloc(64)
        b2 = a.alloc(64)
        a.free(b2)
    assert a.closed
    for call in (lambda: a.alloc(64), lambda: a.alloc(64, 64), lambda: a.free(b),
                 lambda: a.free(b2), lambda: a.stats(), lambda: a.check(),
                 lambda: a.check(reclaim=True), lambda: a.block_at(0), lambda: a.keep(b),
                 lambda: a.check_invariants(), lambda: a.heap, lambda: a.root_offset,
                 lambda: b.view):
        with pytest.raises(ArenaClosed):
            call()
    with pytest.raises(ArenaClosed):
        a.root_offset = 0
    a.close()  # idempotent


# ------------------------------------------------------------------------------------------
# Threads and fork


def test_threads_allocating_at_once() -> None:
    with Arena(1 << 16, block_size=16, lock=False) as a:
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            try:
                mine: list[tuple[Block, bytes]] = []
                for i in range(600):
                    if len(mine) > 20 or (mine and i % 3 == 0):
                        b, pattern = mine.pop(i % len(mine))
                        assert b.view.tobytes() == pattern
                        a.free(b)
                    else:
                        size = 1 + (i * 37 + seed * 11) % 300
                        b = a.alloc(size, align=None if i % 4 else 64)
                        pattern = bytes([seed]) * size
                        b.view[:] = pattern
                        mine.append((b, pattern))
                for b, pattern in mine:
                    assert b.view.tobytes() == pattern
                    a.free(b)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        s = a.stats()
        assert s.used_bytes == 0 and s.largest_free == a.size
        a.check_invariants()


def test_threads_on_the_quick_lists_keep_allocations_minus_frees_exact() -> None:
    """Quick-list frees are counted without the lock, so racing threads may lose an increment;
    a lost one drops an allocation and a free alike, so their difference stays exact."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        with Arena(1 << 16, block_size=64, lock=False) as a:
            kept: list[list[Block]] = [[] for _ in range(4)]

            def worker(mine: list[Block]) -> None:
                for i in range(20_000):
                    a.free(a.alloc(64))
                    if i % 1000 == 0:
                        mine.append(a.alloc(1 + i % 128))

            threads = [threading.Thread(target=worker, args=(mine,)) for mine in kept]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            live = [b for mine in kept for b in mine]
            s = a.stats()
            assert s.allocations - s.frees == len(live) == 80
            assert s.used_bytes == sum(-(-b.size // 64) * 64 for b in live)
            assert s.allocations <= 4 * 20_000 + len(live) and s.frees <= 4 * 20_000
            for b in live:
                a.free(b)
            s = a.stats()
            assert s.allocations == s.frees and s.used_bytes == 0
            a.check_invariants()
    finally:
        sys.setswitchinterval(old_interval)


def test_fork_of_a_private_arena_gives_the_child_its_own_copy() -> None:
    with Arena(1 << 16, block_size=64, lock=False) as a:
        b = a.alloc(64)
        b.view[:] = b"p" * 64

        def child() -> tuple[bytes, int, int]:
            seen = b.view.tobytes()
            b.view[:] = b"c" * 64
            a.alloc(1000)
            a.free(b)
            s = a.stats()
            return seen, s.used_bytes, s.minor_faults

        seen, used, faults = run_in_child(child)
        assert seen == b"p" * 64 and used == 1024 and faults >= 0
        assert b.view.tobytes() == b"p" * 64  # the child's writes stayed in the child
        assert a.stats().used_bytes == 64
        a.free(b)


@pytest.mark.parametrize("backing", ["memfd", "file"])
def test_fork_of_a_shared_arena_shares_blocks_and_locks_apart(backing: str,
                                                              tmp_path: Any) -> None:
    if backing == "memfd":
        a = Arena(1 << 16, block_size=64, lock=False, shared=True)
    else:
        a = Arena.create(tmp_path / "arena", 1 << 16, block_size=64, lock=False)
    with a:
        b = a.alloc(64)
        b.view[:] = b"p" * 64
        parent_fd = a.fd

        def child() -> tuple[int, bytes, bool]:
            assert a.fd != parent_fd  # its own open file description, so its own OFD lock
            c = a.alloc(1000)
            c.view[:] = b"c" * 1000
            seen = b.view.tobytes()
            a.free(b)  # the parent's block, through the handle inherited across fork
            return c.offset, seen, a.stats().shared

        offset, seen, shared = run_in_child(child)
        assert seen == b"p" * 64 and shared
        s = a.stats()
        assert s.used_bytes == 1024 and s.allocations == 2 and s.frees == 1
        assert a.heap[offset : offset + 1000].tobytes() == b"c" * 1000
        # The child is dead; its block is reported, then reclaimed.
        report = a.check()
        assert [(x.offset, x.size) for x in report.leaked] == [(offset, 1024)]
        assert not report.ok
        # The parent's old handle is stale: its block was freed by the child.
        with pytest.raises(StaleBlock):
            a.free(b)
        assert a.check(reclaim=True).reclaimed_bytes == 1024
        assert a.stats().used_bytes == 0 and a.check().ok


def test_check_does_not_report_a_dead_process_block_this_process_holds() -> None:
    with Arena(1 << 16, block_size=64, lock=False, shared=True) as a:

        def child() -> list[int]:
            return [a.alloc(64).offset, a.alloc(128).offset]

        first, second = run_in_child(child)
        held = a.block_at(first)  # taken over by this process: not a leak
        report = a.check()
        assert [(x.offset, x.size) for x in report.leaked] == [(second, 128)]
        a.check(reclaim=True)
        assert a.stats().used_bytes == 64 and not held.freed
        a.free(held)
        assert a.stats().used_bytes == 0


def test_fork_after_the_file_was_unlinked_still_locks_apart(tmp_path: Any) -> None:
    path = tmp_path / "arena"
    with Arena.create(path, 1 << 16, block_size=64, lock=False) as a:
        os.unlink(path)  # a common pattern: nobody else should find it by name
        parent_fd = a.fd

        def child() -> tuple[bool, bool, int]:
            b = a.alloc(64)
            return a.fd != parent_fd, a.closed, b.offset

        own_fd, closed, offset = run_in_child(child)
        assert own_fd and not closed
        assert a.stats().used_bytes == 64 and a.block_at(offset).size == 64


def test_a_handle_on_a_block_another_process_freed_and_reallocated_is_stale() -> None:
    with Arena(1 << 16, block_size=64, lock=False, shared=True) as a:
        b = a.alloc(256)
        b.view[:] = b"p" * 256
        keep = a.alloc(64)  # so that the freed block does not coalesce into the rest

        def child() -> int:
            a.free(a.block_at(b.offset))  # frees the parent's block ...
            again = a.alloc(256)  # ... and gets the very same place, for itself
            again.view[:] = b"c" * 256
            return again.offset

        assert run_in_child(child) == b.offset
        with pytest.raises(StaleBlock):
            a.free(b)  # the parent's handle is stale: the child's block is left alone
        assert a.stats().used_bytes == 256 + 64
        assert a.heap[b.offset : b.offset + 256].tobytes() == b"c" * 256
        a.free(keep)
