"""Per-cpu counters across real processes: SIGKILL at random points, page faults, churn,
removal seen across processes, a dead holder's cached slots.

Children are forked from the test process (the pre-fork server pattern: they inherit the
domain and take their own vcpu ids) and always leave through ``os._exit``; every child is
reaped, killed first if needed. Waits are bounded by a generous deadline that only guards
against a hang: no assertion depends on how long anything took.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import shm_dir

from percpu import Domain, MetricRemoved

HANG = 120.0  # seconds: a guard against a hung child, never an assertion about speed
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_counters_proc-")
    try:
        yield os.path.join(tmp, "domain")
    finally:
        shutil.rmtree(tmp)


class Child:
    """A forked child running ``fn(w)``; ``w`` is the write end of a pipe to the parent."""

    def __init__(self, fn: Callable[[int], object]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(r)
                fn(w)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.r = pid, r
        self.status: int | None = None
        self.killed = False

    def kill(self) -> None:
        if self.status is None and not self.killed:
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True

    def reap(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
            os.close(self.r)
        return self.status

    def read_all(self) -> bytes:
        """Everything the child writes, up to its end (EOF)."""
        chunks: list[bytes] = []
        deadline = time.monotonic() + HANG
        while True:
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "child hung"
            chunk = os.read(self.r, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def read_line(self) -> bytes:
        out = b""
        deadline = time.monotonic() + HANG
        while not out.endswith(b"\n"):
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "child hung"
            byte = os.read(self.r, 1)
            assert byte, f"child ended early: {out!r}"
            out += byte
        return out[:-1]


class Children:
    """Every child started in a test; all are killed if still running and reaped at the end."""

    def __init__(self) -> None:
        self.all: list[Child] = []

    def start(self, fn: Callable[[int], object]) -> Child:
        child = Child(fn)
        self.all.append(child)
        return child

    def close(self) -> None:
        for child in self.all:
            child.kill()
        for child in self.all:
            child.reap()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.close()


def wait_go(r: int) -> bytes:
    """In a child: block until the parent writes to ``r``."""
    data = os.read(r, 64)
    assert data, "parent went away"
    return data


# ------------------------------------------------------------------------------------------
# SIGKILL at random points


N_COUNTERS = 4
STEPS = 6000  # adds per worker that is not killed


def test_sigkill_at_random_points_loses_at_most_one_add_per_kill(
        path: str, children: Children) -> None:
    """Each worker acknowledges every completed add on its pipe. A kill can fall between an
    add and its acknowledgement, so the total lies in [acknowledged, acknowledged + kills].
    The parent reads snapshots all along: no Counter ever goes backwards."""
    rng = random.Random(4)
    d = Domain.create(path, 4 << 20, max_vcpus=3)  # 4 at once: one shares the overflow id
    workers, concurrency = 20, 4
    acked = [0] * N_COUNTERS
    kills = 0
    last: list[int | float] = [0] * N_COUNTERS

    def worker(w: int, seed: int) -> None:
        counters = [d.counter("work_total", {"c": str(i)}) for i in range(N_COUNTERS)]
        order = random.Random(seed)
        for _ in range(STEPS):
            i = order.randrange(N_COUNTERS)
            if i == 0:
                counters[i].inc()
            else:
                counters[i].add(1)
            os.write(w, bytes([i]))

    def read_snapshot() -> None:
        values = {m.labels: m.value for m in d.snapshot()}
        for i in range(N_COUNTERS):
            now = values.get((("c", str(i)),), 0)
            assert now >= last[i], f"counter {i} went back from {last[i]} to {now}"
            last[i] = now

    running: dict[int, tuple[Child, int | None, int]] = {}  # fd -> child, kill after, seen
    started = 0
    deadline = time.monotonic() + HANG
    while started < workers or running:
        while started < workers and len(running) < concurrency:
            seed = rng.randrange(1 << 30)
            child = children.start(lambda w, seed=seed: worker(w, seed))  # type: ignore[misc]
            kill_after = rng.choice([None, None, 0, rng.randrange(STEPS), rng.randrange(200)])
            if kill_after == 0:
                child.kill()  # at once: maybe mid-lease, mid-registration, mid-refill
            running[child.r] = (child, kill_after, 0)
            started += 1
        ready, _, _ = select.select(list(running), [], [], 1.0)
        assert time.monotonic() < deadline, "workers hung"
        for fd in ready:
            child, kill_after, seen = running[fd]
            data = os.read(fd, 4096)
            if not data:
                status = child.reap()
                if os.WIFSIGNALED(status):  # (a kill after its last add may find it gone)
                    assert child.killed and os.WTERMSIG(status) == signal.SIGKILL
                    kills += 1
                else:
                    assert os.WEXITSTATUS(status) == 0
                del running[fd]
                continue
            for i in data:
                acked[i] += 1
            seen += len(data)
            if kill_after is not None and seen >= kill_after:
                child.kill()
            running[fd] = (child, kill_after, seen)
        read_snapshot()
    read_snapshot()
    assert sum(acked) > 0 and kills > 0
    for i in range(N_COUNTERS):
        assert acked[i] <= last[i] <= acked[i] + kills, (i, acked[i], last[i], kills)
    assert sum(acked) <= sum(last) <= sum(acked) + kills
    report = d.check(reclaim=True)  # everyone is gone: leftovers of killed workers go back
    assert report.problems == ()
    assert d.check().ok
    d.close()


# ------------------------------------------------------------------------------------------
# Page faults


def test_a_million_adds_make_no_page_fault(path: str) -> None:
    """In a fresh interpreter (nothing else of the test run in it): after a warm-up, a million
    ``add`` on a shared domain (its quiescer thread running) make no minor page fault. The
    warm-up lets the quiescer run its first ticks too (0.3 s, 60 of them): on 3.13t its first
    ones touch new pages of the interpreter's allocator (2 minor faults, in the quiescer
    thread, none in the adding one, measured with RUSAGE_THREAD), later ones none."""
    code = textwrap.dedent("""
        import resource, sys, time
        from percpu import Domain
        d = Domain.create(sys.argv[1], 4 << 20, max_vcpus=4)
        c = d.counter("hot_total")
        add = c.add
        for _ in range(100_000):
            add(1)
        time.sleep(0.3)
        for _ in range(100_000):
            add(1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(1_000_000):
            add(1)
        after = resource.getrusage(resource.RUSAGE_SELF)
        alive = d._grace.thread is not None and d._grace.thread.is_alive()
        print(after.ru_minflt - before.ru_minflt, after.ru_majflt - before.ru_majflt,
              c.value, alive)
        d.close()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, path], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    minor, major, value, alive = out.stdout.split()
    assert (int(minor), int(major), int(value), alive) == (0, 0, 1_200_000, "True")


# ------------------------------------------------------------------------------------------
# Churn


def test_churn_of_1000_workers_stays_at_the_peak_concurrencys_memory(
        path: str, children: Children) -> None:
    """1000 short-lived workers in waves of 8 (all 8 of a wave alive at once: the peak
    concurrency), each using the same 50 counters: ids stay below 8, and pages and arena
    bytes stay where the first wave left them. Half the workers release their id cleanly,
    half vanish without a word (the next holder of their id reclaims it)."""
    d = Domain.create(path, 2 << 20, max_vcpus=8)
    wave, total, names = 8, 1000, 50

    def worker(w: int, go: int, clean: bool) -> None:
        for k in range(names):
            d.counter("churn_total", {"k": str(k)}).inc()
        os.write(w, b"r")
        assert os.read(go, 1) == b"g"  # the whole wave is alive now
        if clean:
            d.close()
        os.write(w, b"x")

    peak = None
    for first in range(0, total, wave):
        go_r, go_w = os.pipe()
        batch = [children.start(lambda w, n=n, go=go_r: worker(w, go, n % 2 == 0))  # type: ignore[misc]
                 for n in range(first, first + wave)]
        os.close(go_r)
        for child in batch:
            assert os.read(child.r, 1) == b"r"
        os.write(go_w, b"g" * wave)
        os.close(go_w)
        for child in batch:
            assert child.read_all() == b"x"
            assert child.reap() == 0
        stats = d.stats()
        figures = (stats.pages, stats.pagesets, stats.arena_used_bytes)
        if peak is None:
            peak = figures
        assert figures == peak, (first, figures, peak)
        assert stats.ids_ever_used == wave
    stats = d.stats()
    assert stats.fresh_ids + stats.reused_ids + stats.reclaimed_ids == total
    assert stats.reclaimed_ids > 0 and stats.reused_ids > 0
    assert stats.metrics == names
    assert sorted(m.value for m in d.snapshot()) == [total] * names
    report = d.check()
    assert report.problems == () and report.unreferenced_slots == 0
    d.close()


# ------------------------------------------------------------------------------------------
# Removal across processes


def test_remove_is_seen_in_every_process(path: str, children: Children) -> None:
    d = Domain.create(path, 2 << 20, max_vcpus=4)
    mine = d.counter("parent_removes_total")
    mine.add(3)
    d.counter("child_removes_total").add(4)
    go_r, go_w = os.pipe()

    def child(w: int) -> None:
        os.close(go_w)
        theirs = d.counter("parent_removes_total")
        theirs.add(5)
        os.write(w, f"{theirs.value}\n".encode())
        wait_go(go_r)  # the parent removed it and waited for our quiescer to acknowledge
        try:
            theirs.inc()
        except MetricRemoved:
            os.write(w, b"removed\n")
        else:
            os.write(w, b"still counting\n")
        assert d.remove("child_removes_total")
        assert d.synchronize(timeout=HANG)  # both quiescers acknowledged
        fresh = d.counter("parent_removes_total")
        os.write(w, f"{fresh.value}\n".encode())
        wait_go(go_r)
        d.close()

    kid = children.start(child)
    os.close(go_r)
    assert kid.read_line() == b"8"
    assert d.remove("parent_removes_total")
    assert d.synchronize(timeout=HANG)  # returns once the child's quiescer acknowledged
    os.write(go_w, b"go")
    assert kid.read_line() == b"removed"
    assert kid.read_line() == b"0"  # registered again in the child: from zero
    with pytest.raises(MetricRemoved):
        mine.inc()
    assert d.counter("parent_removes_total").value == 0
    handle_seen_removed = d.counter("child_removes_total")
    assert handle_seen_removed.value == 0  # a new one: the old was removed by the child
    os.write(go_w, b"go")
    assert kid.read_all() == b""
    assert kid.reap() == 0
    os.close(go_w)
    report = d.check()
    assert report.problems == () and report.unreferenced_slots == 0
    assert d.stats().pending_frees == 0
    d.close()


# ------------------------------------------------------------------------------------------
# A dead holder's cached slots


def test_a_killed_holders_cached_slots_are_recovered(path: str, children: Children) -> None:
    d = Domain.create(path, 2 << 20, max_vcpus=4)
    d.counter("c_total").inc()  # the parent holds id 0

    def victim(w: int) -> None:
        objs = [d.alloc(8) for _ in range(6)]
        for obj in objs[:2]:
            obj.free()
        vcpu = d.vcpu_id()
        os.write(w, f"{vcpu} {d._caches.count(vcpu)}\n".encode())
        time.sleep(HANG)

    kid = children.start(victim)
    vcpu, cached = map(int, kid.read_line().split())
    assert vcpu == 1 and cached > 0
    kid.kill()
    kid.reap()
    report = d.check()
    assert report.problems == ()
    assert report.unreferenced_slots == 4  # its live raw objects; the cache is accounted for
    pages = d.stats().pages
    before = d.stats().recovered_cache_slots

    def heir(w: int) -> None:
        assert d.vcpu_id() == vcpu
        path_taken = d.last_lease_path
        objs = [d.alloc(8) for _ in range(cached)]  # from the inherited cache
        os.write(w, f"{path_taken.value if path_taken else None} {len(objs)}\n".encode())
        d.close()

    kid = children.start(heir)
    assert kid.read_line() == f"reclaimed {cached}".encode()
    assert kid.read_all() == b""
    assert kid.reap() == 0
    stats = d.stats()
    assert stats.recovered_cache_slots - before == cached
    assert stats.pages == pages  # no new page: the heir used the dead holder's cache
    report = d.check(reclaim=True)  # only the parent is left: the 4 leaked objects go back
    assert report.problems == () and report.reclaimed_slots == 4
    assert d.check().unreferenced_slots == 0
    d.close()
