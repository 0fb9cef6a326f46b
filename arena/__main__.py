"""``python -m arena``: a demonstration of a page-fault-free arena, with its health figures.

Maps an arena, prefaults and (when the memlock limit allows) locks it, then runs a million
mixed-size alloc/free operations and prints what it did, the allocator's health figures and the
page faults the process took after start-up (zero is the point).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
import warnings

from . import Arena, ArenaExhausted, Block, _cli


def demo(size: int, operations: int, seed: int) -> int:
    """Run the demonstration and print its report; return the process exit status."""
    rng = random.Random(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = Arena(size, block_size=64, lock="auto", prefault=True)
    for w in caught:
        print(f"note: {w.message}")
    sizes = [rng.choice((16, 64, 64, 64, 200, 1000, 4096)) for _ in range(4096)]
    aligns = [None, None, None, 64, 4096]
    live: list[Block] = []
    exhausted = 0
    warm_up = min(operations, 100_000)  # Python's own heap settles during these
    faults_before = 0
    start = time.perf_counter()
    for i in range(operations):
        if i == warm_up:
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if live and (len(live) > 2000 or rng.random() < 0.5):
            a.free(live.pop(rng.randrange(len(live))))
        else:
            try:
                live.append(a.alloc(sizes[i & 4095], align=aligns[i % 5]))
            except ArenaExhausted:
                exhausted += 1
    elapsed = time.perf_counter() - start
    loop_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    during = a.stats()
    for b in live:
        a.free(b)
    s = a.stats()
    print(f"arena: {s.size:,} bytes, block size {s.block_size}, locked={s.locked}, "
          f"prefaulted={s.prefaulted}")
    print(f"ran {operations:,} alloc/free operations in {elapsed:.2f} s "
          f"({elapsed / operations * 1e9:,.0f} ns each), up to {len(sizes)} sizes, "
          f"alignments up to 4096")
    print(f"mid-run: used {during.used_bytes:,} B, free {during.free_bytes:,} B, largest free run "
          f"{during.largest_free:,} B, fragmentation {during.fragmentation:.3f}")
    print(f"totals: {s.allocations:,} allocations, {s.frees:,} frees, "
          f"{s.failed_allocations} failed")
    print(f"after freeing everything: used {s.used_bytes} B, largest free run "
          f"{s.largest_free:,} B (== free: {s.largest_free == s.free_bytes})")
    print(f"minor page faults in the loop after {warm_up:,} warm-up operations: {loop_faults}")
    print(f"page faults since the arena was ready (whole process, this report included): "
          f"minor {s.minor_faults}, major {s.major_faults}")
    report = a.check()
    print(f"check: ok={report.ok}, blocks={report.blocks}, problems={len(report.problems)}")
    a.close()
    return 0 if report.ok and s.used_bytes == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m arena``: the demo, or ``stats PATH`` / ``check PATH``."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] in _cli.COMMANDS:
        return _cli.main(args_in)
    p = argparse.ArgumentParser(prog="python -m arena", description=__doc__)
    p.add_argument("--size", type=int, default=64 << 20, help="arena bytes (default 64 MiB)")
    p.add_argument("--operations", type=int, default=1_000_000, help="alloc/free operations")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.epilog = "other commands: 'stats PATH' and 'check PATH' of a shared arena file"
    args = p.parse_args(args_in)
    return demo(args.size, args.operations, args.seed)


if __name__ == "__main__":
    sys.exit(main())
