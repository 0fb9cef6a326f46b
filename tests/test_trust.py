"""The shared file as untrusted input: clean refusals (issue 14, the parts done so far)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from conftest import shm_dir

from arena import Arena, ArenaExists
from percpu import BadDomainFile, Domain, DomainExists


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(dir=shm_dir(), prefix="test_trust-")
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("what", ["file", "symlink", "dangling symlink", "directory"])
def test_create_over_a_taken_path_is_refused_and_changes_nothing(tmp: str, what: str) -> None:
    path = os.path.join(tmp, "domain")
    target = os.path.join(tmp, "target")
    if what == "file":
        with open(path, "wb") as f:
            f.write(b"precious")
    elif what == "directory":
        os.mkdir(path)
    else:
        if what == "symlink":
            with open(target, "wb") as f:
                f.write(b"precious")
        os.symlink(target, path)
    before = sorted(os.listdir(tmp))
    with pytest.raises(DomainExists) as domain_error:
        Domain.create(path, 1 << 20, max_vcpus=2)
    assert isinstance(domain_error.value, FileExistsError)
    assert "already exists" in str(domain_error.value)
    with pytest.raises(ArenaExists) as arena_error:
        Arena.create(path, 1 << 20)
    assert isinstance(arena_error.value, FileExistsError)
    assert sorted(os.listdir(tmp)) == before
    if what in ("file", "symlink"):
        with open(target if what == "symlink" else path, "rb") as f:
            assert f.read() == b"precious"


def test_a_refused_file_says_its_errno_once(tmp: str) -> None:
    path = os.path.join(tmp, "garbage")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"not a domain" * 1000)
    os.close(fd)
    with pytest.raises(BadDomainFile) as refused:
        Domain.open(path)
    assert str(refused.value).count("[Errno") == 1, str(refused.value)


def test_the_cli_refuses_a_damaged_registry_in_one_line(tmp: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """A registry entry whose key points outside the arena (a damaged file): ``check`` and
    ``stats --json`` print one line and exit 2, no traceback."""
    from percpu import _cli
    from percpu._layout import E_HASH, E_KEY, ENTRY_WORDS

    path = os.path.join(tmp, "domain")
    d = Domain.create(path, 1 << 20, max_vcpus=2)
    d.counter("c").inc()
    from percpu._names import encode_key
    from percpu._registry import key_hash

    t = d._registry.table(key_hash(encode_key("c")) >> 56)
    (idx,) = [i for i in range(len(t) // ENTRY_WORDS) if t[i * ENTRY_WORDS + E_HASH] > 1]
    t[idx * ENTRY_WORDS + E_KEY] = 1 << 40  # far outside the arena
    t.release()
    d.close()
    capsys.readouterr()
    assert _cli.main(["check", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the arena" in err[0], err


def test_a_pending_count_above_its_cap_is_refused_on_open(tmp: str) -> None:
    """The issue's case: a pending count pushed past its cap (5000 > 4096) passed open, and
    the first inc() then zeroed a live counter. Now open refuses the file; nothing changes."""
    from percpu._layout import D_PENDING, PENDING_CAP

    path = os.path.join(tmp, "domain")
    d = Domain.create(path, 1 << 20, max_vcpus=2)
    d.counter("live").add(50)
    d._root[D_PENDING] = PENDING_CAP + 904
    d._abandon()  # as a holder that died: nothing more is written
    with pytest.raises(BadDomainFile) as refused:
        Domain.open(path)
    assert "pending" in str(refused.value)
    with open(path, "rb") as f:
        image = f.read()
    with pytest.raises(BadDomainFile):
        Domain.open(path)
    with open(path, "rb") as f:
        assert f.read() == image  # the refusal wrote nothing
