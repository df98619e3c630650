"""ONNX Runtime's thread count on Triton follows a container's CPU limit, not the node's core count."""

from __future__ import annotations

import importlib
import io

import pytest

FILES = {"v2": {"/sys/fs/cgroup/cpu.max": "200000 100000\n"},
         "v2 unlimited": {"/sys/fs/cgroup/cpu.max": "max 100000\n"},
         "v1": {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"},
         "none": {}}


@pytest.fixture
def triton_module():
    return importlib.import_module("services.inference.triton_model.ort_session")


@pytest.mark.parametrize(("cgroup", "expected"), [("v2", 2), ("v2 unlimited", 64), ("v1", 1), ("none", 64)])
def test_the_cpu_quota_bounds_the_threads(triton_module, monkeypatch, cgroup, expected):
    files = FILES[cgroup]

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(triton_module.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(triton_module, "open", fake_open, raising=False)
    assert triton_module.usable_cores() == expected
