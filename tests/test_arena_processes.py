"""Several real processes allocating from one shared arena at once, and some of them killed.

Every process writes a pattern naming itself into each block it holds and checks all of them
after every step, so two live blocks that overlap (across processes too) are caught by the
process whose pattern was overwritten. Results are counts and states, never timings: children
report through pipes, are always reaped, and a killed child is SIGKILLed at points chosen at
random (in a tight alloc/free loop, so often while it holds the arena lock) and, separately,
at every store of an alloc and of a free while it holds the lock with ``W_OP`` set.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _children import Child

from arena import Arena, ArenaExhausted, Block, StaleBlock
from arena._layout import W_OP

SIZES = (16, 64, 100, 500, 1000, 4096)
ALIGNS = (None, None, None, 64, 256, 4096)
ARENA_BYTES = 1 << 20
GRANULE = 64


# ------------------------------------------------------------------------------------------
# Children


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Every child a test starts; any left running when it ends is killed and reaped."""
    started: list[Child] = []
    yield started
    for c in started:
        if not c.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            c.reap()


class Holder:
    """One process's blocks, each filled with a pattern that names the process and the block."""

    def __init__(self, a: Arena, seed: int) -> None:
        self.a = a
        self.rng = random.Random(seed)
        self.mine: dict[int, tuple[Block, bytes]] = {}
        self.allocs = self.frees = self.exhausted = 0
        self.serial = 0

    def step(self, cap: int = 24) -> None:
        rng, mine = self.rng, self.mine
        if mine and (len(mine) >= cap or rng.random() < 0.45):
            b, pattern = mine.pop(rng.choice(list(mine)))
            assert b.view.tobytes() == pattern, f"block at {b.offset} was overwritten"
            self.a.free(b)
            self.frees += 1
            return
        size = rng.choice(SIZES)
        try:
            b = self.a.alloc(size, rng.choice(ALIGNS))
        except ArenaExhausted:
            self.exhausted += 1
            return
        self.serial += 1
        pattern = (struct.pack("<II", os.getpid(), self.serial) * (size // 8 + 1))[:size]
        b.view[:] = pattern
        mine[b.offset] = (b, pattern)
        self.allocs += 1

    def verify(self) -> None:
        for off, (b, pattern) in self.mine.items():
            assert b.view.tobytes() == pattern, f"block at {off} was overwritten"

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
            self.verify()

    def free_all(self) -> None:
        self.verify()
        for b, _ in self.mine.values():
            self.a.free(b)
            self.frees += 1
        self.mine.clear()

    def extents(self) -> set[tuple[int, int]]:
        return {(off, -(-b.size // GRANULE) * GRANULE) for off, (b, _) in self.mine.items()}


def used_extents(a: Arena) -> set[tuple[int, int]]:
    return {(b.start * GRANULE, b.size * GRANULE) for b in a._core.blocks() if b.used}


def make_arena(backing: str, tmp_path: Path) -> Arena:
    if backing == "memfd":
        return Arena(ARENA_BYTES, block_size=GRANULE, lock=False, shared=True)
    return Arena.create(tmp_path / "arena", ARENA_BYTES, block_size=GRANULE, lock=False)


def attach(a: Arena, how: str) -> Arena:
    """In a child: the inherited arena, or a fresh mapping of its file."""
    if how == "open":
        assert a.path is not None
        return Arena.open(a.path, lock=False)
    return a


# ------------------------------------------------------------------------------------------
# Processes at once


@pytest.mark.parametrize("backing", ["file", "memfd"])
def test_processes_allocate_at_once_without_overlap(backing: str, tmp_path: Path,
                                                    children: list[Child]) -> None:
    a = make_arena(backing, tmp_path)
    hows = ["open", "inherit", "open"] if backing == "file" else ["inherit"] * 3

    def work(seed: int, how: str) -> Callable[[], tuple[int, int]]:
        def body() -> tuple[int, int]:
            mine = attach(a, how)
            h = Holder(mine, seed)
            h.run(3000)
            h.free_all()
            return h.allocs, h.frees
        return body

    children.extend(Child(work(seed, how)) for seed, how in enumerate(hows, 1))
    parent = Holder(a, 99)
    parent.run(3000)  # the parent allocates at the same time
    counts = [c.result() for c in children]
    assert parent.extents() == used_extents(a)  # the children gave back everything
    parent.free_all()
    s = a.stats()
    assert s.allocations == parent.allocs + sum(n for n, _ in counts)
    assert s.frees == s.allocations and s.used_bytes == 0 and s.largest_free == a.size
    assert s.recoveries == 0
    report = a.check()
    assert report.ok and report.blocks == 1 and not report.leaked
    a.close()


# ------------------------------------------------------------------------------------------
# Killed at random points


@pytest.mark.parametrize("backing", ["file", "memfd"])
def test_a_child_killed_mid_way_leaks_at_most_its_blocks(backing: str, tmp_path: Path,
                                                         children: list[Child]) -> None:
    a = make_arena(backing, tmp_path)
    rng = random.Random(2024)
    stop_r, stop_w = os.pipe()

    def survive() -> tuple[int, int]:
        os.close(stop_w)
        os.set_blocking(stop_r, False)
        h = Holder(attach(a, "open" if backing == "file" else "inherit"), 7)
        while True:
            h.run(20)
            try:
                if os.read(stop_r, 1):
                    break
            except BlockingIOError:
                pass
        h.free_all()
        return h.allocs, h.frees

    survivor = Child(survive)
    children.append(survivor)
    os.close(stop_r)
    parent = Holder(a, 1)
    victims: list[int] = []
    for round_ in range(6):
        ready_r, ready_w = os.pipe()

        def tight_loop(seed: int = round_, ready_r: int = ready_r,
                       ready_w: int = ready_w) -> None:
            os.close(ready_r)
            h = Holder(a, 1000 + seed)
            for _ in range(200):
                h.step(cap=32)
            os.write(ready_w, b"r")
            while True:  # until SIGKILLed: mostly inside alloc or free, lock held
                h.step(cap=32)

        victim = Child(tight_loop)
        children.append(victim)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"
        os.close(ready_r)
        for _ in range(rng.randrange(0, 300)):  # a random kill point
            parent.step()
        parent.verify()
        victim.kill()
        victims.append(victim.pid)
        parent.run(50)  # the survivors keep allocating after the death
        report = a.check()
        assert report.leaked, "the victim held blocks when it died"
        assert {x.owner_pid for x in report.leaked} == {victim.pid}
        assert not report.problems and not report.ok
        leaked = sum(x.size for x in report.leaked)
        again = a.check(reclaim=True)
        assert again.reclaimed_bytes == leaked
        assert a.check().ok
        a.check_invariants()
    os.write(stop_w, b"s")
    os.close(stop_w)
    allocs, frees = survivor.result()
    assert allocs == frees > 0
    # Accounting agrees with what the survivors hold: the parent's blocks, exactly.
    assert used_extents(a) == parent.extents()
    assert a.stats().used_bytes == sum(n for _, n in parent.extents())
    parent.free_all()
    assert a.stats().used_bytes == 0 and a.check().ok
    a.close()


# ------------------------------------------------------------------------------------------
# Killed inside an operation, with the lock held, at each of its stores


def blocked_inside(a: Arena, op: str, k: int, notify: int, hold: int) -> Callable[[], None]:
    """A child body: allocate three blocks, then run ``op`` and stop at its k-th store."""

    def body() -> None:
        mine = [a.alloc(100) for _ in range(3)]
        real = a._core.words

        class StopAt:
            left = k

            def __getitem__(self, i: Any) -> Any:
                return real[i]

            def __setitem__(self, i: Any, value: Any) -> None:
                if self.left == 0:
                    os.write(notify, b"K")  # inside the operation, the lock held
                    os.read(hold, 1)  # never answered: wait for SIGKILL
                self.left -= 1
                real[i] = value

        a._core.words = StopAt()  # type: ignore[assignment]
        if op == "alloc":
            a.alloc(3000, 4096)
        else:
            a.free(mine[1])
        a._core.words = real
        os.write(notify, b"D")  # the operation had fewer than k stores
        os.read(hold, 1)

    return body


@pytest.mark.parametrize("backing", ["file", "memfd"])
@pytest.mark.parametrize("op", ["alloc", "free"])
def test_killed_holding_the_lock_at_every_store(backing: str, op: str, tmp_path: Path,
                                                children: list[Child]) -> None:
    a = make_arena(backing, tmp_path)
    parent = Holder(a, 5)
    parent.run(40)
    kills = 0
    for k in range(100):
        notify_r, notify_w = os.pipe()
        hold_r, hold_w = os.pipe()
        recoveries = a.stats().recoveries
        victim = Child(blocked_inside(a, op, k, notify_w, hold_r))
        children.append(victim)
        os.close(notify_w)
        os.close(hold_r)
        where = os.read(notify_r, 1)
        if where == b"K":
            assert a._words[W_OP] == victim.pid  # it died inside the operation
        victim.kill()
        os.close(notify_r)
        os.close(hold_w)
        # The kernel dropped its lock: the survivor goes on, repairing first if needed.
        parent.run(10)
        s = a.stats()
        assert s.recoveries == recoveries + (where == b"K")
        a.check_invariants()
        report = a.check(reclaim=True)
        assert {x.owner_pid for x in report.leaked} == {victim.pid}
        assert used_extents(a) == parent.extents()
        if where == b"D":
            break
        kills += 1
    assert kills >= 5  # every store of the operation was a kill point
    parent.free_all()
    assert a.stats().used_bytes == 0 and a.check().ok
    a.close()


def test_block_at_never_returns_a_handle_another_holder_freed(tmp_path: Any) -> None:
    """Holder A keeps a block; holder B frees it (``block_at`` + ``free``, as a domain frees
    a kept table) and allocates the offset again, larger. A's ``block_at`` must see the new
    block, not hand back its own stale handle (whose ``free`` then failed with StaleBlock,
    found by the compaction machine once the registry freed small tables often)."""
    path = str(tmp_path / "arena")
    a = Arena.create(path, 1 << 20)
    b = Arena.open(path)
    try:
        blk = a.alloc(256)
        a.keep(blk)
        offset = blk.offset
        b.free(b.block_at(offset))
        again = b.alloc(512)
        assert again.offset == offset  # the lowest free block: the same offset, larger
        b.keep(again)
        found = a.block_at(offset)
        assert found is not blk and found.size == 512
        a.free(found)
        with pytest.raises(StaleBlock):
            a.free(blk)
        assert a.check().ok
    finally:
        b.close()
        a.close()
