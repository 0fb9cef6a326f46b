"""The registry as pure logic (``percpu._registry``), against a dict.

Words live in a ``_model.FakeHeap``; the table starts at its smallest and grows (moving to a
new block and freeing the old) as the state machine inserts.
"""

from __future__ import annotations

from _model import FakeHeap
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from percpu._layout import D_REG_GEN, D_REG_TABLE, HEADER_WORDS, REG_MIN_CAP, unpack_table
from percpu._registry import Registry, key_hash

KEYS = st.binary(min_size=1, max_size=24)


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.heap = FakeHeap(size=1 << 20)
        root = self.heap.view[: HEADER_WORDS * 8].cast("Q")
        self.root = root
        self.reg = Registry(root, self.heap.view, self.heap.alloc, self.heap.free)
        self.reg.create()
        self.model: dict[bytes, tuple[int, int]] = {}  # key -> (kind, ref)
        self.next_ref = 1

    @rule(key=KEYS, kind=st.integers(1, 3))
    def insert(self, key: bytes, kind: int) -> None:
        if key in self.model:
            return
        gen = self.root[D_REG_GEN]
        self.reg.insert(key, kind, 1, self.next_ref)
        self.model[key] = (kind, self.next_ref)
        self.next_ref += 1
        assert self.root[D_REG_GEN] > gen

    @rule(data=st.data())
    def tombstone(self, data: st.DataObject) -> None:
        if not self.model:
            return
        key = data.draw(st.sampled_from(sorted(self.model)))
        idx, _ = self.reg.lookup(key)
        assert self.reg.tombstone(idx) == self.model.pop(key)[1]

    @rule(data=st.data())
    def repoint(self, data: st.DataObject) -> None:
        if not self.model:
            return
        key = data.draw(st.sampled_from(sorted(self.model)))
        kind, ref = self.model[key]
        self.reg.repoint({ref: ref + 10_000})
        self.model[key] = (kind, ref + 10_000)

    @invariant()
    def every_key_maps_as_in_the_model(self) -> None:
        for key, (kind, ref) in self.model.items():
            idx, _ = self.reg.lookup(key)
            assert idx >= 0 and self.reg.kind_ref(idx) == (kind, ref)
        _gen, entries = self.reg.entries_at()
        assert sorted((key, kind, ref) for kind, _cls, ref, key in entries) == sorted(
            (key, kind, ref) for key, (kind, ref) in self.model.items())
        assert self.reg.problem(len(self.heap.mem)) is None
        _off, cap = unpack_table(int(self.root[D_REG_TABLE]))
        assert cap >= REG_MIN_CAP and len(self.model) * 2 <= cap

    @invariant()
    def only_the_current_table_and_the_keys_are_allocated(self) -> None:
        assert len(self.heap.live) == 1 + len(self.model)


TestRegistry = RegistryMachine.TestCase
TestRegistry.settings = settings(max_examples=40, stateful_step_count=60, deadline=None)


def test_a_missing_key_and_the_hash_words() -> None:
    heap = FakeHeap()
    reg = Registry(heap.view[: HEADER_WORDS * 8].cast("Q"), heap.view, heap.alloc, heap.free)
    reg.create()
    assert reg.lookup(b"absent")[0] == -1
    assert all(key_hash(bytes([i])) > 1 for i in range(256))  # 0 and 1 are reserved
