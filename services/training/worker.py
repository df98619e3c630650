"""The Celery worker that runs training and evaluation jobs, and dataset builds' shards:
`celery -A services.training.worker worker -Q gpu,eval,data -c 1` (`dispatch.WORKER_QUEUES`).

This module wires the pieces together for the launchers (docker-compose.yml, deploy/, `llmp stack`):
the queue and its app (dispatch.py), and the one task, `llmp.training.run_node`, which runs a node
of a job to its end (processes.py: torchrun under a guard, the runtime's events (events.py) forwarded,
the model registered (publish.py)); and the dataset tasks of the `data` queue (services/dataset/tasks.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from celery import signals

from services.common import logs
from services.common.config import Settings
from services.dataset import tasks as dataset_tasks
from services.training.dispatch import EVAL_TASK_NAME, TASK_NAME, app
from services.training.evaluation import EvaluationRunner
from services.training.processes import NodeRunner

__all__ = ["app", "dataset_tasks", "run_evaluation", "run_node"]


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:  # replaces Celery's own logging setup with llmp's
    logs.configure(app.settings or Settings.from_env(), "training-worker")


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_node(self, job_hint: str) -> str:
    """Claim the best free node (not necessarily `job_hint`'s) and run it to its end."""
    settings = self.app.settings or Settings.from_env()
    worker = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    return asyncio.run(NodeRunner(settings, worker).run(job_hint))


@app.task(name=EVAL_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_evaluation(self, job_hint: str) -> str:
    """Claim the oldest free evaluation job (not necessarily `job_hint`) and compute it (evaluation.py)."""
    settings = self.app.settings or Settings.from_env()
    worker = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    return asyncio.run(EvaluationRunner(settings, worker).run(job_hint))
