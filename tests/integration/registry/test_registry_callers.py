"""The registry as the other services call it: through `ServiceClients`' typed stubs, each call site
acting as the identity it names (`identity.acting_as`), never passing metadata by hand."""

from __future__ import annotations

import pytest

from services.common import errors, identity
from services.common.config import Settings
from services.common.grpc_client import ServiceClients
from services.dataset.lineage import registry_lineage
from services.inference.model_source import S3ModelSource

pytestmark = pytest.mark.integration


@pytest.fixture
async def clients_of(registry, settings_env):
    """The registry clients of a service: they call as that service's principal."""
    address = f"127.0.0.1:{registry.app.port}"
    opened = []

    def clients_of(service: str) -> ServiceClients:
        opened.append(ServiceClients(Settings.from_env({**settings_env, "LLMP_REGISTRY_ADDR": address}),
                                     principal=identity.service_principal(service)))
        return opened[-1]

    yield clients_of
    for clients in opened:
        await clients.close()


async def test_the_dataset_service_sees_every_model_of_the_tenant_using_a_dataset(client, source, clients_of):
    prefix, _ = source
    await client.register("tiny", prefix, dataset="corpus", dataset_version=3)
    models_using = registry_lineage(clients_of("dataset"))
    assert identity.current.get() is None  # the lineage check names its own identity
    assert await models_using(client.tenant, "corpus", 3) == ["tiny:1"]
    assert await models_using(client.tenant, "corpus", 4) == []
    assert await models_using("someone-else", "corpus", 3) == []  # another tenant's models are not its


async def test_the_inference_service_resolves_a_tenants_versions_as_that_tenant(client, source, clients_of,
                                                                                 registry, tmp_path):
    prefix, _ = source
    await client.register("tiny", prefix)
    models = S3ModelSource(clients_of("inference"), registry.store, tmp_path)
    with identity.acting_as(identity.Caller("someone-else", "key-x", "developer")):  # whoever asked it
        assert await models.resolve(client.tenant, "tiny", 1, "") == 1
        with pytest.raises(errors.NotFound):  # the registry's NotFound, arriving as the domain error
            await models.resolve("someone-else", "tiny", 1, "")
