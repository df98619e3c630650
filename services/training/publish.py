"""Registering a finished job's model: reserve a version, upload the final folder into it once, commit.

The node that ran global rank 0 holds the final model on its disk (`events.Finished.final_dir`). Its
worker reserves the next version of the job's model with the registry (lineage and metrics are
recorded then), uploads every file straight into the version's prefix while renewing the
reservation, and commits (docs/CONTRACTS.md, "Trained model"): the bytes are written once, where
they stay, and the registry verifies them in place.

A job registers one version however often its workers die. The reservation is recorded on the job
(`Coordinator.record_reservation`) before the first byte is sent, and a later attempt of the job
(which resumes from the final checkpoint and saves the same folder again) looks at it first:
- the version is READY: an earlier attempt committed it and died before ending the job; it is the job's;
- the reservation is still PENDING: renew it and upload into it again (the same files, the same keys);
- the registry gave it up (its lease ran out and the sweep failed it): reserve another.
A worker that dies between reserving and recording leaves a reservation nobody renews; the registry's
sweep fails it and deletes what was uploaded.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2

from services.common import model_transfer, topology
from services.common.config import Settings
from services.common.errors import Conflict, Internal, NotFound
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller, acting_as, service_principal
from services.common.s3 import ObjectStore
from services.training.coordinator import Assignment, Coordinator, Job, ModelReservation
from services.training.events import Finished

log = logging.getLogger(__name__)

REGISTRY_TIMEOUT = 600.0  # seconds for one registry call (a commit verifies every object)


def code_version() -> str:
    """The git commit of the code that trained (or the package version outside a checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
        if result.returncode == 0:
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"llmp-{version('llmp')}"
    except PackageNotFoundError:
        return "unknown"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif value is not None:
            flat[f"{prefix}{name}"] = str(value)
    return flat


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of `values` (booleans and missing values are not metrics)."""
    return {name: float(value) for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def lineage(job: Job) -> registry_pb2.Lineage:
    """What produced the model: dataset, job, code, environment and resolved spec, parent version."""
    spec = job.spec
    result = registry_pb2.Lineage(
        dataset=common_pb2.DatasetRef(name=spec["dataset"]["name"], version=spec["dataset"]["version"]),
        training_job_id=job.id, code_version=code_version(),
        environment=_flatten({**job.environment, "spec": spec}))
    init_from = spec["model"].get("init_from")
    if init_from:
        result.parent.CopyFrom(common_pb2.ModelRef(name=init_from["name"], version=init_from["version"]))
    return result


async def register_model(settings: Settings, coordinator: Coordinator, assignment: Assignment,
                         finished: Finished) -> int:
    """Register the final model `finished` names as the next version of the job's model; returns its number."""
    if not finished.final_dir:
        raise Internal("the run reported no final model")
    job = assignment.job
    caller = Caller(tenant=job.tenant, key_id=job.created_by, role="developer")
    clients = ServiceClients(settings, principal=service_principal(topology.TRAINING.name))
    try:
        registry = _Registry(clients, caller)
        reservation = await coordinator.reservation(job.id)
        if reservation is not None:
            if await registry.committed(reservation, job):
                log.info("model already registered by an earlier attempt",
                         extra={"job_id": job.id, "version": reservation.version})
                return reservation.version
            if not await registry.renew(reservation):
                reservation = None
        if reservation is None:
            reservation = await registry.reserve(job, lineage(job), numbers(finished.metrics))
            if not await coordinator.record_reservation(assignment, reservation):
                raise Conflict(f"job {job.id} is no longer held by this worker; not uploading its model")
        log.info("uploading the model", extra={"job_id": job.id, "version": reservation.version})
        store = ObjectStore(settings.s3)
        declared = await model_transfer.upload_folder(
            store, reservation.prefix, Path(finished.final_dir), renew_every=reservation.lease_seconds / 4,
            renew=lambda: registry.renew(reservation, must=True))
        return await registry.commit(reservation, declared)
    finally:
        await clients.close()


class _Registry:
    """The registry calls registration makes, as the job's owner."""

    def __init__(self, clients: ServiceClients, caller: Caller) -> None:
        self.clients, self.caller = clients, caller

    async def reserve(self, job: Job, lineage: registry_pb2.Lineage, metrics: dict[str, float]) -> ModelReservation:
        with acting_as(self.caller):
            reply = await self.clients.registry.ReserveModelVersion(registry_pb2.ReserveModelVersionRequest(
                model_name=job.model_name, lineage=lineage, metrics=metrics, description=f"trained by job {job.id}"),
                timeout=REGISTRY_TIMEOUT)
        return ModelReservation(id=reply.reservation_id, version=reply.ref.version, prefix=reply.prefix,
                                lease_seconds=reply.lease_seconds)

    async def renew(self, reservation: ModelReservation, *, must: bool = False) -> bool:
        """Extend the reservation's lease; False when the registry gave it up (or raise, when `must`)."""
        try:
            with acting_as(self.caller):
                await self.clients.registry.RenewModelVersionReservation(
                    registry_pb2.RenewModelVersionReservationRequest(reservation_id=reservation.id),
                    timeout=REGISTRY_TIMEOUT)
        except (Conflict, NotFound):
            if must:
                raise
            return False
        return True

    async def committed(self, reservation: ModelReservation, job: Job) -> bool:
        """Whether the reserved version is READY (readers see nothing else) and is this job's."""
        try:
            with acting_as(self.caller):
                reply = await self.clients.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(
                    name=job.model_name, version=reservation.version), timeout=REGISTRY_TIMEOUT)
        except NotFound:
            return False
        return reply.version.lineage.training_job_id == job.id

    async def commit(self, reservation: ModelReservation, declared: list[registry_pb2.DeclaredArtifact]) -> int:
        with acting_as(self.caller):
            reply = await self.clients.registry.CommitModelVersion(registry_pb2.CommitModelVersionRequest(
                reservation_id=reservation.id, artifacts=declared), timeout=REGISTRY_TIMEOUT)
        return reply.version.ref.version
