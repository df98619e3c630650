"""A benchmark's BENCH line is printed only from a machine that was quiet when it started."""

from __future__ import annotations

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
