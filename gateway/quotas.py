"""Per-tenant quotas every gateway replica shares through Redis: requests per second, and generations and
event streams running at once. One tenant's keys all draw on its tenant's quotas, so minting keys buys
nothing; a refused request is 429 with Retry-After and a message naming the quota.

Requests/s is a token bucket per tenant in Redis (one Lua script: refill, take). So that the hot path does
not pay a Redis round trip per request, a replica takes tokens in batches (`batch`: a tenth of a second's
worth) and spends them locally for up to `LEASE_SECONDS`; the tenant's total stays within its rate plus one
batch per replica. Concurrency is a sorted set of leases per tenant and kind,
scored by expiry, so the slots of a replica that died free themselves within `SLOT_LEASE_SECONDS`; a
long stream renews its lease while it runs.

Without Redis (no LLMP_QUOTA_REDIS_URL, and a broker that is not Redis), or while it cannot be reached,
the same quotas hold per replica (logged once): a degraded quota beats refusing every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.common import errors
from services.common.config import Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 1.0  # how long a replica may spend a batch of request tokens it took from Redis
SLOT_LEASE_SECONDS = 60.0  # a concurrency slot not renewed this long is free again (its replica died)
RENEW_SECONDS = 20.0  # how often a running generation or stream renews its slot
KEY_PREFIX = "llmp:quota:"
GENERATIONS, STREAMS = "generations", "streams"
HELD, UNREACHABLE = "held", "unreachable"  # what a refill from Redis came to, beside the tokens left when refused

# KEYS[1]: the tenant's bucket. ARGV: rate, burst, now (s), tokens wanted. Returns {granted, tokens left}.
TAKE_TOKENS = """
local rate, burst, now, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, tostring(tokens)}
"""
# KEYS[1]: the tenant's leases of one kind. ARGV: now, expiry, limit, lease id. Returns 1 if taken, else 0.
TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[2]) - tonumber(ARGV[1])) * 1000) + 1000)
return 1
"""


@dataclass(slots=True)
class _Batch:
    tokens: int
    expires: float


@dataclass(slots=True)
class _LocalBucket:
    tokens: float
    updated: float


class TenantQuotas:
    """The quotas of `settings` (LLMP_TENANT_*), shared through the Redis at `settings.quota_redis_url`."""

    def __init__(self, settings: Settings) -> None:
        self.rate = settings.tenant_rate_limit
        self.burst = max(1.0, 2 * self.rate)  # two seconds' worth
        self.batch = max(1, int(self.rate / 10))  # at most ten Redis calls a second per tenant and replica
        self.limits = {GENERATIONS: settings.tenant_max_generations, STREAMS: settings.tenant_max_streams}
        self._redis = None
        if settings.quota_redis_url:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(settings.quota_redis_url, socket_timeout=1,
                                                       socket_connect_timeout=1)
            self._take_tokens = self._redis.register_script(TAKE_TOKENS)
            self._take_slot = self._redis.register_script(TAKE_SLOT)
        self._batches: dict[str, _Batch] = {}
        self._refills: dict[str, asyncio.Future] = {}  # tenant -> the Redis call for its next batch, in flight
        self._local: dict[str, _LocalBucket] = {}  # the fallback buckets (no Redis)
        self._local_slots: dict[tuple[str, str], int] = {}
        self._degraded = False

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _down(self, error: Exception) -> None:
        if not self._degraded:
            log.warning("quota store unreachable: quotas hold per replica until it is back",
                        extra={"error": str(error)})
        self._degraded = True

    # -- requests per second --------------------------------------------------------------------

    def take_local(self, tenant: str, now: float | None = None) -> bool:
        """Spend one token of a batch this replica holds for `tenant` (no await: the hot path). `now`:
        `time.monotonic()`, if the caller has it."""
        batch = self._batches.get(tenant)
        if batch is not None and batch.tokens > 0 and batch.expires > (time.monotonic() if now is None else now):
            batch.tokens -= 1
            return True
        return False

    async def take(self, tenant: str) -> None:
        """One request of `tenant`; RateLimited when its quota is spent.

        Requests that find the tenant's batch spent at the same moment share one Redis call (`_refills`):
        each taking a batch of its own would lease the tenant's quota many times over (16 requests in flight,
        16 batches, all but one dropped), refusing the tenant well below its rate."""
        while not self.take_local(tenant):
            if self._redis is None:
                self._take_fallback(tenant)
                return
            refill = self._refills.get(tenant)
            if refill is None:
                refill = self._refills[tenant] = asyncio.ensure_future(self._refill(tenant))
                refill.add_done_callback(lambda done: self._refills.pop(tenant) if self._refills.get(tenant) is done
                                         else None)
            # Shielded: a request cancelled while it waits must not cancel the others' refill.
            outcome = await asyncio.shield(refill)
            if outcome is UNREACHABLE:  # Redis down or slow: per replica rather than not at all
                self._take_fallback(tenant)
                return
            if outcome is not HELD:
                raise self._refused(outcome)
            # A batch arrived: take from it (the loop), or, if the requests waiting on it spent it, refill again.

    async def _refill(self, tenant: str) -> str | float:
        """A batch of `tenant`'s tokens from Redis: HELD once it is, the tokens left in Redis when none was
        granted, UNREACHABLE when Redis could not be asked."""
        try:
            granted, left = await self._take_tokens(keys=[f"{KEY_PREFIX}rate:{tenant}"],
                                                    args=[self.rate, self.burst, time.time(), self.batch])
        except Exception as error:
            self._down(error)
            return UNREACHABLE
        self._degraded = False
        if int(granted) > 0:
            self._batches[tenant] = _Batch(int(granted), time.monotonic() + LEASE_SECONDS)
            return HELD
        return float(left)

    def _take_fallback(self, tenant: str) -> None:
        now = time.monotonic()
        bucket = self._local.get(tenant)
        if bucket is None:
            bucket = self._local[tenant] = _LocalBucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise self._refused(bucket.tokens)
        bucket.tokens -= 1

    def _refused(self, tokens_left: float) -> errors.RateLimited:
        return errors.RateLimited(f"tenant request quota of {self.rate:g} requests/s exceeded "
                                  "(LLMP_TENANT_RATE_LIMIT, shared by all of the tenant's keys)",
                                  retry_after=max(0.0, 1 - tokens_left) / self.rate)

    # -- work running at once -------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, tenant: str, kind: str) -> AsyncIterator[None]:
        """Hold one of `tenant`'s `kind` slots (GENERATIONS, STREAMS) for the block; RateLimited when all are
        taken."""
        limit = self.limits[kind]
        key, lease = f"{KEY_PREFIX}{kind}:{tenant}", uuid.uuid4().hex
        shared = False
        if self._redis is not None:
            try:
                now = time.time()
                taken = await self._take_slot(keys=[key], args=[now, now + SLOT_LEASE_SECONDS, limit, lease])
            except Exception as error:
                self._down(error)
            else:
                if not int(taken):
                    raise self._busy(kind, limit)
                shared = True
        if shared:
            renewer = asyncio.create_task(self._renew(key, lease))
            try:
                yield
            finally:
                renewer.cancel()
                try:
                    await self._redis.zrem(key, lease)
                except Exception as error:  # the lease expires by itself
                    self._down(error)
            return
        local = (tenant, kind)
        if self._local_slots.get(local, 0) >= limit:
            raise self._busy(kind, limit)
        self._local_slots[local] = self._local_slots.get(local, 0) + 1
        try:
            yield
        finally:
            self._local_slots[local] -= 1

    async def _renew(self, key: str, lease: str) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                await self._redis.zadd(key, {lease: time.time() + SLOT_LEASE_SECONDS}, xx=True)
            except Exception as error:
                self._down(error)

    @staticmethod
    def _busy(kind: str, limit: int) -> errors.RateLimited:
        setting = "LLMP_TENANT_MAX_GENERATIONS" if kind == GENERATIONS else "LLMP_TENANT_MAX_STREAMS"
        return errors.RateLimited(f"tenant quota of {limit} concurrent {kind} reached ({setting}); retry when one "
                                  "ends", retry_after=1.0)


def slot_kind(method: str, path: str) -> str | None:
    """Which concurrency quota a route's requests hold: generations (completions), streams (events)."""
    if method == "POST" and path.endswith("/completions"):
        return GENERATIONS
    if method == "GET" and path.endswith("/events"):
        return STREAMS
    return None
