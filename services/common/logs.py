"""Logging: one JSON object per line (or plain text), every line stamped with the request id.

The request id is a context variable: the gRPC interceptor and the gateway middleware set it for the
duration of a call, so any `logging.getLogger(__name__)` call inside the call carries it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from services.common.config import Settings

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else passed through `extra=` is emitted as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "request_id": request_id.get(),
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {component} [%(request_id)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = request_id.get()
        return super().format(record)


def configure(settings: Settings, component: str) -> None:
    """Send every logger's records to stderr in the configured format, at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(component) if settings.log_format == "json" else TextFormatter(component)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Chatty libraries stay at WARNING unless debugging.
    for noisy in ("botocore", "urllib3", "aiohttp.access", "celery.redirected"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The first moment a process can say so: a secret left at its published default is nobody's secret.
    for name in settings.published_secrets():
        logging.getLogger("llmp.config").warning(
            "%s is left at its published default: set a secret of your own outside a local stack", name,
            extra={"variable": name})
