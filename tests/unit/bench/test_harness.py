"""A benchmark's BENCH line is printed only from a machine that was quiet when it started; what the host gives two
processes at once is measured beside a scaling ratio."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time

import pytest

from bench import harness


def test_a_quiet_start_prints_the_bench_line(monkeypatch, capsys):
    monkeypatch.setattr(harness, "_started_load", harness.cores() - 0.5)
    harness.report("gateway", 300.0, 400.0, "req/s", "a bare aiohttp handler", digits=0)
    line = capsys.readouterr().out.strip()
    assert line.startswith("BENCH gateway project=300req/s baseline=400req/s ratio=0.75 (a bare aiohttp handler; load ")
    assert "busy" not in line


def test_a_busy_start_refuses_to_report(monkeypatch, capsys):
    monkeypatch.setattr(harness, "_started_load", harness.cores() + 0.5)
    monkeypatch.delenv("LLMP_BENCH_ALLOW_BUSY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        harness.report("gateway", 300.0, 400.0, "req/s", "a bare aiohttp handler")
    assert exit_.value.code == harness.BUSY_EXIT
    out, err = capsys.readouterr()
    assert "BENCH gateway project" not in out and "BENCH gateway not reported: the load average was" in err


def test_a_busy_figure_can_be_looked_at_but_is_marked(monkeypatch, capsys):
    monkeypatch.setattr(harness, "_started_load", harness.cores() + 0.5)
    monkeypatch.setenv("LLMP_BENCH_ALLOW_BUSY", "1")
    harness.report("gateway", 300.0, 400.0, "req/s", "a bare aiohttp handler")
    assert capsys.readouterr().out.rstrip().endswith("[busy: not for RESULTS.md]")


def test_settling_waits_for_the_load_to_fall_and_gives_up_at_its_limit(monkeypatch):
    loads = iter([harness.cores() + 1.0, harness.cores() + 0.5, harness.cores() - 0.5])
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(harness.time, "sleep", lambda seconds: None)
    assert harness.settle(60) == harness.cores() - 0.5  # waited twice, then quiet
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (harness.cores() + 3.0, 0.0, 0.0))
    assert harness.settle(0) == harness.cores() + 3.0  # still busy at the limit: the benchmark then refuses


_LOCK_ENV = "LLMP_TEST_SERIAL_LOCK"  # the lock file's path: the spawned copies inherit the environment


def _sleeping(iterations: int) -> float:
    """A stand-in for the CPU loop that two processes run fully side by side."""
    begun = time.perf_counter()
    time.sleep(0.3)
    return time.perf_counter() - begun


def _serialised(iterations: int) -> float:
    """A stand-in whose copies cannot overlap: a host giving its processes one core between them."""
    begun = time.perf_counter()
    with open(os.environ[_LOCK_ENV], "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        time.sleep(0.3)
    return time.perf_counter() - begun


def test_host_scaling_is_two_when_both_run_at_once_and_one_when_they_take_turns(monkeypatch, tmp_path):
    monkeypatch.setenv(_LOCK_ENV, str(tmp_path / "serial.lock"))  # this run's own: another run's cannot slow it
    assert 1.6 < harness.host_scaling(2, loop=_sleeping) < 2.3  # the sleeps alone may overshoot a little
    assert 0.8 < harness.host_scaling(2, loop=_serialised) < 1.2


def test_the_cpu_loop_takes_time_in_proportion_to_its_work():
    short, long = harness._cpu_loop(200_000), harness._cpu_loop(2_000_000)
    assert long > 3 * short > 0


def _failing_in_copies(iterations: int) -> float:
    """Runs alone in the parent; raises in the spawned copies."""
    if multiprocessing.parent_process() is not None:
        raise RuntimeError("a copy that dies")
    return 0.3


def test_a_copy_that_dies_fails_the_measurement_instead_of_giving_a_figure():
    with pytest.raises(RuntimeError, match="2 of 2 copies of _failing_in_copies failed"):
        harness.host_scaling(2, loop=_failing_in_copies)
