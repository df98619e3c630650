"""The workers' queues on Celery: the one app both sides configure (senders and the worker fleet), its queues,
task names and delivery guarantees. Services meet here, not in each other's modules: the training service
sends `gpu` and `eval` tasks (services/training/dispatch.py), the dataset service `data` tasks
(services/dataset/shards.py). In production the GPU workers (`celery -A services.training.worker`,
`GPU_WORKER_QUEUES`) run the training tasks and the CPU data workers (`celery -A services.dataset.worker`,
`DATA_WORKER_QUEUES`) the dataset's; the local launcher's one worker consumes every queue (`WORKER_QUEUES`) and
imports the dataset's tasks too (`WORKER_IMPORTS`, Celery's `imports`).

Reliability comes from three settings and a lease kept in PostgreSQL by whoever sent the work: late acks
and reject-on-worker-lost give the message back to the broker if the worker process dies; prefetch 1 keeps
one task per worker process. On RabbitMQ, set the broker's `consumer_timeout` above the longest job: a
message stays unacked for the whole run (late acks). On Redis the visibility timeout is set to
`VISIBILITY_TIMEOUT`; a message redelivered after it is harmless (its claim finds nothing to do).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from services.common.config import Settings

TASK_NAME = "llmp.training.run_node"
QUEUE = "gpu"
EVAL_TASK_NAME = "llmp.training.run_evaluation"  # one evaluation job (evaluation.py), on a queue of its own
EVAL_QUEUE = "eval"  # workers consume both (`--queues gpu,eval,...`); a fleet may give evaluations workers of their own
DATA_QUEUE = "data"  # dataset builds' CPU stages, one byte range of a corpus per task (services/dataset/shards.py)
SCAN_TASK_NAME = "llmp.dataset.scan_shard"
PACK_TASK_NAME = "llmp.dataset.pack_shard"
WORKER_QUEUES = ",".join((QUEUE, EVAL_QUEUE, DATA_QUEUE))  # the local launcher's one worker (`llmp up`): all of them
# A fleet (docker-compose.yml, deploy/) splits them: GPU workers take training and evaluations only, and CPU data
# workers (services/dataset/worker.py) the dataset ranges, so a range never holds a GPU node's only slot.
GPU_WORKER_QUEUES = ",".join((QUEUE, EVAL_QUEUE))
DATA_WORKER_QUEUES = DATA_QUEUE
VISIBILITY_TIMEOUT = 24 * 3600  # Redis: seconds before an unacked message is delivered again
WORKER_IMPORTS = ("services.dataset.tasks",)  # task modules the worker imports besides its own (the data queue's)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Everything the queues rely on, from `settings` (see the module docstring)."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend or None,
        "task_ignore_result": not settings.result_backend,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE,
        "task_queues": tuple(Queue(queue, routing_key=queue) for queue in (QUEUE, EVAL_QUEUE, DATA_QUEUE)),
        "task_routes": {TASK_NAME: {"queue": QUEUE, "routing_key": QUEUE},
                        EVAL_TASK_NAME: {"queue": EVAL_QUEUE, "routing_key": EVAL_QUEUE},
                        SCAN_TASK_NAME: {"queue": DATA_QUEUE, "routing_key": DATA_QUEUE},
                        PACK_TASK_NAME: {"queue": DATA_QUEUE, "routing_key": DATA_QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": _transport_options(settings.broker_url),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "imports": WORKER_IMPORTS,
    }


def _transport_options(broker_url: str) -> dict[str, Any]:
    """Redis and SQS redeliver an unacknowledged message after the visibility timeout; RabbitMQ needs none,
    and the SQLAlchemy transport (one-machine stacks) hands every option to `create_engine`, which refuses it."""
    scheme = broker_url.split("://", 1)[0].lower()
    return {"visibility_timeout": VISIBILITY_TIMEOUT} if scheme in ("redis", "rediss", "sqs") else {}


class TrainingCelery(Celery):
    """Configured from `LLMP_*` when first used, not when imported (`celery -A` imports the module)."""

    settings: Settings | None = None

    def on_configure(self) -> None:
        if self.settings is None:
            self.settings = Settings.from_env()
        self.config_from_object(celery_config(self.settings))


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (the coordinator's side)."""
    producer = TrainingCelery("llmp-training", set_as_current=False)
    producer.settings = settings
    return producer


app = TrainingCelery("llmp-training")  # the worker's app (services/training/worker.py registers its tasks on it)
