"""Fair turns across tenants for a replica's build slots: one tenant's queue of builds cannot starve another's.

A replica builds one dataset at a time (the build is CPU-bound). Waiting builds queue per tenant, and a free
slot goes to the waiting tenant served least recently, then in arrival order within that tenant: with ten
builds of one tenant waiting and one of another, the other's runs next, not eleventh.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class TenantTurns:
    """`capacity` slots handed out least-recently-served tenant first (see the module docstring)."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self.busy = 0
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._last_served: dict[str, int] = {}  # tenant -> the turn number of its latest grant
        self._turns = 0

    @asynccontextmanager
    async def held(self, tenant: str) -> AsyncIterator[None]:
        """Wait for a slot in the tenant's turn; hold it for the body."""
        await self._acquire(tenant)
        try:
            yield
        finally:
            self._release()

    def waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))

    async def _acquire(self, tenant: str) -> None:
        if self.busy < self.capacity and not self._waiting:
            self._grant(tenant)
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just as the caller went away: pass it on
                self._release()
            else:
                self._forget(tenant, granted)
            raise

    def _forget(self, tenant: str, granted: asyncio.Future) -> None:
        queue = self._waiting.get(tenant)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self._waiting[tenant]

    def _grant(self, tenant: str) -> None:
        self.busy += 1
        self._turns += 1
        self._last_served[tenant] = self._turns

    def _release(self) -> None:
        self.busy -= 1
        while self.busy < self.capacity and self._waiting:
            tenant = min(self._waiting, key=lambda name: self._last_served.get(name, 0))
            queue = self._waiting[tenant]
            granted = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if granted.done():  # its waiter was cancelled
                continue
            self._grant(tenant)
            granted.set_result(None)
