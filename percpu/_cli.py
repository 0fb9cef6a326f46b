"""``python -m percpu``: look at, scrape, verify and compact a shared domain file.

Design note
-----------
The tool is an *observer*: it opens the domain file without locking it in memory and without
prefaulting it, and never takes a vcpu id (``snapshot``, ``stats`` and ``check`` do not lease),
so running it beside a service changes none of the service's figures: ids in use, leases and
page faults stay the service's own. It takes the domain lock for as long as ``stats()`` or
``check()`` need it, as any holder registering a metric does.

Exit statuses (one table for every subcommand):

* 0 -- done; for ``check``, the domain is consistent (after repair, with ``--repair``).
* 1 -- ``check`` found problems it did not (or could not) repair; ``compact`` left moves
  pending at its timeout (a holder stopped or stuck).
* 2 -- the command could not run: a usage error, a missing file, a file that is not a domain,
  a permission problem, or a feature this version lacks. One line on stderr says which and
  what to do.

Everything the domain exposes is read through its public API (``stats()``, ``snapshot()``,
``check()``), except the per-size-class pageset occupancy, which reads the pageset directory
directly when this version of the domain does not report it, and says "not available" when it
cannot. Figures that not every version has (``ids_ever_used``, ``pending_moves``,
``compact()``) are used when present and reported as not available otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NoReturn

from arena import ArenaError, error_line, open_error

from ._errors import PercpuError
from ._exposition import _escape_label_value

if TYPE_CHECKING:
    from ._domain import Domain
    from ._results import DomainStats

PROG = "python -m percpu"
EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_ERROR = 2
PAGE = 4096  # bytes in a pageset page
SPARSE_OCCUPANCY = 0.25  # a pageset less full than this is a compaction candidate
DEFAULT_PORT = 9464  # TCP port of `serve` unless --port says otherwise
DEFAULT_INTERVAL = 2.0  # seconds between two frames of `top`


class CliError(Exception):
    """A command cannot run; the message is one line for stderr (exit status 2)."""


# --------------------------------------------------------------------------------------------
# Opening a domain file, with one clear line for each way it can fail


@contextmanager
def open_domain(path: str) -> Iterator[Domain]:
    """Open ``path`` as an observer (no memlock, no prefault, no lease); close it after."""
    from ._domain import Domain

    try:
        domain = Domain.open(path, lock=False, prefault=False)
    except OSError as exc:  # BadDomainFile included
        raise CliError(open_error(path, exc, "percpu domain",
                                  "percpu.Domain.create(path)")) from None
    try:
        yield domain
    finally:
        domain.close()


# --------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class ClassOccupancy:
    """Pagesets of one size class: how full their slots are."""

    slot_bytes: int  #: bytes of one slot in this class
    pagesets: int  #: pagesets of this class with at least one slot taken
    slots_taken: int  #: slots taken (metrics, raw objects, holders' caches, pending frees)
    slots: int  #: slots those pagesets hold
    sparse_pagesets: int  #: pagesets less than SPARSE_OCCUPANCY full (compaction candidates)
    pages: int  #: pages of these pagesets (one per id that touched each)

    @property
    def occupancy(self) -> float:
        return self.slots_taken / self.slots if self.slots else 0.0


@dataclass(frozen=True)
class Holder:
    """A live holder of a vcpu id, with what /proc says of its process."""

    vcpu_id: int
    pid: int
    command: str | None  #: /proc/PID/comm (None: not visible from here)
    minor_faults: int | None  #: since the process started (None: not visible)
    major_faults: int | None


@dataclass(frozen=True)
class Report:
    """Everything ``stats`` shows (and ``--json`` writes)."""

    path: str
    domain: DomainStats
    arena: Any  #: arena.ArenaStats
    holders: tuple[Holder, ...]
    occupancy: tuple[ClassOccupancy, ...] | None  #: None: this version hides the pagesets
    pending_moves: int | None  #: None: this version has no compaction
    compaction_available: bool


def _proc_faults(pid: int) -> tuple[str | None, int | None, int | None]:
    """(command, minor faults, major faults) of ``pid`` from /proc, None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None, None, None
    head, _, tail = raw.rpartition(b")")
    fields = tail.split()
    command = head.partition(b"(")[2].decode("utf-8", "replace")
    try:
        return command, int(fields[7]), int(fields[9])  # fields 10 and 12 of proc(5)
    except (IndexError, ValueError):
        return command, None, None


def pageset_occupancy(domain: Domain) -> tuple[ClassOccupancy, ...] | None:
    """Per size class: pagesets, slots taken and slots, from the domain's pageset directory.

    Uses the domain's own report when it has one (``stats().pageset_occupancy``); otherwise
    reads the directory under the domain lock. None when neither is possible in this version.
    """
    try:
        from . import _layout as lay

        root = getattr(domain, "_root")  # noqa: B009 - private, may change: getattr, not .
        ps_entry: Callable[[int], Any] = getattr(domain, "_pagesets").entry  # noqa: B009
        lock = getattr(domain, "_lock")  # noqa: B009
        max_vcpus = domain.max_vcpus
        per_class: dict[int, list[int]] = {}
        with lock:
            for ps in range(int(root[lay.D_PS_COUNT])):
                e = ps_entry(ps)
                cls = int(e[lay.P_CLASS]) - 1
                taken = int(e[lay.P_TAKEN])
                if cls < 0 or taken == 0:
                    continue
                slots = lay.slots_per_page(cls)
                pages = sum(1 for k in range(max_vcpus + 1) if e[lay.P_PAGES + k])
                row = per_class.setdefault(cls, [0, 0, 0, 0, 0])
                row[0] += 1
                row[1] += taken
                row[2] += slots
                row[3] += taken < SPARSE_OCCUPANCY * slots
                row[4] += pages
        return tuple(ClassOccupancy(lay.SIZE_CLASSES[cls], *row)
                     for cls, row in sorted(per_class.items()))
    except (AttributeError, ImportError, IndexError, TypeError, ValueError):
        return None


def gather(domain: Domain, path: str) -> Report:
    """Read every figure ``stats`` and ``top`` show, from one open domain."""
    s = domain.stats()
    holders = []
    for vcpu, pid in sorted(s.holder_pids.items()):
        command, minor, major = _proc_faults(pid)
        holders.append(Holder(vcpu, pid, command, minor, major))
    own = getattr(s, "pageset_occupancy", None)
    occupancy = own if isinstance(own, tuple) else pageset_occupancy(domain)
    moves = getattr(s, "pending_moves", None)
    return Report(path=path, domain=s, arena=domain.arena.stats(), holders=tuple(holders),
                  occupancy=occupancy, pending_moves=moves if isinstance(moves, int) else None,
                  compaction_available=callable(getattr(domain, "compact", None)))


def ids_ever_used(s: DomainStats) -> int:
    """Ids ever leased in the domain (ids 0..n-1): per-cpu memory follows this figure."""
    n = getattr(s, "ids_ever_used", None)
    return n if isinstance(n, int) else s.highest_id_used  # older versions: 1 + highest id


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, ClassOccupancy):
            out["occupancy"] = value.occupancy
        return out
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _na(value: object, what: str = "not available in this version") -> str:
    return what if value is None else str(value)


def format_report(r: Report) -> list[str]:
    """The ``stats`` text, one string a line."""
    s, a = r.domain, r.arena
    lines = [f"domain {r.path}: arena {_bytes(a.size)}, max_vcpus {s.max_vcpus} "
             f"(+1 shared overflow id)"]
    lines.append(f"ids in use: {s.holders_now} of {s.max_vcpus}; ids ever used "
                 f"{ids_ever_used(s)} (per-cpu memory follows this, not processes started)")
    for h in r.holders:
        faults = ("faults: not visible from here" if h.minor_faults is None else
                  f"faults since start: minor {h.minor_faults:,}, major {h.major_faults:,}")
        lines.append(f"  id {h.vcpu_id:>3}  pid {h.pid:>7}  {h.command or '?':<15} {faults}")
    lines.append(f"leases: fresh {s.fresh_ids}, reused {s.reused_ids}, reclaimed "
                 f"{s.reclaimed_ids} (holder died); overflow holders {s.overflow_holders}, "
                 f"shared-id operations {s.shared_id_operations}")
    lines.append(f"metrics: {s.metrics}; pagesets {s.pagesets}, pages {s.pages} "
                 f"({_bytes(s.pages * PAGE)}), {_bytes(s.bytes_per_metric)} per metric")
    if r.occupancy is None:
        lines.append("pageset occupancy: not available in this version")
    else:
        for c in r.occupancy:
            lines.append(f"  {c.slot_bytes:>2}-byte slots: {c.pagesets} pagesets, "
                         f"{c.slots_taken:,} of {c.slots:,} slots taken "
                         f"({c.occupancy:.1%}), {c.sparse_pagesets} sparse, {c.pages} pages")
    if r.pending_moves is None:
        moves = "n/a (no compaction in this version)"
    else:
        waited = getattr(s, "pending_move_seconds", 0.0)
        moves = f"{r.pending_moves}" + (f" (waiting {waited:.1f} s)" if r.pending_moves else "")
    lines.append(f"pending: frees {s.pending_frees} (epoch {s.epoch}), moves {moves}; "
                 f"recovered cache slots {s.recovered_cache_slots}")
    if r.compaction_available:
        lines.append(f"compaction, ever: {getattr(s, 'moved_slots', 0):,} slots moved, "
                     f"{getattr(s, 'compacted_pagesets', 0):,} pagesets "
                     f"({getattr(s, 'compacted_pages', 0):,} pages) given back in "
                     f"{getattr(s, 'compaction_batches', 0):,} batches")
    lines.append(f"arena: used {_bytes(a.used_bytes)}, free {_bytes(a.free_bytes)}, largest "
                 f"free run {_bytes(a.largest_free)}; failed allocations "
                 f"{a.failed_allocations}, recoveries {a.recoveries}")
    return lines


# --------------------------------------------------------------------------------------------
# Subcommands


def report_json(report: Report) -> dict[str, Any]:
    """``stats --json``: the report, less the observer's own page faults (``domain`` and
    ``arena`` count those of the process that reads them, this tool; the holders' are in
    ``holders``)."""
    data: dict[str, Any] = _jsonable(report)
    for section in ("domain", "arena"):
        data[section].pop("minor_faults", None)
        data[section].pop("major_faults", None)
    return data


def cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    with open_domain(args.path) as d:
        report = gather(d, args.path)
    if args.json:
        json.dump(report_json(report), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        out.write("\n".join(format_report(report)) + "\n")
    return EXIT_OK


def _series_name(name: str, kind: str, labels: Sequence[tuple[str, str]]) -> str:
    if kind == "counter" and not name.endswith("_total"):
        name += "_total"
    if labels:
        inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels)
        name = f"{name}{{{inner}}}"
    return name


def top_frame(report: Report, values: list[Any], previous: dict[tuple[Any, ...], float] | None,
              faults_before: dict[int, tuple[int, int]] | None, elapsed: float, *, sort: str,
              rows: int | None, ansi: bool) -> tuple[list[str], dict[tuple[Any, ...], float]]:
    """One screen of ``top``: the header, the holders, the busiest metrics. Pure."""
    s, a = report.domain, report.arena
    bold, plain = ("\x1b[1m", "\x1b[0m") if ansi else ("", "")
    occ = ("n/a" if report.occupancy is None else
           f"{sum(c.slots_taken for c in report.occupancy) / max(1, sum(c.slots for c in report.occupancy)):.1%}")  # noqa: E501
    lines = [
        f"{bold}percpu top{plain}  {report.path}  {time.strftime('%H:%M:%S')}",
        f"ids {s.holders_now}/{s.max_vcpus} in use (ever {ids_ever_used(s)})  "
        f"reclaimed {s.reclaimed_ids}  overflow {s.overflow_holders}  metrics {s.metrics}",
        f"pagesets {s.pagesets} ({occ} full)  pages {s.pages}  "
        f"{_bytes(s.bytes_per_metric)}/metric  pending frees {s.pending_frees}  moves "
        f"{_na(report.pending_moves, 'n/a')}",
        f"arena used {_bytes(a.used_bytes)} of {_bytes(a.size)}  largest free "
        f"{_bytes(a.largest_free)}  failed allocations {a.failed_allocations}",
        "",
        f"{bold}{'ID':>4} {'PID':>8} {'COMMAND':<16} {'MINFLT/s':>9} {'MAJFLT/s':>9}{plain}",
    ]
    for h in report.holders:
        before = None if faults_before is None else faults_before.get(h.pid)
        if h.minor_faults is None or h.major_faults is None or before is None or elapsed <= 0:
            minor = major = "-"
        else:
            minor = f"{(h.minor_faults - before[0]) / elapsed:.1f}"
            major = f"{(h.major_faults - before[1]) / elapsed:.1f}"
        lines.append(f"{h.vcpu_id:>4} {h.pid:>8} {(h.command or '?')[:16]:<16} {minor:>9} "
                     f"{major:>9}")
    lines.append("")
    current: dict[tuple[Any, ...], float] = {}
    table = []
    for v in values:
        key = (v.name, v.labels, v.kind)
        amount = float(v.count if v.kind == "summary" else v.value)
        current[key] = amount
        if previous is None or key not in previous or elapsed <= 0:
            rate: float | None = None
        else:
            rate = (amount - previous[key]) / elapsed
        shown = (f"{v.count:,} obs, sum {v.value:,.6g}" if v.kind == "summary" else
                 f"{v.value:,}" if isinstance(v.value, int) else f"{v.value:,.6g}")
        table.append((_series_name(v.name, v.kind, v.labels), v.kind, shown, rate, amount))
    if sort == "rate":
        table.sort(key=lambda t: (-(t[3] or 0.0), t[0]))
    elif sort == "value":
        table.sort(key=lambda t: (-t[4], t[0]))
    else:
        table.sort(key=lambda t: t[0])
    width = max([len("METRIC")] + [len(t[0]) for t in table])
    width = min(width, 60)
    lines.append(f"{bold}{'METRIC':<{width}} {'KIND':<8} {'VALUE':>24} {'RATE/s':>12}{plain}")
    shown_rows = table if rows is None else table[:max(0, rows - len(lines) - 1)]
    for name, kind, shown, rate, _ in shown_rows:
        if len(name) > width:
            name = name[:width - 1] + "~"
        rate_text = "-" if rate is None else f"{rate:,.1f}"
        lines.append(f"{name:<{width}} {kind:<8} {shown:>24} {rate_text:>12}")
    if len(shown_rows) < len(table):
        lines.append(f"... {len(table) - len(shown_rows)} more (a taller terminal shows more)")
    return lines, current


def cmd_top(args: argparse.Namespace, out: IO[str]) -> int:
    ansi = out.isatty() and not args.no_ansi
    previous: dict[tuple[Any, ...], float] | None = None
    faults_before: dict[int, tuple[int, int]] | None = None
    last = time.monotonic()
    with open_domain(args.path) as d:
        try:
            frame = 0
            while args.iterations is None or frame < args.iterations:
                if frame:
                    time.sleep(args.interval)
                now = time.monotonic()
                report = gather(d, args.path)
                values = d.snapshot()
                rows = shutil.get_terminal_size().lines if ansi else None
                lines, previous = top_frame(report, values, previous, faults_before,
                                            now - last, sort=args.sort, rows=rows, ansi=ansi)
                faults_before = {h.pid: (h.minor_faults, h.major_faults)
                                 for h in report.holders
                                 if h.minor_faults is not None and h.major_faults is not None}
                last = now
                if ansi:
                    out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
                else:
                    out.write(("\n" if frame else "") + "\n".join(lines) + "\n")
                out.flush()
                frame += 1
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, out: IO[str]) -> int:
    from ._exposition import DomainExposition, make_server

    with open_domain(args.path) as d:
        # One scrape at a time reads the domain (DomainExposition serialises them), each from
        # the layout the previous one left (remade only when the series change).
        source = DomainExposition(d, health=not args.no_health)
        try:
            server = make_server(source, args.host, args.port)
        except OSError as exc:
            raise CliError(f"cannot listen on {args.host} port {args.port}: "
                           f"{exc.strerror or exc}") from None
        host, port = str(server.server_address[0]), int(server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        out.write(f"serving {args.path} at http://{shown}:{port}/metrics "
                  "(Prometheus text; OpenMetrics when the scraper asks); Ctrl-C stops\n")
        out.flush()

        def stop(signum: int, frame: object) -> NoReturn:
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            server.server_close()
    return EXIT_OK


def cmd_check(args: argparse.Namespace, out: IO[str]) -> int:
    with open_domain(args.path) as d:
        result = d.check(reclaim=args.repair)
    if args.json:
        json.dump(_jsonable(result), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        a = result.arena
        out.write(f"{args.path}: {'ok' if result.ok else 'PROBLEMS FOUND'}\n")
        for p in result.problems:
            out.write(f"  domain: {p}\n")
        for p in a.problems:
            out.write(f"  arena: {p} (repaired)\n")
        out.write(f"  slots taken but unreferenced: {result.unreferenced_slots}, reclaimed "
                  f"{result.reclaimed_slots}\n")
        out.write(f"  arena: {a.blocks} blocks ({a.used_blocks} used), {len(a.leaked)} leaked "
                  f"by dead processes, {a.reclaimed_bytes} bytes reclaimed\n")
        if not result.ok and not args.repair:
            out.write("  run again with --repair to reclaim what dead holders left (slots are "
                      "only reclaimed when no holder is alive)\n")
    return EXIT_OK if result.ok else EXIT_PROBLEMS


def format_compaction(result: Any) -> list[str]:
    """The lines ``compact`` prints for a ``CompactResult`` (any object: its fields if it has
    the known ones, else its repr)."""
    g = getattr
    if g(result, "pages_before", None) is None:
        return [f"compacted: {result}"]
    lines = [f"moved {g(result, 'moved', 0):,} slots in {g(result, 'batches', 0)} batches "
             f"({g(result, 'seconds', 0.0):.2f} s); gave back {g(result, 'reclaimed_pagesets', 0)} "
             f"pagesets ({g(result, 'reclaimed_pages', 0)} pages)",
             f"pages {result.pages_before:,} -> {g(result, 'pages_after', 0):,} "
             f"(ideal {g(result, 'ideal_pages', 0):,})"]
    graces = g(result, "grace_seconds", ())
    if graces:
        lines.append(f"grace periods: longest {max(graces) * 1e3:,.1f} ms")
    pending = g(result, "pending_moves", 0)
    if pending:
        lines.append(f"{pending} moves still wait for a holder that has not reached a quiescent "
                     "point (stopped, or stuck in a long C call): they complete when it resumes "
                     "or dies; `stats` shows them")
    return lines


def cmd_compact(args: argparse.Namespace, out: IO[str]) -> int:
    with open_domain(args.path) as d:
        compact = getattr(d, "compact", None)
        if not callable(compact):
            raise CliError("compaction is not available in this version of percpu "
                           "(Domain.compact() is missing)")
        before = d.stats()
        result = compact() if args.timeout is None else compact(timeout=args.timeout)
        after = d.stats()
    pending = getattr(result, "pending_moves", 0)
    if args.json:
        json.dump({"result": _jsonable(result), "pages_before": before.pages,
                   "pages_after": after.pages, "pagesets_before": before.pagesets,
                   "pagesets_after": after.pagesets}, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        out.write(f"{args.path}: " + "\n  ".join(format_compaction(result)) + "\n")
        out.write(f"  pagesets {before.pagesets} -> {after.pagesets}, pages {before.pages} -> "
                  f"{after.pages}\n")
    return EXIT_PROBLEMS if isinstance(pending, int) and pending > 0 else EXIT_OK


def cmd_demo(argv: list[str]) -> int:
    try:
        from . import _demo
    except ModuleNotFoundError as exc:
        if exc.name != "percpu._demo":
            raise
        raise CliError("the demo is not available in this version of percpu") from None
    status: int = _demo.main(argv)
    return status


# --------------------------------------------------------------------------------------------
# The parser

_DESCRIPTION = """\
Per-cpu counters shared by the processes of a service: look at them, scrape them, check them.

PATH is a domain file made by percpu.Domain.create(PATH) (for example under /dev/shm). Run the
tool as the user the service runs as: domain files are 0600. The tool only observes: it takes
no vcpu id and changes no counter (except `check --repair` and `compact`).

Without a command, runs the demonstration (`demo`)."""

_EPILOG = """\
examples:
  python -m percpu                                # the demonstration
  python -m percpu stats /dev/shm/myapp.domain    # health figures; --json for scripts
  python -m percpu top /dev/shm/myapp.domain      # live view, like top (Ctrl-C quits)
  python -m percpu serve /dev/shm/myapp.domain --port 9464   # Prometheus scrape endpoint
  python -m percpu check /dev/shm/myapp.domain    # exit status 0 when consistent

exit status: 0 ok, 1 `check` found problems (or `compact` left moves pending),
2 the command could not run.
See docs/operations.md for what each figure means and when to worry."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m percpu``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, summary: str, detail: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=summary, description=f"{summary}\n\n{detail}",
                           formatter_class=fmt)
        c.add_argument("path", metavar="PATH", help="the domain file (made by Domain.create)")
        return c

    c = command("stats", "print the domain's health figures",
                "ids in use and their holders' pids (with their page faults from /proc), how\n"
                "ids were leased, metrics, pagesets and how full they are, bytes per metric,\n"
                "pending frees and moves, and the arena's figures (failed allocations...).")
    c.add_argument("--json", action="store_true", help="write JSON for scripts")
    c.set_defaults(run=cmd_stats)

    c = command("top", "a live view of the domain, refreshed like top",
                "The header shows ids, pagesets and the arena; then each holder with its\n"
                "minor page faults per second (0 in steady state is the point); then every\n"
                "metric with its rate. Ctrl-C quits.")
    c.add_argument("--interval", type=_non_negative, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help=f"seconds between refreshes (default {DEFAULT_INTERVAL})")
    c.add_argument("--iterations", type=_positive, default=None, metavar="N",
                   help="stop after N frames (default: until Ctrl-C)")
    c.add_argument("--sort", choices=("rate", "value", "name"), default="rate",
                   help="order of the metrics (default: rate)")
    c.add_argument("--no-ansi", action="store_true",
                   help="never clear the screen (frames follow each other)")
    c.set_defaults(run=cmd_top)

    c = command("serve", "serve the metrics over HTTP for Prometheus",
                "GET /metrics answers in the Prometheus text format 0.0.4, or OpenMetrics 1.0\n"
                "when the scraper's Accept header asks for it; gzipped when its\n"
                "Accept-Encoding header accepts gzip. Listens on the loopback\n"
                "interface unless --host says otherwise (there is no authentication: exposing\n"
                "it further is your explicit choice). SIGTERM or Ctrl-C stops it.")
    c.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; '::1' for IPv6)")
    c.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one and prints it)")
    c.add_argument("--no-health", action="store_true",
                   help="leave out the percpu_domain_* health figures")
    c.set_defaults(run=cmd_serve)

    c = command("check", "verify the domain's shared structures (and repair on request)",
                "Walks the registry, the pagesets, the holders' caches and the arena. Reports\n"
                "slots no metric refers to (left by a holder killed mid-operation) and arena\n"
                "blocks whose owner died. Exit status 0 when consistent, 1 when not.")
    c.add_argument("--repair", action="store_true",
                   help="reclaim what dead holders left (slots only when no holder is alive)")
    c.add_argument("--json", action="store_true", help="write JSON for scripts")
    c.set_defaults(run=cmd_check)

    c = command("compact", "move live counters out of sparse pagesets and free their pages",
                "Moves live metrics out of sparse pagesets into dense ones while the service\n"
                "keeps counting (values stay exact), then gives the emptied pages back to the\n"
                "arena. Each batch waits for every live holder to pass a quiescent point.\n"
                "Exit status 1 when moves are still pending at the timeout (a holder stopped\n"
                "or stuck): they complete when it resumes or dies.")
    c.add_argument("--timeout", type=_non_negative, default=None, metavar="SECONDS",
                   help="stop waiting for slow holders after SECONDS (default: the domain's)")
    c.add_argument("--json", action="store_true", help="write JSON for scripts")
    c.set_defaults(run=cmd_compact)

    sub.add_parser("demo", help="run the demonstration (arguments after `demo` go to it; "
                                "`demo --help` lists them)", add_help=False)
    return p


def _number(text: str, kind: Callable[[str], Any], ok: Callable[[Any], bool], want: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
    return value


def _non_negative(text: str) -> float:
    value: float = _number(text, float, lambda v: math.isfinite(v) and v >= 0,
                           "a number of seconds >= 0")
    return value


def _positive(text: str) -> int:
    value: int = _number(text, int, lambda v: v > 0, "an integer > 0")
    return value


def _port(text: str) -> int:
    value: int = _number(text, int, lambda v: 0 <= v <= 65535, "a port number (0..65535)")
    return value


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Entry point of ``python -m percpu``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    try:
        if not args_list or args_list[0] == "demo":
            return cmd_demo(args_list[1:])
        args = build_parser().parse_args(args_list)
        status: int = args.run(args, out)
        return status
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (PercpuError, ArenaError) as exc:  # a refusal met mid-command (a damaged file)
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `python -m percpu stats x | head`
        sys.stderr.close()
        return EXIT_OK
