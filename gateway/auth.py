"""API keys: stored hashed in PostgreSQL, each with a role and a tenant; per-key and per-address rate limits.

A key looks like `llmp_<id>_<secret>`: the id finds the row, the secret is compared by its SHA-256
(keys are 256-bit random, so a slow password hash adds nothing). The bootstrap admin key comes from
`LLMP_ADMIN_KEY` (or `.llmp/admin.key`, generated when unset).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from services.common import errors, private_files
from services.common.bounded import Bounded
from services.common.config import Settings
from services.common.db import Database
from services.common.identity import Caller

ROLES = ("admin", "developer", "inference")
KEY_PREFIX = "llmp"
BOOTSTRAP_ID = "bootstrap"
DEFAULT_TENANT = "default"
BOOTSTRAP_CALLER = Caller(tenant=DEFAULT_TENANT, key_id=BOOTSTRAP_ID, role="admin")
CACHE_SECONDS = 5.0  # a revoked key (through another gateway replica) stops working within this
MAX_CACHED = 100_000  # keys remembered (known or unknown) before the caches start over: memory stays bounded


def key_scope(caller: Caller) -> str | None:
    """The tenant whose API keys `caller` (an admin) manages; None for every tenant's. Only admins of the
    bootstrap key's tenant (`default`, the platform operators) manage every tenant's keys; another
    tenant's admin sees, creates and revokes its own tenant's keys only, and another tenant's key is
    404 to it like any other tenant's object."""
    return None if caller.tenant == DEFAULT_TENANT else caller.tenant


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key id, secret, full key) for a fresh API key."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(full_key: str) -> tuple[str, str]:
    prefix, _, rest = full_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret:
        raise errors.Unauthenticated("malformed API key")
    return key_id, secret


def admin_key(settings: Settings) -> str:
    """The bootstrap admin key: LLMP_ADMIN_KEY, else the one in the state dir (created if missing)."""
    if settings.admin_key:
        return settings.admin_key
    return private_files.read_or_create(Path(settings.state_dir) / "admin.key", lambda: new_key()[2])


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key (an API key's id, or a client address): `rate` requests per second sustained,
    bursts of `burst`."""

    def __init__(self, rate: float, burst: int, *, subject: str = "this key") -> None:
        self.rate, self.burst, self.subject = rate, burst, subject
        self._buckets: Bounded[str, _Bucket] = Bounded(MAX_CACHED)

    def take(self, key_id: str, rate: float | None = None, now: float | None = None) -> None:
        """One request of `key_id`; RateLimited past the limit. `now`: `time.monotonic()`, if the caller has it."""
        rate = rate or self.rate
        if now is None:
            now = time.monotonic()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets.remember(key_id, _Bucket(self.burst, now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise errors.RateLimited(f"rate limit of {rate:g} requests/s exceeded for {self.subject}",
                                     retry_after=(1 - bucket.tokens) / rate)
        bucket.tokens -= 1


class KeyStore:
    """API keys in PostgreSQL."""

    def __init__(self, db: Database, bootstrap_key: str) -> None:
        self.db = db
        self.bootstrap_key = bootstrap_key
        self._bootstrap = bootstrap_key.encode()
        self._cache: Bounded[str, tuple[float, Caller, float]] = Bounded(MAX_CACHED)  # key -> (expires, caller, rate)
        self._unknown: Bounded[str, float] = Bounded(MAX_CACHED)  # full key found unknown or revoked -> until when

    def cached(self, full_key: str, now: float | None = None) -> tuple[Caller, float] | None:
        """The caller and rate limit of the bootstrap key, or of a key checked within the last few seconds
        (no await, no query). `now`: `time.monotonic()`, if the caller has it."""
        cached = self._cache.get(full_key)  # first: the hot path is an ordinary key seen a moment ago
        if cached is not None and cached[0] > (time.monotonic() if now is None else now):
            return cached[1], cached[2]
        if hmac.compare_digest(full_key.encode(), self._bootstrap):
            return BOOTSTRAP_CALLER, 0.0
        return None

    async def authenticate(self, full_key: str) -> tuple[Caller, float]:
        """The caller a key stands for and its rate limit (requests/s); Unauthenticated otherwise. A key
        found unknown is remembered as such for `CACHE_SECONDS`: repeating it costs no query."""
        cached = self.cached(full_key)
        if cached is not None:
            return cached
        if self._unknown.get(full_key, 0.0) > time.monotonic():
            raise errors.Unauthenticated("unknown or revoked API key")
        key_id, secret = parse_key(full_key)
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT tenant, role, secret_sha256, rate_limit FROM api_keys WHERE id = %s AND revoked_at IS NULL",
                (key_id,))
            row = await cursor.fetchone()
        if row is None or not hmac.compare_digest(row["secret_sha256"], hash_secret(secret)):
            self._unknown.remember(full_key, time.monotonic() + CACHE_SECONDS)
            raise errors.Unauthenticated("unknown or revoked API key")
        caller = Caller(tenant=row["tenant"], key_id=key_id, role=row["role"])
        self._cache.remember(full_key, (time.monotonic() + CACHE_SECONDS, caller, row["rate_limit"]))
        return caller, row["rate_limit"]

    async def create(self, *, tenant: str, role: str, name: str, rate_limit: float, created_by: str) -> dict:
        if role not in ROLES:
            raise errors.ValidationFailed(f"role must be one of {', '.join(ROLES)}")
        key_id, secret, full_key = new_key()
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO api_keys (id, tenant, role, name, secret_sha256, rate_limit, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id, tenant, role, name, rate_limit, created_at",
                (key_id, tenant, role, name, hash_secret(secret), rate_limit, created_by))
            row = await cursor.fetchone()
        return {**_public(row), "key": full_key}

    async def list(self, tenant: str | None = None) -> list[dict]:
        """Every key (`tenant` None) or one tenant's."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, tenant, role, name, rate_limit, created_at, revoked_at FROM api_keys "
                "WHERE %(tenant)s::text IS NULL OR tenant = %(tenant)s ORDER BY created_at", {"tenant": tenant})
            return [_public(row) for row in await cursor.fetchall()]

    async def revoke(self, key_id: str, tenant: str | None = None) -> None:
        """Revoke a key (of `tenant` only, unless None): it stops working here at once (the cache is
        cleared) and on other gateway replicas within `CACHE_SECONDS`."""
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE id = %(id)s AND revoked_at IS NULL "
                "AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)", {"id": key_id, "tenant": tenant})
            if cursor.rowcount == 0:
                raise errors.NotFound(f"API key {key_id} not found")
        self._cache.clear()


def _public(row: dict) -> dict:
    return {key: (value.isoformat() if hasattr(value, "isoformat") else value) for key, value in row.items()}
