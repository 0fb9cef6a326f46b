"""OS effects of the arena: page faults, memory locking, and the security of shared files.

Measurements that the test process's own noise would spoil (page faults) and changes that
must not touch the test process (resource limits, privileges, mlockall) run in a fresh
interpreter started with ``subprocess``; it imports everything it needs *before* it drops its
privileges, so it never needs to read the source tree as the unprivileged user.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import arena
from arena import Arena, ArenaError, BadArenaFile, memlock_limit
from arena._layout import (
    MAGIC,
    VERSION,
    W_GRANULE,
    W_MAGIC,
    W_NGRAN,
    W_TAGS,
    W_TOTAL,
    W_VERSION,
)
from arena._locks import SharedLock, is_locked, try_lock, unlock

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534  # uid and gid of "nobody"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown / drop privileges")


# Defined in every child: the memory this process has locked, in KiB (VmLck).
CHILD_PRELUDE = """
def vmlck():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
"""


def run_python(code: str, timeout: float = 120) -> Any:
    """Run ``code`` (after ``CHILD_PRELUDE``) in a fresh interpreter; return the JSON it
    prints on its last line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    source = CHILD_PRELUDE + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# Page faults


def test_a_million_operations_take_no_minor_page_fault() -> None:
    out = run_python("""
        import json, resource
        from arena import Arena
        a = Arena(1 << 20, block_size=64, lock="auto", prefault=True)
        sizes = [16, 64, 64, 100, 200, 640, 1000, 1024, 2000, 4096, 64 * 17, 8192]
        aligns = [None, None, None, None, 64, 256, 4096]
        ring = [None] * 256

        def run(pairs):
            alloc, free, ns, na = a.alloc, a.free, len(sizes), len(aligns)
            for i in range(pairs):
                k = (i * 7) & 255
                b = ring[k]
                if b is not None:
                    free(b)
                ring[k] = alloc(sizes[i % ns], aligns[i % na])

        run(50_000)  # warm-up: Python's own allocator settles (its pools exist afterwards)
        before = resource.getrusage(resource.RUSAGE_SELF)
        run(500_000)  # 500,000 allocations and 500,000 frees
        after = resource.getrusage(resource.RUSAGE_SELF)
        s = a.stats()
        print(json.dumps({"minor": after.ru_minflt - before.ru_minflt,
                          "major": after.ru_majflt - before.ru_majflt,
                          "allocations": s.allocations, "frees": s.frees,
                          "failed": s.failed_allocations, "prefaulted": s.prefaulted}))
    """)
    assert out["allocations"] == 550_000 and out["frees"] == 550_000 - 256
    assert out["failed"] == 0 and out["prefaulted"]
    assert (out["minor"], out["major"]) == (0, 0)


# ------------------------------------------------------------------------------------------
# Memory locking


LOW_MEMLOCK = """
    import json, os, resource, warnings
    import arena
    from arena import Arena, MemlockError

    LIMIT = 64 * 1024
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))
    if os.geteuid() == 0:  # root has CAP_IPC_LOCK, which ignores the limit: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    out = {"limit": arena.memlock_limit(), "uid": os.geteuid(), "vmlck0": vmlck()}
    path = os.path.join(WORKDIR, "locked")
    for where in ("anonymous", "file"):
        try:
            if where == "file":
                Arena.create(path, 1 << 20, lock="require")
            else:
                Arena(1 << 20, lock="require")
        except MemlockError as exc:
            out[where] = {"message": str(exc), "errno": exc.errno,
                          "arena_error": isinstance(exc, arena.ArenaError),
                          "os_error": isinstance(exc, OSError)}
    out["file_left_behind"] = os.path.exists(path)
    out["vmlck_after_refusals"] = vmlck()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = Arena(1 << 20, lock="auto")
        second = Arena(1 << 20, lock="auto")
        plain = Arena(1 << 20, lock=False)
    out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    b = first.alloc(1000)
    b.view[:] = b"x" * 1000
    first.free(b)
    out["auto_locked"] = [first.stats().locked, second.stats().locked]
    out["false_locked"] = plain.stats().locked
    out["vmlck_unlocked"] = vmlck()
    small = Arena(4096, lock="require")  # 16 KiB mapped: fits the limit
    out["small"] = [small.stats().locked, small.mapped_bytes, vmlck()]
    try:
        arena.mlockall()
    except OSError as exc:
        out["mlockall"] = str(exc)
    print(json.dumps(out))
"""


@as_root
def test_low_memlock_refuses_require_warns_once_on_auto_and_never_locks_false() -> None:
    workdir = tempfile.mkdtemp(dir="/dev/shm")
    try:
        os.chown(workdir, NOBODY, NOBODY)
        out = run_python(f"WORKDIR = {workdir!r}\n" + textwrap.dedent(LOW_MEMLOCK))
        assert os.listdir(workdir) == []  # the refused create removed its file
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    assert out["uid"] == NOBODY and out["limit"] == 64 * 1024 and out["vmlck0"] == 0
    for where in ("anonymous", "file"):
        err = out[where]
        assert err["arena_error"] and err["os_error"] and err["errno"] in (1, 11, 12)
        msg = err["message"]
        assert "RLIMIT_MEMLOCK" in msg
        assert "65536 bytes (64 KiB)" in msg  # the limit
        assert str(1 << 20) in msg  # the size asked (the heap) ...
        with Arena(1 << 20, lock=False) as same_size:
            assert str(same_size.mapped_bytes) in msg  # ... and what mlock was asked to lock
        assert "ulimit -l" in msg and "LimitMEMLOCK" in msg and "CAP_IPC_LOCK" in msg
    assert not out["file_left_behind"] and out["vmlck_after_refusals"] == 0
    # "auto" warns once per process, names the limit, and carries on unlocked.
    assert len(out["warnings"]) == 1
    category, message = out["warnings"][0]
    assert category == "RuntimeWarning" and "RLIMIT_MEMLOCK" in message
    assert "carrying on unlocked" in message
    assert out["auto_locked"] == [False, False] and out["false_locked"] is False
    assert out["vmlck_unlocked"] == 0
    locked, mapped, vmlck = out["small"]
    assert locked and vmlck * 1024 >= mapped
    assert "RLIMIT_MEMLOCK" in out["mlockall"]


def test_lock_false_does_not_lock_and_require_does() -> None:
    out = run_python("""
        import json
        from arena import Arena

        a = Arena(1 << 20, lock=False)
        out = {"false": [a.stats().locked, vmlck()]}
        try:
            b = Arena(1 << 20, lock="require")
            out["require"] = [b.stats().locked, vmlck(), b.mapped_bytes]
            b.close()
            out["after_close"] = vmlck()
        except OSError as exc:  # an unprivileged run with a small limit
            out["require"] = str(exc)
        print(json.dumps(out))
    """)
    assert out["false"] == [False, 0]
    if isinstance(out["require"], str):
        assert "RLIMIT_MEMLOCK" in out["require"]
        return
    locked, vmlck, mapped = out["require"]
    assert locked and vmlck * 1024 >= mapped
    assert out["after_close"] == 0  # unmapping unlocks


@as_root
def test_mlockall_and_munlockall() -> None:
    out = run_python("""
        import json
        import mmap
        import arena

        before = vmlck()
        arena.mlockall()
        locked = vmlck()
        # MCL_FUTURE: memory mapped later is locked too. A mapping of its own: a bytearray
        # may come from memory the allocator mapped before (3.13t's mimalloc reserves about
        # 1 GiB up front), which was locked already.
        later = mmap.mmap(-1, 8 << 20)
        grown = vmlck()
        arena.munlockall()
        print(json.dumps([before, locked, grown, vmlck()]))
    """)
    before, locked, grown, after = out
    assert before == 0 and locked > 0 and grown >= locked + 8 * 1024 and after == 0


def test_a_forked_child_locks_the_arena_again() -> None:
    out = run_python("""
        import json, os
        from arena import Arena

        try:
            a = Arena(1 << 20, lock="require")
        except OSError:
            print(json.dumps(None))  # an unprivileged run with a small limit
            raise SystemExit
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            s = a.stats()  # memory locks are not inherited across fork: the child relocks
            os.write(w, json.dumps([vmlck(), s.locked, s.minor_faults]).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        print(json.dumps([a.mapped_bytes, child]))
    """)
    if out is None:
        pytest.skip("RLIMIT_MEMLOCK too small to lock 1 MiB")
    mapped, (vmlck, locked, faults) = out
    assert locked and vmlck * 1024 >= mapped
    assert faults >= 0  # counted from the child's own start, not the parent's


def test_memlock_limit_is_the_soft_limit() -> None:
    import resource

    assert memlock_limit() == resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


# ------------------------------------------------------------------------------------------
# Shared files: creation


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = os.lstat(path)
    data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
    return data, st.st_mode, st.st_uid, st.st_size


def test_create_makes_a_0600_file_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        a = Arena.create(tmp_path / "a", 1 << 16, lock=False)
    finally:
        os.umask(old)
    with a:
        st = os.stat(tmp_path / "a")
        assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)
        assert st.st_uid == os.geteuid() and st.st_size == a.mapped_bytes
        assert a.path == str(tmp_path / "a") and a.shared and a.stats().shared


def test_create_refuses_an_existing_path_and_a_symlink(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_bytes(b"precious")
    os.chmod(existing, 0o600)
    target = tmp_path / "target"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(target)
    to_existing = tmp_path / "to-existing"
    to_existing.symlink_to(existing)
    before = {p: snapshot(p) for p in (existing, dangling, to_existing)}
    for path in (existing, dangling, to_existing):
        with pytest.raises(FileExistsError):
            Arena.create(path, 1 << 16, lock=False)
    assert {p: snapshot(p) for p in before} == before
    assert not target.exists()  # the symlink was not followed
    assert existing.read_bytes() == b"precious"


def test_create_refuses_bad_arguments_before_touching_the_path(tmp_path: Path) -> None:
    with pytest.raises(arena.InvalidArgument):
        Arena.create(tmp_path / "a", 0)
    with pytest.raises(arena.InvalidArgument):
        Arena.create(tmp_path / "a", 4096, lock="sometimes")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------
# Shared files: opening


@pytest.fixture
def arena_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "arena"
    a = Arena.create(path, 1 << 16, block_size=64, lock=False)
    b = a.alloc(1000)
    b.view[:] = b"z" * 1000
    a.keep(b)
    a.close()
    yield path


def test_open_maps_the_same_allocator(arena_file: Path) -> None:
    with Arena.open(arena_file, lock=False) as one, Arena.open(arena_file, lock=False) as two:
        assert one.stats().used_bytes == 1024 and one.heap[:1000].tobytes() == b"z" * 1000
        b = one.alloc(64)
        assert two.stats().used_bytes == 1024 + 64
        c = two.alloc(64)
        assert c.offset != b.offset
        assert one.block_at(c.offset).size == 64
        two.free(c)
        one.free(b)
        assert one.stats().used_bytes == two.stats().used_bytes == 1024
        assert one.check().ok


def open_refused(path: Path, needle: str) -> BadArenaFile:
    before = snapshot(path)
    with pytest.raises(BadArenaFile, match=needle) as info:
        Arena.open(path, lock=False)
    assert snapshot(path) == before, "a refused open changed the file"
    assert isinstance(info.value, ArenaError) and isinstance(info.value, OSError)
    return info.value


@as_root
def test_open_refuses_a_file_owned_by_another_user(arena_file: Path) -> None:
    os.chown(arena_file, NOBODY, NOBODY)
    open_refused(arena_file, "owned by uid 65534")


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_open_refuses_a_file_writable_by_others(arena_file: Path, mode: int) -> None:
    os.chmod(arena_file, mode)
    open_refused(arena_file, "writable by group or others")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400 | 0o200])
def test_open_accepts_a_private_or_readable_file(arena_file: Path, mode: int) -> None:
    os.chmod(arena_file, mode)
    Arena.open(arena_file, lock=False).close()


def test_open_refuses_what_is_not_a_regular_file(tmp_path: Path, arena_file: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(arena_file)
    open_refused(link, "symbolic link")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    open_refused(fifo, "not a regular file")  # and does not block on it
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    open_refused(directory, "not a regular file")
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        open_refused(sock_path, "not a regular file")
    if os.stat("/dev/null").st_uid == os.geteuid():
        with pytest.raises(BadArenaFile, match="not a regular file"):
            Arena.open("/dev/null", lock=False)
    with pytest.raises(FileNotFoundError):
        Arena.open(tmp_path / "missing", lock=False)


def test_open_refuses_a_truncated_file(arena_file: Path) -> None:
    size = arena_file.stat().st_size
    os.truncate(arena_file, size - 4096)
    open_refused(arena_file, "header says")
    os.truncate(arena_file, 100)
    open_refused(arena_file, "too small")
    os.truncate(arena_file, 0)
    open_refused(arena_file, "too small")


def poke(path: Path, word: int, value: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<Q", value), word * 8)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("word", "value", "needle"),
    [
        (W_MAGIC, 0, "magic"),
        (W_MAGIC, int.from_bytes(b"NOTARENA", "little"), "magic"),
        (W_VERSION, VERSION + 1, "version"),
        (W_GRANULE, 48, "block size"),
        (W_GRANULE, 1 << 30, "block size"),
        (W_NGRAN, 0, "granule count"),
        (W_NGRAN, 2**40, "granule count"),
        (W_NGRAN, 1 << 20, "do not match|header says"),
        (W_TOTAL, 1 << 40, "do not match"),
        (W_TAGS, 0, "do not match"),
    ],
)
def test_open_refuses_a_bad_header(arena_file: Path, word: int, value: int,
                                   needle: str) -> None:
    poke(arena_file, word, value)
    err = open_refused(arena_file, needle)
    assert str(arena_file) in str(err)


def test_open_after_a_refusal_of_a_repaired_file_works(arena_file: Path) -> None:
    poke(arena_file, W_MAGIC, 0)
    open_refused(arena_file, "magic")
    poke(arena_file, W_MAGIC, MAGIC)
    with Arena.open(arena_file, lock=False) as a:
        assert a.stats().used_bytes == 1024


# ------------------------------------------------------------------------------------------
# The lock (OFD byte-range lock plus a thread lock)


@pytest.fixture
def two_descriptions(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two open file descriptions of one file: what two processes of a shared arena hold."""
    path = tmp_path / "lockfile"
    path.write_bytes(b"\0" * 64)
    fds = (os.open(path, os.O_RDWR), os.open(path, os.O_RDWR))
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def test_shared_lock_excludes_another_description_and_is_reentrant(
        two_descriptions: tuple[int, int]) -> None:
    mine, theirs = two_descriptions
    lock = SharedLock(mine, 5)
    assert lock.acquire() is True  # outermost
    assert lock.held and is_locked(theirs, 5) and not try_lock(theirs, 5)
    assert not is_locked(theirs, 4) and try_lock(theirs, 6)  # one byte, nothing else
    unlock(theirs, 6)
    assert lock.acquire() is False  # re-entered: no second OFD lock
    lock.release()
    assert lock.held and is_locked(theirs, 5)  # still held by the outer level
    lock.release()
    assert not lock.held and not is_locked(theirs, 5)
    assert try_lock(theirs, 5)  # now the other description gets it
    assert is_locked(mine, 5)
    unlock(theirs, 5)


def test_shared_lock_left_free_when_taking_it_fails(two_descriptions: tuple[int, int]) -> None:
    """A failing fcntl (here a closed descriptor) or a failing on_acquire hook leaves neither
    the thread lock nor the OFD lock held, so the next caller is not stuck behind it."""
    mine, theirs = two_descriptions
    gone = os.dup(mine)
    os.close(gone)
    lock = SharedLock(gone, 5)
    with pytest.raises(OSError):
        lock.acquire()
    assert not lock.held
    taken: list[bool] = []
    worker = threading.Thread(target=lambda: taken.append(lock._mutex.acquire(timeout=5)))
    worker.start()
    worker.join()
    assert taken == [True]  # another thread gets the thread lock at once

    calls: list[int] = []

    def refuse() -> None:
        calls.append(1)
        raise BadArenaFile(117, "the repair hook refuses")

    hooked = SharedLock(mine, 7, on_acquire=refuse)
    with pytest.raises(BadArenaFile):
        hooked.acquire()
    assert calls == [1] and not hooked.held and not is_locked(theirs, 7)
    assert try_lock(theirs, 7)
    unlock(theirs, 7)
