"""The CPUs this process may run on, and the bound on vcpu ids derived from them.

The runtime hands out compact *vcpu ids* (leases, lowest free first) to the processes sharing a
domain. **Invariant:** an id in use is always below ``max_vcpus``, and ``max_vcpus`` never
exceeds :data:`MAX_VCPUS_LIMIT`. This module computes the default for ``max_vcpus``; everything
here is a pure function of files under a ``root`` directory (``/`` by default), so tests build a
fake ``/proc`` and ``/sys`` under a temporary directory.

Choices made:

* **Which CPUs count.** The sizing follows "min(threads, affinity, cpuset)": the *allowed* set is
  the scheduler affinity (``os.sched_getaffinity(0)``) intersected with the cgroup cpuset when
  one is found. The kernel already confines a task's affinity to its cpuset, so the intersection
  usually changes nothing; it matters when an affinity is passed in, or when the cpuset was
  narrowed after the affinity was read. An empty intersection (a stale or inconsistent view) is
  never returned: the affinity wins, since the process demonstrably runs there.
* **possible vs online.** ``possible`` (``/sys/devices/system/cpu/possible``) never changes while
  the system runs and is the bound to size memory for; ``online`` can change with hotplug and is
  only a hint for preallocation. Both fall back to ``range(os.cpu_count())``.
* **cgroup v1 before v2.** On a hybrid system the cpuset controller lives on exactly one
  hierarchy: when ``/proc/self/cgroup`` names a v1 hierarchy carrying ``cpuset`` that one is
  used, otherwise (or when no v1 cpuset mount shows the cgroup) the unified line ``0::/path``.
* **Mapping a cgroup path to a directory.** ``/proc/self/mountinfo`` gives each cgroup mount's
  root inside the hierarchy (field 4). The directory of cgroup path ``P`` is the mount point plus
  ``P`` relative to that root; a mount whose root is not an ancestor of ``P`` cannot show ``P``
  and is skipped. Containers commonly mount their own cgroup as the root of ``/sys/fs/cgroup``.
* **Walking up.** A cgroup whose cpuset file is missing (controller not enabled there) or empty
  inherits its parent's CPUs, so the search walks towards the mount point. A parent's CPUs
  include the child's, so this can only over-estimate, which is the safe direction for a bound.
* **Unreadable means unknown.** A cpuset file that exists but cannot be read or parsed gives
  ``None`` (no cpuset information), never an exception: the bound then rests on the affinity.
* **Headroom.** Pre-fork servers run more workers than CPUs (gunicorn advises ``2 x cores + 1``),
  so the default is ``allowed * VCPU_HEADROOM_FACTOR + VCPU_HEADROOM_EXTRA``, capped at
  :data:`MAX_VCPUS_LIMIT`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from percpu._errors import InvalidArgument

__all__ = [
    "MAX_VCPUS_LIMIT",
    "VCPU_HEADROOM_EXTRA",
    "VCPU_HEADROOM_FACTOR",
    "CpuBounds",
    "allowed_cpus",
    "cgroup_cpuset",
    "default_max_vcpus",
    "format_cpu_list",
    "online_cpus",
    "parse_cpu_list",
    "possible_cpus",
    "read_cpu_bounds",
]

# Headroom for pre-fork servers, which run more worker processes than there are CPUs: gunicorn's
# documentation recommends (2 x $num_cores) + 1 workers. Each worker holds a vcpu id, so the
# default bound follows the same formula.
VCPU_HEADROOM_FACTOR = 2
VCPU_HEADROOM_EXTRA = 1

#: Hard cap on ``max_vcpus``. Each vcpu id owns a slot in every per-cpu page of a domain, so the
#: cap bounds a domain's memory whatever the machine reports. 4096 covers the headroom formula up
#: to 2047 allowed CPUs; larger machines get 4096 ids, fewer than ``2 x cores + 1``.
MAX_VCPUS_LIMIT = 4096

# Largest CPU number accepted by :func:`parse_cpu_list`. Linux's NR_CPUS tops out at 8192 on the
# architectures it supports; the margin is wide, the point is that a corrupt file cannot make us
# build a set of a billion integers.
_CPU_NUMBER_LIMIT = 1 << 16

_ITEM = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)

_SYS_CPU = Path("sys/devices/system/cpu")


# --- the kernel's cpu list format ------------------------------------------------------------


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse the kernel's cpu list format, e.g. ``"0-3,8,10-11\\n"``.

    Surrounding whitespace (the trailing newline of a sysfs file) is ignored and an empty text
    is the empty set. Items are a number or an ascending ``first-last`` range, separated by
    single commas, without inner spaces.

    Raises:
        InvalidArgument: (a ``ValueError``) when *text* is malformed; the message quotes it.
    """
    body = text.strip()
    if not body:
        return frozenset()
    cpus: set[int] = set()
    for item in body.split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise InvalidArgument(f"malformed cpu list {text!r}: bad item {item!r}")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise InvalidArgument(f"malformed cpu list {text!r}: descending range {item!r}")
        if last >= _CPU_NUMBER_LIMIT:
            raise InvalidArgument(
                f"malformed cpu list {text!r}: cpu {last} is not below {_CPU_NUMBER_LIMIT}"
            )
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Write *cpus* in the kernel's cpu list format, with runs as ranges: ``{0,1,2,5}`` gives
    ``"0-2,5"``. The empty set gives ``""``. :func:`parse_cpu_list` reads the result back.

    Raises:
        InvalidArgument: (a ``ValueError``) for a negative cpu number.
    """
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise InvalidArgument(f"cpu numbers must be >= 0, got {ordered[0]}")
    parts: list[str] = []
    for first, last in _runs(ordered):
        parts.append(str(first) if first == last else f"{first}-{last}")
    return ",".join(parts)


def _runs(ordered: list[int]) -> Iterator[tuple[int, int]]:
    """Yield ``(first, last)`` for each run of consecutive numbers in sorted, distinct *ordered*."""
    if not ordered:
        return
    first = last = ordered[0]
    for cpu in ordered[1:]:
        if cpu != last + 1:
            yield first, last
            first = cpu
        last = cpu
    yield first, last


# --- cgroup cpuset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    """One line of ``/proc/self/mountinfo``, the fields we use."""

    root: str
    mount_point: str
    fs_type: str
    super_options: frozenset[str]


def _unescape_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash...)."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo(text: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts of a mountinfo text; malformed lines are skipped."""
    mounts: list[_Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fs_type = fields[sep + 1]
        if fs_type not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            _Mount(
                root=_unescape_mountinfo(fields[3]),
                mount_point=_unescape_mountinfo(fields[4]),
                fs_type=fs_type,
                super_options=frozenset(fields[sep + 3].split(",")),
            )
        )
    return mounts


def _relative_to_mount(cgroup_path: str, mount_root: str) -> str | None:
    """*cgroup_path* relative to a mount of the hierarchy at *mount_root*, or None when that
    mount does not show the cgroup. Both are absolute paths inside the hierarchy."""
    if ".." in cgroup_path.split("/"):
        # A cgroup outside this process's cgroup namespace ("/../sibling"): not reachable here.
        return None
    root = mount_root.rstrip("/")
    path = cgroup_path.rstrip("/")
    if path == root:
        return ""
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return None


def _read_first_cpu_file(
    directory: Path, mount_dir: Path, names: tuple[str, ...]
) -> frozenset[int] | None:
    """Walk from *directory* up to *mount_dir* (inclusive); in each, the first of *names* that
    exists and is not empty gives the answer. A file that exists but cannot be read or parsed
    gives None, and so does reaching the mount point without an answer."""
    current = directory
    while True:
        for name in names:
            try:
                text = (current / name).read_text(encoding="ascii")
            except (FileNotFoundError, NotADirectoryError):
                continue
            except (OSError, UnicodeDecodeError):
                return None
            if not text.strip():
                continue
            try:
                return parse_cpu_list(text)
            except ValueError:
                return None
        if current == mount_dir or current.parent == current:
            return None
        current = current.parent


def cgroup_cpuset(root: Path = Path("/")) -> frozenset[int] | None:
    """The CPUs the cgroup cpuset of this process allows, or None when unknown.

    Reads ``root/proc/self/cgroup`` and ``root/proc/self/mountinfo``, then the cpuset files of
    the process's cgroup under *root*: ``cpuset.cpus.effective`` for cgroup v2;
    ``cpuset.effective_cpus`` then ``cpuset.cpus`` for cgroup v1 (without the ``cpuset.``
    prefix on a ``noprefix`` mount). A missing or empty file defers to the parent cgroup, up to
    the mount point. None when there is no cpuset hierarchy or mount, or a file is unreadable or
    malformed.
    """
    try:
        cgroup_text = (root / "proc/self/cgroup").read_text(
            encoding="utf-8", errors="surrogateescape"
        )
        mountinfo_text = (root / "proc/self/mountinfo").read_text(
            encoding="utf-8", errors="surrogateescape"
        )
    except OSError:
        return None

    v1_path: str | None = None
    v2_path: str | None = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpuset" in controllers.split(","):
            v1_path = path

    mounts = _parse_mountinfo(mountinfo_text)
    hierarchies: list[tuple[str, list[_Mount]]] = []
    if v1_path is not None:
        v1_mounts = [m for m in mounts if m.fs_type == "cgroup" and "cpuset" in m.super_options]
        hierarchies.append((v1_path, v1_mounts))
    if v2_path is not None:
        hierarchies.append((v2_path, [m for m in mounts if m.fs_type == "cgroup2"]))

    # The first mount that shows the cgroup decides, even if its answer is None (unreadable):
    # a hierarchy is only skipped when no mount of it shows the cgroup.
    for cgroup_path, candidates in hierarchies:
        for mount in candidates:
            relative = _relative_to_mount(cgroup_path, mount.root)
            if relative is None:
                continue
            mount_dir = root / mount.mount_point.lstrip("/")
            directory = mount_dir / relative if relative else mount_dir
            if mount.fs_type == "cgroup2":
                names: tuple[str, ...] = ("cpuset.cpus.effective",)
            elif "noprefix" in mount.super_options:
                names = ("effective_cpus", "cpus")
            else:
                names = ("cpuset.effective_cpus", "cpuset.cpus")
            return _read_first_cpu_file(directory, mount_dir, names)
    return None


# --- sysfs masks and the affinity ------------------------------------------------------------


def _all_cpus_fallback() -> frozenset[int]:
    """``range(os.cpu_count())``, at least CPU 0."""
    return frozenset(range(os.cpu_count() or 1))


def _read_sys_mask(root: Path, name: str) -> frozenset[int]:
    """``root/sys/devices/system/cpu/<name>`` parsed, or the os.cpu_count() fallback when the
    file is missing, unreadable, malformed or empty."""
    try:
        cpus = parse_cpu_list((root / _SYS_CPU / name).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return _all_cpus_fallback()
    return cpus or _all_cpus_fallback()


def possible_cpus(root: Path = Path("/")) -> frozenset[int]:
    """The CPUs that can ever be online (``sys/devices/system/cpu/possible``): fixed at boot,
    the bound to size memory by. Falls back to ``range(os.cpu_count())``."""
    return _read_sys_mask(root, "possible")


def online_cpus(root: Path = Path("/")) -> frozenset[int]:
    """The CPUs online now (``sys/devices/system/cpu/online``): changes with hotplug, a hint for
    preallocation only. Falls back to ``range(os.cpu_count())``."""
    return _read_sys_mask(root, "online")


def _current_affinity(root: Path) -> frozenset[int]:
    """``os.sched_getaffinity(0)``, or the possible CPUs where the platform lacks it."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return possible_cpus(root)
    return frozenset(getaffinity(0))


def allowed_cpus(root: Path = Path("/"), affinity: Iterable[int] | None = None) -> frozenset[int]:
    """The CPUs this process may run on: the affinity (``os.sched_getaffinity(0)`` unless
    *affinity* is given) intersected with the cgroup cpuset when there is one. Never empty: an
    empty intersection gives the affinity.

    Raises:
        InvalidArgument: (a ``ValueError``) when the given *affinity* is empty.
    """
    allowed, _ = _allowed_and_cpuset(root, affinity)
    return allowed


def _resolve_affinity(root: Path, affinity: Iterable[int] | None) -> frozenset[int]:
    """The given *affinity* as a non-empty frozenset, or the current one."""
    if affinity is None:
        return _current_affinity(root)
    cpus = frozenset(affinity)
    if not cpus:
        raise InvalidArgument("affinity must name at least one cpu, got an empty set")
    return cpus


def _allowed_and_cpuset(
    root: Path, affinity: Iterable[int] | None
) -> tuple[frozenset[int], frozenset[int] | None]:
    """``(allowed, cpuset)`` for :func:`allowed_cpus` and :func:`read_cpu_bounds`."""
    cpus = _resolve_affinity(root, affinity)
    cpuset = cgroup_cpuset(root)
    if cpuset is None:
        return cpus, None
    return (cpus & cpuset) or cpus, cpuset


# --- the bound -------------------------------------------------------------------------------


def default_max_vcpus(n_allowed: int) -> int:
    """The default ``max_vcpus`` for *n_allowed* usable CPUs:
    ``n_allowed * VCPU_HEADROOM_FACTOR + VCPU_HEADROOM_EXTRA``, capped at
    :data:`MAX_VCPUS_LIMIT`.

    Raises:
        InvalidArgument: (a ``ValueError``) when *n_allowed* is below 1.
    """
    if n_allowed < 1:
        raise InvalidArgument(f"n_allowed must be >= 1, got {n_allowed!r}")
    return min(n_allowed * VCPU_HEADROOM_FACTOR + VCPU_HEADROOM_EXTRA, MAX_VCPUS_LIMIT)


@dataclass(frozen=True)
class CpuBounds:
    """Everything :func:`read_cpu_bounds` found, for diagnostics and sizing.

    Attributes:
        possible: CPUs that can ever be online (fixed bound).
        online: CPUs online when read (hint).
        affinity: the scheduler affinity used.
        cgroup_cpuset: the cgroup cpuset, or None when there is none or it is unreadable.
        allowed: ``affinity & cgroup_cpuset`` (the affinity when that is empty or unknown).
        default_max_vcpus: :func:`default_max_vcpus` of ``len(allowed)``.
    """

    possible: frozenset[int]
    online: frozenset[int]
    affinity: frozenset[int]
    cgroup_cpuset: frozenset[int] | None
    allowed: frozenset[int]
    default_max_vcpus: int


def read_cpu_bounds(root: Path = Path("/"), affinity: Iterable[int] | None = None) -> CpuBounds:
    """Read every mask under *root* once and derive the default vcpu bound from them.

    *affinity*, when given, replaces ``os.sched_getaffinity(0)`` (it must not be empty).
    """
    cpus = _resolve_affinity(root, affinity)
    allowed, cpuset = _allowed_and_cpuset(root, cpus)
    return CpuBounds(
        possible=possible_cpus(root),
        online=online_cpus(root),
        affinity=cpus,
        cgroup_cpuset=cpuset,
        allowed=allowed,
        default_max_vcpus=default_max_vcpus(len(allowed)),
    )
