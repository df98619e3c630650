"""Kubernetes mode of the canary split, on the real service (Triton, PostgreSQL): PUT and DELETE of a
deployment set its route in VirtualService `inference`, and a pod of each track serves its own version.

No cluster here: the VirtualService is the istio/ manifest held in memory, changed by the very patch
and retry logic `IstioWeights` sends to the API server (`update_virtual_service` with
`virtual_service_patch`); only IstioWeights' two HTTP calls are left out."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml
from llmp.inference.v1 import inference_pb2 as pb

from services.common.grpc_client import DEPLOYMENT_KEY
from services.inference.mesh import update_virtual_service, virtual_service_patch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "deploy"))

from json_patch import apply_patch  # noqa: E402

pytestmark = pytest.mark.integration

ISTIO = ROOT / "istio" / "virtual-services.yaml"


class ManifestMesh:
    """MeshWeights over VirtualService `inference` of istio/, kept in memory."""

    def __init__(self) -> None:
        self.value = next(doc for doc in yaml.safe_load_all(ISTIO.read_text())
                          if doc and doc["kind"] == "VirtualService" and doc["metadata"]["name"] == "inference")
        self.calls: list[tuple[str, str, int | None]] = []

    async def _update(self, tenant: str, deployment: str, weight: int | None) -> None:
        self.calls.append((tenant, deployment, weight))

        async def read():
            return copy.deepcopy(self.value)

        async def write(patch):
            self.value = apply_patch(self.value, patch)

        await update_virtual_service(read, write, lambda vs: virtual_service_patch(vs, tenant, deployment, weight))

    async def set(self, tenant: str, deployment: str, canary_weight: int) -> None:
        await self._update(tenant, deployment, canary_weight)

    async def remove(self, tenant: str, deployment: str) -> None:
        await self._update(tenant, deployment, None)

    def split(self) -> dict[str, dict[str, int]]:
        return {route["match"][0]["headers"][DEPLOYMENT_KEY]["exact"]:
                {d["destination"]["subset"]: d["weight"] for d in route["route"]}
                for route in self.value["spec"]["http"] if route.get("match")}


@pytest.fixture
def mesh(service):
    mesh = ManifestMesh()
    service.deployments.mesh = mesh
    yield mesh
    service.deployments.mesh = None
    service.deployments.track = ""


async def test_put_and_delete_set_the_deployments_route_in_the_mesh(service, mesh):
    await service.deploy(stable=1, canary=(2, 30))
    assert mesh.split() == {"acme/tiny-chat": {"stable": 70, "canary": 30}}
    await service.deploy(stable=1, canary=(2, 60))
    await service.deploy("other", stable=1, canary=(2, 5))
    assert mesh.split() == {"acme/tiny-chat": {"stable": 40, "canary": 60}, "acme/other": {"stable": 95, "canary": 5}}
    await service.deploy(stable=1, canary=(2, 0))  # rolled back: everything to stable, no route of its own
    assert mesh.split() == {"acme/other": {"stable": 95, "canary": 5}}
    await service.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="other"), metadata=service.metadata)
    assert mesh.split() == {}
    assert mesh.calls[-1] == ("acme", "other", None)


async def test_a_refused_mesh_change_does_not_undo_the_deployment(service, mesh):
    async def refuse(*_):
        raise RuntimeError("API server away")

    mesh.set = refuse
    response = await service.deploy(stable=1, canary=(2, 30))
    assert response.deployment.state == "READY" and response.deployment.canary.weight == 30
    assert mesh.split() == {}


@pytest.mark.parametrize("track", ["stable", "canary"])
async def test_a_pod_of_a_track_serves_its_version_whatever_the_weight(service, mesh, track):
    await service.deploy(stable=1, canary=(2, 10))
    service.deployments.track = track
    served = [await service.generate("O", max_tokens=1, routing_key=f"user-{i}") for i in range(20)]
    expected = (2, True) if track == "canary" else (1, False)
    assert {(c.model_version, c.canary) for c in served} == {expected}
    await service.deploy(stable=2)  # promoted: no canary left, the canary track serves stable too
    served = [await service.generate("O", max_tokens=1, routing_key=f"user-{i}") for i in range(5)]
    assert {(c.model_version, c.canary) for c in served} == {(2, False)}
