"""deploy/: the kustomize overlays render, validate against the Kubernetes schemas, and agree with the
topology, the LLMP_* settings and docker-compose.yml.

Rendering uses the real kustomize (`kubectl kustomize`, conftest.py); schemas come from
the `kubernetes-validate` package (the Kubernetes OpenAPI as JSON Schema, strict: unknown fields fail).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import containers, quantity, render

from services.common import topology
from services.common.config import DEFAULTS, Settings
from services.common.queues import GPU_WORKER_QUEUES
from services.dataset import ingestion

ROOT = Path(__file__).resolve().parents[3]
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests target (native sidecars, gRPC probes)
ISTIO_KINDS = {"PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication", "Gateway",
               "VirtualService", "DestinationRule"}
WORKLOADS = {"Deployment", "StatefulSet"}
LLMP_IMAGES = {"dataset", "training", "registry", "inference", "gateway"}  # built from the repository's sources
GPU_WORKLOADS = {"training-worker", "triton"}


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def workloads(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in WORKLOADS]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def llmp_containers(objects: list[dict]):
    for obj in workloads(objects):
        for container in containers(obj):
            name = container["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
            if name in LLMP_IMAGES:
                yield obj, container


def secret_env(objects: list[dict], names: set[str] | None = None) -> dict[str, str]:
    """LLMP_* settings the Secrets (those named, or all) hold."""
    return {key: value for name, secret in by_kind(objects, "Secret").items() if names is None or name in names
            for key, value in secret.get("stringData", {}).items() if key.startswith("LLMP_")}


def config_env(objects: list[dict]) -> dict[str, str]:
    """The settings of an llmp service: the ConfigMap, and the Secrets the services share."""
    return {**by_kind(objects, "ConfigMap")["llmp-config"]["data"],
            **secret_env(objects, {"llmp-registry-database", "llmp-registry-s3", "llmp-admin-key",
                                   "llmp-service-secret"})}


# -- rendering and schemas -------------------------------------------------------------------------

def test_overlays_render_every_component(overlay):
    _, objects = overlay
    names = {obj["metadata"]["name"] for obj in workloads(objects)}
    assert {"gateway", "training-worker", "triton", "postgres", "redis", "minio",
            *(service.name for service in topology.GRPC_SERVICES)} <= names
    assert all(obj["metadata"].get("namespace") == "llmp" for obj in objects if obj["kind"] != "Namespace")


def test_every_manifest_parses():
    files = [*ROOT.glob("deploy/**/*.yaml"), *ROOT.glob("istio/*.yaml")]
    assert len(files) > 15
    for path in files:
        assert all(isinstance(doc, dict) for doc in yaml.safe_load_all(path.read_text()) if doc is not None), path


def test_core_objects_validate_against_the_kubernetes_schemas(overlay):
    name, objects = overlay
    without_schema = set()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.add(obj["kind"])
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {list(error.path)}: {error.message}")
    # Only Istio's custom resources lack a schema here; test_istio.py checks them.
    assert without_schema <= ISTIO_KINDS


def test_schema_validation_catches_a_wrong_field(prod):
    deployment = copy.deepcopy(by_kind(prod, "Deployment")["dataset"])
    pod_spec(deployment)["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# -- agreement with the topology and the settings --------------------------------------------------

@pytest.mark.parametrize("service", topology.GRPC_SERVICES, ids=lambda s: s.name)
def test_grpc_services_have_named_grpc_ports_and_grpc_health_probes(prod, service):
    svc = by_kind(prod, "Service")[service.name]
    port = next(p for p in svc["spec"]["ports"] if p["port"] == service.port)
    assert port["name"] == f"grpc-{service.name}" and port.get("appProtocol") == "grpc"
    selected = [obj for obj in workloads(prod)
                if selects(svc["spec"]["selector"], obj["spec"]["template"]["metadata"]["labels"])]
    assert selected
    for obj in selected:
        container = pod_spec(obj)["containers"][0]
        assert container["args"] == ["python", "-m", service.module]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[port["targetPort"]] == service.port
        assert ports["http-metrics"] == service.metrics_port
        assert container["readinessProbe"]["grpc"]["port"] == service.port
        assert container["startupProbe"]["grpc"]["port"] == service.port


def test_gateway_service_and_probes(prod):
    svc = by_kind(prod, "Service")["gateway"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [topology.GATEWAY_PORT]
    container = pod_spec(by_kind(prod, "Deployment")["gateway"])["containers"][0]
    assert container["args"] == ["python", "-m", topology.GATEWAY_MODULE]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_service_selects_pods_and_targets_their_ports(overlay):
    _, objects = overlay
    for name, svc in by_kind(objects, "Service").items():
        pods = [obj for obj in workloads(objects)
                if selects(svc["spec"]["selector"], obj["spec"]["template"]["metadata"]["labels"])]
        assert pods, f"Service {name} selects no pods"
        for port in svc["spec"].get("ports", []):  # a headless Service may declare none
            for obj in pods:
                offered = {p.get("name"): p["containerPort"] for c in containers(obj) for p in c.get("ports", [])}
                assert port["targetPort"] in offered, f"Service {name} targets {port['targetPort']}"


def test_settings_are_known_variables_that_parse(overlay):
    name, objects = overlay
    config = by_kind(objects, "ConfigMap")["llmp-config"]["data"]
    base_secrets = secret_env(render(ROOT / "deploy" / "base"))
    keys = set(config) | set(base_secrets)
    assert keys <= set(DEFAULTS), f"unknown: {sorted(keys - set(DEFAULTS))}"
    settings = Settings.from_env({**config, **base_secrets})
    services = by_kind(objects, "Service")
    for addr in [*settings.service_addrs.values(), settings.s3.endpoint, settings.triton_grpc_url,
                 settings.triton_http_url, settings.broker_url.split("//")[1].split("/")[0],
                 settings.database_url.split("@")[1].split("/")[0]]:
        host, port = addr.rsplit(":", 1)
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, addr
    for service in topology.GRPC_SERVICES:
        assert settings.listen_addr(service) == f"0.0.0.0:{service.port}"
    assert settings.gateway_port == topology.GATEWAY_PORT


def test_same_settings_as_docker_compose(prod):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_env = compose["x-llmp-env"]
    # Production's settings, with the keys of the (out-of-band) Secret as the base defines them.
    env = {**config_env(render(ROOT / "deploy" / "base")), **config_env(prod)}
    # Compose interpolates credentials and the log level from the host's environment.
    interpolated = {key for key, value in compose_env.items() if "${" in str(value)}
    for key, value in compose_env.items():
        assert key in env, f"{key} is set in compose but not on Kubernetes"
        if key not in interpolated:
            assert env[key] == str(value), key


def test_llmp_containers_take_the_settings_and_run_as_non_root(overlay):
    _, objects = overlay
    found = 0
    for obj, container in llmp_containers(objects):
        found += 1
        refs = container.get("envFrom", [])
        assert {"configMapRef": {"name": "llmp-config"}} in refs  # credentials: test_credentials.py
        for variable in container.get("env", []):
            assert not variable["name"].startswith("LLMP_") or variable["name"] in DEFAULTS
        pod_security = pod_spec(obj).get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser", 0) != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert found >= 7  # 4 services, the canary inference track, the worker, the gateway


def test_every_container_requests_resources_and_pins_its_image(overlay):
    name, objects = overlay
    for obj in objects:
        for container in containers(obj):
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{obj['metadata']['name']}/{container['name']}"
            image = container["image"]
            tag = image.rsplit(":", 1)[-1]
            assert ":" in image and tag != "latest", image
            if image.split("/")[-1].split(":")[0] in LLMP_IMAGES:
                assert image.startswith("registry."), f"{name}: {image} is not from the overlay's registry"


def test_every_pod_asks_for_the_node_disk_its_bounded_volumes_may_fill(overlay):
    """An emptyDir not in memory is the node's disk: unless the pod requests that much ephemeral storage, the
    scheduler places it where the disk is already promised to others, and the kubelet evicts under pressure."""
    name, objects = overlay
    checked = 0
    for obj in workloads(objects):
        spec = pod_spec(obj)
        on_disk = [volume["emptyDir"]["sizeLimit"] for volume in spec.get("volumes", [])
                   if "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory"
                   and "sizeLimit" in volume["emptyDir"]]
        requested = sum(quantity(container.get("resources", {}).get("requests", {}).get("ephemeral-storage", 0))
                        for container in containers(obj))
        assert requested >= sum(map(quantity, on_disk)), f"{name}: {obj['metadata']['name']} requests {requested}"
        checked += bool(on_disk)
    assert checked >= 7  # gateway, dataset, registry, training, inference (both tracks), both workers


def test_the_dataset_services_builds_have_a_volume_that_holds_them(overlay):
    """Each build slot's corpus and work at the largest upload the overlay accepts (ingestion.work_dir_bytes,
    measured on corpora of short lines), on a volume of the pod's own where the service writes them."""
    name, objects = overlay
    dataset = by_kind(objects, "Deployment")["dataset"]
    settings = Settings.from_env(config_env(objects))
    (container,) = pod_spec(dataset)["containers"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert str(settings.state_dir) in mounts, f"{name}: the work folder {settings.state_dir} is not a volume"
    volumes = {volume["name"]: volume for volume in pod_spec(dataset)["volumes"]}
    claim = volumes[mounts[str(settings.state_dir)]]["ephemeral"]["volumeClaimTemplate"]["spec"]
    needed = ingestion.work_dir_bytes(settings.dataset_build_slots, settings.max_upload_bytes)
    assert quantity(claim["resources"]["requests"]["storage"]) >= needed, f"{name}: {needed / 2**30:.1f} GiB needed"


def test_gpu_workloads_request_gpus_on_gpu_nodes_and_nothing_else_does(overlay):
    _, objects = overlay
    for obj in workloads(objects):
        spec = pod_spec(obj)
        gpus = [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in spec["containers"]]
        if obj["metadata"]["name"] in GPU_WORKLOADS:
            assert all(gpu and int(gpu) >= 1 for gpu in gpus)
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert not any(gpus), f"{obj['metadata']['name']} asks for a GPU"


def test_training_worker_and_triton_run_what_compose_runs(prod):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    worker = pod_spec(by_kind(prod, "StatefulSet")["training-worker"])["containers"][0]
    assert worker["args"][:4] == ["celery", "--app", topology.WORKER_APP, "worker"]
    # training and evaluation jobs (dataset builds' ranges go to the data workers: test_data_worker.py)
    assert worker["args"][worker["args"].index("--queues") + 1] == GPU_WORKER_QUEUES
    assert worker["image"].endswith("/llmp/training:0.1.0")
    triton = pod_spec(by_kind(prod, "Deployment")["triton"])["containers"][0]
    assert triton["image"].endswith("/" + compose["triton"]["image"])  # the overlay's registry, same image
    assert triton["args"] == compose["triton"]["command"]
    ports = {p["containerPort"] for p in triton["ports"]}
    assert set(topology.PORTS["triton"]) == ports


def test_every_workload_has_a_disruption_budget(overlay):
    _, objects = overlay
    budgets = list(by_kind(objects, "PodDisruptionBudget").values())
    for obj in workloads(objects):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, f"{obj['metadata']['name']}: {len(matching)} budgets"


def test_references_resolve(overlay):
    name, objects = overlay
    accounts = by_kind(objects, "ServiceAccount")
    config_maps = by_kind(objects, "ConfigMap")
    secrets_needed = set()
    for obj in [*workloads(objects), *by_kind(objects, "Job").values()]:
        spec = pod_spec(obj)
        assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
        for container in containers(obj):
            for ref in container.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in config_maps
                else:
                    secrets_needed.add(ref["secretRef"]["name"])
            for variable in container.get("env", []):
                secret_ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret_ref:
                    secrets_needed.add(secret_ref["name"])
    assert secrets_needed == set(by_kind(render(ROOT / "deploy" / "base"), "Secret"))  # each one is used
    present = set(by_kind(objects, "Secret"))
    if name == "prod":
        assert not present, "production credentials never live in the repository"
    else:
        assert secrets_needed <= present


def test_dev_credentials_agree_with_each_other(dev):
    """Each component's database URL names its own role (llmp_<component>, created by postgres-init with
    the password the postgres pod gets for it), never the superuser."""
    from urllib.parse import urlsplit

    secrets = by_kind(dev, "Secret")
    postgres = secrets["llmp-postgres"]["stringData"]
    urls = {name.removeprefix("llmp-").removesuffix("-database"): secret["stringData"]["LLMP_DATABASE_URL"]
            for name, secret in secrets.items() if name.endswith("-database")}
    assert set(urls) == {"gateway", *(service.name for service in topology.GRPC_SERVICES)}
    for component, url in urls.items():
        parts = urlsplit(url)
        assert (parts.username, parts.password) == (f"llmp_{component}", postgres[f"{component}-password"])
        assert postgres["password"] not in url  # services are not the superuser


def test_prod_scales_the_serving_path(prod, dev):
    prod_deployments, dev_deployments = by_kind(prod, "Deployment"), by_kind(dev, "Deployment")
    for name in ("gateway", "inference"):
        assert prod_deployments[name]["spec"]["replicas"] >= 2 > dev_deployments[name]["spec"]["replicas"]
    assert pod_spec(prod_deployments["gateway"])["containers"][0]["resources"]["requests"]["cpu"] == "1"
    assert by_kind(dev, "ConfigMap")["llmp-config"]["data"]["LLMP_LOG_LEVEL"] == "DEBUG"
    assert by_kind(prod, "ConfigMap")["llmp-config"]["data"]["LLMP_LOG_LEVEL"] == "INFO"


def test_namespace_joins_the_mesh(overlay):
    _, objects = overlay
    assert by_kind(objects, "Namespace")["llmp"]["metadata"]["labels"]["istio-injection"] == "enabled"


def test_only_inference_may_read_and_patch_its_virtual_service(overlay):
    """The canary controller (services/inference/canary.py IstioWeights) GETs then PATCHes VirtualService
    `inference`; that is all its Role allows, and no other llmp identity gets an API token."""
    _, objects = overlay
    bindings = by_kind(objects, "RoleBinding")
    roles = by_kind(objects, "Role")
    granted = {}
    for binding in bindings.values():
        role = roles[binding["roleRef"]["name"]]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == "llmp"
            granted.setdefault(subject["name"], []).extend(role["rules"])
    assert granted == {"llmp-inference": [{"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"],
                                           "resourceNames": ["inference"], "verbs": ["get", "patch"]}]}
    pods = {obj["metadata"]["name"]: pod_spec(obj) for obj in workloads(objects)}
    inference = {pod["serviceAccountName"] for name, pod in pods.items() if name.startswith("inference")}
    assert inference == {"llmp-inference"}
    accounts = by_kind(objects, "ServiceAccount")
    assert [name for name, account in accounts.items() if account.get("automountServiceAccountToken", True)] == [
        "llmp-inference"]


def test_llmp_pods_in_the_mesh_leave_grpc_balancing_to_envoy(overlay):
    """Every llmp pod has a sidecar (the namespace injects it) and reaches the services through ClusterIPs:
    its channels must not balance or health-check themselves (issue 16, defect 9)."""
    _, objects = overlay
    namespaces = [obj for obj in objects if obj["kind"] == "Namespace"]
    assert all(ns["metadata"]["labels"].get("istio-injection") == "enabled" for ns in namespaces)
    config = next(obj for obj in objects if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "llmp-config")
    assert config["data"]["LLMP_GRPC_BALANCING"] == "mesh"
    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    for key, address in config["data"].items():
        if key.endswith("_ADDR"):
            host = address.rsplit(":", 1)[0]
            assert services[host]["spec"].get("clusterIP") != "None", f"{host}: headless, yet balanced by Envoy"


def test_every_llmp_image_is_a_component_of_the_one_dockerfile(overlay):
    """`llmp/<component>` images are `docker build --build-arg COMPONENT=<component> .` (the root Dockerfile),
    except llmp/triton (deploy/triton)."""
    from test_dockerfiles import IMAGES, STAGES

    _, objects = overlay
    images = {container["image"] for obj in objects for container in containers(obj)}
    named = [re.search(r"(?:^|/)llmp/([\w-]+)(?::[\w.-]+|@sha256:\w+)?$", image) for image in images]
    components = {match.group(1) for match in named if match and match.group(1) != "triton"}
    assert components == set(IMAGES), sorted(components ^ set(IMAGES))
    assert components <= set(STAGES)
    for component in components:
        assert (ROOT / "deploy" / "locks" / f"{component}.lock").is_file()
