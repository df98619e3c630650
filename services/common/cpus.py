"""How many CPUs this process may use: its CPU affinity, narrowed by its container's CPU quota.

Kubernetes turns a CPU limit into a cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`)
without touching the affinity, so `os.cpu_count()` and the affinity both say the node's 64 cores to a 2-CPU pod.
Two callers size themselves from it: the data worker's pool processes (services/dataset/worker.py) and ONNX
Runtime's threads on Triton (services/inference/triton_model/ort_session.py).

Standard library only: the inference service copies this file beside each Triton model (model_repository.py),
whose Python stub imports nothing from llmp.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(cgroup: Path | None = None) -> float | None:
    """The container's CPU quota in CPUs (1.5 for `150000 100000`), or None without one."""
    cgroup = cgroup or CGROUP
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup / quota_file).read_text().split()
            if period_file is not None:
                fields.append((cgroup / period_file).read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:  # no quota: the affinity decides
            return None
        try:
            return int(quota) / period
        except ValueError:
            return None
    return None


def usable_cpus(rounding: Callable[[float], int] = math.floor, cgroup: Path | None = None) -> int:
    """The CPUs this process may use: at most its affinity, at most its quota, at least 1. `rounding` says what a
    fractional quota gives: threads kept busy round down (math.floor, ORT), processes that share it round up."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup)
    return cpus if quota is None else max(1, min(cpus, rounding(quota)))
