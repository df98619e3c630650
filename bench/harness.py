"""What every benchmark shares: the machine's load, and the BENCH line, which is never printed from a busy machine.

A ratio taken while other work competes for the cores is not the project's figure (under concurrent load ratios
drop by half), so a benchmark refuses to report when the load average was above the core count at its start: it
prints why instead of the BENCH line and exits 3. Only the start counts: by its end the benchmark's own processes
(servers, load generators) are in the average. The end's load is printed beside it. `LLMP_BENCH_ALLOW_BUSY=1`
reports anyway, marked, for a figure that is only looked at, never recorded in bench/RESULTS.md.

A benchmark of scaling (N processes vs 1) also prints `host_scaling`: what the host itself gives N processes at
once in the same minutes, the ceiling its own ratio is read against.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

BUSY_EXIT = 3
_started_load = os.getloadavg()[0]  # when the benchmark's module was imported, before its own work


def _machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_cores = _machine_cores()  # at import: a benchmark may pin itself to fewer later (bench/gateway.py)


def cores() -> int:
    """The cores this benchmark was given when it started (what the load average is judged against)."""
    return _cores


def load() -> str:
    """The 1, 5 and 15 minute load averages and the core count, for a benchmark's header."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {cores()} cores"


def rounds(label: str, ratios: Sequence[float]) -> None:
    """Prints each round's ratio and their median, so a reader sees the spread behind the BENCH figure."""
    if ratios:
        print(f"{label}: per-round ratios {' '.join(f'{ratio:.2f}' for ratio in ratios)}; "
              f"median {statistics.median(ratios):.2f}")


def report(name: str, project: float, baseline: float, unit: str, baseline_is: str, digits: int = 1) -> None:
    """The BENCH line (SPEC: `BENCH <name> project=<v><unit> baseline=<v><unit> ratio=<p/b> (<baseline>)`), or,
    from a busy machine, why there is none (exit 3)."""
    at_start, at_end = _started_load, os.getloadavg()[0]
    busy = at_start > cores()
    line = (f"BENCH {name} project={project:.{digits}f}{unit} baseline={baseline:.{digits}f}{unit} "
            f"ratio={project / baseline:.2f} ({baseline_is}; load {at_start:.2f} at start, {at_end:.2f} at end, "
            f"{cores()} cores)")
    if busy and os.environ.get("LLMP_BENCH_ALLOW_BUSY") != "1":
        print(f"BENCH {name} not reported: the load average was {at_start:.2f} at its start on {cores()} cores, so "
              f"other work competed for them (figures of this run: project={project:.{digits}f}{unit} "
              f"baseline={baseline:.{digits}f}{unit}). Run it alone.", file=sys.stderr)
        sys.exit(BUSY_EXIT)
    print(line + (" [busy: not for RESULTS.md]" if busy else ""))


HOST_LOOP = 20_000_000  # iterations of `_cpu_loop`: 1.4-2.5 s alone on a 2-vCPU AMD EPYC guest


def _cpu_loop(iterations: int = HOST_LOOP) -> float:
    """Seconds a fixed amount of pure-Python integer work takes: no I/O, no memory traffic, nothing shared."""
    begun = time.perf_counter()
    total = 0
    for value in range(iterations):
        total += value ^ (value >> 3)
    return time.perf_counter() - begun


def host_scaling(processes: int = 2, iterations: int = HOST_LOOP, loop: Callable[[int], float] = _cpu_loop) -> float:
    """What this host gives `processes` processes at once, as a speed-up: `processes` × the time of `loop`
    alone (the mean of a run before and one after) / the span of `processes` copies released together by a barrier,
    from the first one's start to the last one's end as they saw them (perf_counter is the system's monotonic
    clock, the same in every process), so neither starting them nor the parent's own scheduling is timed. It
    bounds any "N processes vs 1" ratio taken in the same minutes: on a virtual machine two vCPUs are not always
    two free cores (on a 2-vCPU KVM guest it was measured anywhere from 1.29 to 2.09 a minute apart), so a
    benchmark of scaling prints it beside its own ratio.

    The copies are spawned, not forked: a fork of a process whose other threads hold locks (gRPC's, in a test
    run) can hang in the child. `loop` must therefore be importable by name (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    before = loop(iterations)
    start, spans = context.Barrier(processes), context.Array("d", 2 * processes)
    copies = [context.Process(target=_loop_after, args=(start, spans, index, iterations, loop))
              for index in range(processes)]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.join()
    failed = [copy.exitcode for copy in copies if copy.exitcode]
    if failed:  # a copy that never started its loop left its span at zero: there is no figure
        raise RuntimeError(f"{len(failed)} of {processes} copies of {loop.__name__} failed (exit codes {failed})")
    together = max(spans[1::2]) - min(spans[0::2])
    after = loop(iterations)
    return processes * (before + after) / 2 / together


_START_SECONDS = 120.0  # for every copy to reach the barrier: a spawn imports the parent's main module again


def _loop_after(start: Any, spans: Any, index: int, iterations: int, loop: Callable[[int], float]) -> None:
    start.wait(timeout=_START_SECONDS)  # every copy started: they run side by side (a copy that died breaks it)
    spans[2 * index] = time.perf_counter()
    loop(iterations)
    spans[2 * index + 1] = time.perf_counter()


def settle(limit_s: float, poll_s: float = 5.0) -> float:
    """Waits until the 1-minute load average is at most the core count, or `limit_s` passed; returns it. The
    average decays over about a minute, so the servers of a benchmark that just ended still weigh in it."""
    deadline = time.monotonic() + limit_s
    load_now = os.getloadavg()[0]
    while load_now > cores() and time.monotonic() < deadline:
        print(f"waiting for the load to settle: {load_now:.2f} on {cores()} cores", file=sys.stderr)
        time.sleep(poll_s)
        load_now = os.getloadavg()[0]
    return load_now


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Wait for a quiet machine before a benchmark (make bench-<name>).")
    parser.add_argument("--settle", action="store_true", help="wait until the load is at most the core count")
    parser.add_argument("--limit", type=float, default=180.0, help="seconds to wait at most (default 180)")
    if parser.parse_args().settle:
        settle(parser.parse_args().limit)
