"""Damaged words of an arena file, one at a time (issue 14): each is refused with BadArenaFile,
nothing changed, where the code of 226c41a raised IndexError/ValueError, hung,
wrote through the damaged word or left ``W_OP`` set."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import deadline

from arena import Arena, BadArenaFile
from arena import _cli as arena_cli
from arena._layout import NIL, W_ALLOCS, W_FL, W_HEADS, W_OP, W_SL, W_USED
from arena._tlsf import mapping_insert

GRANULE = 64


@pytest.fixture
def a() -> Iterator[Arena]:
    with Arena(1 << 16, block_size=GRANULE, lock=False, prefault=False) as arena:
        yield arena


def _top_head(a: Arena, used: int = 0) -> int:
    """Word index of the list head that holds the big free block (after ``used`` granules)."""
    fl, sl = mapping_insert(a._layout.n_granules - used)
    return W_HEADS + fl * 16 + sl


def _snapshot(a: Arena) -> bytes:
    return bytes(a._words[: a._layout.heap_offset // 8].tobytes()) + a.heap.tobytes()


def test_a_list_head_outside_the_heap_is_refused(a: Arena) -> None:
    a._words[_top_head(a)] = a._layout.n_granules + 5  # was IndexError on the next alloc
    before = _snapshot(a)
    with pytest.raises(BadArenaFile, match="nothing was changed"):
        a.alloc(5000)
    with pytest.raises(BadArenaFile):
        a.stats()
    assert _snapshot(a) == before and a._words[W_OP] == 0


def test_a_free_link_into_a_used_block_is_never_written_through(a: Arena) -> None:
    user = a.alloc(4096)
    user.view[:] = b"u" * 4096
    head = a._words[_top_head(a, 4096 // GRANULE)]  # the free rest: link it to `user`
    assert a._core.tag(head) == a._layout.n_granules - 4096 // GRANULE
    link = a._core._heap + head * (GRANULE // 8)
    a._words[link] = (NIL << 32) | (user.offset // GRANULE)  # next = the used block
    before = _snapshot(a)
    with pytest.raises(BadArenaFile):
        a.alloc(5000, align=None)  # the old code unlinked the head and wrote into `user`
    assert _snapshot(a) == before and user.view.tobytes() == b"u" * 4096


def test_a_list_that_links_to_itself_ends_the_walk(a: Arena) -> None:
    head = a._words[_top_head(a)]
    link = a._core._heap + head * (GRANULE // 8)
    a._words[link] = (NIL << 32) | head  # next = itself: the old largest_free never returned
    with deadline(5.0), pytest.raises(BadArenaFile):
        a.stats()


@pytest.mark.parametrize("word,value", [(W_USED, (1 << 16) // GRANULE + 1), (W_USED, 2**64 - 1),
                                        (W_FL, 1 << 40), (W_SL, 1 << 20)])
def test_counts_and_bitmaps_past_their_caps_are_refused(word: int, value: int) -> None:
    a = Arena(1 << 16, block_size=GRANULE, lock=False, prefault=False, cache_max=0)
    b = a.alloc(3000)  # a used block, freed below through the allocator (no cache)
    if word == W_SL:  # the second-level map of the list the rest is on
        word += mapping_insert(a._layout.n_granules - 47)[0]
    a._words[word] |= value
    before = _snapshot(a)
    ops: list[Callable[[], object]] = [a.stats]  # reads the top list and used count
    if word == W_USED:
        ops.append(lambda: a.alloc(2000, align=4096))
    for op in ops:  # was ValueError / IndexError
        with pytest.raises(BadArenaFile):
            op()
    assert _snapshot(a) == before
    if word == W_USED:
        with pytest.raises(BadArenaFile):
            a.free(b)
        assert _snapshot(a) == before
    a.close()


def test_a_statistics_counter_at_its_cap_wraps(a: Arena) -> None:
    a._words[W_ALLOCS] = 2**64 - 1  # was ValueError (the block was allocated, then it raised)
    b = a.alloc(3000, align=256)
    assert a._words[W_ALLOCS] == 0 and a.stats().used_bytes == 3008
    a.free(b)


def test_check_that_cannot_repair_changes_nothing(a: Arena) -> None:
    a._words[a._core._tags + 1] = 0  # a used block's tag gone: the partition is broken
    a._words[a._core._tags] = 3  # a free block of 3 granules, then granule 3 holds nothing
    before = _snapshot(a)
    with pytest.raises(BadArenaFile, match="cannot be repaired"):
        a.check()
    assert _snapshot(a) == before and a._words[W_OP] == 0  # W_OP was left set


def test_cli_check_of_a_damaged_index_is_one_line_and_status_2(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    with Arena.create(path, 1 << 16, block_size=GRANULE, lock=False) as a:
        a.alloc(64)
        a._words[W_USED] = 2**64 - 1
    for argv in (["check", str(path)], ["check", "--repair", str(path)], ["stats", str(path)]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = arena_cli.main(argv, out=io.StringIO())
        # check rebuilds the index (derived words) and says so (status 1); after it all is well
        assert status == (1 if argv == ["check", str(path)] else 0), err.getvalue()
        assert not err.getvalue()


def test_cli_check_of_broken_tags_is_one_line_and_status_2(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    with Arena.create(path, 1 << 16, block_size=GRANULE, lock=False) as a:
        a.alloc(64)
        a._words[a._core._tags] = 0
        a._words[W_USED] = 2**64 - 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = arena_cli.main(["check", "--repair", str(path)], out=io.StringIO())
    lines = err.getvalue().splitlines()
    assert status == 2 and len(lines) == 1 and "cannot be repaired" in lines[0]
