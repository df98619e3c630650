"""Issue 15, finding 3: the registry (as every service) believes only a signed identity. Metadata that is
unsigned, signed with another key, expired, tampered with or meant for another service is refused with
UNAUTHENTICATED before any handler runs; a service acting for a tenant on its own may call only what it is
granted; and a tenant cannot register a version from another tenant's job output. Tenants whose names
collide once joined (`acme` model `prod-chat`, `acme-prod` model `chat`) stay apart through all of it."""

from __future__ import annotations

import base64
import json
import time
import uuid

import grpc
import pytest
from llmp.registry.v1 import registry_pb2 as pb

from services.common.identity import (
    CALLER_TOKEN_KEY,
    GATEWAY,
    SERVICE_ROLE,
    SERVICE_TOKEN_KEY,
    Caller,
    CallSigner,
    acting_as,
    signed_metadata,
)
from services.common.signing import Claims, Signer
from tests import identities
from tests.integration.registry.conftest import Client, upload_folder

pytestmark = pytest.mark.integration


def _token(claims: Claims, signer: Signer = identities.SIGNER) -> tuple[tuple[str, str], ...]:
    return ((CALLER_TOKEN_KEY, signer.sign(claims)),)


def _claims(tenant: str, *, audience: str = "registry", issuer: str = GATEWAY, ttl: float = 60.0) -> Claims:
    return Claims(issuer, audience, tenant, "key-x", "admin", time.time() + ttl)


def _tampered(tenant: str, victim: str) -> tuple[tuple[str, str], ...]:
    """A genuine token of `tenant` whose payload names `victim` instead, the signature left as it was."""
    version, payload, signature = identities.SIGNER.sign(_claims(tenant)).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "tenant": victim}).encode()).rstrip(b"=").decode()
    return ((CALLER_TOKEN_KEY, f"{version}.{forged}.{signature}"),)


@pytest.fixture
def acme(registry) -> Client:
    return Client(registry.stub, registry, f"acme{uuid.uuid4().hex[:6]}")


@pytest.fixture
def acme_prod(registry, acme) -> Client:
    return Client(registry.stub, registry, f"{acme.tenant}-prod")


@pytest.fixture
async def acme_model(registry, checkpoint, acme) -> str:
    """acme's model `prod-chat` v1, registered from one of its jobs."""
    prefix = f"jobs/{acme.tenant}/{uuid.uuid4().hex[:8]}/final/"
    upload_folder(registry.store, checkpoint, prefix)
    await acme.register("prod-chat", prefix)
    return prefix


def _get(name: str) -> pb.GetModelVersionRequest:
    return pb.GetModelVersionRequest(name=name, version=1)


@pytest.mark.parametrize("forgery", ["unsigned", "wrong key", "expired", "tampered tenant", "other audience",
                                     "service posing as gateway"])
async def test_forged_identities_are_refused_before_any_handler(acme, acme_prod, acme_model, forgery):
    victim = acme.tenant
    metadata = {
        "unsigned": (("llmp-tenant", victim), ("llmp-key-id", "k"), ("llmp-role", "admin")),  # the old way
        "wrong key": _token(_claims(victim), Signer(b"a-secret-that-is-not-the-stack-one")),
        "expired": _token(_claims(victim, ttl=-1.0)),
        "tampered tenant": _tampered(acme_prod.tenant, victim),
        "other audience": _token(_claims(victim, audience="dataset")),
        "service posing as gateway": ((SERVICE_TOKEN_KEY, identities.SIGNER.sign(_claims(victim, issuer=GATEWAY))),),
    }[forgery]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await acme.stub.GetModelVersion(_get("prod-chat"), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
    # The genuine token of the same tenant reads it: the refusal was the forgery's, not the request's.
    assert (await acme.stub.GetModelVersion(_get("prod-chat"), metadata=acme.metadata)).version.ref.version == 1


async def test_colliding_tenants_reach_only_their_own_models(acme, acme_prod, acme_model, registry, checkpoint):
    # acme-prod's own `chat`: joined with its tenant it spells what acme's `prod-chat` does.
    prefix = f"jobs/{acme_prod.tenant}/{uuid.uuid4().hex[:8]}/final/"
    upload_folder(registry.store, checkpoint, prefix)
    await acme_prod.register("chat", prefix)
    for name in ("prod-chat", "chat"):
        stub, mine = acme_prod.stub, name == "chat"
        if mine:
            assert (await stub.GetModelVersion(_get(name), metadata=acme_prod.metadata)).version.ref.name == "chat"
        else:
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await stub.GetModelVersion(_get(name), metadata=acme_prod.metadata)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await acme.stub.ListModels(pb.ListModelsRequest(), metadata=acme.metadata)
    assert [model.name for model in listed.models] == ["prod-chat"]


async def test_a_tenant_cannot_register_another_tenants_job_output(acme, acme_prod, acme_model):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await acme_prod.register("stolen", acme_model)  # acme's job output, named by acme-prod
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source_prefix" in refused.value.details() and acme_prod.tenant in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await acme_prod.stub.GetModelVersion(_get("stolen"), metadata=acme_prod.metadata)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was registered


def _as_service(service: str, caller: Caller, audience: str = "registry") -> tuple[tuple[str, str], ...]:
    with acting_as(caller):
        return CallSigner(identities.SIGNER, f"service:{service}").metadata(audience)


async def test_a_service_acting_for_a_tenant_is_held_to_its_grants(acme, acme_model):
    inference = _as_service("inference", Caller(acme.tenant, "", SERVICE_ROLE))
    assert (await acme.stub.GetModelVersion(_get("prod-chat"), metadata=inference)).version.ref.version == 1
    with pytest.raises(grpc.aio.AioRpcError) as denied:  # the inference service never registers anything
        await acme.stub.RegisterModelVersion(pb.RegisterModelVersionRequest(
            model_name="sneaky", source_prefix=acme_model), metadata=inference)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "service:inference may not call registry/RegisterModelVersion" in denied.value.details()


async def test_a_users_token_passes_through_one_service_for_its_own_tenant_only(acme, acme_prod, acme_model):
    # What the gateway gave the inference service for an acme-prod request, passed on by inference...
    user_token = dict(signed_metadata(identities.SIGNER, Caller(acme_prod.tenant, "k", "developer"),
                                      "inference"))[CALLER_TOKEN_KEY]
    passed = Caller(acme_prod.tenant, "k", "developer", token=user_token)
    with pytest.raises(grpc.aio.AioRpcError) as hidden:  # ...acts for acme-prod: acme's model is not its
        await acme.stub.GetModelVersion(_get("prod-chat"), metadata=_as_service("inference", passed))
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    # ...and cannot be stapled to a service token that names acme.
    own = dict(_as_service("inference", Caller(acme.tenant, "", SERVICE_ROLE)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await acme.stub.GetModelVersion(_get("prod-chat"), metadata=(
            (SERVICE_TOKEN_KEY, own[SERVICE_TOKEN_KEY]), (CALLER_TOKEN_KEY, user_token)))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A token the gateway issued to the registry itself is not the inference service's to pass on.
    direct = dict(signed_metadata(identities.SIGNER, Caller(acme.tenant, "k", "admin"), "registry"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await acme.stub.GetModelVersion(_get("prod-chat"), metadata=(
            (SERVICE_TOKEN_KEY, own[SERVICE_TOKEN_KEY]), (CALLER_TOKEN_KEY, direct[CALLER_TOKEN_KEY])))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
