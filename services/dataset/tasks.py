"""The dataset tasks of the `data` queue, registered on the workers' Celery app (services/common/queues.py): one
byte range of a corpus through the scan or the pack stage (shards.py). Late acks and reject-on-worker-lost: a
worker killed mid-range gives the message back to the broker and another worker redoes that range."""

from __future__ import annotations

from typing import Any

from services.common.config import Settings
from services.common.queues import PACK_TASK_NAME, SCAN_TASK_NAME, app
from services.common.s3 import ObjectStore
from services.dataset import shards

__all__ = ["pack_shard", "scan_shard"]


def _store(task) -> ObjectStore:
    return ObjectStore((task.app.settings or Settings.from_env()).s3)


@app.task(name=SCAN_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def scan_shard(self, spec: dict[str, Any]) -> None:
    shards.run_task(_store(self), "scan", spec)


@app.task(name=PACK_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def pack_shard(self, spec: dict[str, Any]) -> None:
    shards.run_task(_store(self), "pack", spec)
