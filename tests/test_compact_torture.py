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

``PERCPU_TORTURE_SECONDS`` sets the length of the chaos (default 10 s). Children are forked,
talk over pipes, stop when the parent sets a shared stop word, end with ``os._exit`` and are
reaped; the parent never waits more than
``HANG_GUARD`` seconds for anything, so a hang shows as a failure.
"""

from __future__ import annotations

import contextlib
import faulthandler
import mmap
import os
import random
import selectors
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from conftest import shm_dir

from percpu import Domain

DURATION = float(os.environ.get("PERCPU_TORTURE_SECONDS", "10"))  # seconds of chaos
HANG_GUARD = 60.0  # seconds
SIZE = 16 << 20  # bytes of arena
COUNTERS = 40  # counters the writers add to
WRITERS = 3
MAX_VCPUS = 6  # writers + compactor + reader + replacements racing the dead
KEEP = 60  # fillers kept each round: more than COUNTERS, so the writers' pageset is a source
RECORD = struct.Struct("<i")
TORTURE_DIRS: list[str] = []  # temporary directories made in this process

# The stop word: a shared anonymous page, inherited by every child at fork; the parent sets it
# to ask them all to finish (a plain memory word: no signal handler to race with fork).
_STOP_PAGE = mmap.mmap(-1, mmap.PAGESIZE)
STOP = memoryview(_STOP_PAGE).cast("q")


def stopping() -> bool:
    return bool(STOP[0])


def _child(fn: Callable[[int], None], fd: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if it hangs
            fn(fd)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


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


@dataclass
class Proc:
    role: str
    pid: int
    fd: int  # read end of its pipe
    stopped: bool = False
    killed: bool = False
    data: bytearray = field(default_factory=bytearray)


class Chaos:
    def __init__(self, path: str) -> None:
        self.path = path
        self.procs: list[Proc] = []
        self.done: list[Proc] = []  # exited or killed, pipes drained to EOF
        self.acked = [0] * COUNTERS
        self.writer_kills = 0
        self.other_kills = 0
        self.stops = 0
        self.lock = threading.Lock()  # guards procs, done and acked between the two threads
        self.quit = threading.Event()
        self.drainer = threading.Thread(target=self.drain, daemon=True)
        self.error: BaseException | None = None  # what killed the drainer, if anything
        self.seeds = iter(range(1, 1 << 30))

    def spawn(self, role: str) -> None:
        r, w = os.pipe()
        fn = {"writer": lambda: writer(self.path, next(self.seeds)),
              "compactor": lambda: compactor(self.path), "reader": lambda: reader(self.path)}
        pid = _child(fn[role](), w)
        os.close(w)
        with self.lock:
            self.procs.append(Proc(role, pid, r))

    def drain(self) -> None:
        try:
            self._drain()
        except BaseException as exc:  # a dead drainer would block every writer: say so
            self.error = exc
            raise

    def _drain(self) -> None:
        with selectors.DefaultSelector() as sel:
            watched: dict[int, Proc] = {}
            while not self.quit.is_set() or watched or self.procs:
                with self.lock:
                    for p in self.procs:
                        if p.fd not in watched:
                            watched[p.fd] = p
                            sel.register(p.fd, selectors.EVENT_READ)
                for key, _events in sel.select(0.05):
                    fd = int(key.fd)
                    p = watched[fd]
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        self.take(p, chunk)
                        continue
                    sel.unregister(fd)  # EOF: the process is gone
                    del watched[fd]
                    with self.lock:
                        self.procs.remove(p)
                        self.done.append(p)
                    os.close(fd)

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

    def pick(self, roles: tuple[str, ...], rng: random.Random) -> Proc | None:
        with self.lock:
            choice = [p for p in self.procs if p.role in roles and not p.stopped]
        return rng.choice(choice) if choice else None

    def run(self, seconds: float, rng: random.Random) -> None:
        end = time.monotonic() + seconds
        stopped: list[tuple[float, Proc]] = []
        p: Proc | None
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.2, 0.6))
            now = time.monotonic()
            for t, q in list(stopped):
                if now >= t:
                    os.kill(q.pid, signal.SIGCONT)
                    q.stopped = False
                    stopped.remove((t, q))
            action = rng.random()
            if action < 0.3:
                p = self.pick(("writer",), rng)
                if p is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.killed = True
                    self.writer_kills += 1
                    self.spawn("writer")
            elif action < 0.38:
                p = self.pick(("compactor",), rng)
                if p is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.killed = True
                    self.other_kills += 1
                    self.spawn("compactor")
            else:
                p = self.pick(("writer", "compactor", "reader"), rng)
                if p is not None:
                    os.kill(p.pid, signal.SIGSTOP)
                    p.stopped = True
                    self.stops += 1
                    stopped.append((now + rng.uniform(0.1, 0.8), p))
        for _t, q in stopped:
            os.kill(q.pid, signal.SIGCONT)
            q.stopped = False

    def finish(self) -> None:
        with self.lock:
            live = [p for p in self.procs if not p.killed]
            killed = [p for p in self.procs + self.done if p.killed]
        STOP[0] = 1
        deadline = time.monotonic() + HANG_GUARD
        for p in live:
            while True:
                pid, _status = os.waitpid(p.pid, os.WNOHANG)
                if pid:
                    assert os.WIFEXITED(_status) and os.WEXITSTATUS(_status) == 0, \
                        f"{p.role} {p.pid} failed: {_status}"
                    break
                if time.monotonic() >= deadline:
                    os.kill(p.pid, signal.SIGUSR1)  # its threads' stacks, on stderr
                    time.sleep(1)
                    with self.lock:
                        drained = p in self.procs
                    try:
                        with open(f"/proc/{p.pid}/status") as f:
                            status = " ".join(line.strip() for line in f if line.startswith(
                                ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
                        with open(f"/proc/{p.pid}/wchan") as f:
                            status += f" wchan {f.read()}"
                    except OSError as exc:
                        status = repr(exc)
                    raise AssertionError(f"{p.role} {p.pid} does not stop (drainer alive: "
                                         f"{self.drainer.is_alive()} {self.error!r}, its "
                                         f"pipe drained: {drained}, stopped: {p.stopped}; "
                                         f"{status})")
                time.sleep(0.01)
        self.quit.set()
        self.drainer.join(HANG_GUARD)
        assert not self.drainer.is_alive()
        for p in killed:  # reap the SIGKILLed
            os.waitpid(p.pid, 0)


def test_counters_stay_exact_and_monotonic_under_compaction_and_chaos() -> None:
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_compact_torture-")
    TORTURE_DIRS.append(tmp)
    path = os.path.join(tmp, "domain")
    chaos = Chaos(path)
    STOP[0] = 0
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
        chaos.run(DURATION, random.Random(int(os.environ.get("PERCPU_TORTURE_SEED", "5"))))
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
        print(f"\ntorture: {sum(chaos.acked)} adds acknowledged, {chaos.writer_kills} writers "
              f"and {chaos.other_kills} compactors killed, {chaos.stops} stops, "
              f"{len(rounds)} compactions reported, {stats.moved_slots} slots moved, "
              f"{stats.compacted_pages} pages given back, {reads} reader passes")
        assert all(e >= 0 for e in extra), f"lost adds: {extra}"
        assert sum(extra) <= chaos.writer_kills, f"{sum(extra)} unreported adds > kills"
        assert sum(chaos.acked) > 0 and reads > 0
        assert stats.moved_slots > 0 and stats.compacted_pages > 0
        assert not report.problems, report.problems
    finally:
        with chaos.lock:
            left = list(chaos.procs)
        for p in left:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
        for p in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, 0)
        shutil.rmtree(tmp, ignore_errors=True)


def test_torture_leaves_no_files() -> None:
    """Only this process's: another test session may be running beside this one."""
    assert not [d for d in TORTURE_DIRS if os.path.exists(d)]
