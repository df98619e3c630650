"""Signed claims: the tokens that carry who a gRPC call acts for, and their verification.

A token is `v1.<payload>.<signature>`: the payload the claims as compact JSON, the signature HMAC-SHA256
of `v1.<payload>` under the secret every llmp process shares (`LLMP_SERVICE_SECRET`), both base64url
without padding. HMAC, not a public-key signature: the lock holds no Ed25519 library, and every process
that verifies also signs (a service acts as itself), so a key pair per process would buy nothing until
each service gets a secret of its own. What the claims mean is `identity`'s business; this module only
makes them unforgeable and short-lived.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass

from services.common import errors
from services.common.config import MIN_SERVICE_SECRET_BYTES

VERSION = "v1"
MIN_SECRET_BYTES = MIN_SERVICE_SECRET_BYTES  # a shorter secret is guessable offline from one captured token


@dataclass(frozen=True)
class Claims:
    """What a token asserts."""

    issuer: str  # who signed: "gateway", or "service:<name>" for a service acting itself
    audience: str  # the one service the token is for
    tenant: str
    key_id: str  # the API key the gateway authenticated (or the key a service's work was started by)
    role: str
    expires: float  # Unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies claims with one shared secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise errors.InvalidArgument(f"the service secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._secret, signed.encode(), hashlib.sha256).digest())

    def sign(self, claims: Claims) -> str:
        payload = _b64(json.dumps(asdict(claims), separators=(",", ":"), sort_keys=True).encode())
        signed = f"{VERSION}.{payload}"
        return f"{signed}.{self._mac(signed)}"

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """The claims of a token this secret signed and that has not expired; Unauthenticated otherwise
        (one message for every flaw: a forger learns nothing from which check failed)."""
        version, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        expected = self._mac(f"{version}.{payload}")
        if version != VERSION or not hmac.compare_digest(signature.encode(), expected.encode()):
            raise errors.Unauthenticated("invalid identity token")
        try:
            claims = Claims(**json.loads(_unb64(payload)))
        except (ValueError, TypeError):  # signed by us, so only a version skew gets here
            raise errors.Unauthenticated("invalid identity token") from None
        if claims.expires <= (time.time() if now is None else now):
            raise errors.Unauthenticated("identity token expired")
        return claims
