"""The signed claims every gRPC call's identity rides on: what one secret signs, only it verifies, unchanged
and in time; and the service secret a process signs with comes from its settings or, in dev only, the state dir."""

from __future__ import annotations

import pytest

from services.common import errors
from services.common.config import Settings
from services.common.signing import Claims, Signer

SIGNER = Signer(b"0123456789abcdef-unit")
# Expiring in 2100: claims built at import time must still be in time when a long run reaches these tests.
CLAIMS = Claims("gateway", "registry", "acme", "key-1", "developer", 4_102_444_800.0)


def test_a_token_verifies_to_the_claims_it_was_signed_with():
    assert SIGNER.verify(SIGNER.sign(CLAIMS)) == CLAIMS


@pytest.mark.parametrize("forge", [
    lambda token: Signer(b"another-secret-of-16+").sign(CLAIMS),
    lambda token: token[:-2] + ("AA" if not token.endswith("AA") else "BB"),  # signature bits flipped
    lambda token: token.replace("v1.", "v2.", 1),
    lambda token: token.split(".", 2)[0] + "." + token.split(".", 2)[1],  # no signature at all
    lambda token: "",
])
def test_forged_tokens_are_unauthenticated(forge):
    with pytest.raises(errors.Unauthenticated):
        SIGNER.verify(forge(SIGNER.sign(CLAIMS)))


def test_an_expired_token_is_unauthenticated():
    token = SIGNER.sign(CLAIMS)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        SIGNER.verify(token, now=CLAIMS.expires + 1)


def test_a_short_secret_is_refused():
    with pytest.raises(errors.InvalidArgument, match="at least 16 bytes"):
        Signer(b"short")
    with pytest.raises(errors.InvalidArgument, match="LLMP_SERVICE_SECRET must be at least 16 bytes"):
        Settings.from_env({"LLMP_SERVICE_SECRET": "short"})  # at startup, before any call


def test_the_dev_profile_shares_one_generated_secret_through_the_state_dir(tmp_path):
    first = Settings.from_env({"LLMP_STATE_DIR": str(tmp_path)}).service_secret()
    assert first == Settings.from_env({"LLMP_STATE_DIR": str(tmp_path)}).service_secret()  # another process
    assert (tmp_path / "service.secret").stat().st_mode & 0o077 == 0  # its owner's only
    assert Settings.from_env({"LLMP_SERVICE_SECRET": "x" * 16}).service_secret() == b"x" * 16


def test_outside_the_dev_profile_the_secrets_must_be_set():
    own = {"LLMP_S3_ACCESS_KEY": "ak", "LLMP_S3_SECRET_KEY": "sk", "LLMP_PROFILE": "production"}
    with pytest.raises(errors.InvalidArgument, match="LLMP_SERVICE_SECRET must be set"):
        Settings.from_env(own)
    with pytest.raises(errors.InvalidArgument, match="LLMP_S3_ACCESS_KEY, LLMP_S3_SECRET_KEY still hold their "
                                                     "published defaults"):
        Settings.from_env({"LLMP_PROFILE": "production", "LLMP_SERVICE_SECRET": "s" * 32})
    assert Settings.from_env({**own, "LLMP_SERVICE_SECRET": "s" * 32}).profile == "production"
    assert Settings.from_env({}).published_secrets()  # dev: accepted, named in a warning at startup
