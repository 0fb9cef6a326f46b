"""A shared arena file is untrusted input (issue 14): mutated files are refused, never obeyed.

Each case copies one arena file (used blocks, free holes on several lists, blocks of a dead
owner, one kept block), mutates it (bit flips, huge words, zeroed runs, truncation, counts
and indexes pushed past their caps, several at once), then runs open, stats, alloc (plain and
aligned), free, block_at, check, check(reclaim=True) and the ``python -m arena check`` command
on it; every other case with this process's cache on (``cache_bytes``). Every outcome is
classified: an operation either works or raises an :class:`ArenaError`; anything else
(IndexError, ValueError, KeyError, a hang) fails the test. An operation refused with
:class:`BadArenaFile` must leave the file exactly as it found it (unless this process had
blocks cached: giving them back is the earlier frees' work, done block by block).

Seeded and deterministic. ``ARENA_FUZZ_CASES`` sets the number of cases (default 300);
``ARENA_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import deadline, shm_dir

from arena import Arena, ArenaError, BadArenaFile, Block
from arena import _cli as arena_cli
from arena._layout import (
    FL_COUNT,
    HEADER_WORDS,
    SL_COUNT,
    TAG_END,
    TAG_OWNER_SHIFT,
    TAG_USED,
    W_ALLOCS,
    W_FAILED,
    W_FL,
    W_FREES,
    W_HEADS,
    W_OP,
    W_RECOVERIES,
    W_SL,
    W_USED,
)

CASES = int(os.environ.get("ARENA_FUZZ_CASES", "300"))
SEED = int(os.environ.get("ARENA_FUZZ_SEED", "14"))
HEAP_BYTES = 1 << 16
GRANULE = 64
CASE_TIMEOUT = 10.0  # seconds: far above what a case takes; only a hang reaches it
DEAD_PID = (1 << 22) + 7  # above PID_MAX_LIMIT: never a live process



@dataclass(frozen=True)
class Base:
    """The arena file every case starts from, and what is known of it."""

    data: bytes
    n_granules: int
    tags_word: int  # word index of granule 0's tag
    heap_word: int
    used_offsets: tuple[int, ...]


@pytest.fixture(scope="module")
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(dir=shm_dir(), prefix="test_arena_fuzz-")
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def base(tmp: str) -> Base:
    path = os.path.join(tmp, "base")
    rng = random.Random(SEED)
    with Arena.create(path, HEAP_BYTES, block_size=GRANULE, lock=False, prefault=False) as a:
        blocks = [a.alloc(rng.choice((16, 64, 100, 300, 1000, 2000, 5000))) for _ in range(40)]
        for b in blocks[::3]:  # holes of several sizes, so several lists are in use
            a.free(b)
        a.stats()  # drains the quick lists: the holes are in the file's lists
        live = [b for b in blocks if not b.freed]
        a.keep(live[0])
        for b in live[1:5]:  # blocks of a dead process, for check to find
            a._core.set_owner(b.offset // GRANULE, DEAD_PID)
        offsets = tuple(b.offset for b in live)
        layout = a._layout
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return Base(data, layout.n_granules, layout.tags_offset // 8, layout.heap_offset // 8,
                offsets)


# -- mutations ------------------------------------------------------------------------------


def _put(buf: bytearray, word: int, value: int) -> None:
    if word >= 0 and (word + 1) * 8 <= len(buf):
        buf[word * 8 : word * 8 + 8] = (value & (2**64 - 1)).to_bytes(8, "little")


def _word_in(rng: random.Random, b: Base) -> int:
    region = rng.random()
    if region < 0.35:
        return rng.randrange(HEADER_WORDS)
    if region < 0.8:
        return b.tags_word + rng.randrange(b.n_granules)
    return b.heap_word + rng.randrange(b.n_granules) * (GRANULE // 8)  # free links live here


def _huge(rng: random.Random, b: Base) -> int:
    return rng.choice((2**64 - 1, 2**63, 2**63 | 1, 2**32 - 1, 2**32, 2**32 + 1, b.n_granules,
                       b.n_granules + 1, b.n_granules - 1, rng.getrandbits(64),
                       rng.getrandbits(32), TAG_USED | rng.getrandbits(32),
                       TAG_END | rng.randrange(1, b.n_granules + 2),
                       rng.getrandbits(32) << 32 | 0xFFFFFFFF))


def _mutate(rng: random.Random, b: Base, buf: bytearray) -> str:
    kind = rng.choice(("flip", "flip", "huge", "huge", "zeros", "truncate", "caps", "caps",
                       "tag", "link"))
    if kind == "flip":
        word = _word_in(rng, b)
        pos = word * 8 + rng.randrange(8)
        if pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
    elif kind == "huge":
        _put(buf, _word_in(rng, b), _huge(rng, b))
    elif kind == "zeros":
        start = _word_in(rng, b) * 8
        n = max(0, min(rng.choice((8, 16, 64, 512, 4096)), len(buf) - start))
        buf[start : start + n] = bytes(n)
    elif kind == "truncate":
        del buf[rng.randrange(len(buf)) :]
    elif kind == "caps":  # counts and indexes just past what they may hold
        word, value = rng.choice((
            (W_USED, b.n_granules + rng.randrange(1, 3)), (W_USED, 0),
            (W_USED, 2**64 - 1), (W_FL, 1 << rng.randrange(FL_COUNT, 64)),
            (W_FL, 2**64 - 1), (W_SL + rng.randrange(FL_COUNT), 1 << rng.randrange(SL_COUNT, 64)),
            (W_SL + rng.randrange(FL_COUNT), 2**64 - 1),
            (W_HEADS + rng.randrange(FL_COUNT * SL_COUNT), b.n_granules + rng.randrange(3)),
            (W_HEADS + rng.randrange(FL_COUNT * SL_COUNT), rng.randrange(b.n_granules)),
            (W_ALLOCS, 2**64 - 1), (W_FREES, 2**64 - 1), (W_FAILED, 2**64 - 1),
            (W_RECOVERIES, 2**64 - 1), (W_OP, rng.choice((1, 2**64 - 1, os.getpid()))),
        ))
        _put(buf, word, value)
    elif kind == "tag":  # a tag's size, flags or owner pushed out of range
        g = rng.randrange(b.n_granules)
        old = int.from_bytes(buf[(b.tags_word + g) * 8 : (b.tags_word + g) * 8 + 8], "little")
        new = rng.choice((old & ~0xFFFFFFFF | (b.n_granules + 1), old ^ TAG_USED, old ^ TAG_END,
                          old | (2**30 - 1) << TAG_OWNER_SHIFT, old & ~0xFFFFFFFF,
                          old + rng.randrange(1, 5), max(old - rng.randrange(1, 5), 0)))
        _put(buf, b.tags_word + g, new)
    else:  # a free-list link pointing somewhere else
        g = rng.randrange(b.n_granules)
        target = rng.choice((rng.randrange(b.n_granules), b.n_granules, 0xFFFFFFFE, g))
        word = b.heap_word + g * (GRANULE // 8)
        old = int.from_bytes(buf[word * 8 : word * 8 + 8], "little")
        _put(buf, word, (old & ~0xFFFFFFFF | target) if rng.random() < 0.5
             else (old & 0xFFFFFFFF | target << 32))
    return kind


# -- running one case -------------------------------------------------------------------------


def _file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _alloc_into(a: Arena, got: list[Block], size: int, align: int | None) -> None:
    got.append(a.alloc(size, align))


def _free_at(a: Arena, offset: int) -> None:
    a.free(a.block_at(offset))


def run_case(path: str, b: Base, rng: random.Random, cache: bool) -> list[str]:
    """Every operation of one case; returns its outcomes, raises on a forbidden one."""
    outcomes: list[str] = []
    opened: list[Arena] = []

    def step(name: str, op: Callable[[], object]) -> bool:
        before = _file(path)
        pending = bool(opened) and opened[0]._cached_count() > 0
        try:
            op()
        except BadArenaFile:
            assert pending or _file(path) == before, f"{name} refused the file but changed it"
            outcomes.append(f"{name}: refused")
            return False
        except ArenaError as exc:
            outcomes.append(f"{name}: {type(exc).__name__}")
            return True
        outcomes.append(f"{name}: ok")
        return True

    if not step("open", lambda: opened.append(Arena.open(
            path, lock=False, prefault=False, cache_bytes=(1 << 14) if cache else None))):
        return outcomes
    with opened[0] as a:
        step("stats", a.stats)
        got: list[Block] = []
        for size, align in ((64, None), (1000, None), (5000, None), (64, 4096), (3000, 256)):
            step(f"alloc {size}", functools.partial(_alloc_into, a, got, size, align))
        for blk in got:
            step("free", functools.partial(a.free, blk))
        for offset in rng.sample(b.used_offsets, 3):
            step("block_at+free", functools.partial(_free_at, a, offset))
        step("check", a.check)
        step("check --repair", lambda: a.check(reclaim=True))
        step("stats again", a.stats)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = arena_cli.main(["check", path], out=io.StringIO())
    lines = err.getvalue().splitlines()
    assert status in (0, 1) or (status == 2 and len(lines) == 1), (status, err.getvalue())
    outcomes.append(f"cli check: {status}")
    return outcomes


def test_mutated_arena_files_are_refused_or_work(tmp: str, base: Base) -> None:
    rng = random.Random(SEED)
    path = os.path.join(tmp, "case")
    seen: Counter[str] = Counter()
    failures: list[str] = []
    for case in range(CASES):
        buf = bytearray(base.data)
        kinds = [_mutate(rng, base, buf) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        with open(path, "wb") as f:
            f.write(buf)
        os.chmod(path, 0o600)
        try:
            with deadline(CASE_TIMEOUT):
                outcomes = run_case(path, base, random.Random(case), cache=case % 2 == 1)
        except Exception as exc:  # every other outcome is a failure; collect them all
            failures.append(f"case {case} (mutations {kinds}): {type(exc).__name__}: "
                            f"{str(exc)[:200]}")
            seen["failed"] += 1
        else:
            seen["refused at open" if outcomes[0] == "open: refused" else
                 "refused later" if any("refused" in o for o in outcomes) else
                 "all ops ran"] += 1
        os.unlink(path)
    print(dict(seen))
    assert not failures, f"{len(failures)} of {CASES} cases (seed {SEED}):\n" + "\n".join(
        failures[:30])
    assert seen["refused at open"] and seen["refused later"] and seen["all ops ran"]
