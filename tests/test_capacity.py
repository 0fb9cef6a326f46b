"""Admission and capacity: a domain filled to ``DomainFull`` still lets every id count into
every metric that exists, the arena is really full when ``DomainFull`` comes, and
``Domain.size_for`` sizes a domain that holds its workload.

The process tests fork real holders (``_children.Child``): they open the domain file, count
into every metric and wait, all alive at once, so that they hold distinct ids (the last one
shares the overflow id). No assertion depends on timing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest
from _children import Child
from conftest import shm_dir

from percpu import BadDomainFile, Domain, DomainFull, InvalidArgument
from percpu._layout import PAGE

FILLED_SIZE = 300 * 1024  # the issue's domain: a few hundred counters fill it
MAX_VCPUS = 4


@pytest.fixture
def path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(dir=shm_dir(), prefix="test_capacity-")
    try:
        yield os.path.join(tmp, "domain")
    finally:
        shutil.rmtree(tmp)


def fill(d: Domain, kinds: str = "cgs") -> list[tuple[str, str]]:
    """Register metrics (cycling through counters, gauges and summaries, each counted once)
    and raw objects until DomainFull; the (kind, name) of every metric registered."""
    made: list[tuple[str, str]] = []
    with pytest.raises(DomainFull):
        for i in range(1 << 20):
            kind = kinds[i % len(kinds)]
            name = f"m{i}"
            if kind == "c":
                d.counter(name).inc()
            elif kind == "g":
                d.gauge(name).inc()
            elif kind == "s":
                d.summary(name).observe(1.0)
            made.append((kind, name))
            if i % 7 == 0:
                d.alloc(4)  # raw objects take pagesets (of their own class) too
    return made


def count_all(made: list[tuple[str, str]], d: Domain) -> None:
    for kind, name in made:
        if kind == "c":
            d.counter(name).inc()
        elif kind == "g":
            d.gauge(name).inc()
        else:
            d.summary(name).observe(1.0)


def holders_count_into(path: str, made: list[tuple[str, str]], n: int) -> list[int]:
    """``n`` forked holders, alive together, each opening ``path`` and counting once into
    every metric of ``made``; the ids they held. A DomainFull (or anything else) raised in
    a holder fails the test with its traceback."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def holder() -> int:
        os.close(go_w)
        d = Domain.open(path)
        count_all(made, d)
        vcpu = d.vcpu_id()
        os.write(ready_w, b".")
        os.read(go_r, 1)  # EOF once the parent let go: every holder is alive until then
        d.close()
        return vcpu

    children = [Child(holder) for _ in range(n)]
    os.close(ready_w)
    try:
        got = b""
        while len(got) < n:
            chunk = os.read(ready_r, n)
            if not chunk:
                break  # a holder failed before it was ready: its result says why
            got += chunk
    finally:
        os.close(go_w)
        os.close(ready_r)
    ids = [c.result() for c in children]
    os.close(go_r)
    return ids


def test_a_filled_domain_lets_max_vcpus_new_holders_count_into_every_metric(path: str
                                                                             ) -> None:
    # Issue 14: 3 of 4 new workers got DomainFull from d.counter("m0") in a full domain.
    d = Domain.create(path, FILLED_SIZE, max_vcpus=MAX_VCPUS)
    try:
        made = fill(d)
        assert len(made) > 100
        ids = holders_count_into(path, made, MAX_VCPUS)  # ids 1..3 and the overflow id
        assert sorted(ids) == [1, 2, 3, MAX_VCPUS]
        for kind, name in made:  # the filler once, each of the holders once
            if kind == "c":
                assert d.counter(name).value == 1 + MAX_VCPUS
            elif kind == "g":
                assert d.gauge(name).value == 1 + MAX_VCPUS
            else:
                assert d.summary(name).value == (1 + MAX_VCPUS, 1.0 + MAX_VCPUS)
        assert d.check().ok
    finally:
        d.close()


def test_counters_only_the_issues_figures(path: str) -> None:
    d = Domain.create(path, FILLED_SIZE, max_vcpus=MAX_VCPUS)
    try:
        made = fill(d, "c")
        ids = holders_count_into(path, made, MAX_VCPUS)
        assert sorted(ids) == [1, 2, 3, MAX_VCPUS]
        assert [d.counter(name).value for _k, name in made] == [5] * len(made)
    finally:
        d.close()


def test_domain_full_comes_at_registration_and_changes_nothing() -> None:
    with Domain(FILLED_SIZE, max_vcpus=MAX_VCPUS) as d:
        made = fill(d, "c")
        before = d.stats()
        for _ in range(3):
            with pytest.raises(DomainFull, match=r"reserves 5 pages|no room"):
                d.counter("one_more").inc()
        after = d.stats()
        assert (after.metrics, after.pagesets, after.pages, after.reserved_pages) == (
            before.metrics, before.pagesets, before.pages, before.reserved_pages)
        assert after.arena_used_bytes == before.arena_used_bytes
        assert d.counter(made[0][1]).value == 1  # what exists is still counted into


def test_stats_show_the_reserve_and_the_headroom() -> None:
    ids = MAX_VCPUS + 1
    with Domain(1 << 20, max_vcpus=MAX_VCPUS) as d:
        s = d.stats()
        assert (s.reserved_pages, s.reserve_shortfall, s.free_slots) == (0, 0, 0)
        assert s.pageset_reserve_bytes == ids * PAGE
        d.counter("a").inc()  # one pageset: this holder's page, and the others reserved
        s = d.stats()
        assert (s.pagesets, s.pages, s.reserved_pages, s.reserve_shortfall) == (1, 1, ids - 1, 0)
        assert s.free_slots == 256 - 1 - 7  # 16-byte slots: one registered, seven cached
        d.histogram("b").observe(2.0)  # a second class: another pageset, reserved in full
        s = d.stats()
        assert (s.pagesets, s.pages, s.reserved_pages) == (2, 2, 2 * (ids - 1))
        assert 0 < s.arena_in_use == s.arena_used_bytes / (1 << 20) < 1
        # The reserve is in use for the arena: what is free is free beyond it.
        assert s.arena_used_bytes >= (s.pages + s.reserved_pages) * PAGE


def test_other_ids_take_their_pages_from_the_reserve(path: str) -> None:
    with Domain.create(path, 1 << 20, max_vcpus=MAX_VCPUS) as d:
        made = [("c", f"c{i}") for i in range(400)]  # two pagesets of counters (256 a page)
        count_all(made, d)
        s = d.stats()
        assert (s.pagesets, s.pages, s.reserved_pages) == (2, 2, 2 * MAX_VCPUS)
        used = s.arena_used_bytes
        holders_count_into(path, made, MAX_VCPUS)
        s = d.stats()
        assert (s.pages, s.reserved_pages, s.reserve_shortfall) == (2 * (MAX_VCPUS + 1), 0, 0)
        assert s.arena_used_bytes == used  # the pages were there already


def test_compaction_gives_an_emptied_pagesets_reserve_back() -> None:
    with Domain(1 << 20, max_vcpus=MAX_VCPUS) as d:
        for i in range(600):
            d.counter(f"c{i}").inc()
        before = d.stats()
        for i in range(600):
            d.remove(f"c{i}")
        assert d.synchronize(5.0)
        d.compact()
        s = d.stats()
        assert s.pagesets < before.pagesets
        assert s.reserve_shortfall == 0
        assert s.reserved_pages + s.pages < before.reserved_pages + before.pages
        assert s.arena_used_bytes < before.arena_used_bytes


def test_a_damaged_reserve_word_is_refused() -> None:
    from percpu._layout import D_RESERVE  # (not at the top: the file runs on older code too)

    with Domain(1 << 20, max_vcpus=MAX_VCPUS) as d:
        d.counter("a").inc()
        root = d._root
        for bad in (root[D_RESERVE] + PAGE, 3, root[D_RESERVE] ^ 1 << 40):
            saved = root[D_RESERVE]
            root[D_RESERVE] = bad
            with pytest.raises(BadDomainFile):
                d.stats()
            root[D_RESERVE] = saved
        d._bytes[saved - 1 + 8] ^= 1  # the first reserved page's count word
        with pytest.raises(BadDomainFile):
            d.stats()


def _distinct_label_sets(d: Domain) -> int:
    n = 0
    with pytest.raises(DomainFull):
        while True:
            d.counter("requests_total", {"path": f"/api/v1/item/{n}"}).inc()
            n += 1
    return n


@pytest.mark.parametrize(("size", "max_vcpus"), [(16 << 20, 4), (8 << 20, 32)])
def test_domain_full_comes_only_when_the_arena_is_80_percent_used(size: int,
                                                                  max_vcpus: int) -> None:
    # Issue 14: distinct label sets failed at 65,536 in 16 MiB with 46% free. With 4 ids the
    # registry is what fills the arena; with 32, the reserved pages.
    with Domain(size, max_vcpus=max_vcpus) as d:
        n = _distinct_label_sets(d)
        a = d.arena.stats()  # reserved pages are arena blocks: counted as used
        assert d.stats().metrics == n
        assert a.used_bytes / a.size >= 0.80, (n, a)


SIZED: list[tuple[int, int, int, int | None]] = [
    # (counters and gauges, summaries, max_vcpus, names)
    (20_000, 0, MAX_VCPUS, 1),
    (3_000, 1_000, MAX_VCPUS, None),
    (2_000, 0, 16, 40),
]


@pytest.mark.parametrize(("metrics", "summaries", "max_vcpus", "names"), SIZED)
def test_a_domain_sized_by_size_for_holds_its_workload(path: str, metrics: int, summaries: int,
                                                       max_vcpus: int, names: int | None
                                                       ) -> None:
    size = Domain.size_for(metrics, max_vcpus=max_vcpus, summaries=summaries, names=names)
    groups = names or metrics + summaries
    # One kind a name: the name's group decides it.
    made = [("c" if i % groups % 2 else "g", f"name_{i % groups}") for i in range(metrics)]
    labels: Callable[[int], dict[str, str]] = lambda i: {"path": f"/a/b/c/{i:06d}"}  # noqa: E731
    with Domain.create(path, size, max_vcpus=max_vcpus) as d:
        for i, (kind, name) in enumerate(made):
            (d.counter if kind == "c" else d.gauge)(name, labels(i)).inc()
        for i in range(summaries):
            d.summary(f"name_{(metrics + i) % groups}_s", labels(i)).observe(1.0)
        assert d.stats().metrics == metrics + summaries
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def holder() -> int:
            os.close(go_w)
            h = Domain.open(path)
            for i, (kind, name) in enumerate(made):
                (h.counter if kind == "c" else h.gauge)(name, labels(i)).inc()
            for i in range(summaries):
                h.summary(f"name_{(metrics + i) % groups}_s", labels(i)).observe(1.0)
            os.write(ready_w, b".")
            os.read(go_r, 1)
            vcpu = h.vcpu_id()
            h.close()
            return vcpu

        children = [Child(holder) for _ in range(max_vcpus - 1)]  # with us: every id
        os.close(ready_w)
        for _ in children:
            if not os.read(ready_r, 1):
                break
        os.close(go_w)
        os.close(ready_r)
        assert sorted(c.result() for c in children) == list(range(1, max_vcpus))
        os.close(go_r)
        kind, name = made[1]
        assert (d.counter if kind == "c" else d.gauge)(name, labels(1)).value == max_vcpus
        assert d.stats().reserve_shortfall == 0


def test_size_for_is_arithmetic_that_grows_with_the_workload() -> None:
    base = Domain.size_for(1000, max_vcpus=4)
    assert base % PAGE == 0
    assert Domain.size_for(2000, max_vcpus=4) > base
    assert Domain.size_for(1000, max_vcpus=8) > base
    assert Domain.size_for(1000, max_vcpus=4, names=1) < base
    assert Domain.size_for(1000, max_vcpus=4, key_bytes=200) > base
    assert Domain.size_for(1000, max_vcpus=4, summaries=1000) > base
    assert Domain.size_for(0, max_vcpus=4) > 0
    with pytest.raises(InvalidArgument):
        Domain.size_for(-1)
    with pytest.raises(InvalidArgument):
        Domain.size_for(10, max_vcpus=0)
