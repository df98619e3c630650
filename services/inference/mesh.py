"""The service mesh's side of a deployment's canary weight: its route in Istio VirtualService `inference`.

VirtualService `inference` (istio/virtual-services.yaml) ends with a default route that sends every
call to subset `stable`. A deployment with a canary weight w > 0 gets a route of its own, before the
default: calls whose `x-llmp-deployment` header (services/common/grpc_client.py) names it go w% to
subset `canary` and the rest to `stable`. Pods of each subset run with LLMP_INFERENCE_TRACK set to
their track and serve that track's version (Deployments.route), so the mesh's weight decides which
version answers. Weight 0 and no route of its own are the same, so weight 0 removes the route.

On Kubernetes (a service-account token, `KUBERNETES_SERVICE_HOST` and LLMP_INFERENCE_TRACK set) the
server hands `IstioWeights` to `Deployments` (its `MeshWeights`), which sets a deployment's route through
the Kubernetes API once a change of the deployment is routed here; whoever changes the weight (a client's
PUT, the canary controller's steps) goes through `Deployments.put`, so the mesh splits traffic the same way.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from services.common.errors import NotFound, Unavailable, ValidationFailed
from services.common.grpc_client import DEPLOYMENT_KEY, deployment_metadata

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
VIRTUAL_SERVICE = "inference"
UPDATE_ATTEMPTS = 5


def mesh_route_name(tenant: str, deployment: str) -> str:
    return f"deployment/{tenant}/{deployment}"


def default_route_index(routes: list) -> int:
    """The route that takes every call no other route matched: the first one without a `match`."""
    index = next((i for i, http in enumerate(routes) if not http.get("match")), None)
    if index is None:
        raise NotFound("VirtualService has no default route (one without `match`) to split deployments from")
    destinations = routes[index].get("route", [])
    if [d.get("destination", {}).get("subset") for d in destinations] != ["stable"]:
        raise NotFound("the default route of the VirtualService must send everything to subset 'stable'")
    return index


def deployment_route(default: Mapping, tenant: str, deployment: str, canary_weight: int) -> dict:
    """The route of one deployment: the default route's settings (timeout, retries...), split by weight."""
    stable = dict(default["route"][0]["destination"])
    canary = {**stable, "subset": "canary"}
    (header_value,) = (value for _, value in deployment_metadata(tenant, deployment))
    settings = {key: copy.deepcopy(value) for key, value in default.items() if key not in ("name", "match", "route")}
    return {"name": mesh_route_name(tenant, deployment),
            "match": [{"headers": {DEPLOYMENT_KEY: {"exact": header_value}}}],
            "route": [{"destination": stable, "weight": 100 - canary_weight},
                      {"destination": canary, "weight": canary_weight}],
            **settings}


def virtual_service_patch(virtual_service: Mapping, tenant: str, deployment: str,
                          canary_weight: int | None) -> list[dict]:
    """A JSON Patch (RFC 6902) giving `deployment` of `tenant` its canary weight in the VirtualService.

    Weight 1-100: the deployment's route, added before the default route or replaced; 0 or None (the
    deployment was deleted): its route removed. [] when the object already says so. The patch starts
    with a `test` of the resourceVersion (when the object has one) and of the route it changes, so the
    API server refuses it when the object changed since it was read.
    """
    if canary_weight is not None and not 0 <= canary_weight <= 100:
        raise ValidationFailed(f"canary weight must be between 0 and 100, not {canary_weight}")
    routes = list(virtual_service.get("spec", {}).get("http", []))
    default = default_route_index(routes)
    name = mesh_route_name(tenant, deployment)
    index = next((i for i, http in enumerate(routes) if http.get("name") == name), None)
    wanted = deployment_route(routes[default], tenant, deployment, canary_weight) if canary_weight else None
    if index is not None and index < default and routes[index] == wanted:
        return []
    if index is None and wanted is None:
        return []
    patch: list[dict] = []
    version = virtual_service.get("metadata", {}).get("resourceVersion")
    if version:
        patch.append({"op": "test", "path": "/metadata/resourceVersion", "value": version})
    if index is not None and index < default and wanted is not None:
        patch.append({"op": "test", "path": f"/spec/http/{index}/name", "value": name})
        patch.append({"op": "replace", "path": f"/spec/http/{index}", "value": wanted})
        return patch
    if index is not None:  # removed, or behind the default route where it would never match
        patch.append({"op": "test", "path": f"/spec/http/{index}/name", "value": name})
        patch.append({"op": "remove", "path": f"/spec/http/{index}"})
        if index < default:
            default -= 1
    if wanted is not None:
        patch.append({"op": "add", "path": f"/spec/http/{default}", "value": wanted})
    return patch


class StaleObject(Exception):
    """The API server refused a patch because the object changed since it was read."""


async def update_virtual_service(read: Callable[[], Awaitable[Mapping]],
                                 write: Callable[[list[dict]], Awaitable[None]],
                                 change: Callable[[Mapping], list[dict]], attempts: int = UPDATE_ATTEMPTS) -> bool:
    """Read the object, patch it by `change(object)`, again from a fresh read while the patch is stale.

    Returns whether it wrote (False: the object already said so). `write` raises StaleObject when the
    API server answers that the object moved on.
    """
    for attempt in range(1, attempts + 1):
        patch = change(await read())
        if not patch:
            return False
        try:
            await write(patch)
            return True
        except StaleObject:
            if attempt == attempts:
                raise Unavailable(f"VirtualService changed under {attempts} patches in a row", retry_after=2) from None
            await asyncio.sleep(0.05 * attempt)
    return False


class IstioWeights:
    """Patches VirtualService `inference` in this pod's namespace with the service-account token.

    Needs RBAC: get and patch on `virtualservices.networking.istio.io` named `inference`. The HTTP calls
    are all this class does; `virtual_service_patch` and `update_virtual_service` hold the logic (tested
    in tests/unit/inference/test_mesh_routes.py against the repository's istio/ manifests).
    """

    def __init__(self, api_url: str, namespace: str, account_dir: Path = SERVICE_ACCOUNT_DIR,
                 name: str = VIRTUAL_SERVICE) -> None:
        self.url = f"{api_url}/apis/networking.istio.io/v1/namespaces/{namespace}/virtualservices/{name}"
        self.account_dir = account_dir

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR) -> "IstioWeights | None":
        """The patcher when running in a Kubernetes pod, else None (local and compose)."""
        host = environ.get("KUBERNETES_SERVICE_HOST")
        if not host or not (account_dir / "token").exists():
            return None
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        namespace = (account_dir / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", namespace, account_dir)

    async def set(self, tenant: str, deployment: str, canary_weight: int) -> None:
        await self._update(tenant, deployment, canary_weight)

    async def remove(self, tenant: str, deployment: str) -> None:
        await self._update(tenant, deployment, None)

    async def _update(self, tenant: str, deployment: str, canary_weight: int | None) -> None:
        import aiohttp

        token = (self.account_dir / "token").read_text().strip()  # re-read: projected tokens rotate
        context = ssl.create_default_context(cafile=str(self.account_dir / "ca.crt"))
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
                async def read() -> Mapping:
                    async with session.get(self.url, ssl=context) as response:
                        response.raise_for_status()
                        return await response.json()

                async def write(patch: list[dict]) -> None:
                    async with session.patch(self.url, data=json.dumps(patch), ssl=context,
                                             headers={"Content-Type": "application/json-patch+json"}) as response:
                        # 409: the object changed between apply and store; 422: a `test` op failed.
                        if response.status in (409, 422):
                            raise StaleObject(await response.text())
                        response.raise_for_status()

                wrote = await update_virtual_service(
                    read, write, lambda current: virtual_service_patch(current, tenant, deployment, canary_weight))
        except aiohttp.ClientError as error:
            raise Unavailable(f"cannot set VirtualService weights: {error}", retry_after=2) from error
        if wrote:
            log.info("mesh weights set", extra={"tenant": tenant, "deployment": deployment,
                                                "canary_weight": canary_weight})
