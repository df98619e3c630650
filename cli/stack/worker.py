"""The Celery worker that runs training jobs: one process on the `gpu` queue, one job at a time, under a
node name of its own so its health check asks exactly it."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cli.stack.broker import supports_broadcast
from cli.stack.component import Launch, PythonProcess
from cli.stack.state import Record
from services.common.queues import WORKER_QUEUES


@dataclass(frozen=True)
class Worker(PythonProcess):
    def command(self, launch: Launch) -> tuple[list[str], dict[str, str], str]:
        node = f"llmp-worker-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        command = [sys.executable, "-m", "celery", "-A", self.module, "worker", "-Q", WORKER_QUEUES,
                   "--concurrency", "1", "--prefetch-multiplier", "1", "-n", node, "--loglevel", "INFO"]
        return command, super().command(launch)[1], node  # the environment every llmp process gets

    def probe(self, record: Record, env: Mapping[str, str], timeout: float) -> bool:
        """The worker answers a Celery ping (Redis/AMQP), or, on a broker without broadcast, its log says it
        is ready (it logs `<node> ready.` once it consumes)."""
        if supports_broadcast(env["LLMP_BROKER_URL"]):
            from celery import Celery

            app = Celery("llmp-launcher", broker=env["LLMP_BROKER_URL"], set_as_current=False)
            try:
                replies = app.control.ping(destination=[record.detail], timeout=timeout)
            except Exception:  # the broker's own errors
                return False
            finally:
                app.close()
            return any(record.detail in reply for reply in replies)
        log = Path(record.log or "")
        return log.exists() and f"{record.detail} ready." in log.read_text(errors="replace")
