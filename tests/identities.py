"""Signed identities for tests that call a service's stub directly, as the gateway would.

`SERVICE_SECRET` is the session's `LLMP_SERVICE_SECRET` (tests/conftest.py puts it in `settings_env`), so the
services a test starts, in-process or as processes, verify what `metadata` signs.
"""

from __future__ import annotations

from services.common.identity import Caller, signed_metadata
from services.common.signing import Signer

# Fixed, not random: a stack kept between sessions (LLMP_RELIABILITY_STACK) still verifies what a later one signs.
SERVICE_SECRET = "llmp-test-service-secret-never-for-real-use"
SIGNER = Signer(SERVICE_SECRET.encode())


def metadata(tenant: str, service: str, *, key_id: str = "key-test",
             role: str = "developer") -> tuple[tuple[str, str], ...]:
    """What the gateway sends when `tenant`'s key (`key_id`, `role`) calls `service`."""
    return signed_metadata(SIGNER, Caller(tenant, key_id, role), service)
