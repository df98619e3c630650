"""A one-task Celery app for the launcher's broker round trip (the worker runs with this folder as cwd)."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

app = Celery("roundtrip", broker=os.environ["ROUNDTRIP_BROKER_URL"])
app.conf.broker_connection_retry_on_startup = True


@app.task(name="roundtrip.write")
def write(path: str, text: str) -> None:
    Path(path).write_text(text)
