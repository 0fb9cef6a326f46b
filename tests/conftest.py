"""Fixtures shared by the domain tests (counters, compaction)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from types import FrameType
from typing import Any, ClassVar

import pytest
from hypothesis.stateful import RuleBasedStateMachine

from percpu import Domain


class Hang(Exception):
    """A test body ran past its :func:`deadline` (a loop that never ends, an endless wait)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the body (from SIGALRM: main thread only) when it runs past
    ``seconds``, instead of hanging the suite."""

    def ring(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def shm_dir() -> str:
    """Where shared test files go: /dev/shm (tmpfs, as a deployment) when writable."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


@pytest.fixture
def no_quiescer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grace periods run only when a test calls for them (no background quiescer thread)."""
    monkeypatch.setattr(Domain, "_background_quiescer", False)


@pytest.fixture
def shared(no_quiescer: None, request: pytest.FixtureRequest
           ) -> Iterator[tuple[str, list[Domain]]]:
    """A shared domain file (the test module's ``SIZE`` bytes, max_vcpus=2) and the list of
    holders opened on it; every holder in the list is closed and the file removed after."""
    prefix = request.module.__name__.rpartition(".")[2] + "-"
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix=prefix)
    path = os.path.join(tmp, "domain")
    holders = [Domain.create(path, request.module.SIZE, max_vcpus=2)]
    try:
        yield path, holders
    finally:
        for d in holders:
            d.close()
        shutil.rmtree(tmp)


class SharedDomainMachine(RuleBasedStateMachine):
    """Base of the state machines over one shared domain file (counters, compaction).

    It turns the background quiescer off (every grace period runs when a rule calls for it)
    and makes a temporary directory with the file's ``path``. A subclass fills ``holders``
    (objects with a ``dom``) and creates the file in an ``@initialize`` rule; ``teardown``
    closes every holder's domain, turns the quiescer back on and removes the directory.
    """

    tmp_prefix = "domain_sm-"
    holders: list[Any]
    #: Every temporary directory a machine made in this process (the tests that check they
    #: are all removed look at these only: another test session may be running beside).
    made: ClassVar[list[str]] = []

    def __init__(self) -> None:
        super().__init__()
        self._saved = Domain.__dict__.get("_background_quiescer", True)
        Domain._background_quiescer = False
        self.tmp = tempfile.mkdtemp(dir=shm_dir(), prefix=self.tmp_prefix)
        SharedDomainMachine.made.append(self.tmp)
        self.path = os.path.join(self.tmp, "domain")
        self.holders = []

    def teardown(self) -> None:
        try:
            for h in self.holders:
                h.dom.close()
        finally:
            Domain._background_quiescer = self._saved
            shutil.rmtree(self.tmp, ignore_errors=True)
