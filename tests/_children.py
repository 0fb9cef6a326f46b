"""Forked children for the process tests: run a function in a child, get its result back.

A child runs ``fn``, pickles ``("ok", result)`` or ``("error", traceback)`` into a pipe and
leaves with ``os._exit`` (it never returns into pytest). Only results the tests themselves made
are unpickled: the pipe is private to the parent and its own child.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

import pytest


class Child:
    """A forked child running ``fn``; its pickled result comes back through a pipe."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        sys.stdout.flush()  # or the child would print the parent's buffered output again
        sys.stderr.flush()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # never returns into pytest
            code = 1
            try:
                os.close(r)
                try:
                    payload = pickle.dumps(("ok", fn()))
                    code = 0
                except BaseException:
                    payload = pickle.dumps(("error", traceback.format_exc()))
                with os.fdopen(w, "wb") as f:
                    f.write(payload)
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._r, self.reaped = pid, r, False

    def result(self) -> Any:
        """The child's return value (after reaping it); fails the test with its traceback."""
        with os.fdopen(self._r, "rb") as f:
            data = f.read()
        status = self.reap()
        kind, value = pickle.loads(data) if data else (
            "error", f"the child died silently (status {status})")
        if kind != "ok":
            pytest.fail(f"in child {self.pid}:\n{value}")
        assert os.waitstatus_to_exitcode(status) == 0
        return value

    def kill(self) -> None:
        """SIGKILL the child, reap it and check that the signal is what ended it."""
        os.kill(self.pid, signal.SIGKILL)
        status = self.reap()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        os.close(self._r)

    def reap(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        return status


def run_in_child(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child and return its (picklable) result."""
    return Child(fn).result()


def stop_group(proc: subprocess.Popen[Any], wait: float) -> int:
    """SIGTERM a server started as a process group leader (a graceful shutdown), SIGKILL its
    group if it outlives ``wait`` seconds, then SIGKILL the group again for workers a crash
    orphaned; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    if proc.poll() is None:  # never leave it behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers orphaned by a crash, if any
    return proc.returncode


def log_tail(log: IO[bytes], limit: int = 4000) -> str:
    """The last ``limit`` characters written to ``log`` (a server's output, for a failure)."""
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-limit:]
