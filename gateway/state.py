"""Typed application state (`web.AppKey`s), importable by the app and every view without cycles."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.auth import KeyStore, RateLimiter
from gateway.quotas import TenantQuotas
from services.common.config import Settings
from services.common.db import Database
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller
from services.common.s3 import ObjectStore

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
DATABASE: web.AppKey[Database] = web.AppKey("database", Database)
OBJECT_STORE: web.AppKey[ObjectStore] = web.AppKey("object_store", ObjectStore)  # /v1/status only
KEYS: web.AppKey[KeyStore] = web.AppKey("keys", KeyStore)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter", RateLimiter)
# Per client address, in front of authentication: requests whose key is not already known cost a query.
IP_LIMITER: web.AppKey[RateLimiter] = web.AppKey("ip_limiter", RateLimiter)
QUOTAS: web.AppKey[TenantQuotas] = web.AppKey("quotas", TenantQuotas)
CLIENTS: web.AppKey[ServiceClients] = web.AppKey("clients", ServiceClients)
ROUTE_TABLE: web.AppKey[list] = web.AppKey("routes", list)
# Set when shutdown starts: /readyz turns 503 so the load balancer stops sending while requests drain.
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining", asyncio.Event)
# The authenticated caller of the current request (set by the auth middleware).
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
