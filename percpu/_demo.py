"""The main job: worker processes counting into one shared domain, one of them SIGKILLed.

``python -m percpu`` (or ``python -m percpu demo``) creates a private domain file (0600, in
``/dev/shm`` when it exists), registers a few metrics, forks ``--workers`` processes that
increment them, SIGKILLs one of them half-way through its work, starts a replacement (which
takes the lowest free vcpu id: the dead worker's, continuing on top of its slots), and at the end
prints the totals next to the totals the workers were asked to produce, with the health figures.

How the demo knows the exact expected total although a worker is killed: each worker adds in
batches and, after each batch, reports it through a pipe and waits for the parent's go-ahead.
The victim is killed while it waits, so every add it made is acknowledged and none is in flight;
the replacement does the victim's remaining batches. (A worker killed at a random instant may
have one update in flight; the test suite checks that case with bounds, see
tests/test_counters_processes.py.)
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import tempfile
import time

from ._domain import Domain

ROUTES = ("/", "/api", "/static")


def _default_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _worker(dom: Domain, index: int, batches: int, batch: int, go: int, report: int) -> None:
    """Body of a forked worker: ``batches`` batches of ``batch`` requests, reported one by one."""
    requests = [dom.counter("demo_requests", {"route": r}) for r in ROUTES]
    sent = dom.counter("demo_response_bytes")
    inflight = dom.gauge("demo_inflight")
    latency = dom.summary("demo_latency_seconds")
    vcpu = dom.vcpu_id()

    def serve(i: int) -> None:  # what a request handler would count
        inflight.inc()
        requests[i % 3].inc()
        sent.add(512)
        latency.observe(0.001)
        inflight.dec()

    # Warm-up: the first request on each route takes the lease, the pages and the caches.
    for i in range(len(ROUTES)):
        serve(i)
    done = len(ROUTES)
    faults = 0
    for b in range(batches):
        if os.read(go, 1) != b"g":
            break
        todo = batch - len(ROUTES) if b == 0 else batch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(done, done + todo):
            serve(i)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        done += todo
        # The first batch's copy-on-write faults on pages inherited from the parent belong to
        # fork, not to counting: count the faults taken inside the later batches' loops.
        if b:
            faults += after - before
        os.write(report, f"{index} {vcpu} {done} {faults}\n".encode())


def main(argv: list[str] | None = None) -> int:
    """Run the demonstration; return the process exit status (0 when every total is exact)."""
    p = argparse.ArgumentParser(prog="python -m percpu demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--requests", type=int, default=100_000,
                   help="requests each worker counts (default 100000)")
    p.add_argument("--dir", default=_default_dir(), help="where the domain file goes")
    args = p.parse_args(argv)
    if args.workers < 1 or args.requests < 10:
        p.error("need at least 1 worker and 10 requests")
    batches = 10
    batch = args.requests // batches
    per_worker = batches * batch

    path = os.path.join(args.dir, f"percpu-demo-{os.getpid()}.domain")
    dom = Domain.create(path, max_vcpus=args.workers + 2)
    try:
        return _run(dom, path, args.workers, batches, batch, per_worker)
    finally:
        dom.close()
        os.unlink(path)


def _spawn(dom: Domain, index: int, batches: int, batch: int) -> tuple[int, int, int]:
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            os.close(go_w)
            os.close(rep_r)
            _worker(dom, index, batches, batch, go_r, rep_w)
            status = 0
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(rep_w)
    return pid, go_w, rep_r


def _run(dom: Domain, path: str, workers: int, batches: int, batch: int,
         per_worker: int) -> int:
    t0 = time.perf_counter()
    victim = workers - 1
    procs = {i: _spawn(dom, i, batches, batch) for i in range(workers)}
    acked = {i: 0 for i in range(workers)}
    ids: dict[int, int] = {}
    faults: dict[int, int] = {}
    replacement_of_victim: tuple[int, int] | None = None
    announced = False
    # Drive every worker batch by batch; kill the victim after half of its batches.
    for b in range(batches):
        for i, (pid, go, rep) in list(procs.items()):
            if i == victim and b == batches // 2:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(go)
                os.close(rep)
                print(f"worker {i} (pid {pid}, vcpu id {ids[i]}) SIGKILLed after "
                      f"{acked[i]:,} requests")
                done_by_victim = acked[i]
                # The replacement does what the victim had left, on the victim's lease.
                rb = batches - b
                procs[i] = _spawn(dom, i, rb, batch)
                replacement_of_victim = (done_by_victim, rb)
                pid, go, rep = procs[i]
            os.write(go, b"g")
        for i, (pid, _go, rep) in procs.items():
            line = _readline(rep).split()
            _, vcpu, done, nfaults = (int(x) for x in line)
            if replacement_of_victim is not None and i == victim:
                done += replacement_of_victim[0]
                if not announced:
                    print(f"replacement worker (pid {pid}) took vcpu id {vcpu}")
                    announced = True
            ids[i] = vcpu
            acked[i] = done
            faults[i] = nfaults
    for pid, go, rep in procs.values():
        os.close(go)
        os.close(rep)
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0

    expected = workers * per_worker
    snap = {(m.name, m.labels): m for m in dom.snapshot()}
    counted = sum(int(snap[("demo_requests", (("route", r),))].value) for r in ROUTES)
    sent = int(snap[("demo_response_bytes", ())].value)
    inflight = int(snap[("demo_inflight", ())].value)
    lat = snap[("demo_latency_seconds", ())]
    s = dom.stats()
    checks = {
        "requests": (counted, expected),
        "response bytes": (sent, 512 * expected),
        "in flight": (inflight, 0),
        "latency observations": (lat.count, expected),
    }
    print(f"{workers} workers x {per_worker:,} requests in {elapsed:.2f} s "
          f"(domain file {path}, removed at exit)")
    ok = True
    for what, (got, want) in checks.items():
        mark = "exact" if got == want else "WRONG"
        ok &= got == want
        print(f"  {what:22} counted {got:>12,}  expected {want:>12,}  {mark}")
    print(f"ids: max {s.max_vcpus}, in use now {s.holders_now}, peak {s.ids_ever_used}, "
          f"fresh {s.fresh_ids}, reused {s.reused_ids}, reclaimed from the dead "
          f"{s.reclaimed_ids}, shared-id operations {s.shared_id_operations}")
    print(f"memory: {s.metrics} metrics in {s.pagesets} pagesets, {s.pages} pages, "
          f"{s.bytes_per_metric:,.0f} bytes per metric; arena used {s.arena_used_bytes:,} B")
    print(f"minor page faults in the workers' counting loops after their first batch: "
          f"{', '.join(str(faults[i]) for i in sorted(faults))}")
    print("all totals exact" if ok else "TOTALS DISAGREE")
    return 0 if ok else 1


def _readline(fd: int) -> str:
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise RuntimeError("a worker died unexpectedly")
        out += chunk
    return out.decode()


if __name__ == "__main__":
    sys.exit(main())
