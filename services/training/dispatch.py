"""The coordinator's dispatcher: training and evaluation jobs as messages on the workers' queues
(services/common/queues.py holds the app, the queues and their guarantees).

One task, `llmp.training.run_node` (registered by `worker.py`), is one node of one job. The message
only says "a node is free": the worker that receives it claims the highest-priority free node from
PostgreSQL (see coordinator.py), so the broker's FIFO never overrides priorities. If the whole machine
disappears, the coordinator notices the expired lease and re-queues the job.
"""

from __future__ import annotations

from celery import Celery

from services.common.queues import EVAL_QUEUE, EVAL_TASK_NAME, QUEUE, TASK_NAME


class CeleryDispatcher:
    """coordinator.Dispatcher over Celery: `messages` run_node messages to the `gpu` queue (run_evaluation
    messages to the `eval` queue for evaluations)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def dispatch(self, job_id: str, messages: int, kind: str = "training") -> None:
        task, queue = (TASK_NAME, QUEUE) if kind == "training" else (EVAL_TASK_NAME, EVAL_QUEUE)
        for _ in range(messages):
            self.app.send_task(task, args=[job_id], queue=queue, routing_key=queue)


