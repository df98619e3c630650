"""The CPU data worker: `celery -A services.dataset.worker worker -Q data` (`queues.DATA_WORKER_QUEUES`).

It runs the dataset builds' byte ranges (services/dataset/tasks.py, shards.py) and nothing else, one range per
pool process, as many processes as `LLMP_DATA_WORKER_CONCURRENCY` says (0: the CPUs it may use). A fleet runs
these on CPU nodes (docker-compose.yml `data-worker`, deploy/base/data-worker.yaml) and the GPU workers consume
`gpu,eval` only, so a tokenize-and-dedup range never takes a GPU node's one slot. Its code reaches S3 and the
broker only: no database, no gRPC service, no torch (it runs the dataset image). The local launcher's one
worker (`llmp up`, services/training/worker.py) keeps consuming every queue, this one's included.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from celery import signals

from services.common import cpus, logs
from services.common.config import Settings
from services.common.queues import app
from services.dataset import tasks

__all__ = ["app", "available_cpus", "concurrency", "range_peak_bytes", "tasks", "worker_memory_bytes",
           "worker_scratch_bytes"]

def available_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may use (services/common/cpus.py), a fractional quota rounded up: processes share it."""
    return cpus.usable_cpus(math.ceil, cgroup)


def concurrency(settings: Settings, cgroup: Path | None = None) -> int:
    """Pool processes of a data worker: `LLMP_DATA_WORKER_CONCURRENCY`, else (0) the CPUs it may use."""
    return settings.data_worker_concurrency or available_cpus(cgroup)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:  # replaces Celery's own logging setup with llmp's
    logs.configure(app.settings or Settings.from_env(), "data-worker")


@signals.celeryd_init.connect
def _set_concurrency(conf: Any, options: dict[str, Any], **_: Any) -> None:
    """Before the pool starts: its size from the settings, unless `--concurrency` was given. Celery's own default
    is the host's CPU count, which in a container is the node's, not the container's limit."""
    if not options.get("concurrency"):
        conf.worker_concurrency = concurrency(app.settings or Settings.from_env())


# What one pool process holds at its peak while it runs a range, grown from the worst case measured: the
# shortest documents (one line each, ~45 bytes: 1.45 M documents in 63 MiB), whose per-document state is
# largest per byte. Measured on `_scan` and `_pack` with a streaming local-folder store in place of S3 (the S3
# client streams both ways too): the scan peaked at 155 MiB RSS (~110 MiB of it the imports) and wrote 2.58 GiB of
# scratch files under /tmp (then with every record's MinHash signature, since left out of a range's output:
# an upper bound now); the pack peaked at 204 MiB (the tokenizer and
# its batches) with 183 MiB of scratch. An earlier figure of 1,432 MiB had a store that read whole archives into
# memory. Memory and scratch grow with the range at most, never with the corpus. A worker's memory limit holds
# its main process and `concurrency` ranges at this peak, its /tmp that many ranges' scratch (tests/unit/deploy
# checks the manifests and compose against it).
RANGE_BASE_BYTES = 128 * 2**20  # a process with the dataset code imported, no range yet
RANGE_BYTES_PER_CORPUS_BYTE = 2.0  # measured 1.2 (the pack: (204 - 128) MiB over 63 MiB)
RANGE_SCRATCH_PER_CORPUS_BYTE = 44.0  # measured 41.3


def range_peak_bytes(shard_bytes: int) -> int:
    """The peak RSS of a pool process running one range of `shard_bytes` (LLMP_DATASET_SHARD_BYTES)."""
    return RANGE_BASE_BYTES + math.ceil(RANGE_BYTES_PER_CORPUS_BYTE * shard_bytes)


def worker_memory_bytes(processes: int, shard_bytes: int) -> int:
    """Memory a data worker of `processes` pool processes needs: its main process and a range in each."""
    return RANGE_BASE_BYTES + processes * range_peak_bytes(shard_bytes)


def worker_scratch_bytes(processes: int, shard_bytes: int) -> int:
    """Scratch space (/tmp) a data worker of `processes` pool processes needs at most."""
    return processes * math.ceil(RANGE_SCRATCH_PER_CORPUS_BYTE * shard_bytes)
