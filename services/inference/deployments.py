"""Deployments: a name → a stable model version and an optional canary taking `weight`% of requests.

Rows live in PostgreSQL (`inference_deployments`); what requests route to lives in memory (`Router`),
and only ever points at versions Triton reports ready. A change loads the new versions first, waits
for readiness, then swaps the route in one step, so no request fails during it; versions no route uses
any more are unloaded once their in-flight requests finish. Deleting removes the route, drains, then
deletes the row.

Deploying is one step even for a version never exported: a version whose ONNX export is not READY is
EXPORTING first — the registry is asked for the export (`CreateExport`), which exports and checks parity
in the background; once it is READY the version is marked deployed, LOADING, then READY. An export that
fails (its parity gate included) ends the deployment FAILED with the registry's reason.

Who splits a deployment's traffic between stable and canary depends on the process's track
(LLMP_INFERENCE_TRACK). Without one (local, compose) `route` draws: `canary_weight`% of the routing keys
go to the canary. On Kubernetes the pods of each Istio subset run with track `stable` or `canary` and
route to that track's version, and the mesh splits: every change of a deployment's weight, and its
deletion, is mirrored into the `inference` VirtualService (`MeshWeights`, mesh.IstioWeights) once
the new route is in place here — the same weights either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Protocol

from services.common import contracts
from services.common.config import INFERENCE_TRACKS
from services.common.db import Database
from services.common.errors import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    Unavailable,
    ValidationFailed,
)
from services.common.periodic import Periodic
from services.inference import model_repository
from services.inference.generation import ServedVersion
from services.inference.model_source import ModelSource
from services.inference.triton_engine import TritonEngine

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0
# How often a deployment waiting for its version's ONNX export asks the registry how far it got.
EXPORT_POLL_S = 1.0
# Every replica re-reads the deployment rows this often and routes what changed through another replica.
SYNC_INTERVAL_S = 2.0
PEER_GRACE_S = 3 * SYNC_INTERVAL_S


class MeshWeights(Protocol):
    """The service mesh's split of a deployment's traffic (mesh.IstioWeights on Kubernetes)."""

    async def set(self, tenant: str, deployment: str, canary_weight: int) -> None:
        """Make the mesh send `canary_weight`% of the deployment's traffic to the canary track."""

    async def remove(self, tenant: str, deployment: str) -> None:
        """Forget the deployment (it was deleted)."""


@dataclass(frozen=True)
class DeploymentSpec:
    """What a client asks for."""

    name: str
    model: str
    stable_version: int
    canary_version: int | None = None
    canary_weight: int = 0

    def validate(self) -> "DeploymentSpec":
        contracts.validate_name(self.name, "deployment name")
        contracts.validate_name(self.model, "model name")
        if self.stable_version < 1:
            raise ValidationFailed("stable version must be a positive integer")
        if self.canary_version is not None:
            if self.canary_version < 1:
                raise ValidationFailed("canary version must be a positive integer")
            if not 0 <= self.canary_weight <= 100:
                raise ValidationFailed(f"canary weight must be between 0 and 100, not {self.canary_weight}")
        elif self.canary_weight:
            raise ValidationFailed("a canary weight needs a canary version")
        return self

    def versions(self) -> tuple[int, ...]:
        return (self.stable_version,) + ((self.canary_version,) if self.canary_version else ())


def etag_of(row: dict) -> str:
    content = "|".join(str(row.get(key)) for key in (
        "name", "model", "stable_version", "canary_version", "canary_weight", "state", "message", "updated_at"))
    return '"' + hashlib.sha256(content.encode()).hexdigest()[:32] + '"'


def _row_versions(row: dict) -> set[tuple[str, int]]:
    return {(row["model"], v) for v in (row["stable_version"], row["canary_version"]) if v}


def canary_bucket(routing_key: str) -> int:
    """0-99, stable for a key: requests with the same key reach the same version."""
    return int.from_bytes(hashlib.sha256(routing_key.encode()).digest()[:8], "big") % 100


@dataclass
class Route:
    stable: ServedVersion
    canary: ServedVersion | None = None
    weight: int = 0

    def pick(self, routing_key: str, track: str = "") -> tuple[ServedVersion, bool]:
        """The version to serve and whether it is the canary. A track serves its own version (the
        mesh already chose the track; the canary track serves stable while there is no canary);
        without one, a weighted draw that is sticky per routing key."""
        if track == "stable":
            return self.stable, False
        if track == "canary":
            return (self.canary, True) if self.canary is not None else (self.stable, False)
        if self.canary is None or self.weight <= 0:
            return self.stable, False
        bucket = canary_bucket(routing_key) if routing_key else random.randrange(100)
        return (self.canary, True) if bucket < self.weight else (self.stable, False)


def _routes_row(route: Route | None, row: dict) -> bool:
    """Whether `route` already serves the stored deployment `row` (same versions, same canary weight)."""
    if route is None:
        return False
    canary = route.canary.version if route.canary is not None else None
    return (route.stable.model == row["model"] and route.stable.version == row["stable_version"]
            and canary == (row["canary_version"] or None)
            and (canary is None or route.weight == row["canary_weight"]))


@dataclass
class _Loaded:
    served: ServedVersion
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Deployments:
    """The deployments of every tenant, their rows, routes and the Triton models behind them."""

    def __init__(self, db: Database, engine: TritonEngine, source: ModelSource,
                 repository: model_repository.Repository,
                 batching: model_repository.BatchingConfig | None = None, *, track: str = "",
                 mesh: MeshWeights | None = None) -> None:
        if track not in INFERENCE_TRACKS:  # "": this process splits by weight itself
            raise ValidationFailed(f"inference track must be one of {INFERENCE_TRACKS}, not {track!r}")
        self.track = track
        self.mesh = mesh
        self.db = db
        self.engine = engine
        self.source = source
        self.repository = repository
        self.batching = batching or model_repository.BatchingConfig()
        self.routes: dict[tuple[str, str], Route] = {}
        self.loaded: dict[str, _Loaded] = {}  # triton name -> loaded version
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changes: dict[tuple[str, str], asyncio.Lock] = {}
        self._follower = Periodic("deployment sync", SYNC_INTERVAL_S, self.sync)

    # -- reads ----------------------------------------------------------------------------------------

    async def get(self, tenant: str, name: str) -> dict:
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT * FROM inference_deployments WHERE tenant = %s AND name = %s", (tenant, name))).fetchone()
        if row is None:
            raise NotFound(f"deployment {name!r} not found")
        return row

    async def list(self, tenant: str) -> list[dict]:
        async with self.db.pool.connection() as conn:
            return await (await conn.execute(
                "SELECT * FROM inference_deployments WHERE tenant = %s ORDER BY name", (tenant,))).fetchall()

    def triton_models(self, tenant: str, row: dict) -> dict[str, str]:
        versions = [row["stable_version"]] + ([row["canary_version"]] if row["canary_version"] else [])
        return {str(v): contracts.triton_model_name(tenant, row["model"], v) for v in versions}

    # -- changes --------------------------------------------------------------------------------------

    async def put(self, tenant: str, spec: DeploymentSpec, *, if_match: str = "", if_none_match: str = "",
                  wait: bool = False) -> tuple[dict, bool]:
        """Store the deployment as LOADING (EXPORTING when a version has no READY ONNX export yet), export
        and load its versions (in the background unless `wait`), then route."""
        spec.validate()
        unexported = []
        for version in spec.versions():
            await self.source.resolve(tenant, spec.model, version, "")
            if (await self.source.export_status(tenant, spec.model, version)).state != "READY":
                unexported.append(version)
        state = "EXPORTING" if unexported else "LOADING"
        lock = self._changes.setdefault((tenant, spec.name), asyncio.Lock())
        async with self.db.transaction() as conn:
            current = await (await conn.execute(
                "SELECT * FROM inference_deployments WHERE tenant = %s AND name = %s FOR UPDATE",
                (tenant, spec.name))).fetchone()
            if current is not None and if_none_match == "*":
                raise AlreadyExists(f"deployment {spec.name!r} already exists")
            if if_match and (current is None or current["etag"] != if_match):
                raise PreconditionFailed(f"deployment {spec.name!r} does not match If-Match {if_match}")
            # The registry refuses a version whose export cannot be deployed, and from now on refuses to
            # delete it; a failure here rolls the change back. Versions still to export are marked once
            # their export is READY (`_export`).
            for version in spec.versions():
                if version not in unexported:
                    await self.source.mark_deployed(tenant, spec.model, version, spec.name)
            row = {"name": spec.name, "model": spec.model, "stable_version": spec.stable_version,
                   "canary_version": spec.canary_version, "canary_weight": spec.canary_weight,
                   "state": state, "message": ""}
            stored = await (await conn.execute(
                """INSERT INTO inference_deployments
                       (tenant, name, model, stable_version, canary_version, canary_weight, state, message, etag)
                   VALUES (%(tenant)s, %(name)s, %(model)s, %(stable_version)s, %(canary_version)s,
                           %(canary_weight)s, %(state)s, '', '')
                   ON CONFLICT (tenant, name) DO UPDATE SET model = EXCLUDED.model,
                       stable_version = EXCLUDED.stable_version, canary_version = EXCLUDED.canary_version,
                       canary_weight = EXCLUDED.canary_weight, state = EXCLUDED.state, message = '',
                       updated_at = now()
                   RETURNING *""", {"tenant": tenant, **row})).fetchone()
            stored["etag"] = etag_of(stored)
            await conn.execute("UPDATE inference_deployments SET etag = %s WHERE tenant = %s AND name = %s",
                               (stored["etag"], tenant, spec.name))
        replaced = _row_versions(current) - {(spec.model, v) for v in spec.versions()} if current else set()
        task = self._spawn(self._activate(tenant, spec, lock, replaced, mirror=True, unexported=tuple(unexported)))
        if wait:
            await asyncio.shield(task)
            stored = await self.get(tenant, spec.name)
        return stored, current is None

    async def _activate(self, tenant: str, spec: DeploymentSpec, lock: asyncio.Lock,
                        replaced: set[tuple[str, int]] = frozenset(), *, mirror: bool = False,
                        unexported: tuple[int, ...] = ()) -> None:
        """Export what `unexported` names, load, then route; `replaced` are the (model, version)s the
        deployment served before the change; `mirror`: a change made through `put` here (a client's or the
        canary controller's), which the mesh follows once routed here (`sync` re-routes what another
        replica changed, and that one mirrored it)."""
        async with lock:
            try:
                if unexported:
                    if not await self._export(tenant, spec, unexported, retry_failed=mirror):
                        return
                    await self._set_state(tenant, spec.name, "LOADING", "", expect=spec)
                stable = await self._ensure_loaded(tenant, spec.model, spec.stable_version)
                canary = (await self._ensure_loaded(tenant, spec.model, spec.canary_version)
                          if spec.canary_version else None)
            except Exception as error:  # any failure marks the deployment FAILED with the reason
                log.warning("deployment failed", extra={"deployment": spec.name, "error": str(error)})
                await self._set_state(tenant, spec.name, "FAILED", str(error) or type(error).__name__)
                return
            previous = self.routes.get((tenant, spec.name))
            self.routes[(tenant, spec.name)] = Route(stable, canary, spec.canary_weight)
            await self._set_state(tenant, spec.name, "READY", "")
            if mirror:
                await self._mirror(tenant, spec.name, spec.canary_weight if spec.canary_version else 0)
            if previous is not None:
                await self._release_unused([previous.stable, previous.canary])
            await self._unmark(tenant, spec.name, replaced)

    async def _export(self, tenant: str, spec: DeploymentSpec, versions: tuple[int, ...], *,
                      retry_failed: bool) -> bool:
        """Have the registry export `versions` and wait for each to be READY, then mark them deployed. False
        when the deployment FAILED (an export failed) or was changed meanwhile (that change takes over).
        `retry_failed`: a client's PUT asks again for an export that FAILED before; a replica following the
        table (`sync`) only waits for the export that PUT asked for."""
        for version in versions:
            status = await self.source.export_status(tenant, spec.model, version)
            if status.state == "MISSING" or (status.state == "FAILED" and retry_failed):
                status = await self.source.request_export(tenant, spec.model, version)
            while not status.finished:
                await asyncio.sleep(EXPORT_POLL_S)
                if not await self._describes(tenant, spec):
                    return False
                status = await self.source.export_status(tenant, spec.model, version)
            if status.state != "READY":
                reason = f"the ONNX export of model {spec.model} v{version} failed: {status.error or status.state}"
                log.warning("deployment export failed", extra={"deployment": spec.name, "error": reason})
                await self._set_state(tenant, spec.name, "FAILED", reason, expect=spec)
                return False
            await self.source.mark_deployed(tenant, spec.model, version, spec.name)
        return await self._describes(tenant, spec)

    async def _describes(self, tenant: str, spec: DeploymentSpec) -> bool:
        """Whether the stored deployment still asks for `spec`'s model and versions."""
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT model, stable_version, canary_version FROM inference_deployments "
                "WHERE tenant = %s AND name = %s", (tenant, spec.name))).fetchone()
        return row is not None and (row["model"], row["stable_version"], row["canary_version"]) == (
            spec.model, spec.stable_version, spec.canary_version)

    async def _mirror(self, tenant: str, name: str, canary_weight: int | None) -> None:
        """Set (None: remove) the deployment's split in the mesh, when there is one. The change is already
        stored and routed here, so a refusal is logged, not raised; the next change sets it again."""
        if self.mesh is None:
            return
        try:
            if canary_weight is None:
                await self.mesh.remove(tenant, name)
            else:
                await self.mesh.set(tenant, name, canary_weight)
        except Exception as error:  # the API server's refusal or absence must not undo the deployment
            log.error("mesh weights not set", extra={"deployment": name, "canary_weight": canary_weight,
                                                     "error": str(error)})

    async def _unmark(self, tenant: str, name: str, versions) -> None:
        for model, version in versions:
            try:
                await self.source.unmark_deployed(tenant, model, version, name)
            except Exception as error:  # the registry keeps a stale mark: deleting that version stays refused
                log.warning("unmark failed", extra={"deployment": name, "model": model, "version": version,
                                                    "error": str(error)})

    async def _set_state(self, tenant: str, name: str, state: str, message: str, *,
                         expect: DeploymentSpec | None = None) -> None:
        """Set the deployment's state; with `expect`, only while it still asks for that spec's versions."""
        condition, values = "", ()
        if expect is not None:
            condition = " AND model = %s AND stable_version = %s AND canary_version IS NOT DISTINCT FROM %s"
            values = (expect.model, expect.stable_version, expect.canary_version)
        async with self.db.transaction() as conn:
            row = await (await conn.execute(
                "UPDATE inference_deployments SET state = %s, message = %s, updated_at = now() "
                "WHERE tenant = %s AND name = %s" + condition + " RETURNING *",
                (state, message, tenant, name, *values))).fetchone()
            if row is not None:
                await conn.execute("UPDATE inference_deployments SET etag = %s WHERE tenant = %s AND name = %s",
                                   (etag_of(row), tenant, name))

    async def _ensure_loaded(self, tenant: str, model: str, version: int) -> ServedVersion:
        name = contracts.triton_model_name(tenant, model, version)
        async with self._load_locks.setdefault(name, asyncio.Lock()):
            loaded = self.loaded.get(name)
            if loaded is not None and await self.engine.is_ready(name):
                return loaded.served
            files = await self.source.fetch(tenant, model, version)
            await asyncio.to_thread(self.repository.write, name, files.onnx_dir, self.batching)
            await self.engine.load(name)
            if not await self.engine.is_ready(name):
                raise Unavailable(f"Triton loaded {name} but does not report it ready", retry_after=2)
            served = ServedVersion(model, version, name, files.spec(), await asyncio.to_thread(files.tokenizer),
                                   files.digest)
            await asyncio.to_thread(getattr, served, "max_prompt_chars")  # walks the vocabulary once, off the loop
            loaded = _Loaded(served)
            loaded.idle.set()
            self.loaded[name] = loaded
            log.info("model loaded", extra={"triton_model": name})
            return served

    async def _release_unused(self, versions) -> None:
        used = self._routed_names()
        for served in versions:
            if served is None or served.triton_name in used:
                continue
            loaded = self.loaded.get(served.triton_name)
            if loaded is None:
                continue
            try:
                await asyncio.wait_for(loaded.idle.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                log.warning("drain timed out", extra={"triton_model": served.triton_name})
            if self.track:
                # On Kubernetes the pods share one Triton: a peer may route to this version until its next
                # sync, and finish what it sent there, so the model stays a little longer.
                await asyncio.sleep(PEER_GRACE_S)
            # A new route may have picked it up while draining.
            if served.triton_name in self._routed_names():
                continue
            self.loaded.pop(served.triton_name, None)
            try:
                await self.engine.unload(served.triton_name)
            except Exception as error:  # unloading is housekeeping; the route is already gone
                log.warning("unload failed", extra={"triton_model": served.triton_name, "error": str(error)})
            await asyncio.to_thread(self.repository.remove, served.triton_name)

    def _routed_names(self) -> set[str]:
        return {v.triton_name for route in self.routes.values() for v in (route.stable, route.canary) if v}

    async def delete(self, tenant: str, name: str, *, if_match: str = "") -> None:
        row = await self.get(tenant, name)
        if if_match and row["etag"] != if_match:
            raise PreconditionFailed(f"deployment {name!r} does not match If-Match {if_match}")
        async with self._changes.setdefault((tenant, name), asyncio.Lock()):
            route = self.routes.pop((tenant, name), None)
            async with self.db.transaction() as conn:
                await conn.execute("DELETE FROM inference_deployments WHERE tenant = %s AND name = %s", (tenant, name))
            await self._mirror(tenant, name, None)
            if route is not None:
                await self._release_unused([route.stable, route.canary])
            await self._unmark(tenant, name, _row_versions(row))

    async def restore(self) -> None:
        """At start: route every deployment that is READY or LOADING (e.g. after a restart), then keep
        following the table, so a change made through another replica reaches this one within
        SYNC_INTERVAL_S (several inference replicas behind one gateway or mesh)."""
        await self.sync()
        self._follower.start()  # PostgreSQL away for a moment: the routes here stay as they are

    async def sync(self) -> None:
        """Bring this process's routes in line with the stored deployments: (re)activate rows whose
        versions or weight differ from the route here, drop routes whose row is gone. Deployments being
        changed here are left to that change; FAILED rows keep the route they had. An EXPORTING row (its
        change was interrupted, or made through another replica) follows its exports to the end here too."""
        async with self.db.pool.connection() as conn:
            rows = await (await conn.execute("SELECT * FROM inference_deployments")).fetchall()
        stored = {(row["tenant"], row["name"]): row for row in rows}
        for key, row in stored.items():
            lock = self._changes.setdefault(key, asyncio.Lock())
            if (row["state"] not in ("READY", "LOADING", "EXPORTING") or lock.locked()
                    or _routes_row(self.routes.get(key), row)):
                continue
            spec = DeploymentSpec(row["name"], row["model"], row["stable_version"], row["canary_version"],
                                  row["canary_weight"])
            unexported = spec.versions() if row["state"] == "EXPORTING" else ()
            self._spawn(self._activate(key[0], spec, lock, unexported=unexported))
        for key in [key for key in self.routes if key not in stored]:
            lock = self._changes.setdefault(key, asyncio.Lock())
            if not lock.locked():  # deleted through another replica
                route = self.routes.pop(key)
                self._spawn(self._release_unused([route.stable, route.canary]))

    def _spawn(self, coroutine) -> asyncio.Task:
        """Run `coroutine` in the background; `close` cancels it if it is still running."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        await self._follower.close()
        for task in list(self._tasks):
            task.cancel()

    # -- routing --------------------------------------------------------------------------------------

    async def route(self, tenant: str, name: str, routing_key: str) -> tuple[ServedVersion, bool]:
        route = self.routes.get((tenant, name))
        if route is None:
            row = await self.get(tenant, name)  # NotFound when it does not exist
            if row["state"] == "FAILED":
                raise Unavailable(f"deployment {name!r} failed: {row['message']}", retry_after=5)
            if row["state"] == "EXPORTING":
                raise Unavailable(f"deployment {name!r} is waiting for its version's ONNX export", retry_after=5)
            raise Unavailable(f"deployment {name!r} is still loading", retry_after=2)
        return route.pick(routing_key, self.track)

    def acquire(self, served: ServedVersion) -> None:
        loaded = self.loaded.get(served.triton_name)
        if loaded is not None:
            loaded.in_flight += 1
            loaded.idle.clear()

    def release(self, served: ServedVersion) -> None:
        loaded = self.loaded.get(served.triton_name)
        if loaded is not None:
            loaded.in_flight -= 1
            if loaded.in_flight <= 0:
                loaded.in_flight = 0
                loaded.idle.set()
