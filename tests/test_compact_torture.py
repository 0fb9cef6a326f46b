"""Compaction torture with real processes (issue 5).

Writers add to shared counters at full speed and report every completed add to the parent over
a pipe (4 bytes: the counter's index; a pipe write that small is atomic). A compactor process
churns short-lived counters and compacts in a loop, arranged so that each round empties the
pageset the writers' counters live in: those counters move every round, under the writers'
feet. A reader process checks that no counter ever goes down, through ``snapshot()`` and
``value``. Meanwhile the parent SIGKILLs writers and the compactor (replacing them), and
SIGSTOPs / SIGCONTs any of them at random. At the end every counter lies in
``[acknowledged, acknowledged + kills]``, summed over counters: a killed writer may have added
once without reporting it, nothing else may differ.

``PERCPU_TORTURE_SECONDS`` sets the length of the chaos (default 10 s). The harness comes
from ``tests/_chaos.py``: children are forked, talk over pipes, stop when the parent sets the
shared stop word, end with ``os._exit`` and are reaped; the parent never waits more than
``HANG_GUARD`` seconds for anything, so a hang shows as a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import time
import traceback
from collections.abc import Callable

from _chaos import HANG_GUARD, STOP, Chaos, Proc, fork, stopping
from conftest import shm_dir

from percpu import Domain

DURATION = float(os.environ.get("PERCPU_TORTURE_SECONDS", "10"))  # seconds of chaos
SIZE = 16 << 20  # bytes of arena
COUNTERS = 40  # counters the writers add to
WRITERS = 3
MAX_VCPUS = 6  # writers + compactor + reader + replacements racing the dead
KEEP = 60  # fillers kept each round: more than COUNTERS, so the writers' pageset is a source
RECORD = struct.Struct("<i")
TORTURE_DIRS: list[str] = []  # temporary directories made in this process


def writer(path: str, seed: int) -> Callable[[int], None]:
    def run(fd: int) -> None:
        d = Domain.open(path)
        cs = [d.counter("t", {"i": str(i)}) for i in range(COUNTERS)]
        rng = random.Random(seed)
        pack, write = RECORD.pack, os.write
        while not stopping():
            for _ in range(64):
                i = rng.randrange(COUNTERS)
                cs[i].inc()
                write(fd, pack(i))  # after the add: a kill in between loses one report
        d.close()
    return run


def compactor(path: str) -> Callable[[int], None]:
    def run(fd: int) -> None:
        d = Domain.open(path)
        tag = os.getpid()
        kept: list[str] = []
        j = 0
        while not stopping():
            # Fill the holes of the writers' pageset, then start a new one; keep the last KEEP
            # (they are in the new pageset), drop the rest and last round's: the writers'
            # pageset is now the sparser one, so compaction moves their counters into the new.
            names = [f"{tag}_{j}_{k}" for k in range(600)]
            for name in names:
                d.counter("f", {"k": name})
            for name in kept + names[:-KEEP]:
                d.remove("f", {"k": name})
            kept = names[-KEEP:]
            r = d.compact(timeout=0.5)
            os.write(fd, f"{r.moved} {r.pending_moves} {r.reclaimed_pages}\n".encode())
            j += 1
        d.close()
    return run


def reader(path: str) -> Callable[[int], None]:
    def run(fd: int) -> None:
        d = Domain.open(path)
        cs = [d.counter("t", {"i": str(i)}) for i in range(COUNTERS)]
        last: list[int | float] = [0] * COUNTERS
        reads = 0
        while not stopping():
            snap = {m.labels: m.value for m in d.snapshot() if m.name == "t"}
            for i in range(COUNTERS):
                s = snap[(("i", str(i)),)]
                if s < last[i]:
                    os.write(fd, f"BAD snapshot {i} {last[i]} -> {s}\n".encode())
                last[i] = s
            for i in range(0, COUNTERS, 7):
                v = cs[i].value
                if v < last[i]:
                    os.write(fd, f"BAD value {i} {last[i]} -> {v}\n".encode())
                last[i] = v
            reads += 1
        os.write(fd, f"READS {reads}\n".encode())
        d.close()
    return run


class CompactionChaos(Chaos[Proc]):
    """Writers, a compactor and a reader; the parent kills writers and the compactor."""

    def __init__(self, path: str, rng: random.Random) -> None:
        super().__init__(path, rng, Proc)
        self.acked = [0] * COUNTERS  # adds acknowledged, per counter

    def child(self, role: str, fd: int) -> int:
        fn = {"writer": lambda: writer(self.path, next(self.seeds)),
              "compactor": lambda: compactor(self.path), "reader": lambda: reader(self.path)}
        run = fn[role]()
        return fork(lambda: run(fd), traceback.print_exc)

    def take(self, p: Proc, chunk: bytes) -> None:
        if p.role != "writer":
            p.data += chunk
            return
        p.data += chunk
        n = len(p.data) // 4 * 4
        counts = [0] * COUNTERS
        for (i,) in RECORD.iter_unpack(bytes(p.data[:n])):
            counts[i] += 1
        del p.data[:n]
        with self.lock:
            for i, c in enumerate(counts):
                self.acked[i] += c

    def act(self, now: float) -> None:
        action = self.rng.random()
        if action < 0.3:
            p = self.pick(("writer",))
            if p is not None:
                self.kill(p)
        elif action < 0.38:
            p = self.pick(("compactor",))
            if p is not None:
                self.kill(p)
        else:
            p = self.pick(("writer", "compactor", "reader"))
            if p is not None:
                self.stop(p, now + self.rng.uniform(0.1, 0.8))

    def finish(self) -> None:
        """Stop everyone; each child still running must exit 0 (bounded); reap the killed."""
        with self.lock:
            live = [p for p in self.procs if not p.killed]
            killed = [p for p in self.procs + self.done if p.killed]
        STOP[0] = 1
        deadline = time.monotonic() + HANG_GUARD
        for p in live:
            status = self.wait(p, deadline)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
                f"{p.role} {p.pid} failed: {status}"
        self.join_drainer()
        for p in killed:  # reap the SIGKILLed
            os.waitpid(p.pid, 0)
            p.reaped = True


def test_counters_stay_exact_and_monotonic_under_compaction_and_chaos() -> None:
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_compact_torture-")
    TORTURE_DIRS.append(tmp)
    path = os.path.join(tmp, "domain")
    seed = int(os.environ.get("PERCPU_TORTURE_SEED", "5"))  # the parent's random choices
    chaos = CompactionChaos(path, random.Random(seed))
    try:
        with Domain.create(path, SIZE, max_vcpus=MAX_VCPUS) as d:
            # The writers' counters start spread over three pagesets.
            for j in range(1500):
                d.counter("setup", {"j": str(j)})
                if j % 37 == 0 and j // 37 < COUNTERS:
                    d.counter("t", {"i": str(j // 37)})
            for j in range(1500):
                d.remove("setup", {"j": str(j)})
        chaos.drainer.start()
        for _ in range(WRITERS):
            chaos.spawn("writer")
        chaos.spawn("compactor")
        chaos.spawn("reader")
        chaos.run(DURATION, (0.2, 0.6))
        chaos.finish()
        reports = [p for p in chaos.done if p.role != "writer"]
        text = b"".join(bytes(p.data) for p in reports).decode()
        assert "BAD" not in text, text
        reads = sum(int(line.split()[1]) for line in text.splitlines()
                    if line.startswith("READS"))
        rounds = [tuple(map(int, line.split())) for line in text.splitlines()
                  if line and line[0].isdigit()]
        with Domain.open(path) as d:
            final = d.compact(timeout=HANG_GUARD)  # finishes a batch the dead left in flight
            assert final.pending_moves == 0
            values = [d.counter("t", {"i": str(i)}).value for i in range(COUNTERS)]
            stats = d.stats()
            report = d.check()
        extra = [v - a for v, a in zip(values, chaos.acked, strict=True)]
        print(f"\ntorture: {sum(chaos.acked)} adds acknowledged, {chaos.kills['writer']} writers "
              f"and {chaos.kills['compactor']} compactors killed, {chaos.stops} stops, "
              f"{len(rounds)} compactions reported, {stats.moved_slots} slots moved, "
              f"{stats.compacted_pages} pages given back, {reads} reader passes")
        assert all(e >= 0 for e in extra), f"lost adds: {extra}"
        assert sum(extra) <= chaos.kills["writer"], f"{sum(extra)} unreported adds > kills"
        assert sum(chaos.acked) > 0 and reads > 0
        assert stats.moved_slots > 0 and stats.compacted_pages > 0
        assert not report.problems, report.problems
    finally:
        chaos.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def test_torture_leaves_no_files() -> None:
    """Only this process's: another test session may be running beside this one."""
    assert not [d for d in TORTURE_DIRS if os.path.exists(d)]
