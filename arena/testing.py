"""Hypothesis state machines for stress-testing code built on an :class:`arena.Arena`.

:class:`ArenaMachine` is a ``RuleBasedStateMachine`` that owns a small private arena and a
model of what should be allocated in it. Its own rules allocate and free blocks of random sizes
and alignments; its invariant checks, after every step, that the arena's index is consistent
(``Arena.check_invariants``), that its used bytes equal what the model says, and that every
block still holds the bytes written into it (so two blocks that overlap, or a write past a
block's end, is caught at the step that caused it).

Subclass it to stress *your* code on top of the arena: build your structure in :meth:`setup`,
add ``@rule`` methods that drive it, tell the model about the blocks your code allocates and
frees with :meth:`track` / :meth:`untrack` (or set ``EXACT_ACCOUNTING = False`` if it allocates
on its own), and add ``@invariant`` methods comparing your structure with your own model. The
built-in rules keep running beside yours (random allocations and frees put pressure on the
arena your code shares); set ``BUILTIN_RULES = False`` to run only yours. Override
:meth:`sizes` and :meth:`alignments` to change what the built-in rules ask for.

Example (it runs in the test suite: ``tests/test_testing.py``)::

    from hypothesis import strategies as st
    from hypothesis.stateful import invariant, precondition, rule

    from arena import ArenaExhausted, Block
    from arena.testing import ArenaMachine

    class MessageStoreMachine(ArenaMachine):
        ARENA_SIZE = 16 * 1024

        def setup(self) -> None:
            self.store = MessageStore(self.arena)  # your code: a FIFO of messages in blocks
            self.expected: list[tuple[Block, bytes]] = []

        @rule(message=st.binary(min_size=1, max_size=500))
        def put(self, message: bytes) -> None:
            try:
                block = self.store.put(message)
            except ArenaExhausted:
                return
            self.track(block, fill=False)  # the model checks overlap and accounting
            self.expected.append((block, message))

        @precondition(lambda self: self.expected)
        @rule()
        def pop(self) -> None:
            block, message = self.expected.pop(0)
            self.untrack(block)
            assert self.store.pop() == message

        @invariant()
        def same_messages(self) -> None:
            assert self.store.messages() == [m for _, m in self.expected]

    TestMessageStore = MessageStoreMachine.TestCase  # pytest and unittest collect this

Requires hypothesis (the ``test`` extra: ``pip install 'percpu-arena[test]'``).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        Bundle,
        MultipleResults,
        RuleBasedStateMachine,
        consumes,
        invariant,
        multiple,
        precondition,
        rule,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "arena.testing needs hypothesis, which is part of the `test` extra: "
        "pip install 'percpu-arena[test]' (or pip install hypothesis)"
    ) from exc

from dataclasses import dataclass

from ._arena import Arena, Block
from ._errors import ArenaExhausted, DoubleFree

__all__ = ["ArenaMachine", "TrackedBlock"]


@dataclass
class TrackedBlock:
    """A block the model knows about, and the byte it was filled with."""

    block: Block
    fill: int | None  #: 1..255: every byte of the block holds it (None: the caller's bytes)
    rounded: int  #: bytes the arena counts for it (its size rounded up to the block size)


class ArenaMachine(RuleBasedStateMachine):
    """A private arena, a model of its live blocks, rules that allocate and free, and an
    invariant that the arena agrees with the model. See the module docstring."""

    ARENA_SIZE = 64 * 1024  # bytes of heap: small, so that exhaustion and reuse happen
    BLOCK_SIZE = 64  # bytes per granule
    ALIGNMENTS: tuple[int | None, ...] = (None, None, None, 16, 64, 256, 4096)
    BUILTIN_RULES = True  # False: only the subclass's rules run
    EXACT_ACCOUNTING = True  # False: the code under test allocates blocks it does not track

    arena_blocks: Bundle[Block] = Bundle("arena_blocks")

    def __init__(self) -> None:
        super().__init__()
        self.arena = self.make_arena()
        # Invariant: the tracked blocks are live, pairwise disjoint, and each is full of
        # its fill byte; their rounded sizes sum to the arena's used bytes (EXACT_ACCOUNTING).
        self.tracked: dict[int, TrackedBlock] = {}  # offset -> the tracked block there
        self.failed_allocations = 0  # built-in allocations the arena refused
        self._next_fill = 0
        self.setup()

    # -- hooks ---------------------------------------------------------------------------

    def make_arena(self) -> Arena:
        """The arena under test (default: private, ARENA_SIZE bytes, not locked)."""
        return Arena(self.ARENA_SIZE, block_size=self.BLOCK_SIZE, lock=False, prefault=False)

    def setup(self) -> None:
        """Called once the arena exists: build the structure under test here."""

    def sizes(self) -> st.SearchStrategy[int]:
        """Sizes the built-in ``alloc`` asks for (default: 1 byte to an eighth of the arena,
        small sizes more often)."""
        top = max(1, self.ARENA_SIZE // 8)
        return st.one_of(st.integers(1, min(256, top)), st.integers(1, top))

    def alignments(self) -> st.SearchStrategy[int | None]:
        """Alignments the built-in ``alloc`` asks for (None: the block size)."""
        return st.sampled_from([a for a in self.ALIGNMENTS if a is None or a <= self.ARENA_SIZE])

    def teardown(self) -> None:
        """Close the arena. An override must call ``super().teardown()``."""
        self.arena.close()
        super().teardown()

    # -- the model, for the subclass's rules too -------------------------------------------

    def rounded(self, size: int) -> int:
        """Bytes the arena counts for a block of ``size`` bytes."""
        g = self.arena.block_size
        return (size + g - 1) // g * g

    def track(self, block: Block, *, fill: bool = True) -> None:
        """Tell the model about a block just allocated: checks that it is aligned to the
        block size and overlaps no tracked block. With ``fill`` (for blocks whose bytes the
        model owns) it then fills the block with a byte of its own, checked after every step;
        pass ``fill=False`` for a block whose bytes the code under test owns."""
        assert block.offset % self.arena.block_size == 0, block
        assert block.offset >= 0 and block.offset + block.size <= self.arena.size, block
        end = block.offset + self.rounded(block.size)
        for other in self.tracked.values():
            o = other.block
            assert end <= o.offset or o.offset + other.rounded <= block.offset, (
                f"{block!r} overlaps {o!r}")
        value = None
        if fill:
            value = self._next_fill = self._next_fill % 255 + 1
            block.view[:] = bytes((value,)) * block.size
        self.tracked[block.offset] = TrackedBlock(block, value, self.rounded(block.size))

    def untrack(self, block: Block) -> None:
        """Tell the model a block is about to be freed: checks its bytes are intact."""
        entry = self.tracked.pop(block.offset)
        assert entry.block is block, f"{block!r} is not the tracked block at its offset"
        self._assert_intact(entry)

    def _assert_intact(self, entry: TrackedBlock) -> None:
        if entry.fill is None:
            return
        data = bytes(entry.block.view)
        if data != bytes((entry.fill,)) * entry.block.size:
            bad = next(i for i, b in enumerate(data) if b != entry.fill)
            raise AssertionError(f"{entry.block!r}: byte {bad} is {data[bad]}, want "
                                 f"{entry.fill} (overwritten by another block?)")

    # -- built-in rules --------------------------------------------------------------------

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(target=arena_blocks, data=st.data())
    def alloc(self, data: st.DataObject) -> Block | MultipleResults[Block]:
        """Allocate a block of a random size and alignment (or fail, changing nothing)."""
        size = data.draw(self.sizes(), label="size")
        align = data.draw(self.alignments(), label="align")
        try:
            block = self.arena.alloc(size, align=align)
        except ArenaExhausted:
            self.failed_allocations += 1
            return multiple()
        assert block.size == size
        assert block.offset % (align or self.arena.block_size) == 0, (block, align)
        self.track(block)
        return block

    @precondition(lambda self: self.BUILTIN_RULES)
    @rule(block=consumes(arena_blocks))
    def free(self, block: Block) -> None:
        """Free a block; freeing it again is refused and changes nothing."""
        self.untrack(block)
        self.arena.free(block)
        assert block.freed
        try:
            self.arena.free(block)
        except DoubleFree:
            pass
        else:
            raise AssertionError(f"a second free of {block!r} was accepted")

    # -- invariant ---------------------------------------------------------------------------

    @invariant()
    def arena_agrees_with_model(self) -> None:
        """The index is consistent, the used bytes are the model's, every block is intact."""
        self.arena.check_invariants()
        stats = self.arena.stats()
        tracked = sum(t.rounded for t in self.tracked.values())
        assert stats.used_bytes + stats.free_bytes == stats.size
        assert 0 <= stats.largest_free <= stats.free_bytes
        if self.EXACT_ACCOUNTING:
            assert stats.used_bytes == tracked, (stats.used_bytes, tracked)
        else:
            assert stats.used_bytes >= tracked, (stats.used_bytes, tracked)
        for entry in self.tracked.values():
            self._assert_intact(entry)
