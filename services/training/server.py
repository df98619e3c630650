"""The training service process: `python -m services.training.server`.

Wires the coordinator (PostgreSQL), the Celery dispatcher (the `gpu` queue on LLMP_BROKER_URL), the
dataset service (specs are checked against READY dataset versions at submit) and the lease
maintenance loop into the gRPC server. The jobs themselves run in Celery workers (worker.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2
from llmp.registry.v1 import registry_pb2
from llmp.training.v1 import training_pb2_grpc

from services.common import contracts, topology
from services.common.config import Settings
from services.common.db import Database
from services.common.errors import Conflict, NotFound, Unavailable, ValidationFailed
from services.common.grpc_client import ServiceClients
from services.common.grpc_server import GrpcApp, run_main
from services.common.identity import Caller, acting_as, service_principal
from services.common.periodic import Periodic
from services.common.queues import make_producer
from services.training.coordinator import Coordinator, DatasetCheck
from services.training.dispatch import CeleryDispatcher
from services.training.quotas import TrainingQuotas
from services.training.servicer import EvaluationTarget, TrainingServicer
from services.training.spec import FleetLimits, JobSpec

log = logging.getLogger(__name__)
SUPERVISED_FORMATS = (dataset_pb2.CORPUS_FORMAT_PAIRS, dataset_pb2.CORPUS_FORMAT_CHAT)

MIGRATIONS = Path(__file__).parent / "migrations"
TOKENIZER_FILE = "tokenizer.json"  # a tokenizer's identity is the SHA-256 of this file (docs/CONTRACTS.md)
MAX_CONFIG_BYTES = 1 << 20  # a config.json larger than this is not a Transformers config


def dataset_checker(clients: ServiceClients) -> DatasetCheck:
    """Refuse a spec whose dataset version is missing (404), not READY or too small for it (409, naming why): the
    state of another resource, not a malformed field, so a spec valid by /openapi.json is never a 422 for it.
    A fine-tune's `init_from` version must exist and tokenize as the dataset does (422 naming both, as
    SPEC.md says); its spec gets the version's architecture and the adapter's default targets filled in
    (`resolve_base`).
    """

    async def check(caller: Caller, spec: JobSpec) -> str:
        name, number = spec.dataset.name, spec.dataset.version
        try:
            with acting_as(caller):
                response = await clients.dataset.GetDatasetVersion(
                    dataset_pb2.GetDatasetVersionRequest(name=name, version=number))
        except NotFound:
            raise NotFound(f"dataset {name} version {number} does not exist") from None
        version = response.version
        if version.state != dataset_pb2.VERSION_STATE_READY:
            state = dataset_pb2.VersionState.Name(version.state).removeprefix("VERSION_STATE_")
            raise Conflict(f"dataset {name} version {number} is {state}, not READY")
        if spec.model.init_from is not None:  # first: it fills in the architecture the checks below read
            ours = next((obj.sha256 for obj in version.objects
                         if obj.key.endswith("/" + contracts.DATASET_TOKENIZER + TOKENIZER_FILE)), "")
            await _check_base(clients, caller, spec, f"dataset {name} v{number}", ours)
        if version.options.format in SUPERVISED_FORMATS:  # rows of whole examples: counted in examples
            documents = {split.name: split.documents for split in version.splits}
            spec.check_supervised_dataset(documents.get("train", 0), documents.get("validation", 0))
            return version.manifest_key
        tokens = {split.name: split.tokens for split in version.splits}
        try:
            spec.check_dataset(version.tokenizer.vocab_size, tokens.get("train", 0), tokens.get("validation", 0))
        except ValidationFailed as error:  # the spec is valid; this dataset version cannot serve it
            raise Conflict(f"dataset {name} version {number}: {error.message}") from None
        return version.manifest_key

    return check


async def _check_base(clients: ServiceClients, caller: Caller, spec: JobSpec, dataset: str,
                      dataset_tokenizer: str) -> None:
    """The `init_from` version exists, tokenizes as the dataset does, and is an architecture llmp fine-tunes."""
    base = spec.model.init_from
    where = f"model.init_from {base.name} v{base.version}"
    try:
        with acting_as(caller):
            reply = await clients.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=base.name, version=base.version))
        artifacts = {artifact.path: artifact.object.sha256 for artifact in reply.version.artifacts}
        if "config.json" not in artifacts:
            raise ValidationFailed(f"{where} has no config.json: it is not a Transformers model")
        theirs = artifacts.get(TOKENIZER_FILE, "")
        if not theirs:
            raise ValidationFailed(f"{where} has no {TOKENIZER_FILE}: its tokenizer is unknown")
        if theirs != dataset_tokenizer:
            raise ValidationFailed(
                f"{dataset} was tokenized with a different tokenizer than {where}: {TOKENIZER_FILE} "
                f"SHA-256 {dataset_tokenizer[:12] or 'none'}… vs {theirs[:12]}…; create the dataset with "
                f"tokenizer=model&tokenizer_model={base.name}&tokenizer_model_version={base.version}")
        config = await _read_artifact(clients, caller, base.name, base.version, "config.json")
    except NotFound:
        raise ValidationFailed(f"{where} does not exist") from None
    try:
        family = json.loads(config).get("model_type", "")
    except (ValueError, AttributeError):
        raise ValidationFailed(f"{where} has a config.json that is not a JSON object") from None
    spec.model.resolve_base(str(family))


async def _read_artifact(clients: ServiceClients, caller: Caller, name: str, version: int, path: str) -> bytes:
    request = registry_pb2.DownloadArtifactRequest(model=common_pb2.ModelRef(name=name, version=version), path=path)
    data = bytearray()
    with acting_as(caller):
        async for message in clients.registry.DownloadArtifact(request):
            data += message.data
            if len(data) > MAX_CONFIG_BYTES:
                raise ValidationFailed(f"model.init_from {name} v{version} has a {path} over {MAX_CONFIG_BYTES} bytes")
    return bytes(data)


def evaluation_checker(clients: ServiceClients):
    """Resolve what an evaluation names: the model version (READY, with a tokenizer.json) and the dataset
    version (READY, with the split), tokenized with the model's tokenizer (their tokenizer.json SHA-256s
    agree, as fine-tuning requires); a mismatch is the request's fault (422), a missing version a 404."""

    async def check(caller: Caller, model: tuple[str, int], dataset: tuple[str, int], split: str) -> EvaluationTarget:
        try:
            wanted = contracts.evaluated_splits(split)
        except ValueError as error:
            raise ValidationFailed(f"split: {error}") from None
        try:
            with acting_as(caller):
                found = await clients.registry.GetModelVersion(
                    registry_pb2.GetModelVersionRequest(name=model[0], version=model[1]))
        except NotFound:
            raise NotFound(f"model {model[0]} version {model[1]} does not exist") from None
        version = found.version
        if version.state != registry_pb2.VERSION_STATE_READY:
            raise Conflict(f"model {model[0]} version {model[1]} is not READY")
        model_tokenizer = next((a.object.sha256 for a in version.artifacts if a.path == "tokenizer.json"), "")
        try:
            with acting_as(caller):
                response = await clients.dataset.GetDatasetVersion(
                    dataset_pb2.GetDatasetVersionRequest(name=dataset[0], version=dataset[1]))
        except NotFound:
            raise NotFound(f"dataset {dataset[0]} version {dataset[1]} does not exist") from None
        data = response.version
        if data.state != dataset_pb2.VERSION_STATE_READY:
            state = dataset_pb2.VersionState.Name(data.state).removeprefix("VERSION_STATE_")
            raise Conflict(f"dataset {dataset[0]} version {dataset[1]} is {state}, not READY")
        if not model_tokenizer or model_tokenizer != data.tokenizer.sha256:
            raise ValidationFailed(
                f"dataset: {dataset[0]} version {dataset[1]} was tokenized with another tokenizer than model "
                f"{model[0]} version {model[1]} (tokenizer.json SHA-256 {data.tokenizer.sha256[:12] or 'unknown'} "
                f"!= {model_tokenizer[:12] or 'none'}); build it with tokenizer=model&tokenizer_model={model[0]}"
                f"&tokenizer_model_version={model[1]}")
        tokens = {item.name: item.tokens for item in data.splits}
        if not sum(tokens.get(name, 0) for name in wanted):
            raise ValidationFailed(f"split: {split} of dataset {dataset[0]} version {dataset[1]} holds no tokens")
        return EvaluationTarget(manifest_key=data.manifest_key)

    return check


def broker_checker(producer):
    """Readiness of the Celery broker: a connection opens within two seconds."""

    def connect() -> None:
        with producer.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    async def check() -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(connect), 4)
        except Exception as error:  # kombu raises many kinds; any of them means not ready
            raise Unavailable(f"Celery broker unreachable: {error or type(error).__name__}", retry_after=2) from error

    return check


async def build(settings: Settings) -> GrpcApp:
    """The service wired and ready to start (tests start it on a port of their choosing)."""
    db = await Database.connect(settings.database_url, component="training", migrations_dir=MIGRATIONS)
    clients = ServiceClients(settings, principal=service_principal(topology.TRAINING.name))
    producer = make_producer(settings)
    coordinator = Coordinator(db, CeleryDispatcher(producer), check_dataset=dataset_checker(clients),
                              lease_seconds=settings.training_lease_seconds, limits=FleetLimits.from_settings(settings),
                              quotas=TrainingQuotas.from_settings(settings))

    app = GrpcApp(settings, topology.TRAINING)
    app.add_servicer(training_pb2_grpc.add_TrainingServiceServicer_to_server,
                     TrainingServicer(coordinator, evaluation_checker(clients)),
                     "llmp.training.v1.TrainingService")
    app.add_readiness_check("postgresql", db.check)
    app.add_readiness_check("broker", broker_checker(producer))

    # At start, then every third of the lease: re-queue the jobs of workers that stopped renewing, send again
    # what the broker never got. A round in progress at shutdown finishes (its transaction is not cut).
    maintenance = Periodic("training lease check", coordinator.lease_seconds / 3, coordinator.reap,
                           first_at_start=True)
    maintenance.start()

    async def close_producer() -> None:
        producer.close()

    # Hooks run in reverse: maintenance stops first, the pools close last.
    app.on_shutdown(db.close)
    app.on_shutdown(clients.close)
    app.on_shutdown(close_producer)
    app.on_shutdown(maintenance.close)
    return app


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM."""
    app = await build(settings)
    await app.run()


def main() -> None:
    run_main(serve, "training")


if __name__ == "__main__":
    main()
