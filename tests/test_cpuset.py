"""Tests for percpu._cpuset: the cpu list format, cgroup cpusets on fake trees, the vcpu bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from percpu._cpuset import (
    MAX_VCPUS_LIMIT,
    VCPU_HEADROOM_EXTRA,
    VCPU_HEADROOM_FACTOR,
    CpuBounds,
    allowed_cpus,
    cgroup_cpuset,
    default_max_vcpus,
    format_cpu_list,
    online_cpus,
    parse_cpu_list,
    possible_cpus,
    read_cpu_bounds,
)
from percpu._errors import InvalidArgument, PercpuError

ALL_FALLBACK = frozenset(range(os.cpu_count() or 1))

# --- helpers ---------------------------------------------------------------------------------


def mount_line(mount_id: int, root: str, mount_point: str, fs_type: str, options: str) -> str:
    """A mountinfo line, with an optional field, as the kernel writes it."""
    return (
        f"{mount_id} 23 0:{mount_id} {root} {mount_point} rw,nosuid,nodev,noexec,relatime "
        f"shared:{mount_id} - {fs_type} {fs_type} {options}"
    )


BASE_MOUNTS = [
    "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw",
    "23 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw",
]


def make_tree(
    tmp_path: Path,
    cgroup: list[str],
    mounts: list[str],
    files: dict[str, str] | None = None,
) -> Path:
    """A fake root: proc/self/cgroup, proc/self/mountinfo and *files* (paths under the root)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("".join(line + "\n" for line in cgroup))
    (tmp_path / "proc/self/mountinfo").write_text(
        "".join(line + "\n" for line in BASE_MOUNTS + mounts)
    )
    for rel, text in (files or {}).items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


V2_MOUNT = mount_line(30, "/", "/sys/fs/cgroup", "cgroup2", "rw,nsdelegate,memory_recursiveprot")
V1_CPUSET_MOUNT = mount_line(34, "/", "/sys/fs/cgroup/cpuset", "cgroup", "rw,cpuset")
V1_CPU_MOUNT = mount_line(32, "/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")


# --- parse / format --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
        ("", set()),
        ("\n", set()),
        ("5", {5}),
        ("0-0", {0}),
        ("2,1,1-2", {1, 2}),
        ("  0-1\n", {0, 1}),
    ],
)
def test_parse_cpu_list(text: str, expected: set[int]) -> None:
    assert parse_cpu_list(text) == frozenset(expected)


@pytest.mark.parametrize(
    "text",
    [
        "0-",
        "-1",
        "a",
        "1,,2",
        "1,",
        ",1",
        "3-1",
        "0 - 3",
        "1 2",
        "0x3",
        "+1",
        "1-2-3",
        "0-3:1/2",  # the kernel accepts strides on input but never writes them
        "\u0663",  # ARABIC-INDIC DIGIT THREE: int() would take it, the kernel never writes it
        "0-99999999",  # a corrupt file must not build a set of a hundred million ints
    ],
)
def test_parse_cpu_list_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cpu_list(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, PercpuError)


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ([], ""),
        ([0], "0"),
        ([0, 1], "0-1"),
        ([0, 1, 2, 5], "0-2,5"),
        ([11, 10, 8, 3, 2, 1, 0], "0-3,8,10-11"),
        ([3, 3, 1], "1,3"),
        (range(64), "0-63"),
    ],
)
def test_format_cpu_list(cpus: list[int], expected: str) -> None:
    assert format_cpu_list(cpus) == expected


def test_format_cpu_list_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-1"):
        format_cpu_list([0, -1])


@given(st.frozensets(st.integers(min_value=0, max_value=300)))
def test_format_then_parse_round_trips(cpus: frozenset[int]) -> None:
    text = format_cpu_list(cpus)
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(text + "\n") == cpus
    assert " " not in text


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=12))
def test_parse_then_format_is_canonical(ranges: list[tuple[int, int]]) -> None:
    """Any well-formed list (overlapping, unordered ranges) formats to the canonical text,
    which is a fixed point."""
    text = ",".join(f"{first}-{first + length}" for first, length in ranges)
    cpus = parse_cpu_list(text)
    assert cpus == {cpu for first, length in ranges for cpu in range(first, first + length + 1)}
    canonical = format_cpu_list(cpus)
    assert format_cpu_list(parse_cpu_list(canonical)) == canonical


# --- cgroup v2 -------------------------------------------------------------------------------


def test_v2_leaf_file(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/user.slice/app.service"],
        [V2_MOUNT],
        {
            "sys/fs/cgroup/cpuset.cpus.effective": "0-7\n",
            "sys/fs/cgroup/user.slice/cpuset.cpus.effective": "0-3\n",
            "sys/fs/cgroup/user.slice/app.service/cpuset.cpus.effective": "2-3\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({2, 3})


@pytest.mark.parametrize("leaf", [None, "", "\n"], ids=["missing", "empty", "newline"])
def test_v2_missing_or_empty_leaf_falls_back_to_parent(tmp_path: Path, leaf: str | None) -> None:
    files = {
        "sys/fs/cgroup/cpuset.cpus.effective": "0-7\n",
        "sys/fs/cgroup/a/cpuset.cpus.effective": "4-5\n",
        "sys/fs/cgroup/a/b/cgroup.procs": "",
    }
    if leaf is not None:
        files["sys/fs/cgroup/a/b/cpuset.cpus.effective"] = leaf
    root = make_tree(tmp_path, ["0::/a/b"], [V2_MOUNT], files)
    assert cgroup_cpuset(root) == frozenset({4, 5})


def test_v2_walks_up_to_the_mount_root(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/a/b/c"],
        [V2_MOUNT],
        {"sys/fs/cgroup/cpuset.cpus.effective": "1,3\n", "sys/fs/cgroup/a/b/c/x": ""},
    )
    assert cgroup_cpuset(root) == frozenset({1, 3})


def test_v2_never_reads_above_the_mount_point(tmp_path: Path) -> None:
    # A file above the mount point is not part of the hierarchy and must not be used.
    root = make_tree(
        tmp_path,
        ["0::/a"],
        [V2_MOUNT],
        {"sys/fs/cpuset.cpus.effective": "9\n", "sys/fs/cgroup/a/x": ""},
    )
    assert cgroup_cpuset(root) is None


def test_v2_without_cpuset_controller_is_none(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["0::/a"], [V2_MOUNT], {"sys/fs/cgroup/a/cgroup.procs": ""})
    assert cgroup_cpuset(root) is None


def test_v2_mount_root_is_the_cgroup_itself(tmp_path: Path) -> None:
    """A container without a cgroup namespace: /proc/self/cgroup shows the host path, and the
    container's /sys/fs/cgroup is a mount of that very cgroup (mountinfo root field)."""
    mount = mount_line(30, "/docker/abc", "/sys/fs/cgroup", "cgroup2", "rw")
    root = make_tree(
        tmp_path,
        ["0::/docker/abc"],
        [mount],
        {
            "sys/fs/cgroup/cpuset.cpus.effective": "6-7\n",
            # Where a mapping that ignored the mount root would look:
            "sys/fs/cgroup/docker/abc/cpuset.cpus.effective": "0\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({6, 7})


def test_v2_mount_root_is_an_ancestor(tmp_path: Path) -> None:
    mount = mount_line(30, "/docker", "/sys/fs/cgroup", "cgroup2", "rw")
    root = make_tree(
        tmp_path,
        ["0::/docker/abc/worker"],
        [mount],
        {
            "sys/fs/cgroup/cpuset.cpus.effective": "0-15\n",
            "sys/fs/cgroup/abc/cpuset.cpus.effective": "8-9\n",
            "sys/fs/cgroup/abc/worker/cgroup.procs": "",
        },
    )
    assert cgroup_cpuset(root) == frozenset({8, 9})


def test_v2_mount_that_does_not_show_the_cgroup_is_skipped(tmp_path: Path) -> None:
    other = mount_line(30, "/other", "/sys/fs/cgroup", "cgroup2", "rw")
    root = make_tree(
        tmp_path,
        ["0::/mine"],
        [other],
        {"sys/fs/cgroup/cpuset.cpus.effective": "3\n"},
    )
    assert cgroup_cpuset(root) is None
    # ...and a second mount that does show it is used.
    good = mount_line(31, "/", "/mnt/cg", "cgroup2", "rw")
    (root / "proc/self/mountinfo").write_text("\n".join([*BASE_MOUNTS, other, good]) + "\n")
    (root / "mnt/cg/mine").mkdir(parents=True)
    (root / "mnt/cg/mine/cpuset.cpus.effective").write_text("1\n")
    assert cgroup_cpuset(root) == frozenset({1})


def test_v2_cgroup_outside_the_namespace_is_none(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/../sibling"],
        [V2_MOUNT],
        {"sys/fs/cgroup/cpuset.cpus.effective": "0\n", "sys/fs/sibling/cpuset.cpus.effective": "1"},
    )
    assert cgroup_cpuset(root) is None


def test_mountinfo_octal_escapes(tmp_path: Path) -> None:
    mount = mount_line(30, "/", "/run/my\\040cgroup", "cgroup2", "rw")
    root = make_tree(
        tmp_path,
        ["0::/"],
        [mount],
        {"run/my cgroup/cpuset.cpus.effective": "2\n"},
    )
    assert cgroup_cpuset(root) == frozenset({2})


def test_non_utf8_mount_elsewhere_does_not_hide_the_cpuset(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path, ["0::/a"], [V2_MOUNT], {"sys/fs/cgroup/a/cpuset.cpus.effective": "1\n"}
    )
    with (root / "proc/self/mountinfo").open("ab") as mountinfo:
        mountinfo.write(b"99 22 8:1 / /media/caf\xe9 rw shared:99 - vfat /dev/sdb1 rw\n")
    assert cgroup_cpuset(root) == frozenset({1})


# --- cgroup v1 -------------------------------------------------------------------------------

V1_CGROUP = [
    "12:pids:/box",
    "4:cpu,cpuacct:/box",
    "3:cpuset:/box",
    "1:name=systemd:/box",
    "0::/box",
]


def test_v1_effective_cpus_first(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        V1_CGROUP,
        [V1_CPU_MOUNT, V1_CPUSET_MOUNT],
        {
            "sys/fs/cgroup/cpuset/box/cpuset.effective_cpus": "1\n",
            "sys/fs/cgroup/cpuset/box/cpuset.cpus": "0-3\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({1})


def test_v1_cpus_when_no_effective_file(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        V1_CGROUP,
        [V1_CPU_MOUNT, V1_CPUSET_MOUNT],
        {"sys/fs/cgroup/cpuset/box/cpuset.cpus": "0-3\n"},
    )
    assert cgroup_cpuset(root) == frozenset({0, 1, 2, 3})


def test_v1_empty_leaf_falls_back_to_parent(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["3:cpuset:/box/inner"],
        [V1_CPUSET_MOUNT],
        {
            "sys/fs/cgroup/cpuset/box/inner/cpuset.cpus": "\n",
            "sys/fs/cgroup/cpuset/box/cpuset.cpus": "2-3\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({2, 3})


def test_v1_controller_in_a_combined_hierarchy(tmp_path: Path) -> None:
    mount = mount_line(34, "/", "/sys/fs/cgroup/cpu,cpuset", "cgroup", "rw,cpu,cpuset")
    root = make_tree(
        tmp_path,
        ["3:cpu,cpuset:/box", "2:cpusetx:/elsewhere"],
        [mount],
        {"sys/fs/cgroup/cpu,cpuset/box/cpuset.cpus": "5\n"},
    )
    assert cgroup_cpuset(root) == frozenset({5})


def test_v1_mount_root_different_from_slash(tmp_path: Path) -> None:
    mount = mount_line(34, "/box", "/sys/fs/cgroup/cpuset", "cgroup", "rw,cpuset")
    root = make_tree(
        tmp_path,
        ["3:cpuset:/box/inner"],
        [mount],
        {
            "sys/fs/cgroup/cpuset/inner/cpuset.effective_cpus": "7\n",
            "sys/fs/cgroup/cpuset/box/inner/cpuset.effective_cpus": "0\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({7})


def test_v1_noprefix_mount(tmp_path: Path) -> None:
    mount = mount_line(34, "/", "/dev/cpuset", "cgroup", "rw,cpuset,noprefix")
    root = make_tree(tmp_path, ["3:cpuset:/fg"], [mount], {"dev/cpuset/fg/cpus": "0-1\n"})
    assert cgroup_cpuset(root) == frozenset({0, 1})


def test_hybrid_prefers_the_v1_cpuset_hierarchy(tmp_path: Path) -> None:
    unified = mount_line(41, "/", "/sys/fs/cgroup/unified", "cgroup2", "rw")
    root = make_tree(
        tmp_path,
        V1_CGROUP,
        [V1_CPUSET_MOUNT, unified],
        {
            "sys/fs/cgroup/cpuset/box/cpuset.effective_cpus": "1\n",
            "sys/fs/cgroup/unified/box/cpuset.cpus.effective": "0\n",
        },
    )
    assert cgroup_cpuset(root) == frozenset({1})


def test_v1_line_without_v1_mount_falls_back_to_v2(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        V1_CGROUP,
        [V2_MOUNT],
        {"sys/fs/cgroup/box/cpuset.cpus.effective": "3\n"},
    )
    assert cgroup_cpuset(root) == frozenset({3})


# --- no information / unreadable -------------------------------------------------------------


def test_no_cpuset_anywhere_is_none(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["4:memory:/box", "1:name=systemd:/box"],
        [V1_CPU_MOUNT],
        {"sys/fs/cgroup/cpu,cpuacct/box/cpuset.cpus": "0\n"},
    )
    assert cgroup_cpuset(root) is None


def test_no_proc_files_is_none(tmp_path: Path) -> None:
    assert cgroup_cpuset(tmp_path) is None


def test_no_cgroup_mount_is_none(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["0::/a"], [], {"sys/fs/cgroup/a/cpuset.cpus.effective": "0\n"})
    assert cgroup_cpuset(root) is None


def test_garbage_proc_files_are_none(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ["garbage", ""], ["not a mountinfo line", "- - -"])
    assert cgroup_cpuset(root) is None


def test_unreadable_file_is_none_not_parent(tmp_path: Path) -> None:
    # A directory where the file should be: reading raises IsADirectoryError (an OSError);
    # unlike a missing file, that is no reason to trust the parent.
    root = make_tree(
        tmp_path,
        ["0::/a"],
        [V2_MOUNT],
        {
            "sys/fs/cgroup/cpuset.cpus.effective": "0-3\n",
            "sys/fs/cgroup/a/cpuset.cpus.effective/x": "",
        },
    )
    assert cgroup_cpuset(root) is None


def test_malformed_file_is_none(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        ["0::/a"],
        [V2_MOUNT],
        {
            "sys/fs/cgroup/cpuset.cpus.effective": "0-3\n",
            "sys/fs/cgroup/a/cpuset.cpus.effective": "max\n",
        },
    )
    assert cgroup_cpuset(root) is None


# --- possible / online / allowed -------------------------------------------------------------


def test_possible_and_online_from_sysfs(tmp_path: Path) -> None:
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "possible").write_text("0-7\n")
    (cpu / "online").write_text("0-2,4\n")
    assert possible_cpus(tmp_path) == frozenset(range(8))
    assert online_cpus(tmp_path) == {0, 1, 2, 4}


@pytest.mark.parametrize("content", [None, "", "bogus\n"], ids=["missing", "empty", "bogus"])
def test_possible_and_online_fall_back_to_cpu_count(tmp_path: Path, content: str | None) -> None:
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    if content is not None:
        (cpu / "possible").write_text(content)
        (cpu / "online").write_text(content)
    assert possible_cpus(tmp_path) == ALL_FALLBACK
    assert online_cpus(tmp_path) == ALL_FALLBACK


def cpuset_tree(tmp_path: Path, cpus: str) -> Path:
    return make_tree(
        tmp_path, ["0::/a"], [V2_MOUNT], {"sys/fs/cgroup/a/cpuset.cpus.effective": cpus}
    )


def test_allowed_is_affinity_intersected_with_cpuset(tmp_path: Path) -> None:
    root = cpuset_tree(tmp_path, "2-4\n")
    assert allowed_cpus(root, affinity=[0, 1, 2, 3]) == {2, 3}


def test_allowed_disjoint_intersection_falls_back_to_affinity(tmp_path: Path) -> None:
    root = cpuset_tree(tmp_path, "8-9\n")
    assert allowed_cpus(root, affinity={0, 1}) == {0, 1}


def test_allowed_without_cpuset_is_affinity(tmp_path: Path) -> None:
    assert allowed_cpus(tmp_path, affinity=(5, 6)) == {5, 6}


def test_allowed_defaults_to_sched_getaffinity(tmp_path: Path) -> None:
    assert allowed_cpus(tmp_path) == frozenset(os.sched_getaffinity(0))


def test_allowed_rejects_empty_affinity(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="affinity"):
        allowed_cpus(tmp_path, affinity=[])


def test_read_cpu_bounds_on_fake_tree(tmp_path: Path) -> None:
    root = cpuset_tree(tmp_path, "1-3\n")
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "possible").write_text("0-7\n")
    (cpu / "online").write_text("0-3\n")
    bounds = read_cpu_bounds(root, affinity=[0, 1, 2])
    assert bounds == CpuBounds(
        possible=frozenset(range(8)),
        online=frozenset(range(4)),
        affinity=frozenset({0, 1, 2}),
        cgroup_cpuset=frozenset({1, 2, 3}),
        allowed=frozenset({1, 2}),
        default_max_vcpus=2 * VCPU_HEADROOM_FACTOR + VCPU_HEADROOM_EXTRA,
    )
    with pytest.raises(AttributeError):
        bounds.allowed = frozenset()  # type: ignore[misc]


def test_real_machine_is_consistent() -> None:
    bounds = read_cpu_bounds()
    assert bounds.allowed
    assert bounds.allowed <= bounds.possible
    assert bounds.online <= bounds.possible
    assert bounds.allowed <= bounds.affinity
    assert bounds.affinity == frozenset(os.sched_getaffinity(0))
    if bounds.cgroup_cpuset is not None:
        assert bounds.cgroup_cpuset <= bounds.possible
    assert bounds.default_max_vcpus == default_max_vcpus(len(bounds.allowed))
    assert allowed_cpus() == bounds.allowed


# --- the bound -------------------------------------------------------------------------------


def test_default_max_vcpus_formula() -> None:
    assert VCPU_HEADROOM_FACTOR == 2
    assert VCPU_HEADROOM_EXTRA == 1
    assert default_max_vcpus(1) == 3
    assert default_max_vcpus(2) == 5
    assert default_max_vcpus(64) == 129


@pytest.mark.parametrize("n", [0, -1, -4096])
def test_default_max_vcpus_rejects_below_one(n: int) -> None:
    with pytest.raises(ValueError, match=str(n)):
        default_max_vcpus(n)


def test_default_max_vcpus_is_capped() -> None:
    assert MAX_VCPUS_LIMIT == 4096
    assert default_max_vcpus(2047) == 4095
    assert default_max_vcpus(2048) == MAX_VCPUS_LIMIT
    assert default_max_vcpus(10**6) == MAX_VCPUS_LIMIT


@given(st.integers(min_value=1, max_value=100_000))
def test_default_max_vcpus_bounds(n: int) -> None:
    bound = default_max_vcpus(n)
    assert bound <= MAX_VCPUS_LIMIT
    assert bound >= min(n, MAX_VCPUS_LIMIT)
    assert bound >= default_max_vcpus(max(1, n - 1))
