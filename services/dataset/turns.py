"""Fair turns across tenants for a replica's build slots: one tenant's builds cannot starve another's.

A replica runs up to `capacity` builds at once (LLMP_DATASET_BUILD_SLOTS), and one tenant's builds hold at
most `per_tenant` of them (LLMP_TENANT_DATASET_BUILD_SLOTS), so however many or however large one tenant's
builds are, another tenant's build finds a slot without waiting for them. Waiting builds queue per tenant;
a free slot goes to the waiting tenant served least recently among those under their bound, then in
arrival order within that tenant: with ten builds of one tenant waiting and one of another, the other's
runs next, not eleventh.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class TenantTurns:
    """`capacity` slots, at most `per_tenant` to one tenant, handed out least-recently-served tenant first."""

    def __init__(self, capacity: int = 1, per_tenant: int | None = None) -> None:
        if capacity < 1 or (per_tenant is not None and per_tenant < 1):
            raise ValueError("a replica needs at least one build slot, and each tenant at least one")
        self.capacity = capacity
        self.per_tenant = capacity if per_tenant is None else min(per_tenant, capacity)
        self.busy = 0
        self._held: dict[str, int] = {}  # tenant -> slots it holds now
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
            self._release(tenant)

    def waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))

    def holding(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def _may_start(self, tenant: str) -> bool:
        return self.busy < self.capacity and self._held.get(tenant, 0) < self.per_tenant

    async def _acquire(self, tenant: str) -> None:
        # Grants are made as soon as a slot frees, so whoever still waits is at their tenant's bound: a tenant
        # with no waiter of its own may go ahead of them.
        if tenant not in self._waiting and self._may_start(tenant):
            self._grant(tenant)
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just as the caller went away: pass it on
                self._release(tenant)
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
        self._held[tenant] = self._held.get(tenant, 0) + 1
        self._turns += 1
        self._last_served[tenant] = self._turns

    def _release(self, tenant: str) -> None:
        self.busy -= 1
        self._held[tenant] -= 1
        if not self._held[tenant]:
            del self._held[tenant]
        while self.busy < self.capacity:
            eligible = [name for name in self._waiting if self._held.get(name, 0) < self.per_tenant]
            if not eligible:
                return
            tenant = min(eligible, key=lambda name: self._last_served.get(name, 0))
            queue = self._waiting[tenant]
            granted = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if granted.done():  # its waiter was cancelled
                continue
            self._grant(tenant)
            granted.set_result(None)
