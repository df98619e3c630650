"""docker-compose.yml agrees with the local launcher: services, ports, LLMP_* variables, health.

No Docker engine runs here, so the file is parsed and checked against services/common/topology.py and
services/common/config.py, the tables `make up` starts the local stack from.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from services.common import topology
from services.common.config import DEFAULTS, Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]

# Compose service that plays each component of topology.PORTS.
COMPONENT_SERVICE = {"gateway": "gateway", "s3": "minio", "triton": "triton",
                     **{service.name: service.name for service in topology.GRPC_SERVICES}}
LLMP_SERVICES = [*(service.name for service in topology.GRPC_SERVICES), "training-worker", "gateway"]
GPU_SERVICES = ["triton", "training-worker"]
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<default>[^}]*))?\}")


def _env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


# The throw-away credentials the README's first try passes with --env-file.
DEV_ENV = _env_file(ROOT / "deploy" / "compose" / "dev.env")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` / `${VAR:?error}` substitution (with the dev env file by default)."""
    env = DEV_ENV if env is None else env

    def substitute(match: re.Match) -> str:
        if match["name"] in env:
            return env[match["name"]]
        if match["op"] == "?":
            raise KeyError(f"{match['name']} is required")
        return match["default"] or ""

    return INTERPOLATION.sub(substitute, value).replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    raw = SERVICES[service].get("environment", {})
    assert isinstance(raw, dict), f"{service}: environment must be a mapping"
    return {key: interpolate(str(value)) for key, value in raw.items()}


def container_ports(service: str) -> set[int]:
    """Ports the service's container offers on the compose network (`ports` targets and `expose`)."""
    spec = SERVICES[service]
    ports = {int(str(entry).rsplit(":", 1)[-1].split("/")[0]) for entry in spec.get("ports", [])}
    return ports | {int(str(entry)) for entry in spec.get("expose", [])}


def test_every_component_of_the_local_stack_is_a_compose_service():
    expected = {"postgres", "redis", "minio", "triton", "gateway", "training-worker",
                *(service.name for service in topology.GRPC_SERVICES)}
    assert expected <= set(SERVICES)


@pytest.mark.parametrize("component", sorted(topology.PORTS))
def test_ports_agree_with_the_topology(component):
    service = COMPONENT_SERVICE[component]
    assert set(topology.PORTS[component]) <= container_ports(service)


@pytest.mark.parametrize("service", topology.GRPC_SERVICES, ids=lambda s: s.name)
def test_grpc_services_listen_where_they_are_advertised(service):
    settings = Settings.from_env(environment(service.name))
    # Clients reach the service by its compose name on its topology port…
    assert settings.service_addrs[service.name] == f"{service.name}:{service.port}"
    # …and it binds every interface of its container on that port.
    assert settings.listen_addr(service) == f"0.0.0.0:{service.port}"
    assert {service.port, service.metrics_port} <= container_ports(service.name)


@pytest.mark.parametrize("service", LLMP_SERVICES)
def test_llmp_services_use_only_known_variables_with_valid_values(service):
    env = environment(service)
    llmp_vars = {key for key in env if key.startswith("LLMP_")}
    assert llmp_vars <= set(DEFAULTS), f"unknown: {sorted(llmp_vars - set(DEFAULTS))}"
    settings = Settings.from_env(env)  # raises on a value that does not parse
    assert settings.database_url.startswith("postgresql://") and "@postgres:5432/" in settings.database_url
    assert settings.s3.endpoint == f"minio:{topology.S3_PORT}"
    assert settings.broker_url == f"redis://redis:{topology.REDIS_PORT}/0"
    assert settings.triton_grpc_url == f"triton:{topology.TRITON_GRPC_PORT}"
    assert settings.triton_http_url == f"triton:{topology.TRITON_HTTP_PORT}"
    for other in topology.GRPC_SERVICES:
        host, port = settings.service_addrs[other.name].rsplit(":", 1)
        assert host in SERVICES and int(port) in container_ports(host)


def test_no_llmp_variable_anywhere_in_the_file_is_unknown():
    names = set(re.findall(r"\bLLMP_[A-Z0-9_]+", (ROOT / "docker-compose.yml").read_text()))
    assert names and names <= set(DEFAULTS), f"unknown: {sorted(names - set(DEFAULTS))}"


def test_gateway_listens_on_the_topology_port():
    settings = Settings.from_env(environment("gateway"))
    assert settings.gateway_port == topology.GATEWAY_PORT
    assert f"{topology.GATEWAY_PORT}:{topology.GATEWAY_PORT}" in SERVICES["gateway"]["ports"]


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {"minio-init"}))
def test_every_long_running_service_has_a_healthcheck(service):
    test = SERVICES[service].get("healthcheck", {}).get("test")
    assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1


@pytest.mark.parametrize("service", topology.GRPC_SERVICES, ids=lambda s: s.name)
def test_grpc_healthchecks_use_the_grpc_health_protocol_on_the_service_port(service):
    test = SERVICES[service.name]["healthcheck"]["test"]
    assert test[1:] == ["python", "-m", "services.common.healthcheck", f"127.0.0.1:{service.port}"]


def test_gateway_healthcheck_asks_healthz_on_its_port():
    test = SERVICES["gateway"]["healthcheck"]["test"]
    assert test[-1] == f"http://127.0.0.1:{topology.GATEWAY_PORT}/healthz"


def test_dependencies_wait_for_health_and_exist():
    for name, spec in SERVICES.items():
        depends = spec.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with conditions"
        for dependency, condition in depends.items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            # A one-shot job completes; everything else must be healthy, which needs a healthcheck.
            if "healthcheck" in SERVICES[dependency]:
                assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            else:
                assert condition == {"condition": "service_completed_successfully"}, f"{name} -> {dependency}"


def test_dependency_graph_has_no_cycle():
    graph = {name: set(spec.get("depends_on", {})) for name, spec in SERVICES.items()}
    order: list[str] = []
    while graph:
        ready = sorted(name for name, needs in graph.items() if not needs - set(order))
        assert ready, f"cycle among {sorted(graph)}"
        order.extend(ready)
        for name in ready:
            del graph[name]
    assert order.index("gateway") > max(order.index(s.name) for s in topology.GRPC_SERVICES)


@pytest.mark.parametrize("service", LLMP_SERVICES)
def test_llmp_services_are_built_from_the_one_dockerfile_with_their_component(service):
    component = {"training-worker": "training"}.get(service, service)
    assert SERVICES[service]["build"] == {"context": ".", "dockerfile": "Dockerfile", "args": {"COMPONENT": component}}
    assert (ROOT / "deploy" / "locks" / f"{component}.lock").is_file()
    assert SERVICES[service]["image"] == f"llmp/{component}:0.1.0"


def test_training_worker_consumes_the_gpu_and_eval_queues_of_the_worker_app():
    from services.common.queues import GPU_WORKER_QUEUES

    # dataset builds' ranges go to the CPU data worker (test_data_worker.py)
    command = SERVICES["training-worker"]["command"]
    assert command[:4] == ["celery", "--app", topology.WORKER_APP, "worker"]
    assert command[command.index("--queues") + 1] == GPU_WORKER_QUEUES


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_services_reserve_nvidia_devices(service):
    devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)


def test_triton_is_the_pinned_ngc_image_reading_its_repository_from_minio_with_explicit_control():
    triton = SERVICES["triton"]
    dockerfile = (ROOT / triton["build"]["context"] / "Dockerfile").read_text()
    assert re.search(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", dockerfile)  # built on the NGC image
    args = triton["command"]
    repository = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--model-repository="))
    assert repository == f"s3://minio:{topology.S3_PORT}/llmp/triton-models"
    assert "--model-control-mode=explicit" in args
    for flag, port in (("--http-port", topology.TRITON_HTTP_PORT), ("--grpc-port", topology.TRITON_GRPC_PORT),
                       ("--metrics-port", topology.TRITON_METRICS_PORT)):
        assert f"{flag}={port}" in args
    # Triton's S3 client authenticates with the same keys as llmp's own services.
    env = environment("triton")
    llmp = environment("inference")
    assert env["AWS_ACCESS_KEY_ID"] == llmp["LLMP_S3_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == llmp["LLMP_S3_SECRET_KEY"]
    # The inference service writes the repository Triton reads.
    assert llmp["LLMP_TRITON_MODEL_REPOSITORY"] == repository
    # The repository is in the bucket llmp uses, which the init job creates.
    assert repository.split("/")[3] == llmp["LLMP_S3_BUCKET"]
    # On this GPU host the models run on Triton's GPU.
    assert llmp["LLMP_TRITON_INSTANCE_KIND"] == "KIND_GPU"
    assert "CUDAExecutionProvider" in llmp["LLMP_TRITON_ORT_PROVIDERS"]
    assert f"llmp/{llmp['LLMP_S3_BUCKET']}/triton-models/" in SERVICES["minio-init"]["command"][0]


def test_llmp_uses_a_bucket_scoped_s3_user_that_minio_init_creates_never_the_root():
    """MinIO's root credentials stay with MinIO and minio-init (issue 16, defect 10); llmp's services and
    Triton use the user minio-init creates, with read-write on the llmp bucket only."""
    import json

    minio = environment("minio")
    init = environment("minio-init")
    llmp = environment("dataset")
    root = (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter root passwords
    assert (init["ROOT_USER"], init["ROOT_PASSWORD"]) == root
    assert (init["S3_USER"], init["S3_USER_SECRET"]) == (llmp["LLMP_S3_ACCESS_KEY"], llmp["LLMP_S3_SECRET_KEY"])
    assert llmp["LLMP_S3_ACCESS_KEY"] != root[0]
    for name in SERVICES:
        values = set(environment(name).values())
        if name not in {"minio", "minio-init"}:
            assert root[1] not in values, f"{name} gets MinIO's root password"
    script = SERVICES["minio-init"]["command"][0]
    assert 'mc admin user add llmp "$S3_USER" "$S3_USER_SECRET"' in interpolate(script)
    (mount,) = SERVICES["minio-init"]["volumes"]
    source, target, _ = mount.split(":")
    assert f"mc admin policy create llmp llmp-bucket {target}" in script
    policy = json.loads((ROOT / source).read_text())
    bucket = llmp["LLMP_S3_BUCKET"]
    assert {resource for statement in policy["Statement"] for resource in statement["Resource"]} == {
        f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


def test_each_llmp_service_connects_as_its_own_role_never_the_superuser():
    """The postgres container creates one role per component from deploy/base/postgres-init (mounted on
    its initdb folder) with the passwords it is given; each service's URL names its own."""
    from urllib.parse import urlsplit

    postgres = environment("postgres")
    assert "./deploy/base/postgres-init:/docker-entrypoint-initdb.d:ro" in SERVICES["postgres"]["volumes"]
    assert "POSTGRES_USER" not in postgres  # the superuser is `postgres`, used by nobody else
    for service in LLMP_SERVICES:
        role = {"training-worker": "training"}.get(service, service)
        url = urlsplit(environment(service)["LLMP_DATABASE_URL"])
        assert (url.username, url.password) == (f"llmp_{role}", postgres[f"{role.upper()}_DB_PASSWORD"])
        assert (url.hostname, url.port, url.path) == ("postgres", topology.POSTGRES_PORT, f"/{postgres['POSTGRES_DB']}")
        assert url.password != postgres["POSTGRES_PASSWORD"]


def test_secrets_come_from_the_environment_when_set():
    raw = SERVICES["gateway"]["environment"]
    env = {**DEV_ENV, "LLMP_ADMIN_KEY": "k-123", "LLMP_S3_SECRET_KEY": "s3cr3t-from-env", "GATEWAY_DB_PASSWORD": "pw"}
    assert interpolate(raw["LLMP_ADMIN_KEY"], env) == "k-123"
    assert interpolate(raw["LLMP_S3_SECRET_KEY"], env) == "s3cr3t-from-env"
    assert interpolate(raw["LLMP_DATABASE_URL"], env) == "postgresql://llmp_gateway:pw@postgres:5432/llmp"


def test_only_the_gateway_is_published_beyond_loopback():
    for name, spec in SERVICES.items():
        for entry in spec.get("ports", []):
            if name != "gateway":
                assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} on every interface"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_third_party_images_are_pinned(service):
    image = SERVICES[service]["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and not tag.isalpha(), image


CREDENTIAL = re.compile(r"PASSWORD|SECRET|_KEY$")


def test_secrets_have_no_default_and_the_dev_env_file_sets_each():
    """A credential never silently defaults: compose refuses to start until it is set."""
    text = (ROOT / "docker-compose.yml").read_text()
    references = [match for match in INTERPOLATION.finditer(text) if CREDENTIAL.search(match["name"])]
    assert {match["name"] for match in references} >= {"POSTGRES_PASSWORD", "LLMP_S3_SECRET_KEY", "LLMP_ADMIN_KEY"}
    for match in references:
        assert match["op"] == "?", f"{match[0]} has a default"
        with pytest.raises(KeyError):
            interpolate(match[0], {})
    assert {match["name"] for match in references} <= set(DEV_ENV)
    required = {match["name"] for match in INTERPOLATION.finditer(text) if match["op"] == "?"}
    assert required == set(DEV_ENV), "the dev env file sets exactly what compose requires"


@pytest.mark.parametrize("service", sorted(name for name, spec in SERVICES.items()
                                           if spec["image"].startswith("llmp/")))
def test_llmp_images_are_built_here_never_pulled(service):
    spec = SERVICES[service]
    assert spec.get("pull_policy") == "build", f"{service} would be pulled from a public registry"
    assert (ROOT / spec["build"]["context"] / spec["build"].get("dockerfile", "Dockerfile")).is_file()
    builders = {name for name, other in SERVICES.items() if other["image"] == spec["image"] and "build" in other}
    assert {str(other["build"]) for other in map(SERVICES.get, builders)} == {str(spec["build"])}
