"""A round of work repeated in the background at a fixed interval, for as long as a service runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `round()` from `start()` until `close()`, `interval_s` after the end of the one before (the first
    `interval_s` after `start()`, or at once with `first_at_start`).

    A round that raises is logged and the next one runs on time: the work is housekeeping against
    servers that may be away for a moment (PostgreSQL, the Kubernetes API), never a reason to stop.
    `close()` lets a round in progress finish, so what it writes is never cut in half; with
    `cancel_at_close` it cancels the round instead, for rounds that are safe to cut and may run long
    (a readiness probe waiting on a backend, a sweep that the next start repeats).
    """

    def __init__(self, what: str, interval_s: float, round_: Callable[[], Awaitable[object]], *,
                 first_at_start: bool = False, cancel_at_close: bool = False) -> None:
        self.what = what
        self.interval_s = interval_s
        self._round = round_
        self._first_at_start = first_at_start
        self._cancel_at_close = cancel_at_close
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=self.what)

    async def close(self) -> None:
        self._stopping.set()
        if self._task is not None:
            if self._cancel_at_close:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # its own cancellation is no error here
            self._task = None

    async def _run(self) -> None:
        if not self._first_at_start and await self._stopped_within(self.interval_s):
            return
        while not self._stopping.is_set():
            try:
                await self._round()
            except Exception:
                log.exception("%s failed; next round in %.1f s", self.what, self.interval_s)
            if await self._stopped_within(self.interval_s):
                return

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True
