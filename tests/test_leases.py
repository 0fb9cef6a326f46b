"""The lease protocol of ``percpu._lease_records`` against a model, without processes.

The functions under test are the ones ``Domain`` runs (choose_lowest, record_lease,
record_release, live_ids, ids_ever_used, oldest_mark); the OFD locks are replaced by a table that
behaves like them (a lock held by one open file description, dropped by the kernel on death).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from percpu._layout import (
    D_FRESH,
    D_OVERFLOW_HOLDERS,
    D_RECLAIMED,
    D_REUSED,
    L_LEASES,
    L_PID,
    lease_base,
    root_words,
)
from percpu._lease_records import (
    LeasePath,
    choose_lowest,
    classify,
    ids_ever_used,
    live_ids,
    oldest_mark,
    record_lease,
    record_release,
)


class FakeLocks:
    """Exclusive byte locks owned by holders (pids), like OFD locks: taking a lock one already
    holds succeeds, a taken lock is refused without waiting, death drops them all."""

    def __init__(self) -> None:
        self.owner: dict[int, int] = {}

    def try_lock(self, k: int, pid: int) -> bool:
        return self.owner.setdefault(k, pid) == pid

    def unlock(self, k: int, pid: int) -> None:
        assert self.owner.pop(k) == pid

    def drop_all(self, pid: int) -> None:
        for k in [k for k, p in self.owner.items() if p == pid]:
            del self.owner[k]


# --- the small pure functions ------------------------------------------------------------


def test_choose_lowest_takes_the_first_lock_it_gets() -> None:
    tried: list[int] = []

    def try_lock(k: int) -> bool:
        tried.append(k)
        return k in (2, 3)

    assert choose_lowest(5, try_lock) == 2
    assert tried == [0, 1, 2]  # stops at the first success: never holds two ids


def test_choose_lowest_none_when_all_taken() -> None:
    assert choose_lowest(3, lambda k: False) is None
    assert choose_lowest(1, lambda k: True) == 0


@pytest.mark.parametrize(("times", "pid", "path"), [
    (0, 0, LeasePath.FRESH),
    (0, 1234, LeasePath.FRESH),  # a holder died before writing its first lease: still fresh
    (3, 0, LeasePath.REUSED),
    (3, 1234, LeasePath.RECLAIMED),
])
def test_classify(times: int, pid: int, path: LeasePath) -> None:
    assert classify(times, pid) is path


def test_record_lease_rejects_an_id_out_of_range_and_changes_nothing() -> None:
    root = [0] * root_words(2)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        record_lease(root, 2, 2, 99)
    assert root == [0] * root_words(2)


def test_ids_ever_used_counts_ids_not_leases() -> None:
    root = [0] * root_words(4)
    assert ids_ever_used(root) == 0
    record_lease(root, 4, 0, 10)
    assert ids_ever_used(root) == 1
    record_lease(root, 4, 2, 11)
    assert ids_ever_used(root) == 3  # the highest id + 1
    record_lease(root, 4, 1, 12)
    record_lease(root, 4, None, 13)  # overflow: no id of its own
    assert ids_ever_used(root) == 3


@pytest.mark.parametrize("marks", [[], [0], [5], [3, 9], [0, 0, 7], [15]])
@pytest.mark.parametrize("limit", [0, 1, 4, 10, 16])
def test_oldest_mark(marks: list[int], limit: int) -> None:
    calls: list[int] = []

    def any_below(n: int) -> bool:
        assert n >= 1  # a lock query over 0 bytes would mean "to the end of the file"
        calls.append(n)
        return any(m < n for m in marks)

    assert oldest_mark(limit, any_below) == min([limit, *marks])
    assert len(calls) <= max(limit, 1).bit_length() + 1


# --- the state machine ---------------------------------------------------------------------


class LeaseMachine(RuleBasedStateMachine):
    """Holders acquire (atomically, or probing one id per step to interleave with others),
    release, die holding an id, or die between taking a lock and recording the lease.

    The model: the ids held; for each id whether it was ever leased and how its last holder
    left; the path counters; the peak number of contenders (holders with an id plus holders
    still probing). Overflow holders share id ``max_vcpus`` and acknowledge epochs by marks.
    """

    holders = Bundle("holders")

    @initialize(max_vcpus=st.integers(1, 4))
    def setup(self, max_vcpus: int) -> None:
        self.max = max_vcpus
        self.root = [0] * root_words(max_vcpus)
        self.locks = FakeLocks()
        self.next_pid = 100
        self.held: dict[int, int] = {}  # pid -> id, real and model agree (checked)
        self.overflow: dict[int, int] = {}  # pid -> epoch it acknowledged
        self.probing: dict[int, int] = {}  # pid -> next id it will try
        self.last_exit: dict[int, str] = {}  # id -> "released" | "died", of its last holder
        self.counts = {path: 0 for path in LeasePath}
        self.peak = 0
        self.epoch = 0

    # -- helpers --

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def expected_path(self, k: int) -> LeasePath:
        if k not in self.last_exit:
            return LeasePath.FRESH
        return LeasePath.RECLAIMED if self.last_exit[k] == "died" else LeasePath.REUSED

    def lowest_free(self) -> int | None:
        taken = set(self.held.values())
        return next((k for k in range(self.max) if k not in taken), None)

    def record(self, pid: int, vcpu: int | None) -> None:
        expected = LeasePath.OVERFLOW if vcpu is None else self.expected_path(vcpu)
        path = record_lease(self.root, self.max, vcpu, pid)
        assert path is expected
        self.counts[path] += 1
        if vcpu is None:
            self.overflow[pid] = self.epoch
        else:
            assert vcpu not in self.held.values(), "two live holders on one id"
            self.held[pid] = vcpu
            self.last_exit[vcpu] = "holding"
        self.note_peak()

    def note_peak(self) -> None:
        self.peak = max(self.peak, len(self.held) + len(self.probing))

    # -- rules --

    @rule(target=holders)
    def acquire(self) -> int:
        pid = self.new_pid()
        expected = self.lowest_free()
        self.probing[pid] = 0
        self.note_peak()
        vcpu = choose_lowest(self.max, lambda k: self.locks.try_lock(k, pid))
        del self.probing[pid]
        assert vcpu == expected  # lowest free first; None only when every id is held
        self.record(pid, vcpu)
        return pid

    @rule()
    def start_probing(self) -> None:
        pid = self.new_pid()
        self.probing[pid] = 0
        self.note_peak()

    @precondition(lambda self: self.probing)
    @rule(target=holders, data=st.data())
    def probe_one_id(self, data: st.DataObject) -> object:
        pid = data.draw(st.sampled_from(sorted(self.probing)))
        k = self.probing[pid]
        if k < self.max and not self.locks.try_lock(k, pid):
            self.probing[pid] = k + 1  # held by someone else at this moment: try the next
            return multiple()
        del self.probing[pid]
        self.record(pid, k if k < self.max else None)
        return pid

    @rule(pid=consumes(holders))
    def release(self, pid: int) -> None:
        if pid in self.held:
            k = self.held.pop(pid)
            record_release(self.root, self.max, k)  # pid 0 first, then the lock goes
            self.locks.unlock(k, pid)
            self.last_exit[k] = "released"
            assert self.root[lease_base(self.max, k) + L_PID] == 0
        else:
            del self.overflow[pid]

    @rule(pid=consumes(holders))
    def die(self, pid: int) -> None:
        self.locks.drop_all(pid)  # the kernel drops its locks; its record stays as it was
        if pid in self.held:
            k = self.held.pop(pid)
            self.last_exit[k] = "died"
            assert self.root[lease_base(self.max, k) + L_PID] == pid
        else:
            del self.overflow[pid]

    @rule()
    def die_between_lock_and_record(self) -> None:
        pid = self.new_pid()
        before = list(self.root)
        choose_lowest(self.max, lambda k: self.locks.try_lock(k, pid))
        self.locks.drop_all(pid)
        assert self.root == before  # nothing counted: the next holder sees the old record

    @rule()
    def advance_epoch(self) -> None:
        self.epoch += 1

    @precondition(lambda self: self.overflow)
    @rule(data=st.data())
    def overflow_holder_acknowledges(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.overflow)))
        self.overflow[pid] = self.epoch

    # -- invariants --

    @invariant()
    def one_live_holder_per_id_and_bound_respected(self) -> None:
        ids = list(self.held.values())
        assert len(ids) == len(set(ids))
        assert all(0 <= k < self.max for k in ids)
        assert {k: p for p, k in self.held.items()} == {
            k: p for k, p in self.locks.owner.items() if p in self.held}

    @invariant()
    def live_ids_match(self) -> None:
        held_by = self.locks.owner
        assert live_ids(self.root, self.max, lambda k: k in held_by) == sorted(
            self.held.values())

    @invariant()
    def path_counters_match(self) -> None:
        r = self.root
        assert r[D_FRESH] == self.counts[LeasePath.FRESH]
        assert r[D_REUSED] == self.counts[LeasePath.REUSED]
        assert r[D_RECLAIMED] == self.counts[LeasePath.RECLAIMED]
        assert r[D_OVERFLOW_HOLDERS] == self.counts[LeasePath.OVERFLOW]
        leases = sum(r[lease_base(self.max, k) + L_LEASES] for k in range(self.max))
        assert leases == r[D_FRESH] + r[D_REUSED] + r[D_RECLAIMED]

    @invariant()
    def ids_ever_used_follows_peak_concurrency(self) -> None:
        ever = list(self.last_exit)
        assert ids_ever_used(self.root) == len(ever) == self.root[D_FRESH]
        if ever:  # lowest first: the ids used are 0..n-1
            assert sorted(ever) == list(range(len(ever)))
        assert len(ever) <= self.peak

    @invariant()
    def oldest_overflow_ack_is_found(self) -> None:
        acks = list(self.overflow.values())
        for limit in (0, self.epoch, self.epoch + 1):
            assert oldest_mark(limit, lambda n: any(a < n for a in acks)) == min(
                [limit, *acks])


LeaseMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_lease_machine = LeaseMachine.TestCase
