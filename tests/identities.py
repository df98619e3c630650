"""Signed identities for tests that call a service's stub directly, as the gateway would.

`SERVICE_SECRET` is the session's `LLMP_SERVICE_SECRET` (tests/conftest.py puts it in `settings_env`), so the
services a test starts, in-process or as processes, verify what `metadata` signs.
"""

from __future__ import annotations

import secrets

from services.common.identity import Caller, signed_metadata
from services.common.signing import Signer

SERVICE_SECRET = f"test-{secrets.token_urlsafe(24)}"
SIGNER = Signer(SERVICE_SECRET.encode())


def metadata(tenant: str, service: str, *, key_id: str = "key-test",
             role: str = "developer") -> tuple[tuple[str, str], ...]:
    """What the gateway sends when `tenant`'s key (`key_id`, `role`) calls `service`."""
    return signed_metadata(SIGNER, Caller(tenant, key_id, role), service)
