"""ONNX Runtime's thread count on Triton and the data worker's pool follow a container's CPU quota, not the
node's core count (services/common/cpus.py)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

from services.common import cpus
from services.dataset import worker as data_worker

FILES = {"v2": {"cpu.max": "200000 100000\n"},
         "v2 fractional": {"cpu.max": "150000 100000\n"},
         "v2 unlimited": {"cpu.max": "max 100000\n"},
         "v1": {"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"},
         "v1 unlimited": {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
         "none": {}}


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """write(name): the cgroup files of FILES[name] where cpus.py reads them, on a 64-CPU affinity."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpus, "CGROUP", tmp_path)

    def write(name: str) -> Path:
        for file, text in FILES[name].items():
            (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / file).write_text(text)
        return tmp_path
    return write


@pytest.mark.parametrize(("files", "threads", "processes"), [
    ("v2", 2, 2), ("v2 fractional", 1, 2), ("v2 unlimited", 64, 64), ("v1", 1, 2), ("v1 unlimited", 64, 64),
    ("none", 64, 64)])
def test_the_cpu_quota_bounds_ort_threads_down_and_pool_processes_up(cgroup, files, threads, processes):
    cgroup(files)
    ort_session = importlib.import_module("services.inference.triton_model.ort_session")
    assert ort_session.usable_cores() == threads  # spinning threads on 1.5 CPUs: one
    assert data_worker.available_cpus() == processes  # processes sharing 1.5 CPUs: two


def test_a_quota_above_the_affinity_gives_the_affinity(cgroup):
    (cgroup("none") / "cpu.max").write_text(f"{100000 * 4096} 100000\n")
    assert cpus.usable_cpus(math.ceil) == cpus.usable_cpus(math.floor) == 64
