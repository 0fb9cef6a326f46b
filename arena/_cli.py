"""``python -m arena stats|check PATH``: look at and verify a shared arena file.

Design note: like ``python -m percpu``, the tool is an observer. It maps the file without
locking or prefaulting it and allocates nothing; ``check --repair`` (which frees blocks whose
owner died) is the only thing that writes. The error wording for a file that cannot be opened
lives here, in :func:`open_error`, and ``percpu._cli`` uses it too.

Exit statuses: 0 done (``check``: consistent); 1 ``check`` found problems it did not repair;
2 the command could not run (one line on stderr says why and what to do).

Wiring: ``arena/__main__.py`` runs its demonstration by default; it hands ``stats`` and
``check`` to :func:`main` (``if argv and argv[0] in COMMANDS: return _cli.main(argv)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NoReturn

from ._arena import Arena
from ._errors import ArenaError

PROG = "python -m arena"
COMMANDS = ("stats", "check")
EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A command cannot run; the message is one line for stderr (exit status 2)."""


def owner_hint(path: str) -> str:
    """``"; it belongs to NAME (uid N): run this as that user ..."`` when another user owns
    ``path``; empty otherwise."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if st.st_uid == os.geteuid():
        return ""
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return f"; it belongs to {name} (uid {st.st_uid}): run this as that user (sudo -u {name} ...)"


def error_line(exc: BaseException) -> str:
    """An error as one line: an OSError's own text once (not ``[Errno 22] ...``), whitespace
    folded."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(str(text).split())


def open_error(path: str, exc: OSError, what: str, maker: str) -> str:
    """One line saying why ``path`` could not be opened as ``what`` (made by ``maker``)."""
    if isinstance(exc, FileNotFoundError):
        return (f"{path}: no such file (a {what} file is made by {maker}; is the service "
                "running, is the path right?)")
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, not a {what} file"
    if isinstance(exc, PermissionError):
        return (f"{path}: permission denied (the tool needs read and write access, as the "
                f"service has){owner_hint(path)}")
    reason = re.sub(r"^\[Errno \d+\] ", "", exc.strerror or str(exc))
    if reason.startswith(path + ": "):
        reason = reason[len(path) + 2:]
    if not isinstance(exc, ArenaError) and not type(exc).__module__.startswith("percpu"):
        return f"{path}: cannot open: {reason}"
    hint = owner_hint(path) if "owned by" in reason else ""
    if "writable by group or others" in reason:
        hint = f"; if you trust it, `chmod 600 {path}`"
    return f"{path}: not usable as a {what}: {reason}{hint}"


@contextmanager
def open_arena(path: str) -> Iterator[Arena]:
    """Open ``path`` as an observer (no memlock, no prefault); close it after."""
    try:
        a = Arena.open(path, lock=False, prefault=False)
    except OSError as exc:
        raise CliError(open_error(path, exc, "shared arena", "arena.Arena.create(path, size)")
                       ) from None
    try:
        yield a
    finally:
        a.close()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    with open_arena(args.path) as a:
        s = a.stats()
        mapped, root = a.mapped_bytes, a.root_offset
    if args.json:
        data = _jsonable(s)
        for own in ("minor_faults", "major_faults"):  # this tool's own faults: noise
            data.pop(own, None)
        data.update(mapped_bytes=mapped, root_offset=root)
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    layer = "none" if root is None else f"a root block at offset {root} (e.g. a percpu domain)"
    out.write(
        f"arena {args.path}: heap {s.size:,} B in blocks of {s.block_size} B, "
        f"{mapped:,} B mapped; layer above: {layer}\n"
        f"used {s.used_bytes:,} B, free {s.free_bytes:,} B, largest free run "
        f"{s.largest_free:,} B (fragmentation {s.fragmentation:.3f})\n"
        f"allocations {s.allocations:,}, frees {s.frees:,}, failed allocations "
        f"{s.failed_allocations:,}, recoveries after a crash {s.recoveries:,}\n")
    return EXIT_OK


def cmd_check(args: argparse.Namespace, out: IO[str]) -> int:
    with open_arena(args.path) as a:
        report = a.check(reclaim=args.repair)
    if args.json:
        json.dump(_jsonable(report), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        out.write(f"{args.path}: {'ok' if report.ok else 'PROBLEMS FOUND'}\n")
        for p in report.problems:
            out.write(f"  {p} (repaired)\n")
        out.write(f"  {report.blocks} blocks ({report.used_blocks} used), {len(report.leaked)} "
                  f"leaked by dead processes, {report.reclaimed_bytes} bytes reclaimed\n")
        for leak in report.leaked[:20]:
            out.write(f"  leaked: offset {leak.offset}, {leak.size} B, owner pid "
                      f"{leak.owner_pid}\n")
        if not report.ok and not args.repair:
            out.write("  run again with --repair to free the blocks of dead processes\n")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m arena stats|check``."""
    p = _Parser(prog=PROG, description="Look at and verify a shared arena file (made by "
                "arena.Arena.create). Run it as the file's owner.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                           required=True)
    c = sub.add_parser("stats", help="print the arena's health figures")
    c.add_argument("path", metavar="PATH", help="the arena file")
    c.add_argument("--json", action="store_true", help="write JSON for scripts")
    c.set_defaults(run=cmd_stats)
    c = sub.add_parser("check", help="verify the arena (exit status 1 when not consistent)")
    c.add_argument("path", metavar="PATH", help="the arena file")
    c.add_argument("--repair", action="store_true",
                   help="free the blocks of processes that died")
    c.add_argument("--json", action="store_true", help="write JSON for scripts")
    c.set_defaults(run=cmd_check)
    return p


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """``python -m arena stats|check``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        status: int = args.run(args, sys.stdout if out is None else out)
        return status
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ArenaError as exc:  # a refusal met mid-command (a damaged file)
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
