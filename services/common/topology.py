"""The platform's components, their ports and the settings that wire them together.

One table that the local launcher, the docker-compose check and the README all read, so a port or
variable cannot drift between the two ways of running llmp.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GrpcService:
    """A gRPC service of llmp."""

    name: str  # short name, also the proto package: llmp.<name>.v1
    port: int  # default gRPC port
    metrics_port: int  # Prometheus /metrics over HTTP
    addr_env: str  # LLMP_<NAME>_ADDR: where clients reach it (host:port)
    module: str  # python -m <module> starts it


DATASET = GrpcService("dataset", 50051, 9151, "LLMP_DATASET_ADDR", "services.dataset.server")
TRAINING = GrpcService("training", 50052, 9152, "LLMP_TRAINING_ADDR", "services.training.server")
REGISTRY = GrpcService("registry", 50053, 9153, "LLMP_REGISTRY_ADDR", "services.registry.server")
INFERENCE = GrpcService("inference", 50054, 9154, "LLMP_INFERENCE_ADDR", "services.inference.server")

GRPC_SERVICES: tuple[GrpcService, ...] = (DATASET, TRAINING, REGISTRY, INFERENCE)
SERVICES_BY_NAME = {service.name: service for service in GRPC_SERVICES}

GATEWAY_PORT = 8080
GATEWAY_MODULE = "gateway.server"
# The Celery app that runs training jobs on the `gpu` queue (and evaluations; every queue in the local stack).
WORKER_APP = "services.training.worker"
# The Celery app of the CPU data workers: dataset builds' byte ranges on the `data` queue, nothing else.
DATA_WORKER_APP = "services.dataset.worker"

TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
S3_PORT = 9000
POSTGRES_PORT = 5432
REDIS_PORT = 6379

# Every port the local stack listens on, by component (checked against docker-compose.yml).
PORTS: dict[str, tuple[int, ...]] = {
    "gateway": (GATEWAY_PORT,),
    **{service.name: (service.port,) for service in GRPC_SERVICES},
    "triton": (TRITON_HTTP_PORT, TRITON_GRPC_PORT, TRITON_METRICS_PORT),
    "s3": (S3_PORT,),
}

# -- who calls whom ----------------------------------------------------------------------------------
# Every component (a Kubernetes workload running as service account `llmp-<component>`, a compose
# service) and the components it opens connections to. llmp's own rows are what its code reaches
# (tests/unit/deploy/test_calls.py derives them from each entry module's clients and settings and fails
# on drift); istio/authorization.yaml is generated from this table (scripts/gen_istio_policy.py).
POSTGRES, MINIO, REDIS, TRITON = "postgres", "minio", "redis", "triton"
TRAINING_WORKER = "training-worker"
DATA_WORKER = "data-worker"
CALLS: dict[str, frozenset[str]] = {
    "gateway": frozenset({DATASET.name, TRAINING.name, REGISTRY.name, INFERENCE.name, POSTGRES, MINIO}),
    # The broker: a large build's byte ranges go to the workers' `data` queue (services/dataset/shards.py).
    DATASET.name: frozenset({REGISTRY.name, POSTGRES, MINIO, REDIS}),
    # The coordinator imports the worker's Celery app to dispatch, so its image reaches what the worker does.
    # The registry: a fine-tune's base and an evaluated version are checked at submit (tokenizer, config.json).
    TRAINING.name: frozenset({DATASET.name, REGISTRY.name, POSTGRES, REDIS}),
    # Nodes of one multi-node job: c10d rendezvous and NCCL/Gloo between the workers, on ports they pick.
    TRAINING_WORKER: frozenset({REGISTRY.name, POSTGRES, REDIS, MINIO, TRAINING_WORKER}),
    # A range: its corpus bytes from S3, its results back there; its tasks from the broker. No database.
    DATA_WORKER: frozenset({REDIS, MINIO}),
    REGISTRY.name: frozenset({TRAINING.name, POSTGRES, MINIO}),  # a gated alias reads evaluations
    INFERENCE.name: frozenset({REGISTRY.name, TRITON, POSTGRES, MINIO}),
    # Third-party: Triton reads its model repository. (MinIO creates its bucket itself, over loopback.)
    TRITON: frozenset({MINIO}),
}
# The ports a caller reaches each component on (metrics ports are for the monitoring namespace only).
SERVING_PORTS: dict[str, tuple[int, ...]] = {
    "gateway": (GATEWAY_PORT,),
    **{service.name: (service.port,) for service in GRPC_SERVICES},
    TRITON: (TRITON_HTTP_PORT, TRITON_GRPC_PORT),
    MINIO: (S3_PORT,),
    POSTGRES: (POSTGRES_PORT,),
    REDIS: (REDIS_PORT,),
    TRAINING_WORKER: (),  # any port: rendezvous and collectives listen on ports chosen per job
}
METRICS_PORTS: dict[str, tuple[int, ...]] = {
    "gateway": (GATEWAY_PORT,),  # GET /metrics
    **{service.name: (service.metrics_port,) for service in GRPC_SERVICES},
    TRITON: (TRITON_METRICS_PORT,),
}
# The Settings fields that address each backend: a module reading one connects to that backend.
ADDRESSED_BY: dict[str, str] = {"database_url": POSTGRES, "s3": MINIO, "broker_url": REDIS,
                                "triton_grpc_url": TRITON, "triton_http_url": TRITON}
