"""Tests for percpu.rseq: reading glibc's per-thread struct rseq.

Tests marked ``needs_rseq`` run only where the struct can be read (x86-64, glibc >= 2.35, rseq
registered); the others run everywhere, on fake data, and check the decoding and the fallbacks.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from percpu import rseq
from percpu._cpuset import parse_cpu_list

_REASON = rseq._unavailable_reason()
needs_rseq = pytest.mark.skipif(_REASON is not None, reason=f"rseq unavailable: {_REASON}")
needs_sched_getcpu = pytest.mark.skipif(
    rseq._sched_getcpu is None, reason="libc has no sched_getcpu"
)


@pytest.fixture
def restore_affinity() -> Iterator[frozenset[int]]:
    """The calling thread's affinity, restored after the test."""
    saved = frozenset(os.sched_getaffinity(0))
    try:
        yield saved
    finally:
        os.sched_setaffinity(0, saved)


def pin(cpu: int) -> None:
    """Pin the calling thread to *cpu*; the kernel migrates it before the call returns."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # a sandbox may forbid it
        pytest.skip(f"sched_setaffinity refused: {exc}")


def some_cpus(affinity: frozenset[int], n: int) -> list[int]:
    """Up to *n* CPUs of *affinity*, spread out (first, last, ...)."""
    ordered = sorted(affinity)
    picked = [ordered[0], ordered[-1], *ordered[1:-1]]
    return list(dict.fromkeys(picked))[:n]


def node_of(cpu: int) -> int | None:
    """The NUMA node sysfs gives for *cpu*, or None where sysfs does not say."""
    links = list(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    return int(links[0].name[4:]) if len(links) == 1 else None


# --- on this machine -------------------------------------------------------------------------


@needs_rseq
def test_read_gives_a_cpu_of_the_affinity() -> None:
    info = rseq.read()
    assert info is not None
    assert info.cpu_id in os.sched_getaffinity(0)
    assert rseq.available()


@needs_rseq
def test_pinning_moves_cpu_id(restore_affinity: frozenset[int]) -> None:
    for cpu in some_cpus(restore_affinity, 4):
        pin(cpu)
        info = rseq.read()
        assert info is not None
        assert info.cpu_id == cpu
        assert rseq.current_cpu() == cpu
        if rseq._sched_getcpu is not None:
            assert rseq._sched_getcpu() == cpu


@needs_rseq
def test_node_id_matches_sysfs(restore_affinity: frozenset[int]) -> None:
    cpu = min(restore_affinity)
    pin(cpu)
    info = rseq.read()
    assert info is not None
    if not rseq._HAS_NODE_ID:
        assert info.node_id is None
        pytest.skip("this kernel does not fill node_id")
    assert info.node_id is not None
    expected = node_of(cpu)
    if expected is not None:
        assert info.node_id == expected
    online = Path("/sys/devices/system/node/online")
    if online.exists():
        assert info.node_id in parse_cpu_list(online.read_text())


@needs_rseq
def test_mm_cid_is_small() -> None:
    info = rseq.read()
    assert info is not None
    if not rseq._HAS_MM_CID:
        assert info.mm_cid is None
        pytest.skip("this kernel does not fill mm_cid")
    assert info.mm_cid is not None
    assert 0 <= info.mm_cid < (os.cpu_count() or 1)


@needs_rseq
def test_each_thread_reads_its_own_struct(restore_affinity: frozenset[int]) -> None:
    cpus = some_cpus(restore_affinity, 3)
    main_cpu, *others = cpus * 3  # repeat when the affinity has fewer than 3 CPUs
    pin(main_cpu)
    main_area = rseq._area()
    assert main_area is not None
    barrier = threading.Barrier(3, timeout=10)
    results: dict[int, tuple[int, int | None, int | None, int | None]] = {}
    errors: list[BaseException] = []

    def worker(index: int, cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
            barrier.wait()  # all threads alive together: distinct structs must be in use
            info = rseq.read()
            area = rseq._area()
            results[index] = (
                cpu,
                None if info is None else info.cpu_id,
                None if area is None else ctypes.addressof(area),
                rseq.current_cpu(),
            )
            barrier.wait()
        except BaseException as exc:  # reported by the main thread, never a hang
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, others[i])) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
        barrier.wait()
    finally:
        for thread in threads:
            thread.join()
    assert not errors

    main_info = rseq.read()
    assert main_info is not None
    assert main_info.cpu_id == main_cpu  # the workers' pinning did not move the main thread
    addresses = {ctypes.addressof(main_area)}
    for pinned, cpu_id, address, current in results.values():
        assert cpu_id == pinned
        assert current == pinned
        assert address is not None
        addresses.add(address)
    assert len(addresses) == 3


@needs_rseq
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_reads_its_struct(restore_affinity: frozenset[int]) -> None:
    assert rseq.read() is not None  # the parent's thread-local view exists before the fork
    cpu = max(restore_affinity)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running pytest's teardown
        code = 1
        try:
            os.close(read_fd)
            os.sched_setaffinity(0, {cpu})
            info = rseq.read()
            os.write(write_fd, repr(None if info is None else info.cpu_id).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        reported = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reported == repr(cpu)


# --- everywhere: fallbacks and decoding ------------------------------------------------------


@needs_sched_getcpu
def test_missing_symbol_degrades_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rseq, "_rseq_offset", None)
    assert rseq.read() is None
    assert not rseq.available()
    assert rseq._unavailable_reason() is not None
    cpu = rseq.current_cpu()  # from libc's sched_getcpu
    assert cpu is not None
    assert cpu in os.sched_getaffinity(0)


def test_missing_pthread_self_degrades_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rseq, "_pthread_self", None)
    assert rseq.read() is None
    assert not rseq.available()


def test_current_cpu_without_any_source_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rseq, "_rseq_offset", None)
    monkeypatch.setattr(rseq, "_sched_getcpu", None)
    assert rseq.current_cpu() is None


def test_sched_getcpu_failure_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rseq, "_rseq_offset", None)
    monkeypatch.setattr(rseq, "_sched_getcpu", lambda: -1)
    assert rseq.current_cpu() is None


def install_fake_area(
    monkeypatch: pytest.MonkeyPatch, words: list[int]
) -> ctypes.Array[ctypes.c_uint32]:
    """Make this thread's view point at a ctypes array we own, holding *words*."""
    area = rseq._Area(*words)
    local = threading.local()
    local.area = area
    monkeypatch.setattr(rseq, "_STATIC_REASON", None)
    monkeypatch.setattr(rseq, "_rseq_offset", 32)
    monkeypatch.setattr(rseq, "_pthread_self", lambda: 0)
    monkeypatch.setattr(rseq, "_local", local)
    return area


def test_decodes_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # cpu_id_start, cpu_id, rseq_cs (2 words), flags, node_id, mm_cid
    area = install_fake_area(monkeypatch, [3, 3, 0xDEAD, 0xBEEF, 0, 1, 2])
    monkeypatch.setattr(rseq, "_HAS_NODE_ID", True)
    monkeypatch.setattr(rseq, "_HAS_MM_CID", True)
    assert rseq.read() == rseq.RseqInfo(cpu_id=3, node_id=1, mm_cid=2)
    assert rseq.current_cpu() == 3
    assert rseq._unavailable_reason() is None
    area[1] = 5  # the view is live: the next read sees the kernel's update
    assert rseq.current_cpu() == 5


def test_old_kernel_leaves_node_and_cid_out(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_area(monkeypatch, [3, 3, 0, 0, 0, 0, 0])
    monkeypatch.setattr(rseq, "_HAS_NODE_ID", False)
    monkeypatch.setattr(rseq, "_HAS_MM_CID", False)
    assert rseq.read() == rseq.RseqInfo(cpu_id=3, node_id=None, mm_cid=None)


@pytest.mark.parametrize(
    "sentinel", [rseq.RSEQ_CPU_ID_UNINITIALIZED, rseq.RSEQ_CPU_ID_REGISTRATION_FAILED]
)
def test_unregistered_struct_reads_none(monkeypatch: pytest.MonkeyPatch, sentinel: int) -> None:
    install_fake_area(monkeypatch, [0, sentinel, 0, 0, 0, 0, 0])
    assert rseq.read() is None
    assert not rseq.available()
    assert rseq._unavailable_reason() is not None
    monkeypatch.setattr(rseq, "_sched_getcpu", lambda: 7)
    assert rseq.current_cpu() == 7  # falls back rather than returning the sentinel


def test_null_thread_pointer_is_never_dereferenced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rseq, "_STATIC_REASON", None)
    monkeypatch.setattr(rseq, "_rseq_offset", 32)
    monkeypatch.setattr(rseq, "_pthread_self", lambda: 0)
    monkeypatch.setattr(rseq, "_local", threading.local())
    assert rseq.read() is None


def test_rseq_info_is_frozen() -> None:
    info = rseq.RseqInfo(cpu_id=0, node_id=None, mm_cid=None)
    with pytest.raises(AttributeError):
        info.cpu_id = 1  # type: ignore[misc]


def test_the_sentinels() -> None:
    assert ctypes.c_uint32(-1).value == rseq.RSEQ_CPU_ID_UNINITIALIZED
    assert ctypes.c_uint32(-2).value == rseq.RSEQ_CPU_ID_REGISTRATION_FAILED
    assert rseq.AT_RSEQ_FEATURE_SIZE == 27


@pytest.mark.parametrize(
    ("machine", "pointer_size", "expected"),
    [("x86_64", 8, True), ("x86_64", 4, False), ("aarch64", 8, False), ("i686", 4, False)],
)
def test_only_x86_64_is_supported(machine: str, pointer_size: int, expected: bool) -> None:
    assert rseq._thread_pointer_is_pthread_self(machine, pointer_size) is expected


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v782", (6, 18)),
        ("5.15.0-91-generic", (5, 15)),
        ("6.1.0-18-amd64", (6, 1)),
        ("weird", None),
    ],
)
def test_kernel_version(release: str, expected: tuple[int, int] | None) -> None:
    assert rseq._kernel_version(release) == expected


def test_kernel_feature_size() -> None:
    asked: list[int] = []

    def auxv(value: int) -> object:
        def getauxval(key: int) -> int:
            asked.append(key)
            return value

        return getauxval

    assert rseq._kernel_feature_size(auxv(28), "4.19.0") == 28  # type: ignore[arg-type]
    assert asked == [rseq.AT_RSEQ_FEATURE_SIZE]
    assert rseq._kernel_feature_size(auxv(33), "7.0.0") == 33  # type: ignore[arg-type]
    assert rseq._kernel_feature_size(auxv(0), "6.18.0") == 20  # type: ignore[arg-type]
    assert rseq._kernel_feature_size(None, "6.3.0") == 28
    assert rseq._kernel_feature_size(None, "6.2.16") == 20
    assert rseq._kernel_feature_size(None, "5.15.0-91-generic") == 20
    assert rseq._kernel_feature_size(None, "weird") == 20


def test_the_module_state_is_consistent() -> None:
    """Whatever the machine: either a reason is given, or a read works."""
    reason = rseq._unavailable_reason()
    assert (reason is None) == rseq.available()
    if reason is None:
        assert rseq._rseq_offset is not None
        assert rseq._rseq_size >= 20
