"""Which model versions' lineage points at a dataset version, asked of the registry service.

Deleting a dataset version is refused while any does (docs/CONTRACTS.md: deletion checks lineage
through `RegistryService/ListModelVersionsByDataset`). When the registry cannot be reached the
delete fails with Unavailable rather than risk removing data a model came from.
"""

from __future__ import annotations

from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2

from services.common.grpc_client import ServiceClients
from services.common.identity import SERVICE_ROLE, Caller, acting_as
from services.dataset.versions import ModelsUsing

TIMEOUT = 10.0  # seconds


def registry_lineage(clients: ServiceClients) -> ModelsUsing:
    """A `ModelsUsing` backed by the registry service."""

    async def models_using(tenant: str, name: str, version: int) -> list[str]:
        request = registry_pb2.ListModelVersionsByDatasetRequest(
            dataset=common_pb2.DatasetRef(name=name, version=version))
        # As itself (`service:dataset`, granted this read): the check must see every model of the tenant,
        # whoever asked for the delete.
        with acting_as(Caller(tenant=tenant, key_id="", role=SERVICE_ROLE)):
            response = await clients.registry.ListModelVersionsByDataset(request, timeout=TIMEOUT)
        return [f"{model.name}:{model.version}" for model in response.versions]

    return models_using
