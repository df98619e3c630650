"""Typed configuration from `LLMP_*` environment variables.

Read once, in `main()`, with `Settings.from_env()`, and passed down; nothing reads the environment
at import time. `VARIABLES` is the single list of settings: the README table and the compose check
are generated from / tested against it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common import private_files, topology
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class Variable:
    """One `LLMP_*` setting: its name, default and meaning."""

    name: str
    default: str
    help: str


VARIABLES: tuple[Variable, ...] = (
    Variable("LLMP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/llmp",
             "PostgreSQL URL (libpq form). `make up` uses it when reachable, else starts an embedded server."),
    Variable("LLMP_S3_ENDPOINT", f"127.0.0.1:{topology.S3_PORT}", "S3 server host:port (MinIO, SeaweedFS, AWS)."),
    Variable("LLMP_S3_ACCESS_KEY", "llmp", "S3 access key."),
    Variable("LLMP_S3_SECRET_KEY", "llmp-secret-key", "S3 secret key."),
    Variable("LLMP_S3_SECURE", "false", "Use HTTPS to reach S3."),
    Variable("LLMP_S3_REGION", "us-east-1", "S3 region."),
    Variable("LLMP_S3_UPLOAD_CHECKSUM", "crc32",
             "Checksum the S3 server verifies on artifact uploads: crc32 (what AWS SDKs send by default) or sha256 "
             "(S3 also attests the SHA-256 the registry records; costs the server a SHA-256 pass)."),
    Variable("LLMP_S3_BUCKET", "llmp", "Bucket holding datasets, checkpoints, models and the Triton repository."),
    Variable("LLMP_BROKER_URL", f"redis://127.0.0.1:{topology.REDIS_PORT}/0",
             "Celery broker (Redis or RabbitMQ). `make up` uses it when reachable, else a local SQLite broker."),
    Variable("LLMP_RESULT_BACKEND", "", "Celery result backend; empty means none (state lives in PostgreSQL)."),
    Variable("LLMP_TRITON_GRPC_URL", f"127.0.0.1:{topology.TRITON_GRPC_PORT}", "Triton gRPC endpoint."),
    Variable("LLMP_TRITON_HTTP_URL", f"127.0.0.1:{topology.TRITON_HTTP_PORT}", "Triton HTTP endpoint."),
    Variable("LLMP_TRITON_METRICS_PORT", str(topology.TRITON_METRICS_PORT), "Triton metrics port (launcher)."),
    Variable("LLMP_TRITON_MODEL_REPOSITORY", "",
             "Triton model repository (a local path or s3:// URL); empty means .llmp/triton-models locally."),
    *(
        Variable(service.addr_env, f"127.0.0.1:{service.port}", f"Address of the {service.name} gRPC service.")
        for service in topology.GRPC_SERVICES
    ),
    Variable("LLMP_GRPC_BALANCING", "client",
             "How llmp's gRPC clients spread calls over a service's replicas: `client` = round_robin over every "
             "address the service's address resolves to (an `ipv4:` list, a DNS name with several records such "
             "as a headless Service), dropping a replica its health check reports draining; `mesh` = one "
             "connection to the local proxy (Istio's Envoy), which balances each call, and no client health check."),
    Variable("LLMP_BIND_HOST", "127.0.0.1", "Interface servers listen on (0.0.0.0 in containers)."),
    Variable("LLMP_GATEWAY_PORT", str(topology.GATEWAY_PORT), "REST gateway port."),
    Variable("LLMP_ADMIN_KEY", "", "Bootstrap admin API key; generated into .llmp/admin.key when empty."),
    Variable("LLMP_STATE_DIR", ".llmp", "Local state: logs, pids, embedded servers' data, admin key."),
    Variable("LLMP_LOG_LEVEL", "INFO", "Log level."),
    Variable("LLMP_LOG_FORMAT", "json", "`json` (one object per line) or `text`."),
    Variable("LLMP_TRITON_INSTANCE_KIND", "KIND_CPU",
             "Where Triton runs each model instance: KIND_CPU (local), or KIND_GPU on a GPU host "
             "(compose, Kubernetes)."),
    Variable("LLMP_TRITON_ORT_PROVIDERS", "CPUExecutionProvider",
             "ONNX Runtime execution providers the Triton model tries, in order (comma-separated); those its "
             "ONNX Runtime lacks are skipped. GPU: "
             "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider."),
    Variable("LLMP_TRITON_INTRA_OP_THREADS", "0",
             "ONNX Runtime threads per model call in Triton (decoders and encoders); 0 = every core the Triton "
             "process may use, as an in-process baseline gets (threads do not spin between calls, so idle ones "
             "leave the cores to the other processes)."),
    Variable("LLMP_INFERENCE_TRACK", "",
             "Inference track: empty = the process splits a deployment's traffic by its canary weight itself "
             "(local, compose); `stable` or `canary` = it serves that track's version and the Istio "
             "VirtualService weights split the traffic (Kubernetes)."),
    Variable("LLMP_SHUTDOWN_GRACE", "10", "Seconds a server drains in-flight calls after SIGTERM."),
    Variable("LLMP_TRAINING_LEASE_SECONDS", "30",
             "Seconds a training node may go silent before its job is requeued; the worker renews every third."),
    Variable("LLMP_TRAINING_ADVERTISE_HOST", "",
             "Host the other nodes of a multi-node training job reach this worker at (node 0 publishes it as "
             "the rendezvous endpoint); empty means the machine's hostname. On Kubernetes, the worker pod's DNS name."),
    Variable("LLMP_TRAINING_WARM_START", "true",
             "Whether each training worker process keeps a warm runtime (torch and Transformers imported, ~0.4 GiB "
             "of memory while idle) that a job of one process starts in at once, without torchrun; multi-process "
             "jobs use torchrun either way."),
    Variable("LLMP_MAX_UPLOAD_BYTES", str(2 * 1024**3), "Largest dataset upload the gateway accepts."),
    Variable("LLMP_MAX_IMPORT_BYTES", str(64 * 1024**3),
             "Largest model archive `POST /v1/models/{name}/imports` accepts (sent and unpacked, each)."),
    Variable("LLMP_MAX_BODY_BYTES", str(1024**2), "Largest JSON request body the gateway accepts."),
    Variable("LLMP_OTEL_ENDPOINT", "",
             "OTLP/gRPC collector for traces, e.g. http://otel-collector:4317; empty means no tracing."),
    Variable("LLMP_UP_TIMEOUT", "120", "Seconds `llmp up` waits for one component to become healthy."),
    Variable("LLMP_URL", "", "Gateway URL the `llmp` CLI talks to; empty means http://127.0.0.1:$LLMP_GATEWAY_PORT."),
    Variable("LLMP_API_KEY", "", "API key the `llmp` CLI sends; empty means the admin key."),
    Variable("LLMP_PROFILE", "dev",
             "`dev` (one's own machine: published default secrets only warn, a missing service secret is generated "
             "into the state dir) or `production` (both refused at startup)."),
    Variable("LLMP_SERVICE_SECRET", "",
             "Secret (at least 16 bytes) every llmp process shares to sign and verify the identity on gRPC calls; "
             "empty means <state dir>/service.secret, generated when missing (dev profile only)."),
    Variable("LLMP_TENANT_RATE_LIMIT", "200", "Requests per second one tenant may send, across all gateway replicas."),
    Variable("LLMP_TENANT_MAX_GENERATIONS", "32",
             "Generations (completions, chat) one tenant may have running at once, across all gateway replicas."),
    Variable("LLMP_TENANT_MAX_STREAMS", "16",
             "Event streams (SSE) one tenant may hold open at once, across all gateway replicas."),
    Variable("LLMP_QUOTA_REDIS_URL", "",
             "Redis where the gateway replicas share tenant quotas; empty means LLMP_BROKER_URL when it is Redis, "
             "else quotas per replica."),
    Variable("LLMP_IP_RATE_LIMIT", "20",
             "Requests per second one client address may make with a key the gateway has not recently accepted "
             "(checked before the key costs a database query)."),
    Variable("LLMP_TRUSTED_PROXY_HOPS", "0",
             "Proxies in front of the gateway that append the client's address to X-Forwarded-For (behind the Istio "
             "ingress gateway: 1); the per-address limiter reads the address that many entries from the right. "
             "0: the connection's peer."),
    Variable("LLMP_TRAINING_WORKERS", "8",
             "Training nodes the fleet runs: the most `distributed.nnodes` a job may ask."),
    Variable("LLMP_TRAINING_MAX_N_EMBD", "4096", "Largest `model.n_embd` a training job may ask."),
    Variable("LLMP_TRAINING_MAX_N_LAYER", "48", "Largest `model.n_layer` a training job may ask."),
    Variable("LLMP_TRAINING_MAX_STEPS", "1000000", "Largest `hyperparameters.max_steps` a training job may ask."),
    Variable("LLMP_TENANT_MAX_TRAINING_NODES", "8",
             "Training nodes one tenant's queued and running jobs may hold at once, across all coordinator replicas."),
    Variable("LLMP_TENANT_NODE_HOURS_PER_DAY", "192",
             "Node-hours (wall time x nnodes x nproc_per_node) one tenant's jobs may run in any 24 hours; a job "
             "is refused at submit once the tenant's jobs of the last 24 hours reached it."),
    Variable("LLMP_TENANT_INGEST_BYTES_PER_DAY", "10737418240",
             "Corpus bytes one tenant may ingest into new dataset versions in any 24 hours."),
    Variable("LLMP_DATASET_BUILD_SLOTS", "2",
             "Dataset builds one dataset-service replica runs at once (each is CPU-bound and holds its corpus's "
             "dedup state in memory); further builds wait, tenants served in turn."),
    Variable("LLMP_DATASET_FANOUT_BYTES", str(256 * 1024**2),
             "Corpora larger than this build fanned out over the Celery workers' `data` queue (scan and packing, "
             "one byte range per task; dedup and the tokenizer stay in the dataset service): byte-identical to "
             "the in-process build. Smaller ones build in the dataset service, which is faster for them. 0: never "
             "fan out (no worker consumes `data`)."),
    Variable("LLMP_DATASET_SHARD_BYTES", str(64 * 1024**2),
             "Bytes of corpus in one fanned-out task (cut on line boundaries): the unit a killed worker redoes."),
    Variable("LLMP_DATASET_RANGES_IN_FLIGHT", "16",
             "Ranges of one fanned-out build sent to the `data` queue and not finished yet, at most; the next is "
             "sent as one finishes, so builds running at once (other tenants' included) alternate on the workers "
             "instead of queueing behind all of one build's ranges. About the data workers' total processes: "
             "fewer leaves workers idle while one build runs alone."),
    Variable("LLMP_DATA_WORKER_CONCURRENCY", "0",
             "Ranges one data worker (`celery -A services.dataset.worker`, the `data` queue only) runs at once, one "
             "process each. 0: the CPUs the worker may use (its cgroup's CPU quota, else its CPU affinity)."),
    Variable("LLMP_TENANT_DATASET_BUILD_SLOTS", "1",
             "Of a dataset replica's build slots, the most one tenant's builds may hold at once, so another "
             "tenant's build never waits behind them (capped at LLMP_DATASET_BUILD_SLOTS)."),
    Variable("LLMP_GRPC_TLS_CERT", "",
             "PEM certificate this process presents on gRPC (as server and as client); with _KEY and _CA: mutual "
             "TLS, servers require a client certificate signed by LLMP_GRPC_TLS_CA. Empty: plaintext (the mesh "
             "adds mTLS on Kubernetes)."),
    Variable("LLMP_GRPC_TLS_KEY", "", "PEM private key of LLMP_GRPC_TLS_CERT."),
    Variable("LLMP_GRPC_TLS_CA", "", "PEM CA that signs every gRPC peer's certificate (servers and clients)."),
)
# Secrets whose defaults anyone can read here: right for a stack on one's own machine, wrong anywhere else.
# Every process names those still at their default in a warning when it starts (`logs.configure`), and
# refuses to start with them outside the dev profile.
PUBLISHED_SECRETS = ("LLMP_S3_ACCESS_KEY", "LLMP_S3_SECRET_KEY")
PROFILES = ("dev", "production")
MIN_SERVICE_SECRET_BYTES = 16  # signing.MIN_SECRET_BYTES: a shorter secret is guessable from one captured token
INFERENCE_TRACKS = ("", "stable", "canary")
TRITON_INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
GRPC_BALANCING = ("client", "mesh")
UPLOAD_CHECKSUMS = ("crc32", "sha256")  # trailing checksums ObjectStore.upload_file can have S3 verify
DEFAULTS = {variable.name: variable.default for variable in VARIABLES}


def _flag(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise InvalidArgument(f"{name} must be true or false, not {value!r}")


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, not {value!r}") from None
    if number <= 0:
        raise InvalidArgument(f"{name} must be positive, not {number}")
    return number


def _count(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, not {value!r}") from None
    if number < 0:
        raise InvalidArgument(f"{name} must be 0 or more, not {number}")
    return number


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    region: str
    bucket: str
    upload_checksum: str = "crc32"  # one of UPLOAD_CHECKSUMS


@dataclass(frozen=True)
class GrpcTls:
    """Mutual TLS on gRPC: this process's certificate and key, and the CA every peer's certificate must chain to."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> "GrpcTls | None":
        names = ("LLMP_GRPC_TLS_CERT", "LLMP_GRPC_TLS_KEY", "LLMP_GRPC_TLS_CA")
        given = [name for name in names if values.get(name)]
        if not given:
            return None
        if len(given) != len(names):  # half a TLS setup would silently fall back to plaintext
            missing = ", ".join(name for name in names if name not in given)
            raise InvalidArgument(f"mutual TLS on gRPC needs all of {', '.join(names)}; missing {missing}")
        return cls(*(Path(values[name]) for name in names))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA) as PEM bytes."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


@dataclass(frozen=True)
class Settings:
    """Everything a llmp process is configured with."""

    database_url: str
    s3: S3Settings
    broker_url: str
    result_backend: str
    triton_grpc_url: str
    triton_http_url: str
    triton_model_repository: str
    triton_instance_kind: str
    triton_ort_providers: tuple[str, ...]
    triton_intra_op_threads: int
    service_addrs: Mapping[str, str]  # service name -> host:port
    bind_host: str
    gateway_port: int
    admin_key: str
    state_dir: Path
    log_level: str
    log_format: str
    shutdown_grace: float
    inference_track: str
    training_lease_seconds: float
    training_advertise_host: str
    training_warm_start: bool
    max_upload_bytes: int
    max_import_bytes: int
    max_body_bytes: int
    grpc_balancing: str = "client"  # one of GRPC_BALANCING (grpc_client.channel_options)
    profile: str = "dev"  # one of PROFILES
    service_secret_text: str = field(default="", repr=False)  # LLMP_SERVICE_SECRET; see service_secret()
    tenant_rate_limit: float = 200.0
    tenant_max_generations: int = 32
    tenant_max_streams: int = 16
    quota_redis_url: str = ""
    ip_rate_limit: float = 20.0
    trusted_proxy_hops: int = 0
    training_workers: int = 8
    training_max_n_embd: int = 4096
    training_max_n_layer: int = 48
    training_max_steps: int = 1_000_000
    tenant_max_training_nodes: int = 8
    tenant_node_hours_per_day: int = 192
    tenant_ingest_bytes_per_day: int = 10 * 1024**3
    dataset_build_slots: int = 2
    tenant_dataset_build_slots: int = 1
    dataset_fanout_bytes: int = 256 * 1024**2
    dataset_shard_bytes: int = 64 * 1024**2
    data_worker_concurrency: int = 0  # 0: the CPUs the process may use (services/dataset/worker.py)
    dataset_ranges_in_flight: int = 16  # services/dataset/shards.py IN_FLIGHT
    grpc_tls: GrpcTls | None = None  # LLMP_GRPC_TLS_*: mutual TLS on gRPC; None is plaintext
    raw: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Resolve every setting from `env` (default: the process environment) over the defaults."""
        source = os.environ if env is None else env
        unknown = sorted(key for key in source if key.startswith("LLMP_") and key not in DEFAULTS)
        if unknown:
            raise InvalidArgument(f"unknown setting(s) {', '.join(unknown)}; see the README's configuration table")
        values = {name: source.get(name, default) for name, default in DEFAULTS.items()}
        log_format = values["LLMP_LOG_FORMAT"]
        if log_format not in {"json", "text"}:
            raise InvalidArgument(f"LLMP_LOG_FORMAT must be json or text, not {log_format!r}")
        upload_checksum = values["LLMP_S3_UPLOAD_CHECKSUM"]
        if upload_checksum not in UPLOAD_CHECKSUMS:
            raise InvalidArgument(f"LLMP_S3_UPLOAD_CHECKSUM must be crc32 or sha256, not {upload_checksum!r}")
        instance_kind = values["LLMP_TRITON_INSTANCE_KIND"]
        if instance_kind not in TRITON_INSTANCE_KINDS:
            raise InvalidArgument(f"LLMP_TRITON_INSTANCE_KIND must be KIND_CPU or KIND_GPU, not {instance_kind!r}")
        providers = tuple(name.strip() for name in values["LLMP_TRITON_ORT_PROVIDERS"].split(",") if name.strip())
        if not providers or not all(name.endswith("ExecutionProvider") for name in providers):
            raise InvalidArgument("LLMP_TRITON_ORT_PROVIDERS must list ONNX Runtime providers (…ExecutionProvider), "
                                  f"not {values['LLMP_TRITON_ORT_PROVIDERS']!r}")
        track = values["LLMP_INFERENCE_TRACK"]
        if track not in INFERENCE_TRACKS:
            raise InvalidArgument(f"LLMP_INFERENCE_TRACK must be empty, stable or canary, not {track!r}")
        balancing = values["LLMP_GRPC_BALANCING"]
        if balancing not in GRPC_BALANCING:
            raise InvalidArgument(f"LLMP_GRPC_BALANCING must be client or mesh, not {balancing!r}")
        profile = values["LLMP_PROFILE"]
        if profile not in PROFILES:
            raise InvalidArgument(f"LLMP_PROFILE must be dev or production, not {profile!r}")
        published = [name for name in PUBLISHED_SECRETS if values[name] == DEFAULTS[name]]
        if published and profile != "dev":
            raise InvalidArgument(f"{', '.join(published)} still hold their published defaults: set them (only the "
                                  "dev profile accepts those)")
        if profile != "dev" and not values["LLMP_SERVICE_SECRET"]:
            raise InvalidArgument("LLMP_SERVICE_SECRET must be set outside the dev profile")
        if values["LLMP_SERVICE_SECRET"] and len(values["LLMP_SERVICE_SECRET"].encode()) < MIN_SERVICE_SECRET_BYTES:
            raise InvalidArgument(f"LLMP_SERVICE_SECRET must be at least {MIN_SERVICE_SECRET_BYTES} bytes")
        broker = values["LLMP_BROKER_URL"]
        quota_redis = values["LLMP_QUOTA_REDIS_URL"] or (broker if broker.startswith(("redis://", "rediss://")) else "")
        return cls(
            database_url=values["LLMP_DATABASE_URL"],
            s3=S3Settings(
                endpoint=values["LLMP_S3_ENDPOINT"],
                access_key=values["LLMP_S3_ACCESS_KEY"],
                secret_key=values["LLMP_S3_SECRET_KEY"],
                secure=_flag(values["LLMP_S3_SECURE"], "LLMP_S3_SECURE"),
                region=values["LLMP_S3_REGION"],
                bucket=values["LLMP_S3_BUCKET"],
                upload_checksum=upload_checksum,
            ),
            broker_url=values["LLMP_BROKER_URL"],
            result_backend=values["LLMP_RESULT_BACKEND"],
            triton_grpc_url=values["LLMP_TRITON_GRPC_URL"],
            triton_http_url=values["LLMP_TRITON_HTTP_URL"],
            triton_model_repository=values["LLMP_TRITON_MODEL_REPOSITORY"],
            triton_instance_kind=instance_kind,
            triton_ort_providers=providers,
            triton_intra_op_threads=_count(values["LLMP_TRITON_INTRA_OP_THREADS"], "LLMP_TRITON_INTRA_OP_THREADS"),
            service_addrs={s.name: values[s.addr_env] for s in topology.GRPC_SERVICES},
            bind_host=values["LLMP_BIND_HOST"],
            gateway_port=_positive_int(values["LLMP_GATEWAY_PORT"], "LLMP_GATEWAY_PORT"),
            admin_key=values["LLMP_ADMIN_KEY"],
            state_dir=Path(values["LLMP_STATE_DIR"]),
            log_level=values["LLMP_LOG_LEVEL"].upper(),
            log_format=log_format,
            shutdown_grace=float(_positive_int(values["LLMP_SHUTDOWN_GRACE"], "LLMP_SHUTDOWN_GRACE")),
            inference_track=track,
            training_lease_seconds=float(_positive_int(values["LLMP_TRAINING_LEASE_SECONDS"],
                                                       "LLMP_TRAINING_LEASE_SECONDS")),
            training_advertise_host=values["LLMP_TRAINING_ADVERTISE_HOST"],
            training_warm_start=_flag(values["LLMP_TRAINING_WARM_START"], "LLMP_TRAINING_WARM_START"),
            max_upload_bytes=_positive_int(values["LLMP_MAX_UPLOAD_BYTES"], "LLMP_MAX_UPLOAD_BYTES"),
            max_import_bytes=_positive_int(values["LLMP_MAX_IMPORT_BYTES"], "LLMP_MAX_IMPORT_BYTES"),
            max_body_bytes=_positive_int(values["LLMP_MAX_BODY_BYTES"], "LLMP_MAX_BODY_BYTES"),
            grpc_balancing=balancing,
            profile=profile,
            service_secret_text=values["LLMP_SERVICE_SECRET"],
            tenant_rate_limit=float(_positive_int(values["LLMP_TENANT_RATE_LIMIT"], "LLMP_TENANT_RATE_LIMIT")),
            tenant_max_generations=_positive_int(values["LLMP_TENANT_MAX_GENERATIONS"], "LLMP_TENANT_MAX_GENERATIONS"),
            tenant_max_streams=_positive_int(values["LLMP_TENANT_MAX_STREAMS"], "LLMP_TENANT_MAX_STREAMS"),
            quota_redis_url=quota_redis,
            ip_rate_limit=float(_positive_int(values["LLMP_IP_RATE_LIMIT"], "LLMP_IP_RATE_LIMIT")),
            trusted_proxy_hops=_count(values["LLMP_TRUSTED_PROXY_HOPS"], "LLMP_TRUSTED_PROXY_HOPS"),
            training_workers=_positive_int(values["LLMP_TRAINING_WORKERS"], "LLMP_TRAINING_WORKERS"),
            training_max_n_embd=_positive_int(values["LLMP_TRAINING_MAX_N_EMBD"], "LLMP_TRAINING_MAX_N_EMBD"),
            training_max_n_layer=_positive_int(values["LLMP_TRAINING_MAX_N_LAYER"], "LLMP_TRAINING_MAX_N_LAYER"),
            training_max_steps=_positive_int(values["LLMP_TRAINING_MAX_STEPS"], "LLMP_TRAINING_MAX_STEPS"),
            tenant_max_training_nodes=_positive_int(values["LLMP_TENANT_MAX_TRAINING_NODES"],
                                                    "LLMP_TENANT_MAX_TRAINING_NODES"),
            tenant_node_hours_per_day=_positive_int(values["LLMP_TENANT_NODE_HOURS_PER_DAY"],
                                                    "LLMP_TENANT_NODE_HOURS_PER_DAY"),
            tenant_ingest_bytes_per_day=_positive_int(values["LLMP_TENANT_INGEST_BYTES_PER_DAY"],
                                                      "LLMP_TENANT_INGEST_BYTES_PER_DAY"),
            dataset_build_slots=_positive_int(values["LLMP_DATASET_BUILD_SLOTS"], "LLMP_DATASET_BUILD_SLOTS"),
            tenant_dataset_build_slots=_positive_int(values["LLMP_TENANT_DATASET_BUILD_SLOTS"],
                                                     "LLMP_TENANT_DATASET_BUILD_SLOTS"),
            dataset_fanout_bytes=_count(values["LLMP_DATASET_FANOUT_BYTES"], "LLMP_DATASET_FANOUT_BYTES"),
            dataset_shard_bytes=_positive_int(values["LLMP_DATASET_SHARD_BYTES"], "LLMP_DATASET_SHARD_BYTES"),
            dataset_ranges_in_flight=_positive_int(values["LLMP_DATASET_RANGES_IN_FLIGHT"],
                                                   "LLMP_DATASET_RANGES_IN_FLIGHT"),
            data_worker_concurrency=_count(values["LLMP_DATA_WORKER_CONCURRENCY"], "LLMP_DATA_WORKER_CONCURRENCY"),
            grpc_tls=GrpcTls.from_values(values),
            raw=values,
        )

    def published_secrets(self) -> list[str]:
        """The PUBLISHED_SECRETS variables still holding their published default value."""
        return [name for name in PUBLISHED_SECRETS if self.raw.get(name, DEFAULTS[name]) == DEFAULTS[name]]

    def service_secret(self) -> bytes:
        """The secret signing service identities: LLMP_SERVICE_SECRET, else (dev profile, checked at
        `from_env`) the one in <state dir>/service.secret, generated there (owner-only) when missing, so
        every process of a local stack shares it."""
        if self.service_secret_text:
            return self.service_secret_text.encode()
        if self.profile != "dev":
            raise InvalidArgument("LLMP_SERVICE_SECRET must be set outside the dev profile")
        return private_files.read_or_create(Path(self.state_dir) / "service.secret",
                                            lambda: secrets.token_urlsafe(32)).encode()

    def listen_addr(self, service: topology.GrpcService) -> str:
        """Where `service` listens: the bind host on the port of its advertised address."""
        port = self.service_addrs[service.name].rsplit(":", 1)[-1]
        return f"{self.bind_host}:{port}"
