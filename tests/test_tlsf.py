"""Tests for the pure allocator core (arena._tlsf) and the layout arithmetic (arena._layout).

No OS: the core runs over a ``bytearray`` laid out exactly like an arena mapping. A plain model
(a dict of live blocks) stands beside it; free space is whatever the model does not hold, in
maximal runs, because the allocator coalesces fully. Crashes are simulated by a word array that
raises at its k-th store, for every k of an operation.
"""

from __future__ import annotations

from typing import Any

import pytest
from _model import free_runs
from hypothesis import HealthCheck, given, settings
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

from arena._layout import (
    FL_COUNT,
    HEADER_WORDS,
    MAGIC,
    MAX_GRANULE,
    MAX_GRANULES,
    MIN_GRANULE,
    PAGE_SIZE,
    SL_COUNT,
    TAG_END,
    TAG_OWNER_MAX,
    VERSION,
    W_GRANULE,
    W_HEAP,
    W_MAGIC,
    W_NGRAN,
    W_OP,
    W_RECOVERIES,
    W_TAGS,
    W_TOTAL,
    W_USED,
    W_VERSION,
    is_power_of_two,
    layout_for,
    round_up,
    validate_header,
)
from arena._tlsf import (
    BlockInfo,
    CorruptArena,
    Tlsf,
    lowest_bit,
    mapping_insert,
    mapping_search,
)

# ------------------------------------------------------------------------------------------
# Helpers


def list_bounds(fl: int, sl: int) -> tuple[int, int]:
    """[lo, hi) of the block sizes kept on list (fl, sl), from the documented mapping."""
    if fl == 0:
        return sl, sl + 1
    width = 1 << (fl - 1)
    lo = (SL_COUNT + sl) * width
    return lo, lo + width


def make_core(n_granules: int, granule: int = MIN_GRANULE) -> tuple[Tlsf, memoryview]:
    layout = layout_for(n_granules, granule)
    words = memoryview(bytearray(layout.total)).cast("Q")
    core = Tlsf(words, layout.tags_offset // 8, layout.heap_offset // 8, granule, n_granules)
    core.format()
    return core, words


def fits_aligned(runs: list[tuple[int, int]], n: int, align: int) -> bool:
    return any(-start % align + n <= size for start, size in runs)


class Killed(Exception):
    """The simulated SIGKILL."""


class CrashingWords:
    """The arena words, except that the store number ``stores_left`` raises :class:`Killed`."""

    def __init__(self, words: memoryview, stores_left: int) -> None:
        self.words = words
        self.stores_left = stores_left

    def __getitem__(self, i: Any) -> Any:
        return self.words[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        if self.stores_left == 0:
            raise Killed
        self.stores_left -= 1
        self.words[i] = value

    def __len__(self) -> int:
        return len(self.words)


def run_crashing(core: Tlsf, stores: int, op: Any) -> bool:
    """Run ``op(core)`` over words that die at store ``stores``; True when it completed."""
    real = core.words
    core.words = CrashingWords(real, stores)  # type: ignore[assignment]
    try:
        op(core)
    except Killed:
        return False
    finally:
        core.words = real
    return True


def count_stores(core: Tlsf, op: Any) -> int:
    snapshot = core.words.tobytes()
    real = core.words
    proxy = CrashingWords(real, 1 << 30)
    core.words = proxy  # type: ignore[assignment]
    try:
        op(core)
    finally:
        core.words = real
        real[:] = memoryview(snapshot).cast("Q")
    return (1 << 30) - proxy.stores_left


def used_partition(core: Tlsf) -> dict[int, int]:
    return {b.start: b.size for b in core.blocks() if b.used}


ops = st.lists(st.tuples(st.booleans(), st.integers(1, 3) | st.integers(1, 12), st.integers(0, 4)),
               max_size=25)


def build(n: int, script: list[tuple[bool, int, int]]) -> tuple[Tlsf, memoryview, list[int]]:
    core, words = make_core(n)
    live: list[int] = []
    for is_alloc, size, align_log in script:
        if is_alloc or not live:
            g = core.alloc(size, 1 << align_log, 3)
            if g >= 0:
                live.append(g)
        else:
            core.free(live.pop(size % len(live)))
    return core, words, live


# ------------------------------------------------------------------------------------------
# Size classes


@given(st.integers(1, 2**34))
def test_mapping_insert_puts_a_size_on_the_list_that_covers_it(n: int) -> None:
    fl, sl = mapping_insert(n)
    assert 0 <= fl < FL_COUNT and 0 <= sl < SL_COUNT
    lo, hi = list_bounds(fl, sl)
    assert lo <= n < hi


@given(st.integers(1, 2**34), st.integers(1, 2**34))
def test_mapping_insert_is_monotonic(a: int, b: int) -> None:
    a, b = min(a, b), max(a, b)
    assert mapping_insert(a) <= mapping_insert(b)


@given(st.integers(1, 2**34))
def test_mapping_search_returns_the_first_list_whose_every_block_fits(n: int) -> None:
    fl, sl = mapping_search(n)
    lo, _ = list_bounds(fl, sl)
    assert lo >= n  # every block on it (and on any later list) holds n
    # ... and it is the first such list: the one before it starts below n.
    prev = (fl, sl - 1) if sl else (fl - 1, SL_COUNT - 1)
    if prev[0] >= 0:
        assert list_bounds(*prev)[0] < n
    # The waste is bounded: at most one sixteenth of the size (the TLSF good-fit promise).
    assert lo - n < max(1, n // (SL_COUNT // 2))


def test_mapping_small_sizes_are_exact() -> None:
    for n in range(1, SL_COUNT):
        assert mapping_insert(n) == mapping_search(n) == (0, n)
    assert mapping_insert(16) == (1, 0)
    assert mapping_insert(31) == (1, 15)
    assert mapping_insert(32) == (2, 0)
    assert mapping_search(33) == (2, 1)  # 33 rounds up to the list of 34..35
    assert mapping_insert(MAX_GRANULES)[0] < FL_COUNT


@given(st.integers(1, 2**80))
def test_lowest_bit(x: int) -> None:
    i = lowest_bit(x)
    assert x >> i & 1 and x & ((1 << i) - 1) == 0


def test_round_up_and_power_of_two() -> None:
    assert [round_up(v, 8) for v in (0, 1, 8, 9)] == [0, 8, 8, 16]
    assert [v for v in range(-2, 70) if is_power_of_two(v)] == [1, 2, 4, 8, 16, 32, 64]


# ------------------------------------------------------------------------------------------
# Layout and header validation


@given(st.integers(1, 1 << 20), st.sampled_from([16, 64, 4096, MAX_GRANULE]))
def test_layout_regions_are_page_aligned_and_disjoint(n: int, granule: int) -> None:
    lay = layout_for(n, granule)
    assert lay.tags_offset % PAGE_SIZE == lay.heap_offset % PAGE_SIZE == lay.total % PAGE_SIZE == 0
    assert lay.tags_offset >= HEADER_WORDS * 8
    assert lay.heap_offset - lay.tags_offset >= n * 8
    assert lay.total - lay.heap_offset >= lay.heap_size == n * granule


def good_header(n: int = 100, granule: int = 64) -> tuple[list[int], int]:
    lay = layout_for(n, granule)
    words = [0] * HEADER_WORDS
    words[W_MAGIC], words[W_VERSION] = MAGIC, VERSION
    words[W_TOTAL], words[W_GRANULE], words[W_NGRAN] = lay.total, granule, n
    words[W_TAGS], words[W_HEAP] = lay.tags_offset, lay.heap_offset
    return words, lay.total


def test_validate_header_accepts_what_layout_for_computes() -> None:
    words, total = good_header()
    assert validate_header(words, total) == layout_for(100, 64)
    assert validate_header(words, total + PAGE_SIZE) == layout_for(100, 64)  # a longer file


@pytest.mark.parametrize(
    ("word", "value", "needle"),
    [
        (W_MAGIC, 0, "magic"),
        (W_MAGIC, MAGIC ^ 1, "magic"),
        (W_VERSION, VERSION + 1, "version"),
        (W_VERSION, 0, "version"),
        (W_GRANULE, 48, "block size"),
        (W_GRANULE, MIN_GRANULE // 2, "block size"),
        (W_GRANULE, MAX_GRANULE * 2, "block size"),
        (W_GRANULE, 0, "block size"),
        (W_NGRAN, 0, "granule count"),
        (W_NGRAN, MAX_GRANULES + 1, "granule count"),
        (W_NGRAN, 2**64 - 1, "granule count"),
        (W_TOTAL, 0, "do not match"),
        (W_TOTAL, 2**63, "do not match"),
        (W_TAGS, 0, "do not match"),
        (W_HEAP, 8, "do not match"),
        (W_NGRAN, 1000, "do not match"),  # a plausible count whose layout differs
    ],
)
def test_validate_header_rejects_bad_fields(word: int, value: int, needle: str) -> None:
    words, total = good_header()
    words[word] = value
    with pytest.raises(ValueError, match=needle):
        validate_header(words, total + 10 * PAGE_SIZE * 64)


def test_validate_header_rejects_a_short_file() -> None:
    words, total = good_header()
    with pytest.raises(ValueError, match="file is"):
        validate_header(words, total - 1)


def test_validate_header_reads_only_the_identity_words() -> None:
    words, total = good_header()
    touched: set[int] = set()

    class Spy:
        def __getitem__(self, i: int) -> int:
            touched.add(i)
            return words[i]

    validate_header(Spy(), total)
    assert touched <= {W_MAGIC, W_VERSION, W_TOTAL, W_GRANULE, W_NGRAN, W_TAGS, W_HEAP}


# ------------------------------------------------------------------------------------------
# The allocator against a model


def test_format_makes_one_free_block() -> None:
    core, words = make_core(300)
    assert list(core.blocks()) == [BlockInfo(0, 300, False, 0)]
    assert core.largest_free() == 300 and words[W_USED] == 0 and core.problems() == []


def test_alloc_free_basic_and_coalescing() -> None:
    core, words = make_core(64)
    a, b, c = core.alloc(3, 1, 7), core.alloc(5, 1, 7), core.alloc(2, 1, 7)
    assert sorted(used_partition(core).items()) == sorted({a: 3, b: 5, c: 2}.items())
    assert core.used_size(a) == 3 and core.used_size(b) == 5 and core.used_size(c) == 2
    assert words[W_USED] == 10
    assert core.free(a) == 3 and core.free(c) == 2 and core.problems() == []
    assert core.free(b) == 5
    assert list(core.blocks()) == [BlockInfo(0, 64, False, 0)]
    assert core.problems() == [] and words[W_USED] == 0


def test_used_size_refuses_every_offset_that_is_not_a_live_block_start() -> None:
    core, _ = make_core(64)
    # Equal neighbours with one owner: their tags are equal words, so only TAG_END tells an
    # end tag from a start tag.
    blocks = [core.alloc(2, 1, 5) for _ in range(6)] + [core.alloc(3, 1, 5) for _ in range(3)]
    starts = set(blocks)
    assert [g for g in range(64) if core.used_size(g)] == sorted(starts)
    core.free(blocks[1])
    core.free(blocks[3])
    core.free(blocks[2])  # merges with both neighbours: its old tags are now inside a free run
    assert core.used_size(blocks[2]) == core.used_size(blocks[1]) == 0
    assert core.used_size(-1) == core.used_size(64) == core.used_size(10**9) == 0
    assert core.problems() == []


def test_alloc_refused_changes_nothing() -> None:
    core, words = make_core(32)
    core.alloc(10, 1, 1)
    core.alloc(10, 1, 1)
    before = words.tobytes()
    assert core.alloc(13, 1, 1) == -1
    assert core.alloc(33, 1, 1) == -1
    assert core.alloc(4, 32, 1) == -1  # 12 granules free, but none at a multiple of 32
    assert words.tobytes() == before


def test_a_block_just_freed_can_be_had_again() -> None:
    # 201 granules: the good-fit search starts at the list of 208..215, above the only block
    # that fits; the walk of the request's own list finds it.
    core, _ = make_core(256)
    g = core.alloc(201, 1, 1)
    core.alloc(1, 1, 1)
    core.free(g)
    assert core.largest_free() == 201
    assert core.alloc(201, 1, 1) == g


@given(ops, st.data())
def test_largest_free_can_always_be_allocated(script: list[tuple[bool, int, int]],
                                              data: st.DataObject) -> None:
    core, words, _ = build(96, script)
    largest = core.largest_free()
    snapshot = words.tobytes()
    assert core.alloc(largest + 1, 1, 1) == -1
    if largest:
        assert core.alloc(largest, 1, 1) >= 0
        words[:] = memoryview(snapshot).cast("Q")
        assert core.alloc(data.draw(st.integers(1, largest)), 1, 1) >= 0


def test_owner_is_recorded_and_bounded() -> None:
    core, _ = make_core(16)
    g = core.alloc(2, 1, TAG_OWNER_MAX)
    assert [b.owner for b in core.blocks() if b.used] == [TAG_OWNER_MAX]
    core.set_owner(g, 0)
    assert [b.owner for b in core.blocks() if b.used] == [0]
    assert core.problems() == []
    before = core.words.tobytes()
    with pytest.raises(ValueError):
        core.alloc(1, 1, TAG_OWNER_MAX + 1)
    with pytest.raises(ValueError):
        core.set_owner(g, -1)
    assert core.words.tobytes() == before


class TlsfMachine(RuleBasedStateMachine):
    """alloc(n, align) / free against a dict of live blocks."""

    blocks = Bundle("blocks")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, tuple[int, int]] = {}  # start -> (size, owner)

    @initialize(n=st.sampled_from([1, 2, 17, 64, 100, 256, 300]),
                granule=st.sampled_from([16, 32]))
    def setup(self, n: int, granule: int) -> None:
        self.n = n
        self.core, self.words = make_core(n, granule)

    def sizes(self) -> dict[int, int]:
        return {g: size for g, (size, _) in self.model.items()}

    @rule(target=blocks, n=st.integers(1, 80) | st.integers(1, 4),
          align_log=st.integers(0, 9) | st.just(0), owner=st.integers(0, TAG_OWNER_MAX))
    def alloc(self, n: int, align_log: int, owner: int) -> Any:
        align = min(1 << align_log, 1 << (self.n.bit_length() - 1))  # up to the heap size
        runs = free_runs(self.sizes(), self.n)
        before = self.words.tobytes()
        g = self.core.alloc(n, align, owner)
        if g < 0:
            assert self.words.tobytes() == before, "a refused alloc changed the state"
            assert not fits_aligned(runs, n, align), "refused although a free run fits"
            return multiple()
        assert g % align == 0 and g >= 0 and g + n <= self.n
        for start, (size, _) in self.model.items():
            assert g + n <= start or start + size <= g, "overlapping blocks"
        self.model[g] = (n, owner)
        return g

    @rule(g=consumes(blocks))
    def free(self, g: int) -> None:
        size, _ = self.model.pop(g)
        assert self.core.free(g) == size

    @rule(g=blocks, owner=st.integers(0, TAG_OWNER_MAX))
    def set_owner(self, g: int, owner: int) -> None:
        self.core.set_owner(g, owner)
        self.model[g] = (self.model[g][0], owner)

    @rule()
    def too_large_is_refused(self) -> None:
        before = self.words.tobytes()
        assert self.core.alloc(self.n + 1, 1, 1) == -1
        assert self.words.tobytes() == before

    @invariant()
    def consistent(self) -> None:
        core = self.core
        assert core.problems() == []
        used = {b.start: (b.size, b.owner) for b in core.blocks() if b.used}
        assert used == self.model
        free = [(b.start, b.size) for b in core.blocks() if not b.used]
        runs = free_runs(self.sizes(), self.n)
        assert free == runs  # fully coalesced
        assert self.words[W_USED] == sum(size for size, _ in self.model.values())
        assert core.largest_free() == max((size for _, size in runs), default=0)
        assert [g for g in range(self.n) if core.used_size(g)] == sorted(self.model)

    def teardown(self) -> None:
        if not hasattr(self, "core"):
            return
        for g in list(self.model):
            self.core.free(g)
        assert list(self.core.blocks()) == [BlockInfo(0, self.n, False, 0)]
        assert self.core.largest_free() == self.n and self.core.problems() == []


TestTlsfMachine = TlsfMachine.TestCase
TestTlsfMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# Crash recovery: an operation killed at each of its stores, then the index rebuilt


@settings(max_examples=40, deadline=None)
@given(script=ops, n=st.integers(1, 12), align_log=st.integers(0, 4), pick=st.integers(0, 99))
def test_killed_inside_alloc_or_free_then_rebuilt(script: list[tuple[bool, int, int]], n: int,
                                                  align_log: int, pick: int) -> None:
    core, words, live = build(96, script)
    before = used_partition(core)
    snapshot = words.tobytes()
    if live and pick % 2:
        g = live[pick % len(live)]
        after = dict(before)
        del after[g]
        outcomes = [before, after]

        def op(c: Tlsf) -> None:
            c.free(g)
    else:
        new = core.alloc(n, 1 << align_log, 3)
        if new < 0:
            return
        after = used_partition(core)
        words[:] = memoryview(snapshot).cast("Q")
        outcomes = [before, after]

        def op(c: Tlsf) -> None:
            c.alloc(n, 1 << align_log, 3)

    total = count_stores(core, op)
    assert total > 0
    for k in range(total + 1):
        words[:] = memoryview(snapshot).cast("Q")
        words[W_OP] = 4242  # what the arena writes before an operation
        recoveries = words[W_RECOVERIES]
        finished = run_crashing(core, k, op)
        assert finished == (k == total)
        core.rebuild()
        assert core.problems() == [], f"killed at store {k} of {total}"
        assert words[W_OP] == 0 and words[W_RECOVERIES] == recoveries + 1
        assert used_partition(core) in outcomes, f"killed at store {k} of {total}"
        if finished:
            assert used_partition(core) == after
        # The repaired allocator works: fill it up and empty it.
        got = list(iter(lambda: core.alloc(1, 1, 9), -1))
        assert core.largest_free() == 0
        for one in got:
            core.free(one)
        assert core.problems() == []


@settings(max_examples=20, deadline=None)
@given(script=ops, data=st.data())
def test_rebuild_is_itself_safe_to_interrupt(script: list[tuple[bool, int, int]],
                                             data: st.DataObject) -> None:
    core, words, live = build(96, script)
    if not live:
        return
    g = live[0]
    expected = used_partition(core)
    # Leave a free half done, so that the rebuild has runs to merge and stale words to zero.
    assert not run_crashing(core, data.draw(st.integers(0, 3)), lambda c: c.free(g))
    words[W_OP] = 1
    total = count_stores(core, lambda c: c.rebuild())
    k = data.draw(st.integers(0, total))
    run_crashing(core, k, lambda c: c.rebuild())
    core.rebuild()
    assert core.problems() == [] and words[W_OP] == 0
    assert used_partition(core) in (expected, {s: n for s, n in expected.items() if s != g})


@pytest.mark.parametrize("merge", ["both", "next", "previous"])
def test_killed_while_merging_one_granule_neighbours(merge: str) -> None:
    # A one-granule free neighbour's start tag is also its end tag: the merged block's end tag
    # lands on it, and must not before the commit.
    core, words = make_core(16)
    blocks = [core.alloc(1, 1, 1) for _ in range(5)]
    if merge in ("both", "previous"):
        core.free(blocks[1])
    if merge in ("both", "next"):
        core.free(blocks[3])
    before = used_partition(core)
    after = {s: n for s, n in before.items() if s != blocks[2]}
    snapshot = words.tobytes()
    total = count_stores(core, lambda c: c.free(blocks[2]))
    for k in range(total + 1):
        words[:] = memoryview(snapshot).cast("Q")
        run_crashing(core, k, lambda c: c.free(blocks[2]))
        assert used_partition(core) in (before, after), f"killed at store {k}"
        core.rebuild()
        assert core.problems() == [] and used_partition(core) in (before, after)


def test_rebuild_killed_while_merging_one_granule_runs() -> None:
    core, words = make_core(16)
    blocks = [core.alloc(1, 1, 1) for _ in range(5)]
    t = core._tags
    for g in (1, 2, 3):  # three adjacent one-granule free blocks, as a dead process left them
        words[t + g] = 1
    words[W_OP] = 1
    assert [b.start for b in core.blocks()] == [0, 1, 2, 3, 4, 5]
    snapshot = words.tobytes()
    total = count_stores(core, lambda c: c.rebuild())
    for k in range(total + 1):
        words[:] = memoryview(snapshot).cast("Q")
        run_crashing(core, k, lambda c: c.rebuild())
        list(core.blocks())  # still a partition wherever it died
        core.rebuild()
        assert core.problems() == []
        assert {b.start: b.size for b in core.blocks()} == {0: 1, 1: 3, 4: 1, 5: 11}
    assert blocks[0] == 0 and used_partition(core) == {0: 1, 4: 1}


def test_rebuild_zeroes_stale_tags_and_problems_names_them() -> None:
    core, words = make_core(32)
    a = core.alloc(8, 1, 1)
    t = core._tags
    words[t + a + 3] = words[t + a]  # a forged start tag inside a used block
    assert any("stale" in p for p in core.problems())
    core.rebuild()
    assert core.problems() == [] and words[t + a + 3] == 0
    assert core.used_size(a) == 8


def test_problems_reports_a_damaged_index_and_rebuild_repairs_it() -> None:
    core, words = make_core(64)
    a = core.alloc(4, 1, 1)
    core.alloc(4, 1, 1)
    core.free(a)
    words[W_USED] += 1
    t = core._tags
    words[t + 63] = 0  # the free run's end tag
    from arena._layout import W_FL, W_SL

    words[W_SL] = 0
    words[W_FL] |= 1 << 5
    problems = core.problems()
    assert any("used count" in p for p in problems)
    assert any("end tag" in p for p in problems)
    assert any("bitmap" in p or "first-level" in p for p in problems)
    core.rebuild()
    assert core.problems() == []


def test_broken_start_tags_are_corrupt_not_repaired() -> None:
    core, words = make_core(64)
    core.alloc(4, 1, 1)
    words[core._tags + 4] = 0  # the start tag of the free rest: the partition has a hole
    assert core.problems() and "does not fit" in core.problems()[0]
    with pytest.raises(CorruptArena):
        core.rebuild()
    words[core._tags + 4] = 1000  # runs past the heap
    with pytest.raises(CorruptArena):
        list(core.blocks())
    words[core._tags + 4] = 60 | TAG_END  # an end tag where a start tag must be
    with pytest.raises(CorruptArena):
        list(core.blocks())
