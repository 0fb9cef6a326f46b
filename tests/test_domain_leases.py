"""vcpu-id leases with real processes: OFD locks, fork, SIGKILL, overflow, threads.

Each test makes its domain file under /dev/shm (or tmp_path) and removes it; every forked child
ends with ``os._exit`` and is reaped. Children talk to the parent over pipes, one line a message;
a read gives up after ``HANG_GUARD`` seconds so that a bug shows as a failure, never as a hang
(no assertion depends on timing).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from _children import run_in_child
from _writer import writer

import percpu
from arena._arena import ARENA_LOCK_BYTE
from arena._locks import is_locked
from percpu import Domain, InvalidArgument, InvalidType, MetricRemoved
from percpu._cpuset import read_cpu_bounds
from percpu._lease_records import LeasePath

HANG_GUARD = 60.0  # seconds a parent waits for a child's message before failing
SIZE = 1 << 22  # bytes: small domains, quick to prefault
REPO = Path(__file__).resolve().parent.parent


class Pipe:
    """One end of a pair of pipes: lines of text each way."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self._r: IO[str] = os.fdopen(rfd, "r")
        self._w: IO[str] = os.fdopen(wfd, "w", buffering=1)

    def send(self, *words: object) -> None:
        self._w.write(" ".join(map(str, words)) + "\n")

    def recv(self) -> list[str]:
        ready, _, _ = select.select([self._r], [], [], HANG_GUARD)
        if not ready:
            raise TimeoutError(f"no message in {HANG_GUARD} s")
        line = self._r.readline()
        if not line:
            raise EOFError("the other side exited")
        return line.split()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Child:
    """A forked child running ``fn(pipe)``; exit status 0 when it returned, 1 when it raised."""

    def __init__(self, fn: Callable[[Pipe], object]) -> None:
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(up_r)
                os.close(down_w)
                fn(Pipe(down_r, up_w))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(up_w)
        os.close(down_r)
        self.pid = pid
        self.pipe = Pipe(up_r, down_w)
        self._status: int | None = None

    def send(self, *words: object) -> None:
        self.pipe.send(*words)

    def recv(self) -> list[str]:
        return self.pipe.recv()

    def join(self) -> int:
        """Reap the child; its exit code (negative: killed by that signal)."""
        if self._status is None:
            _, status = os.waitpid(self.pid, 0)
            self._status = os.waitstatus_to_exitcode(status)
            self.pipe.close()
        return self._status

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def stop_outside(self, d: Domain) -> None:
        """SIGSTOP the child, and return once it is stopped (a signal is delivered
        asynchronously) and not holding the domain lock (its quiescer could be inside)."""
        for _ in range(1000):
            os.kill(self.pid, signal.SIGSTOP)
            _, status = os.waitpid(self.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status)
            fd = d.arena.fd
            assert fd is not None
            if not is_locked(fd, ARENA_LOCK_BYTE):
                return
            os.kill(self.pid, signal.SIGCONT)
            time.sleep(0.001)
        raise AssertionError("the child always held the domain lock when stopped")


@pytest.fixture
def shm_path() -> Iterator[Path]:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path("/tmp")
    path = base / f"percpu-leases-{os.getpid()}-{threading.get_ident()}"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def domains(shm_path: Path) -> Iterator[Callable[..., Domain]]:
    """``make(max_vcpus=...)``: a shared domain on ``shm_path``, closed after the test."""
    made: list[Domain] = []

    def make(max_vcpus: int = 8, **kw: object) -> Domain:
        d = Domain.create(shm_path, SIZE, max_vcpus=max_vcpus, lock=False, **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def reap_all(children: list[Child]) -> None:
    codes = [c.join() for c in children]
    assert codes == [0] * len(children)


# --- ids, lowest first -----------------------------------------------------------------------


def test_three_in_a_row_all_get_id_0(domains: Callable[..., Domain]) -> None:
    d = domains()

    def worker(pipe: Pipe, clean: bool) -> None:
        pipe.send(d.vcpu_id(), d.last_lease_path.value if d.last_lease_path else "-")
        if clean:
            d.release()

    got = []
    for clean in (True, True, False):
        c = Child(lambda p, clean=clean: worker(p, clean))  # type: ignore[misc]
        got.append(c.recv())
        assert c.join() == 0
    assert got == [["0", "fresh"], ["0", "reused"], ["0", "reused"]]
    s = d.stats()
    assert (s.fresh_ids, s.reused_ids, s.reclaimed_ids) == (1, 2, 0)
    assert s.highest_id_used == 0 and s.holders_now == 0
    # The third child died holding id 0 (os._exit, no release): the next holder reclaims it.
    assert d.vcpu_id() == 0
    assert d.last_lease_path is LeasePath.RECLAIMED
    assert d.stats().reclaimed_ids == 1


def test_two_at_once_get_0_and_1(domains: Callable[..., Domain]) -> None:
    d = domains()

    def worker(pipe: Pipe) -> None:
        pipe.send(d.vcpu_id())
        pipe.recv()  # hold the id until the parent has looked

    a = Child(worker)
    id_a = int(a.recv()[0])
    b = Child(worker)
    id_b = int(b.recv()[0])
    try:
        assert (id_a, id_b) == (0, 1)
        s = d.stats()
        assert s.ids_in_use == (0, 1) and s.holders_now == 2
        assert s.holder_pids == {0: a.pid, 1: b.pid}
        assert s.vcpu_id is None  # the parent took no lease
        assert d.online_vcpus() == frozenset({0, 1})
    finally:
        a.send("go")
        b.send("go")
        reap_all([a, b])
    assert d.online_vcpus() == frozenset()
    assert d.stats().highest_id_used == 1


def test_sigkilled_holder_id_is_free_again_and_keeps_its_counts(
        domains: Callable[..., Domain]) -> None:
    d = domains()

    def worker(pipe: Pipe) -> None:
        c = d.counter("jobs")
        c.add(5)
        pipe.send(d.vcpu_id(), writer(c)._index)
        pipe.recv()  # killed while waiting here

    child = Child(worker)
    vcpu, index = map(int, child.recv())
    assert vcpu == 0 and d.online_vcpus() == {0}
    child.kill()
    assert child.join() == -signal.SIGKILL
    assert d.online_vcpus() == frozenset()  # the kernel dropped its lock
    assert d.stats().holder_pids == {}

    jobs = d.counter("jobs")  # takes the dead child's id 0 and continues on top of its slot
    assert d.vcpu_id() == 0 and d.last_lease_path is LeasePath.RECLAIMED
    assert jobs.value == 5
    jobs.inc()
    w = writer(jobs)
    assert w._index == index and w._cells[w._index] == 6 and jobs.value == 6
    s = d.stats()
    assert s.reclaimed_ids == 1 and s.fresh_ids == 1


def test_reuse_without_loss_across_many_holders(domains: Callable[..., Domain]) -> None:
    """Each holder of id 0 adds to what the previous holders of id 0 left in its slot."""
    d = domains()

    def worker(clean: bool) -> None:
        d.counter("n").add(10)
        if clean:
            d.close()

    for i in range(6):
        run_in_child(lambda clean=i % 2 == 0: worker(clean))  # type: ignore[misc]
    s = d.stats()
    assert s.highest_id_used == 0
    assert (s.fresh_ids, s.reused_ids, s.reclaimed_ids) == (1, 3, 2)  # clean, dirty, ...
    assert d.counter("n").value == 60


def test_1000_short_lived_workers_stay_on_low_ids(domains: Callable[..., Domain]) -> None:
    wave, workers = 8, 1000
    d = domains(max_vcpus=32)

    def worker(i: int) -> None:
        d.counter("requests").inc()
        if i % 2:
            d.release()  # half leave cleanly, half just exit

    started = 0
    while started < workers:
        pids = []
        for _ in range(min(wave, workers - started)):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    worker(started)
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
            started += 1
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    s = d.stats()  # stats() takes no lease: the parent is not a holder
    assert 0 <= s.highest_id_used < wave  # not 999: at most the workers alive at once
    assert s.ids_ever_used == s.highest_id_used + 1 == s.fresh_ids
    assert s.fresh_ids + s.reused_ids + s.reclaimed_ids == workers
    assert s.overflow_holders == 0 and s.holders_now == 0
    assert s.pages <= wave  # one page of the counter's pageset per id used
    assert d.counter("requests").value == workers


# --- more holders than ids ---------------------------------------------------------------


def test_more_holders_than_ids_share_the_overflow_id(domains: Callable[..., Domain]) -> None:
    d = domains(max_vcpus=2)
    n_children, incs = 5, 300

    def worker(pipe: Pipe) -> None:
        c = d.counter("hits")
        g = d.gauge("level")
        s = d.summary("latency")
        pipe.send(d.vcpu_id())
        pipe.recv()  # start together
        for _ in range(incs):
            c.inc()
            g.add(2)
            g.dec()
            s.observe(0.5)
        pipe.send("done")
        pipe.recv()

    children = []
    for _ in range(n_children):
        children.append(Child(worker))
        children[-1].recv()  # one at a time, so the ids are known
    try:
        for c in children:
            c.send("go")
        for c in children:
            assert c.recv() == ["done"]
        s = d.stats()
        assert s.ids_in_use == (0, 1)
        assert s.overflow_holders == 3
        assert s.shared_id_operations == 3 * incs * 4  # every operation of the 3, counted
    finally:
        for c in children:
            c.send("exit")
        reap_all(children)
    assert d.counter("hits").value == n_children * incs  # nothing lost under contention
    assert d.gauge("level").value == n_children * incs
    assert d.summary("latency").value == (n_children * incs, n_children * incs * 0.5)
    assert d.stats().highest_id_used == 1  # the overflow id is not an id in use


def test_threads_of_an_overflow_holder_lose_nothing(domains: Callable[..., Domain]) -> None:
    d = domains(max_vcpus=1)

    def holder(pipe: Pipe) -> None:
        d.vcpu_id()
        pipe.send("ready")
        pipe.recv()

    child = Child(holder)
    child.recv()
    try:
        c = d.counter("c")
        assert d.vcpu_id() == 1 == d.max_vcpus  # the parent shares the overflow id
        assert d.last_lease_path is LeasePath.OVERFLOW
        n_threads, incs = 4, 2000

        def hammer() -> None:
            for _ in range(incs):
                c.inc()

        threads = [threading.Thread(target=hammer) for _ in range(n_threads)]
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        assert c.value == n_threads * incs
        assert d.stats().shared_id_operations == n_threads * incs
    finally:
        child.send("exit")
        reap_all([child])


def test_overflow_holders_take_part_in_grace_periods(domains: Callable[..., Domain]) -> None:
    """A removed metric's slot is reused only after every overflow holder acknowledged, and an
    overflow holder never writes the slot afterwards (it gets MetricRemoved)."""
    d = domains(max_vcpus=1)
    assert d.vcpu_id() == 0
    d.counter("old")

    def overflow_holder(pipe: Pipe) -> None:
        old = d.counter("old")
        old.inc()
        pipe.send(d.vcpu_id(), writer(old)._index)
        pipe.recv()  # the parent removes "old" meanwhile
        try:
            old.inc()
        except MetricRemoved:
            pipe.send("removed")
        else:
            pipe.send("wrote")
        pipe.recv()

    child = Child(overflow_holder)
    try:
        vcpu, index = map(int, child.recv())
        assert vcpu == d.max_vcpus
        assert d._q[index] == 1
        child.stop_outside(d)  # it cannot acknowledge anything now
        assert d.remove("old")
        assert d.stats().pending_frees == 1
        assert not d.synchronize(timeout=0.3)  # blocked by the stopped overflow holder
        assert d.stats().pending_frees == 1
        child.kill(signal.SIGCONT)
        assert d.synchronize(timeout=HANG_GUARD)
        assert d._q[index] == 0  # zeroed on reclaim
        child.send("inc")
        assert child.recv() == ["removed"]
        assert d._q[index] == 0  # the stale handle wrote nothing
    finally:
        child.kill(signal.SIGCONT)
        child.send("exit")
        reap_all([child])


# --- threads of one process --------------------------------------------------------------


def test_threads_of_a_gil_process_share_one_lease(domains: Callable[..., Domain]) -> None:
    d = domains()
    seen: list[int] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        seen.append(d.vcpu_id())

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [0] * 8
    s = d.stats()
    assert s.holders_now == 1 and s.fresh_ids == 1 and s.ids_in_use == (0,)


@pytest.mark.parametrize("shared", [False, True])
def test_straight_line_update_is_not_torn_by_thread_switches(
        domains: Callable[..., Domain], shared: bool) -> None:
    """The hot path ``cells[i] += n`` has no switch point inside it: with a thread switch
    requested every microsecond, many threads on one slot lose no update."""
    d = domains() if shared else Domain(SIZE, max_vcpus=4, lock=False)
    try:
        c, g, s = d.counter("c"), d.gauge("g"), d.summary("s")
        n_threads, incs = 8, 4000
        barrier = threading.Barrier(n_threads)

        def hammer() -> None:
            barrier.wait()
            for _ in range(incs):
                c.inc()
                g.add(3)
                g.dec()
                s.observe(1)

        threads = [threading.Thread(target=hammer) for _ in range(n_threads)]
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        assert sys.getswitchinterval() == old
        total = n_threads * incs
        assert c.value == total
        assert g.value == 2 * total
        assert s.value == (total, float(total))
    finally:
        if not shared:
            d.close()


def test_release_while_threads_count(domains: Callable[..., Domain]) -> None:
    """release() under load: handles rebind on their next use, nothing is lost, no deadlock
    with the quiescer."""
    d = domains()
    c = d.counter("c")
    n_threads, incs = 4, 5000
    stop_releasing = threading.Event()

    def hammer() -> None:
        for _ in range(incs):
            c.inc()

    def releaser() -> None:
        while not stop_releasing.is_set():
            d.release()

    threads = [threading.Thread(target=hammer) for _ in range(n_threads)]
    r = threading.Thread(target=releaser)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop_releasing.set()
    r.join()
    assert c.value == n_threads * incs
    s = d.stats()
    # Alone in the domain: always id 0 again (per-thread mode: each thread an id of its own
    # while it counts, below n_threads).
    assert s.highest_id_used <= (n_threads - 1 if d._lease.threads is not None else 0)
    assert s.reclaimed_ids == 0  # every release was clean


# --- fork and exit -----------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["file", "memfd"])
def test_fork_child_takes_its_own_lease_parent_keeps_its_own(
        domains: Callable[..., Domain], backing: str) -> None:
    d = domains() if backing == "file" else Domain(SIZE, max_vcpus=8, lock=False, shared=True)
    try:
        c = d.counter("c")
        c.inc()
        assert d.vcpu_id() == 0

        def child(pipe: Pipe) -> None:
            assert d.stats().vcpu_id is None  # no lease inherited
            c.inc()  # the handle rebinds to the child's own id
            pipe.send(d.vcpu_id(), d.last_lease_path.value if d.last_lease_path else "-",
                      *d.stats().ids_in_use)
            d.close()  # a clean release

        ch = Child(child)
        msg = ch.recv()
        assert ch.join() == 0
        assert msg == ["1", "fresh", "0", "1"]
        assert d.vcpu_id() == 0 and d.stats().holder_pids == {0: os.getpid()}
        c.inc()
        assert c.value == 3
        assert d.stats().reused_ids == 0  # nobody took id 1 again yet
    finally:
        if backing == "memfd":
            d.close()


def test_private_domain_is_always_id_0(domains: Callable[..., Domain]) -> None:
    d = Domain(SIZE, max_vcpus=4, lock=False)
    try:
        assert d.stats().highest_id_used == -1 and d.stats().ids_ever_used == 0
        assert d.vcpu_id() == 0
        assert d.online_vcpus() == {0}
        assert run_in_child(d.vcpu_id) == 0  # in a forked child too
    finally:
        d.close()


def test_open_from_another_program_and_release_at_exit(
        domains: Callable[..., Domain], shm_path: Path) -> None:
    d = domains(max_vcpus=4)
    assert d.vcpu_id() == 0
    c = d.counter("c")
    c.inc()
    code = textwrap.dedent(f"""
        import os, sys
        from percpu import Domain
        d = Domain.open({str(shm_path)!r}, lock=False)
        d.counter("c").add(10)
        print(d.vcpu_id(), d.max_vcpus, d.last_lease_path.value)
        if sys.argv[1] == "kill":
            sys.stdout.flush()
            os._exit(0)
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean = subprocess.run([sys.executable, "-c", code, "exit"], capture_output=True, text=True,
                           env=env, check=True, timeout=HANG_GUARD)
    assert clean.stdout.split() == ["1", "4", "fresh"]  # the creator's bound, not a default
    died = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True,
                          env=env, check=True, timeout=HANG_GUARD)
    assert died.stdout.split() == ["1", "4", "reused"]  # the first one released at exit
    s = d.stats()
    assert (s.fresh_ids, s.reused_ids, s.reclaimed_ids) == (2, 1, 0)
    assert s.ids_in_use == (0,)
    assert c.value == 21


# --- the bound ---------------------------------------------------------------------------


def test_bound_getters(domains: Callable[..., Domain]) -> None:
    d = domains(max_vcpus=3)
    assert d.max_vcpus == 3
    assert d.possible_vcpus() == frozenset({0, 1, 2})
    assert d.online_vcpus() == frozenset()
    d.vcpu_id()
    assert d.online_vcpus() == frozenset({0}) == set(d.stats().ids_in_use)


def test_default_bound_follows_the_allowed_cpus() -> None:
    d = Domain(SIZE, lock=False)
    try:
        expected = read_cpu_bounds().default_max_vcpus
        assert d.max_vcpus == expected
        assert d.max_vcpus >= len(os.sched_getaffinity(0)) * 2 + 1 or d.max_vcpus == 4096
        assert d.possible_vcpus() == frozenset(range(expected))
    finally:
        d.close()


@pytest.mark.parametrize(("bad", "error"), [
    (0, InvalidArgument), (-1, InvalidArgument), (4097, InvalidArgument),
    (2.0, InvalidType), ("4", InvalidType), (True, InvalidType),
])
def test_bad_bound_is_refused_and_creates_nothing(shm_path: Path, bad: object,
                                                  error: type[Exception]) -> None:
    with pytest.raises(error, match="max_vcpus"):
        Domain.create(shm_path, SIZE, max_vcpus=bad, lock=False)  # type: ignore[arg-type]
    assert not shm_path.exists()


def test_stats_names_and_meanings(domains: Callable[..., Domain]) -> None:
    d = domains(max_vcpus=2)
    s = d.stats()
    assert s.highest_id_used == -1 and s.ids_ever_used == 0  # no lease yet
    assert s.vcpu_id is None and s.max_vcpus == 2
    assert isinstance(s, percpu.DomainStats)
    d.vcpu_id()
    s = d.stats()
    assert s.highest_id_used == 0 and s.ids_ever_used == 1  # an id, and a count of ids
    assert s.vcpu_id == 0 and s.holders_now == 1 and s.holder_pids == {0: os.getpid()}
