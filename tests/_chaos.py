"""Process chaos for the torture tests: forked children that the parent kills and stops at random.

A torture test runs each role (writer, reader, compactor...) in a child of its own and, for a
while, SIGKILLs (and replaces) some of them and SIGSTOPs / SIGCONTs any; then it stops them
all and checks what they reported. This module is the part of that every torture test shares:
:func:`fork` makes a child, :class:`Chaos` is the parent's side (spawning, one thread draining
every pipe, the random kills and stops, the bounded end). A test subclasses :class:`Chaos` to
say how a role's child runs, what its bytes mean and which chaos to make.

The rules, for every child and every test that uses them:

* Children are forked (:func:`fork`; the parent's stdout and stderr are flushed first), so they
  inherit the domain's file and the stop word; nothing is pickled or spawned.
* A child talks to the parent only over its own pipe. A write of at most ``PIPE_BUF`` bytes is
  atomic, so a record sent in one ``os.write`` never tears, even when the writer is SIGKILLed.
* A child stops when the parent sets the shared stop word (:data:`STOP`, read by
  :func:`stopping`): a plain memory word on a shared page, no signal handler to race with fork.
* A child ends with ``os._exit`` (it never returns into pytest): 0 when its function returned,
  1 when it raised (after it reported the exception).
* Every wait is bounded. The parent waits at most :data:`HANG_GUARD` seconds for anything and
  then fails with the child's thread stacks (faulthandler on SIGUSR1, on stderr) and its
  kernel state; a child may bound its own life too (:func:`bound_lifetime`), so even an orphan
  ends. Every child is reaped, and :meth:`Chaos.cleanup` kills and reaps what a failure left.
"""

from __future__ import annotations

import contextlib
import faulthandler
import mmap
import os
import random
import selectors
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

HANG_GUARD = 60.0  # seconds: the longest the parent (or a child) waits for anything

# The stop word: a shared anonymous page, inherited by every child (and grandchild) at fork;
# the parent sets it to ask them all to finish (a plain memory word: no handler to race with).
_STOP_PAGE = mmap.mmap(-1, mmap.PAGESIZE)
STOP = memoryview(_STOP_PAGE).cast("q")


def stopping() -> bool:
    """Whether the parent has asked every child to finish."""
    return bool(STOP[0])


def bound_lifetime(seconds: float) -> None:
    """End this process (after dumping its stacks) ``seconds`` from now, whatever happens to
    its parent: SIGALRM's default action, chained after faulthandler's dump."""
    faulthandler.register(signal.SIGALRM, all_threads=True, chain=True)
    signal.alarm(int(seconds) + 1)


def fork(run: Callable[[], None], failed: Callable[[], None],
         lifetime: float | None = None) -> int:
    """Fork a child that runs ``run`` and ends with ``os._exit``: 0 when ``run`` returned,
    else 1 after ``failed()`` (called while the exception is handled: it reports it; an
    exception of its own is dropped). The child dumps its threads' stacks on SIGUSR1 and, with
    a ``lifetime``, ends that many seconds later at the latest. Returns the child's pid."""
    sys.stdout.flush()  # or the child would print the parent's buffered output again
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, never returns into pytest
        code = 1
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if it hangs
            if lifetime is not None:
                bound_lifetime(lifetime)
            run()
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                failed()
        finally:
            os._exit(code)
    return pid


@dataclass
class Proc:
    """The parent's record of one child."""

    role: str
    pid: int
    fd: int  # read end of its pipe
    stopped: bool = False
    killed: bool = False  # set before the SIGKILL is sent
    reaped: bool = False
    data: bytearray = field(default_factory=bytearray)  # what its pipe gave, not yet taken


P = TypeVar("P", bound=Proc)


class Chaos(ABC, Generic[P]):
    """The parent's side of a torture test.

    :meth:`spawn` forks a role's child (through the subclass's :meth:`child`) with a pipe of
    its own; the ``drainer`` thread (started by the test) reads every pipe and hands the bytes
    to :meth:`take`, and moves a child from ``procs`` to ``done`` at its pipe's EOF; :meth:`run`
    makes the chaos, one :meth:`act` of the subclass after each random pause, and continues
    the stopped when their time is up. A subclass ends the test with :meth:`wait` (bounded)
    and :meth:`join_drainer`; :meth:`cleanup` (in a ``finally``) leaves nothing running.
    ``lock`` guards ``procs``, ``done`` and whatever :meth:`take` tallies.
    """

    def __init__(self, path: str, rng: random.Random,
                 new_proc: Callable[[str, int, int], P]) -> None:
        self.path = path  # the domain file
        self.rng = rng  # the parent's random choices
        self.new_proc = new_proc  # (role, pid, read fd) -> its record
        self.procs: list[P] = []  # pipes still open
        self.done: list[P] = []  # pipes drained to EOF: exited or killed
        self.kills: Tally[str] = Tally()  # SIGKILLs sent, per role
        self.stops = 0  # SIGSTOPs sent
        self.stopped: list[tuple[float, P]] = []  # (when to continue it, the stopped child)
        self.lock = threading.Lock()
        self.quit = threading.Event()
        self.drainer = threading.Thread(target=self.drain, daemon=True)
        self.error: BaseException | None = None  # what killed the drainer, if anything
        self.seeds = iter(range(1, 1 << 30))
        STOP[0] = 0

    @abstractmethod
    def child(self, role: str, fd: int) -> int:
        """Fork (with :func:`fork`) the child of ``role`` that writes to ``fd``; its pid."""

    @abstractmethod
    def take(self, p: P, chunk: bytes) -> None:
        """Bytes from ``p``'s pipe (in the drainer thread, not under the lock)."""

    @abstractmethod
    def act(self, now: float) -> None:
        """One random step of the chaos (:meth:`kill`, :meth:`stop` or nothing)."""

    def ended(self, p: P) -> None:
        """``p``'s pipe reached EOF (in the drainer, under the lock): nothing by default."""

    def target(self, p: P) -> bool:
        """Whether :meth:`pick` may choose ``p``: not while it is stopped."""
        return not p.stopped

    def spawn(self, role: str) -> None:
        r, w = os.pipe()
        pid = self.child(role, w)
        os.close(w)
        with self.lock:
            self.procs.append(self.new_proc(role, pid, r))

    def drain(self) -> None:
        try:
            self._drain()
        except BaseException as exc:  # a dead drainer would block every writer: say so
            self.error = exc
            raise

    def _drain(self) -> None:
        with selectors.DefaultSelector() as sel:
            watched: dict[int, P] = {}
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
                    sel.unregister(fd)  # EOF: the process (and any child it forked) is gone
                    del watched[fd]
                    with self.lock:
                        self.ended(p)
                        self.procs.remove(p)
                        self.done.append(p)
                    os.close(fd)

    def pick(self, roles: tuple[str, ...]) -> P | None:
        """A random child of one of ``roles`` that :meth:`target` allows; None if none is."""
        with self.lock:
            choice = [p for p in self.procs if p.role in roles and self.target(p)]
        return self.rng.choice(choice) if choice else None

    def kill(self, p: P) -> None:
        """SIGKILL ``p`` and spawn another child of its role in its place."""
        p.killed = True  # before the signal: the drainer may see its EOF at once
        os.kill(p.pid, signal.SIGKILL)
        self.kills[p.role] += 1
        self.spawn(p.role)

    def stop(self, p: P, until: float) -> None:
        """SIGSTOP ``p``; :meth:`run` continues it at ``until`` (monotonic) or at its end."""
        os.kill(p.pid, signal.SIGSTOP)
        p.stopped = True
        self.stops += 1
        self.stopped.append((until, p))

    def run(self, seconds: float, pause: tuple[float, float]) -> None:
        """The chaos, for ``seconds``: a random pause in ``pause`` (seconds), the stopped whose
        time is up continued, one :meth:`act`; and so on. None is left stopped at the end."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(self.rng.uniform(*pause))
            now = time.monotonic()
            for t, q in list(self.stopped):
                if now >= t:
                    os.kill(q.pid, signal.SIGCONT)
                    q.stopped = False
                    self.stopped.remove((t, q))
            self.act(now)
        for _t, q in self.stopped:
            os.kill(q.pid, signal.SIGCONT)
            q.stopped = False
        self.stopped.clear()

    def wait(self, p: P, deadline: float) -> int:
        """Reap ``p`` (its wait status) by ``deadline`` (monotonic); after it, fail with
        :meth:`hang_report`."""
        while True:
            pid, status = os.waitpid(p.pid, os.WNOHANG)
            if pid:
                p.reaped = True
                return status
            if time.monotonic() >= deadline:
                raise AssertionError(self.hang_report(p))
            time.sleep(0.01)

    def hang_report(self, p: P) -> str:
        """Why ``p`` does not stop: its threads' stacks (on stderr), its kernel state."""
        os.kill(p.pid, signal.SIGUSR1)  # its threads' stacks, on stderr
        time.sleep(1)
        with self.lock:
            still_open = p in self.procs
        try:
            with open(f"/proc/{p.pid}/status") as f:
                status = " ".join(line.strip() for line in f if line.startswith(
                    ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
            with open(f"/proc/{p.pid}/wchan") as f:
                status += f" wchan {f.read()}"
        except OSError as exc:
            status = repr(exc)
        return (f"{p.role} {p.pid} does not stop in {HANG_GUARD} s (drainer alive: "
                f"{self.drainer.is_alive()} {self.error!r}, its pipe open: {still_open}, "
                f"stopped: {p.stopped}; {status})")

    def join_drainer(self) -> None:
        """Once every child is gone: let the drainer read the last pipes to EOF (bounded)."""
        self.quit.set()
        self.drainer.join(HANG_GUARD)
        assert not self.drainer.is_alive(), \
            f"a pipe stays open (a forked child hangs?): {[p.pid for p in self.procs]}"

    def cleanup(self) -> None:
        """Leave nothing behind (only a failure leaves any): set the stop word, continue and
        SIGKILL every child not reaped, reap them, let the drainer end."""
        STOP[0] = 1
        with self.lock:
            left = [p for p in self.procs + self.done if not p.reaped]
        for p in left:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
        for p in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, 0)
        self.quit.set()
