"""Corrupt domain files: every mutated file is refused with the project's own error, or used
without damage (issue 14). Never an ``IndexError``/``KeyError``/``ValueError`` of the
runtime, never a hang, and never a silent change to a metric the operations did not touch.

A template domain is made once: counters, gauges, summaries, removed metrics still waiting
for a grace period (a second holder never acknowledges), filled caches, a dead holder. Each
case copies it, mutates 1 to 3 of the words that mean something (the root block's header,
lease records, chunk table and pending queue; the registry table, its key blocks and the
pageset entries: every non-zero word outside the counters' own pages), or truncates the file,
then runs open, snapshot, stats, check, an increment, a registration, a removal and a
snapshot again. ``PERCPU_FUZZ_CASES`` sets the number of cases (default 300),
``PERCPU_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import collections
import mmap
import os
import random
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import deadline, shm_dir

from arena import ArenaError
from percpu import Domain, MetricValue, PercpuError
from percpu._layout import (
    HEADER_WORDS,
    LEASE_WORDS,
    PENDING_WORDS,
    REG_SEGMENTS,
    RS_WORDS,
    chunk_table,
    pending_base,
    registry_base,
)

CASES = int(os.environ.get("PERCPU_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PERCPU_FUZZ_SEED", "14"))
CASE_SECONDS = 10  # a case that runs longer is a hang
MAX_VCPUS = 4
PROJECT_ERRORS = (PercpuError, ArenaError)
TOUCHED = {("m0", ()), ("g", (("i", "1"),))}  # the metrics the operations change



def _values(snap: list[MetricValue]) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {(m.name, m.labels): (m.kind, m.value, m.count) for m in snap}


def _make_template(path: str) -> list[int]:
    """The template domain file; the file offsets of its meaningful words."""
    Domain._background_quiescer = False
    try:
        d = Domain.create(path, 1 << 20, max_vcpus=MAX_VCPUS)
        other = Domain.open(path)
        other.vcpu_id()  # a holder that never acknowledges: removals stay pending
        for i in range(40):
            d.counter("m", {"i": str(i)}).add(i + 1)
        d.counter("m0").add(50)
        for i in range(6):
            d.gauge("g", {"i": str(i)}).add(-i)
            d.summary("s", {"i": str(i)}).observe(0.5 * i)
        for i in range(30, 36):
            d.remove("m", {"i": str(i)})
        dead = Domain.open(path)
        dead.counter("m", {"i": "1"}).inc()
        dead._abandon()  # its lease record keeps its pid; its cache keeps slots
        offsets = _meaningful_words(d)
        other._abandon()
        d._abandon()
    finally:
        Domain._background_quiescer = True
    return offsets


def _meaningful_words(d: Domain) -> list[int]:
    heap_base = d.arena._layout.heap_offset  # file offset of heap byte 0
    q = d.arena.heap.cast("Q")
    root = d._root_off // 8
    wanted = set(range(root, root + HEADER_WORDS + (MAX_VCPUS + 1) * LEASE_WORDS))
    wanted.update(range(root + chunk_table(MAX_VCPUS), root + chunk_table(MAX_VCPUS) + 4))
    pend = root + pending_base(MAX_VCPUS)
    wanted.update(range(pend, pend + (d._pending.count() + 2) * PENDING_WORDS))
    reg = root + registry_base(MAX_VCPUS)
    wanted.update(w for w in range(reg, reg + REG_SEGMENTS * RS_WORDS) if q[w])
    pages: set[int] = set()
    for ps in range(int(d._root[9])):  # D_PS_COUNT
        for _k, page in d._pagesets.id_pages(d._pagesets.entry(ps)):
            pages.update(range(page // 8, page // 8 + 512))
    root_end = root + len(d._root)
    for w in range(len(q)):
        if q[w] and w not in pages and not root <= w < root_end:
            wanted.add(w)
    q.release()
    return sorted(heap_base + 8 * w for w in wanted)


def _mutate(path: str, offsets: list[int], rng: random.Random) -> str:
    size = os.path.getsize(path)
    if rng.random() < 0.05:
        new = rng.choice([rng.randrange(size), size - 8, size // 2, 4096])
        os.truncate(path, new)
        return f"truncate to {new}"
    said = []
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        for _ in range(rng.randint(1, 3)):
            off = rng.choice(offsets)
            old = int.from_bytes(m[off : off + 8], "little")
            how = rng.randrange(7)
            if how == 0:
                new = old ^ (1 << rng.randrange(64))
            elif how == 1:
                new = 0
            elif how == 2:
                new = rng.choice([(1 << 64) - 1, 1 << 63, (1 << 63) - 1, 1 << 32])
            elif how == 3:
                new = rng.choice([1, 2, 3, 4, 5, 17, 255, 256, 1024, 4097, 5000, 65536])
            elif how == 4:
                other = rng.choice(offsets)  # a plausible word from elsewhere: an offset, a ref
                new = int.from_bytes(m[other : other + 8], "little")
            elif how == 5:
                new = (old + rng.choice([1, -1, 8, -8, 4096])) % (1 << 64)
            else:
                run = rng.randint(2, 64) * 8
                m[off : off + run] = bytes(min(run, size - off))[: len(m[off : off + run])]
                said.append(f"zero {run} bytes at {off}")
                continue
            m[off : off + 8] = new.to_bytes(8, "little")
            said.append(f"word at {off}: {old:#x} -> {new:#x}")
    return "; ".join(said)


def _run_case(path: str) -> list[str]:
    """Run the operations on a mutated file; the outcome of each ("ok", "refused: Error")."""
    outcomes: list[str] = []

    def step(name: str, op: Callable[[], object]) -> object:
        try:
            out = op()
        except PROJECT_ERRORS as exc:
            outcomes.append(f"{name}: refused ({type(exc).__name__})")
            return None
        outcomes.append(f"{name}: ok")
        return out

    d = step("open", lambda: Domain.open(path))
    if not isinstance(d, Domain):
        return outcomes
    try:
        before = step("snapshot", d.snapshot)
        step("stats", d.stats)
        step("check", d.check)
        step("inc", lambda: d.counter("m0").inc())
        step("gauge", lambda: d.gauge("g", {"i": "1"}).add(2))
        after = step("snapshot again", d.snapshot)
        if isinstance(before, list) and isinstance(after, list):
            b, a = _values(before), _values(after)
            changed = {k: (b[k], a[k]) for k in b.keys() & a.keys()
                       if b[k] != a[k] and k not in TOUCHED}
            assert not changed, f"values changed by operations on other metrics: {changed}"
        step("register", lambda: d.counter("fresh").add(3))
        step("remove", lambda: d.remove("m", {"i": "2"}))
        step("synchronize", lambda: d.synchronize(0.05))
        last = step("snapshot at the end", d.snapshot)
        if isinstance(before, list) and isinstance(last, list):
            b, a = _values(before), _values(last)
            gone = TOUCHED | {("fresh", ()), ("m", (("i", "2"),))}
            changed = {k: (b[k], a[k]) for k in b.keys() & a.keys()
                       if b[k] != a[k] and k not in gone}
            assert not changed, f"values changed by registering and removing: {changed}"
        step("check --reclaim", lambda: d.check(reclaim=True))
    finally:
        step("close", d.close)
    return outcomes


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(dir=shm_dir(), prefix="test_fuzz_domain-")
    yield d
    shutil.rmtree(d)


def test_mutated_domain_files_are_refused_or_used_without_damage(tmp: str) -> None:
    template = os.path.join(tmp, "template")
    offsets = _make_template(template)
    rng = random.Random(SEED)
    tally: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    for case in range(CASES):
        path = os.path.join(tmp, f"case{case}")
        shutil.copyfile(template, path)
        os.chmod(path, 0o600)
        what = _mutate(path, offsets, rng)
        try:
            with deadline(CASE_SECONDS):
                tally.update(_run_case(path))
        except BaseException as exc:  # classified below: every one is a failure (Hang too)
            failures.append(f"case {case} ({what}): {type(exc).__name__}: {exc}\n"
                            + "".join(traceback.format_exception(exc)[-3:]))
        finally:
            os.unlink(path)
    print(f"\n{CASES} mutated domain files (seed {SEED}):")
    for outcome, n in sorted(tally.items()):
        print(f"  {n:6d}  {outcome}")
    assert tally["open: ok"] > CASES // 4, "too few cases got past open: the fuzz is too coarse"
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:8])
