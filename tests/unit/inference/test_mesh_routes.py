"""The Istio side of canary routing, without a cluster: the JSON Patch the inference service sends to the
Kubernetes API, applied (RFC 6902, as the API server applies it) to VirtualService `inference` from the
repository's istio/ manifests; the read-patch-retry loop around it; and the track routing of the pods
the mesh's subsets select. The HTTP calls of `IstioWeights` themselves are not exercised here, only
how it finds the API server."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request

from gateway.state import CALLER
from gateway.views import completions
from services.common.config import Settings
from services.common.errors import InvalidArgument, NotFound, Unavailable, ValidationFailed
from services.common.grpc_client import DEPLOYMENT_KEY, deployment_metadata
from services.common.identity import Caller
from services.inference.deployments import Deployments, Route
from services.inference.generation import ServedVersion
from services.inference.mesh import (
    IstioWeights,
    StaleObject,
    mesh_route_name,
    update_virtual_service,
    virtual_service_patch,
)

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "deploy"))

from json_patch import PatchFailed, apply_patch  # noqa: E402


def manifest(kind: str, name: str) -> dict:
    path = ROOT / "istio" / ("virtual-services.yaml" if kind == "VirtualService" else "destination-rules.yaml")
    return next(doc for doc in yaml.safe_load_all(path.read_text())
                if doc and doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.fixture
def service() -> dict:
    """VirtualService `inference` as the API server returns it: the manifest with a resourceVersion."""
    vs = manifest("VirtualService", "inference")
    vs["metadata"]["resourceVersion"] = "100"
    return vs


def set_weight(vs: dict, tenant: str, name: str, weight: int | None) -> dict:
    patched = apply_patch(vs, virtual_service_patch(vs, tenant, name, weight))
    patched["metadata"]["resourceVersion"] = str(int(vs["metadata"].get("resourceVersion", "0")) + 1)
    return patched


def split(vs: dict) -> dict[str, dict[str, int]]:
    """Header value -> {subset: weight} of every deployment route; "" for the default route."""
    found = {}
    for route in vs["spec"]["http"]:
        key = route["match"][0]["headers"][DEPLOYMENT_KEY]["exact"] if route.get("match") else ""
        assert key not in found, f"two routes for {key!r}"
        found[key] = {d["destination"]["subset"]: d.get("weight", 100) for d in route["route"]}
    return found


def test_a_canary_weight_adds_a_route_for_the_deployment_before_the_default(service):
    patch = virtual_service_patch(service, "acme", "chat", 5)
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "100"}
    patched = set_weight(service, "acme", "chat", 5)
    assert split(patched) == {"acme/chat": {"stable": 95, "canary": 5}, "": {"stable": 100}}
    own, default = patched["spec"]["http"]
    assert own["name"] == mesh_route_name("acme", "chat") and default == service["spec"]["http"][0]
    assert own["match"] == [{"headers": {DEPLOYMENT_KEY: {"exact": deployment_metadata("acme", "chat")[0][1]}}}]
    # The default route's settings come along: timeout, no retries, the destination's port.
    assert (own["timeout"], own["retries"]) == (default["timeout"], default["retries"])
    assert all(d["destination"]["port"] == default["route"][0]["destination"]["port"] for d in own["route"])
    subsets = {s["name"] for s in manifest("DestinationRule", "inference")["spec"]["subsets"]}
    assert {d["destination"]["subset"] for d in own["route"]} <= subsets


def test_changing_the_weight_replaces_the_route_in_place(service):
    patched = set_weight(set_weight(service, "acme", "chat", 5), "acme", "chat", 25)
    assert split(patched) == {"acme/chat": {"stable": 75, "canary": 25}, "": {"stable": 100}}
    patched = set_weight(patched, "acme", "chat", 100)
    assert split(patched)["acme/chat"] == {"stable": 0, "canary": 100}
    assert len(patched["spec"]["http"]) == 2


def test_the_same_weight_again_needs_no_patch(service):
    patched = set_weight(service, "acme", "chat", 50)
    assert virtual_service_patch(patched, "acme", "chat", 50) == []
    assert virtual_service_patch(service, "acme", "chat", 0) == []  # no route, none wanted
    assert virtual_service_patch(service, "acme", "chat", None) == []


def test_two_deployments_and_two_tenants_are_kept_apart(service):
    patched = service
    for tenant, name, weight in (("acme", "chat", 5), ("acme", "summ", 50), ("globex", "chat", 25)):
        patched = set_weight(patched, tenant, name, weight)
    patched = set_weight(patched, "acme", "chat", 25)
    patched = set_weight(patched, "acme", "summ", None)  # deleted
    assert split(patched) == {"acme/chat": {"stable": 75, "canary": 25}, "globex/chat": {"stable": 75, "canary": 25},
                              "": {"stable": 100}}
    assert "match" not in patched["spec"]["http"][-1]  # the default stays last


@pytest.mark.parametrize("weight", [0, None])
def test_weight_zero_and_deletion_remove_the_route(service, weight):
    patched = set_weight(set_weight(service, "acme", "chat", 5), "acme", "other", 5)
    patched = set_weight(patched, "acme", "chat", weight)
    assert split(patched) == {"acme/other": {"stable": 95, "canary": 5}, "": {"stable": 100}}


def test_a_route_behind_the_default_is_moved_in_front_of_it(service):
    stray = set_weight(service, "acme", "chat", 5)
    stray["spec"]["http"].reverse()  # someone appended it after the default: it would never match
    patched = set_weight(stray, "acme", "chat", 25)
    assert [r.get("name") for r in patched["spec"]["http"]] == [mesh_route_name("acme", "chat"), "stable"]
    assert split(patched)["acme/chat"] == {"stable": 75, "canary": 25}


def test_a_patch_of_a_stale_read_is_refused(service):
    """The test ops pin what the patch was computed from: applied to a newer object it fails as a whole."""
    stale = virtual_service_patch(service, "acme", "chat", 5)
    newer = set_weight(service, "globex", "chat", 5)
    with pytest.raises(PatchFailed, match="resourceVersion"):
        apply_patch(newer, stale)
    # Without a resourceVersion (e.g. the manifest as rendered) the route's name still guards a replace.
    unversioned = set_weight(manifest("VirtualService", "inference"), "acme", "chat", 5)
    del unversioned["metadata"]["resourceVersion"]
    replace = virtual_service_patch(unversioned, "acme", "chat", 25)
    assert replace[0] == {"op": "test", "path": "/spec/http/0/name", "value": mesh_route_name("acme", "chat")}
    shifted = copy.deepcopy(unversioned)
    shifted["spec"]["http"].insert(0, {**shifted["spec"]["http"][0], "name": mesh_route_name("globex", "x")})
    with pytest.raises(PatchFailed):
        apply_patch(shifted, replace)


def test_refusals(service):
    with pytest.raises(ValidationFailed):
        virtual_service_patch(service, "acme", "chat", 101)
    without_default = copy.deepcopy(service)
    without_default["spec"]["http"][0]["match"] = [{"uri": {"prefix": "/"}}]
    with pytest.raises(NotFound, match="default route"):
        virtual_service_patch(without_default, "acme", "chat", 5)
    split_default = copy.deepcopy(service)
    split_default["spec"]["http"][0]["route"].append({"destination": {"host": "inference", "subset": "canary"}})
    with pytest.raises(NotFound, match="stable"):
        virtual_service_patch(split_default, "acme", "chat", 5)


# -- the read-patch-retry loop, on an object held in memory ---------------------------------------------


class StoredObject:
    """One object with a resourceVersion, patched as the API server patches it: a patch whose `test`
    ops fail is refused whole (StaleObject, the 422/409 IstioWeights maps), otherwise applied and the
    version bumped. `interfere` writes of another client land between a read and the patch."""

    def __init__(self, value: dict, interfere: list | None = None) -> None:
        self.value = {**value, "metadata": {**value["metadata"], "resourceVersion": "1"}}
        self.interfere = list(interfere or [])
        self.reads = self.writes = 0

    def _store(self, value: dict) -> None:
        value["metadata"]["resourceVersion"] = str(int(self.value["metadata"]["resourceVersion"]) + 1)
        self.value = value

    async def read(self) -> dict:
        self.reads += 1
        return copy.deepcopy(self.value)

    async def write(self, patch: list[dict]) -> None:
        if self.interfere:
            tenant, name, weight = self.interfere.pop(0)
            self._store(apply_patch(self.value, virtual_service_patch(self.value, tenant, name, weight)))
        try:
            patched = apply_patch(self.value, patch)
        except PatchFailed as error:
            raise StaleObject(str(error)) from None
        self.writes += 1
        self._store(patched)


async def test_a_conflicting_write_is_retried_from_a_fresh_read(service):
    stored = StoredObject(service, interfere=[("globex", "chat", 5), ("globex", "summ", 50)])
    wrote = await update_virtual_service(stored.read, stored.write,
                                         lambda vs: virtual_service_patch(vs, "acme", "chat", 25))
    assert wrote and stored.reads == 3 and stored.writes == 1
    assert split(stored.value) == {"globex/chat": {"stable": 95, "canary": 5},
                                   "globex/summ": {"stable": 50, "canary": 50},
                                   "acme/chat": {"stable": 75, "canary": 25}, "": {"stable": 100}}
    again = await update_virtual_service(stored.read, stored.write,
                                         lambda vs: virtual_service_patch(vs, "acme", "chat", 25))
    assert not again and stored.writes == 1  # already so: read, nothing written


async def test_endless_conflicts_give_up_unavailable(service):
    stored = StoredObject(service, interfere=[("globex", f"d{i}", 5) for i in range(10)])
    with pytest.raises(Unavailable, match="3 patches"):
        await update_virtual_service(stored.read, stored.write,
                                     lambda vs: virtual_service_patch(vs, "acme", "chat", 25), attempts=3)
    assert stored.writes == 0 and "acme/chat" not in split(stored.value)


def test_in_cluster_detection(tmp_path):
    assert IstioWeights.in_cluster({}, tmp_path) is None
    assert IstioWeights.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path) is None  # no token
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("llmp\n")
    weights = IstioWeights.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"},
                                      tmp_path)
    assert weights.url == ("https://10.0.0.1:6443/apis/networking.istio.io/v1/namespaces/llmp/"
                           "virtualservices/inference")


# -- tracks: what a pod of each subset serves ---------------------------------------------------------


def served(version: int) -> ServedVersion:
    return ServedVersion("tiny", version, f"acme--tiny--v{version}", spec=None, tokenizer=None)


@pytest.mark.parametrize("weight", [0, 5, 100])
def test_a_track_serves_its_own_version_whatever_the_weight(weight):
    route = Route(served(1), served(2), weight)
    keys = [f"user-{i}" for i in range(200)]
    assert {route.pick(key, "stable") for key in keys} == {(served(1), False)}
    assert {route.pick(key, "canary") for key in keys} == {(served(2), True)}


def test_the_canary_track_serves_stable_while_there_is_no_canary():
    assert Route(served(1)).pick("k", "canary") == (served(1), False)


def test_without_a_track_the_process_splits_by_weight_itself():
    route = Route(served(1), served(2), 30)
    picks = [route.pick(f"user-{i}") for i in range(2000)]
    share = sum(canary for _, canary in picks) / len(picks)
    assert 0.25 < share < 0.35
    assert all(route.pick(f"user-{i}") == picks[i] for i in range(50))  # sticky per routing key


@pytest.mark.parametrize("track", ["", "stable", "canary"])
async def test_deployments_route_by_their_track(track):
    deployments = Deployments(None, None, None, None, track=track)
    deployments.routes[("acme", "chat")] = Route(served(1), served(2), 0)
    picked = {await deployments.route("acme", "chat", f"user-{i}") for i in range(50)}
    assert picked == {(served(2), True)} if track == "canary" else {(served(1), False)}


def test_an_unknown_track_is_refused():
    with pytest.raises(ValidationFailed):
        Deployments(None, None, None, None, track="blue")


def test_the_track_setting():
    assert Settings.from_env({}).inference_track == ""
    assert Settings.from_env({"LLMP_INFERENCE_TRACK": "canary"}).inference_track == "canary"
    with pytest.raises(InvalidArgument, match="LLMP_INFERENCE_TRACK"):
        Settings.from_env({"LLMP_INFERENCE_TRACK": "blue"})


def test_the_gateway_names_the_deployment_as_its_route_matches(service):
    """The metadata the gateway sends on Generate/GenerateStream is what the deployment's route matches."""
    request = make_mocked_request("POST", "/v1/completions")
    request[CALLER] = Caller(tenant="acme", key_id="k1", role="developer")
    metadata = dict(completions._deployment_metadata(request, {"model": "chat", "prompt": "hi"}))
    (route, _) = set_weight(service, "acme", "chat", 5)["spec"]["http"]
    assert route["match"] == [{"headers": {key: {"exact": value} for key, value in metadata.items()}}]
