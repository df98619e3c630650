"""The Celery worker that runs training and evaluation jobs: `celery -A services.training.worker worker -Q gpu,eval
-c 1` on a fleet's GPU nodes (`queues.GPU_WORKER_QUEUES`; the CPU data workers, services/dataset/worker.py, take
the `data` queue there), and in the local stack also dataset builds' ranges (`-Q gpu,eval,data`,
`queues.WORKER_QUEUES`).

This module wires the pieces together for the launchers (docker-compose.yml, deploy/, `llmp stack`): the
app (services/common/queues.py), the task `llmp.training.run_node`, which runs a node of a job to its end
(processes.py: torchrun or the warm runtime under a guard, the runtime's events (events.py) forwarded, the
model registered (publish.py)), and `llmp.training.run_evaluation`. The `data` queue's tasks
(services/dataset/tasks.py) are imported by Celery at start (`queues.WORKER_IMPORTS`), not by this module.
Each pool process keeps a warm runtime (warm.py) for the next job of one process, so such a job starts
without torchrun's and train.py's imports (`LLMP_TRAINING_WARM_START`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any

from celery import signals

from services.common import logs
from services.common.config import Settings
from services.common.queues import EVAL_TASK_NAME, TASK_NAME, app
from services.training import warm
from services.training.evaluation import EvaluationRunner
from services.training.processes import NodeRunner

__all__ = ["app", "run_evaluation", "run_node"]

log = logging.getLogger(__name__)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:  # replaces Celery's own logging setup with llmp's
    logs.configure(app.settings or Settings.from_env(), "training-worker")


# The pool process's warm runtime (warm.py), ready for the next job of one process: started when the pool
# process starts and again after each job it takes, while the worker is otherwise idle.
_spare: warm.Spare | None = None


def _ready_spare(settings: Settings) -> None:
    global _spare
    if _spare is not None and not _spare.handed and _spare.process.poll() is not None:
        log.warning("the warm runtime exited before any job; jobs start under torchrun meanwhile",
                    extra={"exit_code": _spare.process.returncode})
    # Only from the main thread: the guard's PR_SET_PDEATHSIG fires when the thread that started it exits,
    # which a thread pool's thread may do mid-job (the prefork pool runs tasks in its processes' main thread).
    main_thread = threading.current_thread() is threading.main_thread()
    if settings.training_warm_start and main_thread and (_spare is None or not _spare.ready):
        _spare = warm.Spare.start()


@signals.worker_process_init.connect
def _start_spare(**_: Any) -> None:  # in the pool process's main thread, which also runs its tasks
    _ready_spare(app.settings or Settings.from_env())


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_node(self, job_hint: str) -> str:
    """Claim the best free node (not necessarily `job_hint`'s) and run it to its end."""
    settings = self.app.settings or Settings.from_env()
    worker = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    try:
        return asyncio.run(NodeRunner(settings, worker, spare=_spare).run(job_hint))
    finally:
        _ready_spare(settings)  # the next job's, once this one is over


@app.task(name=EVAL_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_evaluation(self, job_hint: str) -> str:
    """Claim the oldest free evaluation job (not necessarily `job_hint`) and compute it (evaluation.py)."""
    settings = self.app.settings or Settings.from_env()
    worker = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    return asyncio.run(EvaluationRunner(settings, worker).run(job_hint))
