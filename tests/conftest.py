"""Fixtures shared by the domain tests (counters, compaction)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from percpu import Domain


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
