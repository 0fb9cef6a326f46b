"""Every domain protocol at once, with real processes and threads (issue 12).

One shared domain file (``max_vcpus=3``: most holders share the overflow id), and at once:

* writers: processes of ``THREADS`` counting threads each (``sys.setswitchinterval(1e-6)``)
  that ``inc``/``add`` to ``COUNTERS`` fixed counters. Around every call a thread sends the
  parent two records over the process's pipe: an *intent* (thread, counter, amount) before the
  call and a *done* after it returned normally. Each record is one ``os.write`` of at most
  ``PIPE_BUF`` bytes, so records never tear or interleave, even when the writer is SIGKILLed.
  The parent sums the done records: the acknowledged adds.
* a releaser: a writer whose third thread loops ``d.release()`` (handles stay usable and
  rebind on their next use) while the others count;
* a forker: a writer whose counting thread forks a child now and then; the child counts a few
  adds into the fixed counters on its own lease (reported through the inherited pipe, under a
  token of its own), then leaves with ``os._exit(0)``, half of the time after ``release()``;
* a closer: a writer-like process whose main thread opens the domain, lets two threads count,
  then calls ``d.close()`` under them, and again, round after round. Every call in those
  threads must either return (and is acknowledged) or raise :class:`percpu.DomainClosed`
  (a *refused* record: a call that raises changed nothing); any other exception is reported;
* a reader checking that no fixed counter ever goes down (``snapshot()`` and ``value``);
* a remover: registers churn metrics (counters, gauges, summaries, names of its own), checks
  each starts at zero and holds exactly what it added, removes it (its handle must then raise
  :class:`percpu.MetricRemoved`) and registers it again, round after round, with short-lived
  fillers that leave sparse pagesets behind;
* a compactor looping ``d.compact(timeout=...)``;
* and the parent SIGKILLs writers (of every kind), the remover and the compactor at random and
  replaces them, and SIGSTOPs / SIGCONTs any child at random (none is left stopped).

At the end everyone is stopped (the shared STOP word), continued, reaped; the parent opens the
domain and checks, for each fixed counter, ``acked <= value <= acked + slack``, where ``slack``
is the sum of the intents left open by SIGKILLed processes (a killed thread may have added
once without reporting it; each counting thread has at most one call open), and in sum
``counted - acked <= writer kills * THREADS * MAX_ADD``. ``d.check()`` must find no problem
(no slot held twice, no free slot written after its free...) and no child may report an
unexpected exception or exit non-zero.

``PERCPU_DOMAIN_TORTURE_SECONDS`` sets the length of the chaos (default 8 s); a long run is
``PERCPU_DOMAIN_TORTURE_SECONDS=300 pytest tests/test_domain_torture.py -s``.
``PERCPU_DOMAIN_TORTURE_SEED`` picks the parent's random choices. The figures are printed as
one line (``-s`` shows it) and written as JSON to ``$PERCPU_TORTURE_REPORT`` when it is set.
Nothing waits unbounded: the parent gives every child ``HANG_GUARD`` seconds to stop, then
fails with the child's thread stacks (faulthandler on SIGUSR1) and its kernel state. The
harness (forking, the stop word, the pipes' drainer, kills and stops, the bounded end) comes
from ``tests/_chaos.py``; the records and the roles are this file's.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import select
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from _chaos import HANG_GUARD, STOP, Chaos, Proc, fork, stopping
from conftest import shm_dir

from percpu import Counter, Domain, DomainClosed, Gauge, MetricRemoved, Summary

DURATION = float(os.environ.get("PERCPU_DOMAIN_TORTURE_SECONDS", "8"))  # seconds of chaos
SEED = int(os.environ.get("PERCPU_DOMAIN_TORTURE_SEED", "12"))
SIZE = 16 << 20  # bytes of arena
MAX_VCPUS = 3  # fewer than the holders: most share the overflow id
COUNTERS = 24  # fixed counters every writer adds to
THREADS = 2  # counting threads per writer process (the closer's included)
MAX_ADD = 3  # a call adds 1 (inc) .. MAX_ADD (add)
FORK_ADDS = 30  # adds a forked child counts before it leaves
CHURN = 30  # churn metrics a remover registers, checks, removes and registers again per round
FILLERS = 300  # short-lived counters per remover round (sparse pagesets for the compactor)
MAX_TEXT = 3000  # bytes of an error message (a record stays below PIPE_BUF: one atomic write)
WRITER_KINDS = ("writer", "releaser", "forker", "closer")  # processes with counting threads
KILLABLE = (*WRITER_KINDS, "remover", "compactor")
TORTURE_DIRS: list[str] = []  # temporary directories made in this process

# A record: (kind, token, a, b). Token: the thread (>= 0) or the forked child (< 0) it is about.
REC = struct.Struct("<iiii")
K_INTENT, K_DONE, K_REFUSED, K_ERROR, K_EVENT = range(5)  # a, b: counter, amount
# K_ERROR: b bytes of text follow; K_EVENT: a is one of EVENTS, b an amount.
EVENTS = ("releases", "forks", "fork_adds", "compactions", "moved", "pending_after_compact",
          "closes", "reader_passes", "churn_rounds", "removals")
EV = {name: i for i, name in enumerate(EVENTS)}
assert REC.size + MAX_TEXT <= select.PIPE_BUF  # one os.write: one whole record, never torn


class Out:
    """The child's end of its pipe: one atomic ``os.write`` per record."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def rec(self, kind: int, token: int, a: int, b: int) -> None:
        os.write(self.fd, REC.pack(kind, token, a, b))

    def event(self, name: str, amount: int = 1) -> None:
        self.rec(K_EVENT, 0, EV[name], amount)

    def error(self, token: int, text: str) -> None:
        data = f"[pid {os.getpid()}] {text}".encode(errors="replace")[-MAX_TEXT:]
        os.write(self.fd, REC.pack(K_ERROR, token, 0, len(data)) + data)

    def exception(self, token: int, what: str) -> None:
        self.error(token, f"{what}:\n{traceback.format_exc()}")


def _join(threads: list[threading.Thread], out: Out, what: str) -> bool:
    """Join ``threads`` within HANG_GUARD / 2; report (with every stack) those that hang."""
    deadline = time.monotonic() + HANG_GUARD / 2
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        faulthandler.dump_traceback(all_threads=True)  # on stderr
        out.error(0, f"{what}: threads {hung} do not finish")
    return not hung


def _fixed(d: Domain) -> list[Counter]:
    return [d.counter("t", {"i": str(i)}) for i in range(COUNTERS)]


def _one_add(cs: list[Counter], rng: random.Random, out: Out, token: int) -> None:
    """One call on a random fixed counter, bracketed by its intent and done records. Raises
    what the call raised (no done record then)."""
    i = rng.randrange(COUNTERS)
    n = rng.randint(1, MAX_ADD)
    out.rec(K_INTENT, token, i, n)
    if n == 1:
        cs[i].inc()
    else:
        cs[i].add(n)
    out.rec(K_DONE, token, i, n)  # after the call: a kill in between leaves the intent open


def _fork_child(d: Domain, cs: list[Counter], rng: random.Random, out: Out, index: int) -> None:
    """Fork a child that counts FORK_ADDS adds on its own lease; wait for it (bounded)."""
    token = -(index + 1)
    seed = rng.randrange(1 << 30)

    def run() -> None:  # pragma: no cover - the forked child: only this thread runs here
        crng = random.Random(seed)
        for _ in range(FORK_ADDS):
            if stopping():
                break
            _one_add(cs, crng, out, token)
            out.event("fork_adds")
        if crng.random() < 0.5:
            d.release()  # else it just leaves: the next holder reclaims its id

    # A lifetime: an orphan too (its forker SIGKILLed) ends in time.
    pid = fork(run, lambda: out.exception(token, "forked child"), lifetime=HANG_GUARD)
    out.event("forks")
    deadline = time.monotonic() + HANG_GUARD / 2
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.waitstatus_to_exitcode(status) != 0:
                out.error(token, f"forked child {pid} ended with status {status}")
            return
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGUSR1)  # its stack, on stderr
            time.sleep(1)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            out.error(token, f"forked child {pid} does not finish")
            return
        time.sleep(0.002)


def _counting(d: Domain, cs: list[Counter], out: Out, token: int, seed: int,
              forks: bool) -> None:
    """A writer's counting thread: adds until STOP; every exception is unexpected."""
    rng = random.Random(seed)
    next_fork = time.monotonic() + rng.uniform(0.05, 0.3)
    forked = 0
    try:
        while not stopping():
            for _ in range(32):
                _one_add(cs, rng, out, token)
            if forks and time.monotonic() >= next_fork:
                _fork_child(d, cs, rng, out, token * 100_000 + forked)
                forked += 1
                next_fork = time.monotonic() + rng.uniform(0.05, 0.3)
    except BaseException:
        out.exception(token, f"counting thread {token}")


def _releasing(d: Domain, out: Out, seed: int) -> None:
    rng = random.Random(seed)
    try:
        while not stopping():
            d.release()
            out.event("releases")
            time.sleep(rng.uniform(0, 0.002))
    except BaseException:
        out.exception(0, "releasing thread")


def writer(path: str, seed: int, kind: str) -> Callable[[Out], None]:
    def run(out: Out) -> None:
        sys.setswitchinterval(1e-6)
        d = Domain.open(path)
        cs = _fixed(d)
        threads = [threading.Thread(target=_counting, name=f"count{t}", daemon=True,
                                    args=(d, cs, out, t, seed * 10 + t,
                                          kind == "forker" and t == 0))
                   for t in range(THREADS)]
        if kind == "releaser":
            threads.append(threading.Thread(target=_releasing, name="release", daemon=True,
                                            args=(d, out, seed * 10 + 9)))
        for t in threads:
            t.start()
        while not stopping():
            time.sleep(0.01)
        if _join(threads, out, kind):
            d.close()
    return run


def _counting_until_closed(cs: list[Counter], out: Out, token: int, seed: int) -> None:
    """A closer's counting thread: adds until its calls raise DomainClosed (three in a row
    end it); any other exception is a failure."""
    rng = random.Random(seed)
    refused = 0
    while refused < 3:
        try:
            _one_add(cs, rng, out, token)
            refused = 0
        except DomainClosed:
            out.rec(K_REFUSED, token, 0, 0)
            refused += 1
        except BaseException:
            out.exception(token, f"closer thread {token} (not DomainClosed)")
            return


def closer(path: str, seed: int) -> Callable[[Out], None]:
    def run(out: Out) -> None:
        sys.setswitchinterval(1e-6)
        rng = random.Random(seed)
        rnd = 0
        while not stopping():
            d = Domain.open(path)
            cs = _fixed(d)
            threads = [threading.Thread(target=_counting_until_closed, name=f"count{t}",
                                        daemon=True, args=(cs, out, rnd * THREADS + t,
                                                           seed * 1000 + rnd * THREADS + t))
                       for t in range(THREADS)]
            for t in threads:
                t.start()
            until = time.monotonic() + rng.uniform(0.02, 0.4)
            while time.monotonic() < until and not stopping():
                time.sleep(0.005)
            try:
                d.close()  # under the counting threads' feet
                out.event("closes")
            except BaseException:
                out.exception(0, "close() while threads count")
            if not _join(threads, out, "closer"):
                return
            try:
                after = cs[0].value
            except DomainClosed:
                pass
            except BaseException:
                out.exception(0, "value after close (not DomainClosed)")
            else:
                out.error(0, f"value after close returned {after}")
            rnd += 1
    return run


def reader(path: str) -> Callable[[Out], None]:
    def run(out: Out) -> None:
        d = Domain.open(path)
        cs = _fixed(d)
        last: list[int | float] = [0] * COUNTERS
        while not stopping():
            snap = {m.labels: m.value for m in d.snapshot() if m.name == "t"}
            for i in range(COUNTERS):
                s = snap[(("i", str(i)),)]
                if s < last[i]:
                    out.error(0, f"snapshot: counter {i} went down {last[i]} -> {s}")
                last[i] = s
            for i in range(0, COUNTERS, 5):
                v = cs[i].value
                if v < last[i]:
                    out.error(0, f"value: counter {i} went down {last[i]} -> {v}")
                last[i] = v
            out.event("reader_passes")
        d.close()
    return run


def remover(path: str, seed: int) -> Callable[[Out], None]:
    def run(out: Out) -> None:
        d = Domain.open(path)
        rng = random.Random(seed)
        tag = str(os.getpid())
        rnd = 0
        while not stopping():
            held: list[tuple[str, dict[str, str], Counter | Gauge | Summary]] = []
            for k in range(CHURN):
                labels = {"p": tag, "k": str(k)}
                h: Counter | Gauge | Summary
                if k % 3 == 0:
                    c = h = d.counter("churn_c", labels)
                    if c.value != 0:
                        out.error(0, f"churn_c{labels} registered again starts at {c.value}")
                    m = rng.randint(1, 50)
                    for _ in range(m):
                        c.inc()
                    if c.value != m:
                        out.error(0, f"churn_c{labels}: {m} incs, value {c.value}")
                    name = "churn_c"
                elif k % 3 == 1:
                    g = h = d.gauge("churn_g", labels)
                    if g.value != 0:
                        out.error(0, f"churn_g{labels} registered again starts at {g.value}")
                    g.add(7)
                    g.sub(rng.randint(0, 20))
                    g.dec()
                    total = g.value
                    g.inc()
                    if g.value != total + 1:
                        out.error(0, f"churn_g{labels}: {total} + 1 reads {g.value}")
                    name = "churn_g"
                else:
                    s = h = d.summary("churn_s", labels)
                    if s.value != (0, 0.0):
                        out.error(0, f"churn_s{labels} registered again starts at {s.value}")
                    s.observe(1.5)
                    s.observe(2)
                    if s.value != (2, 3.5):
                        out.error(0, f"churn_s{labels}: observed 1.5 and 2, reads {s.value}")
                    name = "churn_s"
                held.append((name, labels, h))
            fill = [{"p": tag, "k": f"{rnd}_{k}"} for k in range(FILLERS)]
            for labels in fill:
                d.counter("churn_f", labels).inc()
            for labels in fill:
                if not d.remove("churn_f", labels):
                    out.error(0, f"remove(churn_f{labels}) found nothing")
                out.event("removals")  # each as it happens: under load a round may not end
            rng.shuffle(held)
            for name, labels, h in held:
                if not d.remove(name, labels):
                    out.error(0, f"remove({name}{labels}) found nothing")
                try:
                    if isinstance(h, Summary):
                        h.observe(1.0)
                    else:
                        h.inc()
                except MetricRemoved:
                    pass
                except BaseException:
                    out.exception(0, f"{name}{labels} used after remove (not MetricRemoved)")
                else:
                    out.error(0, f"{name}{labels} counted after its remove")
                if d.remove(name, labels):
                    out.error(0, f"remove({name}{labels}) twice found it twice")
                out.event("removals")
            out.event("churn_rounds")
            rnd += 1
        d.close()
    return run


def compactor(path: str) -> Callable[[Out], None]:
    def run(out: Out) -> None:
        d = Domain.open(path)
        while not stopping():
            r = d.compact(timeout=0.5)
            out.event("compactions")
            out.event("moved", r.moved)
            if r.pending_moves:
                out.event("pending_after_compact")
            if not r.moved:
                time.sleep(0.01)
        d.close()
    return run


@dataclass
class DomainProc(Proc):
    """A child and the calls its records left open."""

    open_calls: dict[int, tuple[int, int]] = field(default_factory=dict)  # token -> (i, n)
    errored: set[int] = field(default_factory=set)  # tokens that reported an exception
    bad: list[str] = field(default_factory=list)  # protocol breaches seen in its records


class DomainChaos(Chaos[DomainProc]):
    """Every role at once; the parent kills any of the killable and stops any child."""

    def __init__(self, path: str, rng: random.Random) -> None:
        super().__init__(path, rng, DomainProc)
        self.acked = [0] * COUNTERS  # amounts acknowledged, per counter
        self.calls = 0  # calls acknowledged
        self.refused = 0  # calls that raised DomainClosed in a closer
        self.events: Tally[str] = Tally()
        self.errors: list[str] = []  # what the children reported

    def child(self, role: str, fd: int) -> int:
        seed = next(self.seeds)
        fn: Callable[[Out], None]
        if role in ("writer", "releaser", "forker"):
            fn = writer(self.path, seed, role)
        elif role == "closer":
            fn = closer(self.path, seed)
        elif role == "remover":
            fn = remover(self.path, seed)
        elif role == "compactor":
            fn = compactor(self.path)
        else:
            assert role == "reader"
            fn = reader(self.path)
        out = Out(fd)
        return fork(lambda: fn(out), lambda: out.exception(0, "the process raised"),
                    lifetime=DURATION + 3 * HANG_GUARD)

    def ended(self, p: DomainProc) -> None:
        if p.data:
            p.bad.append(f"{len(p.data)} bytes of a torn record")

    def target(self, p: DomainProc) -> bool:
        """Not while stopped, nor once SIGKILLed: its pipe stays open (and it in ``procs``)
        while a child it forked lives on."""
        return not p.stopped and not p.killed

    def take(self, p: DomainProc, chunk: bytes) -> None:
        buf = p.data
        buf += chunk
        off = 0
        with self.lock:
            while len(buf) - off >= REC.size:
                kind, token, a, b = REC.unpack_from(buf, off)
                if kind == K_ERROR:
                    if len(buf) - off - REC.size < b:
                        break  # the rest of its text is in the next chunk
                    text = bytes(buf[off + REC.size : off + REC.size + b]).decode(
                        errors="replace")
                    self.errors.append(f"{p.role} {p.pid}: {text}")
                    p.errored.add(token)
                    off += REC.size + b
                    continue
                off += REC.size
                if kind == K_INTENT:
                    if token in p.open_calls:
                        p.bad.append(f"token {token}: a second call opened")
                    p.open_calls[token] = (a, b)
                elif kind == K_DONE:
                    if p.open_calls.pop(token, None) != (a, b):
                        p.bad.append(f"token {token}: done ({a}, {b}) matches no open call")
                    self.acked[a] += b
                    self.calls += 1
                elif kind == K_REFUSED:
                    if p.open_calls.pop(token, None) is None:
                        p.bad.append(f"token {token}: refused, no open call")
                    self.refused += 1
                elif kind == K_EVENT:
                    self.events[EVENTS[a]] += b
                else:
                    p.bad.append(f"unknown record kind {kind}")
        del buf[:off]

    def act(self, now: float) -> None:
        rng = self.rng
        action = rng.random()
        if action < 0.3:
            p = self.pick(WRITER_KINDS)
        elif action < 0.4:
            p = self.pick(("remover",))
        elif action < 0.5:
            p = self.pick(("compactor",))
        else:
            p = self.pick(("writer", "releaser", "forker", "closer", "remover",
                           "compactor", "reader"))
            if p is not None:
                self.stop(p, now + rng.uniform(0.05, 0.6))
            return
        if p is not None:
            self.kill(p)

    def finish(self) -> None:
        """Stop everyone, continue them all, wait for each (bounded), reap the killed."""
        STOP[0] = 1
        with self.lock:
            everyone = self.procs + self.done
        for p in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)  # none is left stopped
            p.stopped = False
        deadline = time.monotonic() + HANG_GUARD
        for p in everyone:
            if p.killed:
                _pid, status = os.waitpid(p.pid, 0)  # SIGKILLed: it is gone or going
                p.reaped = True
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    self.errors.append(f"{p.role} {p.pid} (SIGKILLed) ended with {status}")
                continue
            status = self.wait(p, deadline)
            if os.waitstatus_to_exitcode(status) != 0:
                self.errors.append(f"{p.role} {p.pid} ended with status {status}")
        self.join_drainer()  # EOF from every pipe: forked children gone too
        assert self.error is None, f"the drainer died: {self.error!r}"

    def hang_report(self, p: DomainProc) -> str:
        return f"{super().hang_report(p)}; errors reported so far: {self.errors}"


def _setup(path: str) -> None:
    """Create the domain; the fixed counters start spread over several pagesets (with holes
    the compactor fills by moving them)."""
    with Domain.create(path, SIZE, max_vcpus=MAX_VCPUS) as d:
        for j in range(1500):
            d.counter("setup", {"j": str(j)})
            if j % 53 == 0 and j // 53 < COUNTERS:
                d.counter("t", {"i": str(j // 53)})
        for j in range(1500):
            d.remove("setup", {"j": str(j)})


def _write_report(figures: Mapping[str, object]) -> None:
    out = os.environ.get("PERCPU_TORTURE_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(figures, f, indent=1)


def test_every_protocol_at_once_keeps_counts_exact() -> None:
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_domain_torture-")
    TORTURE_DIRS.append(tmp)
    path = os.path.join(tmp, "domain")
    chaos = DomainChaos(path, random.Random(SEED))
    faulthandler.dump_traceback_later(DURATION + 5 * HANG_GUARD, exit=True)  # the last resort
    started = time.monotonic()
    try:
        _setup(path)
        chaos.drainer.start()
        for role in (*WRITER_KINDS, "remover", "compactor", "reader"):
            chaos.spawn(role)
        chaos.run(DURATION, (0.1, 0.4))
        try:
            chaos.finish()
        except AssertionError as exc:  # a hang: the report says so too
            _write_report({"seed": SEED, "failures": [str(exc)], "errors": chaos.errors})
            raise
        failures: list[str] = list(chaos.errors)
        # Open calls: a SIGKILLed process's (or an errored thread's) may have counted; any
        # other is a breach of the protocol (a call neither acknowledged nor refused).
        slack = [0] * COUNTERS
        for p in chaos.done:
            failures += [f"{p.role} {p.pid}: {b}" for b in p.bad]
            for token, (i, n) in p.open_calls.items():
                if (p.killed and token >= 0) or token in p.errored:
                    slack[i] += n
                else:
                    failures.append(f"{p.role} {p.pid} token {token}: a call on counter {i} "
                                    "was neither acknowledged nor refused")
        with Domain.open(path) as d:
            final = d.compact(timeout=HANG_GUARD)  # finishes a batch the dead left in flight
            synced = d.synchronize(timeout=HANG_GUARD)
            values = [c.value for c in _fixed(d)]
            snap = {m.labels: m.value for m in d.snapshot() if m.name == "t"}
            stats = d.stats()
            report = d.check()
        extra = [v - a for v, a in zip(values, chaos.acked, strict=True)]
        writer_kills = sum(chaos.kills[k] for k in WRITER_KINDS)
        figures = {
            "seconds": round(time.monotonic() - started, 2), "chaos_seconds": DURATION,
            "seed": SEED, "calls_acknowledged": chaos.calls,
            "added_acknowledged": sum(chaos.acked), "calls_refused_closed": chaos.refused,
            "counted": sum(values), "counted_minus_acknowledged": sum(extra),
            "counted_minus_acknowledged_per_counter": extra, "slack_per_counter": slack,
            "kills": dict(chaos.kills), "writer_kills": writer_kills, "stops": chaos.stops,
            **{name: chaos.events[name] for name in EVENTS},
            "moved_slots": stats.moved_slots, "compaction_batches": stats.compaction_batches,
            "compacted_pages": stats.compacted_pages,
            "overflow_holders": stats.overflow_holders,
            "shared_id_operations": stats.shared_id_operations,
            "reclaimed_ids": stats.reclaimed_ids, "reused_ids": stats.reused_ids,
            "check_problems": list(report.problems),
            "arena_problems": list(report.arena.problems),
            "unreferenced_slots": report.unreferenced_slots,
            "errors": len(chaos.errors),
        }
        for i, (v, a, s) in enumerate(zip(values, chaos.acked, slack, strict=True)):
            if v < a:
                failures.append(f"counter {i}: {a} acknowledged, {v} counted: {a - v} lost")
            elif v > a + s:
                failures.append(f"counter {i}: {a} acknowledged, {v} counted: {v - a} more, "
                                f"only {s} in calls open at a kill")
            if snap[(("i", str(i)),)] != v:
                failures.append(f"counter {i}: value {v}, snapshot {snap[(('i', str(i)),)]}")
        if sum(extra) > writer_kills * THREADS * MAX_ADD:
            failures.append(f"{sum(extra)} unacknowledged adds > {writer_kills} writer kills "
                            f"x {THREADS} threads x {MAX_ADD}")
        if final.pending_moves or not synced:
            failures.append(f"the domain does not settle: {final.pending_moves} moves "
                            f"pending, grace period over: {synced}")
        failures += [f"check: {problem}" for problem in report.problems]
        failures += [f"arena check: {problem}" for problem in report.arena.problems]
        if not (chaos.calls and chaos.refused and chaos.events["releases"]
                and chaos.events["fork_adds"] and chaos.events["closes"]
                and chaos.events["reader_passes"] and chaos.events["removals"]
                and chaos.events["compactions"] and stats.moved_slots
                and stats.overflow_holders):
            failures.append(f"a protocol was not exercised: {figures}")
        figures["failures"] = failures
        print(f"\ndomain torture: {chaos.calls} calls acknowledged "
              f"({sum(chaos.acked)} added), {chaos.refused} refused (closed), "
              f"{dict(chaos.kills)} killed, {chaos.stops} stops, {chaos.events['forks']} forks "
              f"({chaos.events['fork_adds']} adds), {chaos.events['compactions']} compactions "
              f"({stats.moved_slots} slots moved), {chaos.events['releases']} releases, "
              f"{chaos.events['closes']} closes, {chaos.events['churn_rounds']} churn rounds "
              f"({chaos.events['removals']} removals), "
              f"{chaos.events['reader_passes']} reader passes, counted - acknowledged "
              f"{sum(extra)} (slack {sum(slack)}), {len(failures)} failures")
        _write_report(figures)
        assert not failures, "\n".join(failures)
    finally:
        faulthandler.cancel_dump_traceback_later()
        chaos.cleanup()  # only after a failure: nothing is left running or stopped
        shutil.rmtree(tmp, ignore_errors=True)


def test_torture_leaves_no_files() -> None:
    """Only this process's: another test session may be running beside this one."""
    assert not [d for d in TORTURE_DIRS if os.path.exists(d)]
