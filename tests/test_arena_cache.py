"""The caches of freed blocks at every size (issue 18), and typed views of blocks.

Private arenas: a freed block up to ``cache_max`` is handed out again without the allocator,
the cache is bounded in bytes, and stats()/check()/exhaustion give it back. Shared arenas (with
``cache_bytes``): the warm alloc+free pair makes no fcntl call, and a cached block is this
process's alone (marked in its start tag): another process cannot take or free it, and once its
owner is dead check() finds it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _children import Child, run_in_child

from arena import Arena, ArenaExhausted, StaleBlock
from arena._layout import TAG_CACHED
from arena._tlsf import Tlsf

KIB = 1024


def _count_fcntl(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every fcntl(2) call the arena's locks make from here on."""
    calls = [0]
    real: Callable[..., Any] = fcntl.fcntl

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(fcntl, "fcntl", counting)  # arena._locks calls fcntl.fcntl
    return calls


@pytest.fixture
def shared_file(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "arena"


# -- private arenas -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * KIB, 64 * KIB, 1024 * KIB])
def test_a_freed_block_of_any_size_is_handed_out_again_without_the_allocator(
        size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with Arena(8 << 20, lock=False) as a:
        b = a.alloc(size)
        a.free(b)
        calls = [0]
        real = Tlsf.alloc_tagged

        def counting(self: Tlsf, *args: int) -> int:
            calls[0] += 1
            return real(self, *args)

        monkeypatch.setattr(Tlsf, "alloc_tagged", counting)
        for _ in range(10):
            again = a.alloc(size)
            assert again.offset == b.offset and len(again.view) == size
            a.free(again)
        assert calls[0] == 0
        s = a.stats()  # gives the cache back: the figures are exact
        assert (s.allocations, s.frees, s.used_bytes) == (11, 11, 0)
        assert s.largest_free == s.free_bytes == a.size


def test_the_cache_is_bounded_in_bytes() -> None:
    with Arena(4 << 20, lock=False, cache_bytes=128 * KIB) as a:
        blocks = [a.alloc(64 * KIB) for _ in range(5)]
        for b in blocks:
            a.free(b)
        assert a._cached_bytes == 128 * KIB and a._cached_count() == 2
        # The three that did not fit went back to the allocator at once.
        assert a._core.used_count() * a.block_size == 128 * KIB
        assert a.stats().used_bytes == 0 and a._cached_count() == 0


def test_blocks_above_cache_max_are_not_cached() -> None:
    with Arena(4 << 20, lock=False, cache_max=64 * KIB) as a:
        a.free(a.alloc(64 * KIB))
        a.free(a.alloc(64 * KIB + 1))
        assert a._cached_count() == 1 and a._cached_bytes == 64 * KIB


def test_exhaustion_gives_the_cache_back_first() -> None:
    with Arena(1 << 20, lock=False) as a:
        blocks = [a.alloc(32 * KIB) for _ in range(32)]  # the whole heap
        for b in blocks:
            a.free(b)
        assert a._cached_count() == 8  # a quarter of the heap, the default bound
        big = a.alloc(1 << 20)  # fits only once the cached blocks have coalesced
        assert a._cached_count() == 0 and big.size == 1 << 20
        a.free(big)
        assert a.stats().failed_allocations == 0


def test_a_full_arena_gives_back_one_cached_block_that_fits_not_the_whole_cache() -> None:
    with Arena(1 << 20, lock=False) as a:
        small = [a.alloc(64) for _ in range(8)]
        big = a.alloc(8 * KIB)
        rest = a.alloc(a.stats().largest_free)  # the heap is full now
        for b in (*small, big):
            a.free(b)
        assert a._cached_count() == 9
        again = a.alloc(4 * KIB)  # no free run: the cached 8 KiB block is given back, split
        assert again.offset == big.offset and a._cached_count() == 8
        s = a.stats()
        assert (s.allocations, s.frees, s.failed_allocations) == (11, 9, 0)
        assert s.used_bytes == 4 * KIB + rest.size
        assert a.check().ok


def test_an_aligned_request_is_served_by_an_aligned_cached_block() -> None:
    with Arena(1 << 20, lock=False) as a:
        b = a.alloc(8 * KIB, align=8 * KIB)
        a.free(b)
        again = a.alloc(8 * KIB, align=8 * KIB)
        assert again.offset == b.offset and a._cached_count() == 0
        a.free(again)
        assert a.check().ok


def test_cache_arguments_are_checked() -> None:
    from arena import InvalidArgument, InvalidType

    with pytest.raises(InvalidArgument):
        Arena(1 << 16, lock=False, cache_bytes=-1)
    with pytest.raises(InvalidType):
        Arena(1 << 16, lock=False, cache_max=1.5)  # type: ignore[arg-type]


# -- shared arenas --------------------------------------------------------------------------


def test_a_warm_pair_in_a_shared_arena_makes_no_fcntl_call(
        shared_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Arena.create(shared_file, 4 << 20, lock=False, cache_bytes=1 << 20) as a:
        for size in (64, 4 * KIB, 64 * KIB):
            a.free(a.alloc(size))  # first use: the allocator, and the free marks it, locked
        calls = _count_fcntl(monkeypatch)
        for _ in range(50):
            for size in (64, 4 * KIB, 64 * KIB):
                a.free(a.alloc(size))
        assert calls[0] == 0
        a.stats()
        assert calls[0] == 2  # the drain: one lock and one unlock
        assert a.stats().used_bytes == 0


def test_a_shared_cached_block_is_this_process_s_alone(shared_file: Path) -> None:
    with Arena.create(shared_file, 1 << 20, lock=False, cache_bytes=1 << 19) as a:
        b = a.alloc(4 * KIB)
        a.free(b)  # cached: still allocated, marked
        assert a._core.tag(b.offset // a.block_size) & TAG_CACHED
        handed = a.alloc(4 * KIB)  # from the cache: keeps the mark
        assert handed.offset == b.offset
        with Arena.open(shared_file, lock=False) as other:  # another opener, another process
            def child() -> list[str]:
                out = []
                for op in (lambda: other.block_at(handed.offset),
                           lambda: a.free(handed)):  # the inherited handle
                    try:
                        op()
                        out.append("done")
                    except StaleBlock as exc:
                        out.append(str(exc))
                return out

            refused = run_in_child(child)
            assert all("cache" in r for r in refused), refused
            assert other.stats().used_bytes == 4 * KIB  # used, as far as the others see
        a.free(handed)
        a.keep(a.alloc(4 * KIB))  # keep clears the mark: the structure owns it
        assert not a._core.tag(b.offset // a.block_size) & TAG_CACHED
        assert a.check().ok


def test_a_dead_process_s_cached_blocks_are_found_by_check(shared_file: Path) -> None:
    with Arena.create(shared_file, 1 << 20, lock=False) as a:
        def child() -> None:
            mine = Arena.open(shared_file, lock=False, cache_bytes=1 << 18)
            blocks = [mine.alloc(n) for n in (256, 8 * KIB, 64 * KIB)]
            for b in blocks:
                mine.free(b)
            handed = mine.alloc(8 * KIB)  # handed out from the cache when it dies
            ok = handed.offset == blocks[1].offset and mine._cached_count() == 2
            os._exit(0 if ok else 3)  # dies without close() or its exit handlers

        dead = Child(child)
        assert os.waitstatus_to_exitcode(dead.reap()) == 0
        os.close(dead._r)
        report = a.check()
        assert not report.ok and sorted(x.size for x in report.leaked) == [256, 8 * KIB,
                                                                           64 * KIB]
        assert all(x.cached for x in report.leaked)
        assert a.check(reclaim=True).reclaimed_bytes == 256 + 72 * KIB
        assert a.stats().used_bytes == 0 and a.check().ok


def test_close_gives_a_shared_cache_back(shared_file: Path) -> None:
    with Arena.create(shared_file, 1 << 20, lock=False) as a:
        other = Arena.open(shared_file, lock=False, cache_bytes=1 << 18)
        other.free(other.alloc(16 * KIB))
        assert a.stats().used_bytes == 16 * KIB
        other.close()
        assert a.stats().used_bytes == 0 and a.check().ok


def test_a_full_shared_cache_frees_through_the_allocator(shared_file: Path) -> None:
    with Arena.create(shared_file, 1 << 20, lock=False, cache_bytes=8 * KIB) as a:
        x, y = a.alloc(8 * KIB), a.alloc(8 * KIB)
        a.free(x)
        a.free(y)  # no room: freed at once
        assert a._cached_count() == 1
        with pytest.raises(ArenaExhausted):
            a.alloc(2 << 20)


def test_a_request_no_cached_block_can_serve_keeps_the_caches() -> None:
    # 16 blocks of 1 KiB, every other one freed onto its quick list: none is next to another
    # free block, so giving them back could make no run of 2 KiB.
    with Arena(16 * KIB, block_size=64, lock=False) as a:
        blocks = [a.alloc(KIB) for _ in range(16)]
        for b in blocks[::2]:
            a.free(b)
        assert a._cached_count() == 8
        with pytest.raises(ArenaExhausted) as info:
            a.alloc(2 * KIB)
        assert a._cached_count() == 8  # kept: the next alloc of 1 KiB is still a cache hit
        assert "8192 bytes free, largest free run 1024 bytes" in str(info.value)
        s = a.stats()  # gives them back: the message said what it finds
        assert (s.free_bytes, s.largest_free, s.failed_allocations) == (8 * KIB, KIB, 1)


def test_a_request_that_cached_blocks_can_serve_is_served() -> None:
    # Blocks 0 and 1 are neighbours: given back, they coalesce into the 2 KiB asked for.
    with Arena(16 * KIB, block_size=64, lock=False) as a:
        blocks = [a.alloc(KIB) for _ in range(16)]
        for i in (0, 1, 4, 8, 12):
            a.free(blocks[i])
        assert a._cached_count() == 5
        two = a.alloc(2 * KIB)
        assert two.offset == 0 and a._cached_count() == 0  # all given back first
        s = a.stats()
        assert s.failed_allocations == 0 and s.used_bytes == 16 * KIB - 3 * KIB
        assert a.check().ok


# -- typed views ----------------------------------------------------------------------------


class Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("total", ctypes.c_double)]


def test_a_block_as_a_ctypes_structure_and_a_memoryview_cast() -> None:
    with Arena(1 << 20, lock=False) as a:
        b = a.alloc(ctypes.sizeof(Header) * 4, align=64)
        base = ctypes.addressof(ctypes.c_char.from_buffer(b.view))
        assert base % 64 == 0  # the offset's alignment is the address's: the heap is page-aligned
        h = Header.from_buffer(b.view)
        h.magic, h.count, h.total = 0xC0FFEE, 3, 2.5
        doubles = b.view.cast("d")
        assert doubles[1] == 2.5 and len(doubles) == b.size // 8
        doubles[1] = 4.0
        assert h.total == 4.0
        del h, doubles
        a.free(b)


def test_a_block_as_a_numpy_array() -> None:
    np = pytest.importorskip("numpy")
    with Arena(1 << 20, lock=False) as a:
        b = a.alloc(64 * KIB, align=4096)
        arr = np.frombuffer(b.view, dtype=np.float64)
        assert arr.ctypes.data % 4096 == 0 and arr.size == 8192
        arr[:] = np.arange(8192)
        assert b.view.cast("d")[8191] == 8191.0  # zero-copy: the same memory
        del arr
        a.free(b)
        assert a.check().ok
