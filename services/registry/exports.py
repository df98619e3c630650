"""The export lifecycle: PENDING on request, a background task that exports and checks parity, READY or FAILED.

`CreateExport` returns at once; `Exports.create` starts a task in the service's event loop that
downloads the version (verifying every SHA-256), runs the exporter and its parity check in a worker
thread, uploads the files under `models/{tenant}/{name}/v{version}/exports/{format}/` (ONNX also as a
Triton model repository under `.../exports/{format}/triton/`), and records the report. An export whose
parity fails is FAILED with its report, its files are not published, and MarkDeployed refuses it.
Exports run one at a time (they are CPU-heavy); a heartbeat lets a restarted service tell interrupted
exports from running ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from services.common import contracts
from services.common.db import Database
from services.common.errors import NotFound
from services.common.s3 import ObjectStore
from services.registry import evaldata, exporters, parity

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
LEASE_SECONDS = 60.0


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as strings ("nan", "inf"): a diverged model's logits are NaN, a shape
    mismatch reports an infinite difference, and PostgreSQL's JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


class Exports:
    """Creates exports and runs them in background tasks owned by the running service."""

    def __init__(self, db: Database, store: ObjectStore, *, thresholds: parity.Thresholds | None = None,
                 exporter_table: dict[str, exporters.Exporter] | None = None, concurrency: int = 1) -> None:
        self.db, self.store = db, store
        self.thresholds = thresholds or parity.Thresholds()
        self.exporter_table = exporter_table or exporters.EXPORTERS
        self.tasks: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(concurrency)

    async def create(self, tenant: str, name: str, version: int, fmt: str) -> dict[str, Any]:
        contracts.validate_name(name, "model name")
        contracts.validate_version(version)
        contracts.validate_export_format(fmt)
        async with self.db.transaction() as conn:
            ready = await (await conn.execute(
                "SELECT 1 FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s "
                "AND state = 'READY' FOR SHARE", (tenant, name, version))).fetchone()
            if ready is None:
                raise NotFound(f"model {name} version {version} not found")
            row = await (await conn.execute(
                """INSERT INTO registry_exports (id, tenant, name, version, format, state)
                   VALUES (%s, %s, %s, %s, %s, 'PENDING')
                   ON CONFLICT (tenant, name, version, format) DO UPDATE
                       SET state = 'PENDING', parity = '{}', error = '', artifacts = '[]', triton_prefix = '',
                           triton_model = '', updated_at = now(), heartbeat_at = now()
                       WHERE registry_exports.state = 'FAILED'
                   RETURNING *""",
                (uuid.uuid4(), tenant, name, version, fmt))).fetchone()
            if row is None:  # it exists and did not fail: return it as it is
                row = await (await conn.execute(
                    "SELECT * FROM registry_exports WHERE tenant = %s AND name = %s AND version = %s AND format = %s",
                    (tenant, name, version, fmt))).fetchone()
                return row
        task = asyncio.create_task(self.run(row["id"]), name=f"export {name} v{version} {fmt}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return row

    async def get(self, tenant: str, name: str, version: int, fmt: str) -> dict[str, Any]:
        contracts.validate_export_format(fmt)
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                """SELECT e.* FROM registry_exports e JOIN registry_versions v USING (tenant, name, version)
                   WHERE e.tenant = %s AND e.name = %s AND e.version = %s AND e.format = %s AND v.state = 'READY'""",
                (tenant, name, version, fmt))).fetchone()
        if row is None:
            raise NotFound(f"no {fmt} export of model {name} version {version}")
        return row

    async def wait(self) -> None:
        """Wait for every running export (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def recover(self, lease_seconds: float = LEASE_SECONDS) -> int:
        """Fail exports whose runner stopped heartbeating (e.g. the service restarted); returns how many."""
        async with self.db.pool.connection() as conn:
            rows = await (await conn.execute(
                """UPDATE registry_exports SET state = 'FAILED', updated_at = now(),
                          error = 'export interrupted (the service stopped); create it again to retry'
                   WHERE state IN ('PENDING', 'RUNNING') AND heartbeat_at < now() - make_interval(secs => %s)
                   RETURNING id""", (lease_seconds,))).fetchall()
        return len(rows)

    async def run(self, export_id: uuid.UUID) -> None:
        # The heartbeat starts before the queue: an export waiting for its slot is not an abandoned one.
        heartbeat = asyncio.create_task(self._heartbeat(export_id))
        try:
            async with self._slots:
                await self._run(export_id)
        finally:
            heartbeat.cancel()

    async def _run(self, export_id: uuid.UUID) -> None:
        async with self.db.pool.connection() as conn:
            row = await (await conn.execute(
                "UPDATE registry_exports SET state = 'RUNNING', updated_at = now(), heartbeat_at = now() "
                "WHERE id = %s AND state = 'PENDING' RETURNING *", (export_id,))).fetchone()
            if row is None:
                return
            version = await (await conn.execute(
                "SELECT * FROM registry_versions WHERE tenant = %s AND name = %s AND version = %s",
                (row["tenant"], row["name"], row["version"]))).fetchone()
            artifacts = await (await conn.execute(
                "SELECT path, key, sha256 FROM registry_artifacts WHERE tenant = %s AND name = %s AND version = %s",
                (row["tenant"], row["name"], row["version"]))).fetchall()
        try:
            state, report, error, stored, triton = await asyncio.to_thread(self._export, row, version, artifacts)
        except Exception as failure:
            log.exception("export failed", extra={"export": str(export_id)})
            error = f"{type(failure).__name__}: {failure}"
            state, report, stored, triton = "FAILED", {}, [], ("", "")
        async with self.db.pool.connection() as conn:
            await conn.execute(
                """UPDATE registry_exports SET state = %s, parity = %s, error = %s, artifacts = %s,
                          triton_prefix = %s, triton_model = %s, updated_at = now()
                   WHERE id = %s AND state = 'RUNNING'""",
                (state, Jsonb(_json_safe(report)), error[:4000], Jsonb(stored), triton[0], triton[1], export_id))
        log.info("export finished", extra={"export": str(export_id), "state": state})

    async def _heartbeat(self, export_id: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                async with self.db.pool.connection() as conn:
                    await conn.execute("UPDATE registry_exports SET heartbeat_at = now() WHERE id = %s", (export_id,))
            except Exception as error:  # PostgreSQL briefly unreachable: try again next beat
                log.warning("export heartbeat failed: %s", error)

    def _export(self, row: dict, version: dict, artifacts: list[dict]) -> tuple[str, dict, str, list, tuple[str, str]]:
        """Worker thread: download, export, check, upload. Returns (state, report, error, artifacts, triton)."""
        tenant, name, number, fmt = row["tenant"], row["name"], row["version"], row["format"]
        with tempfile.TemporaryDirectory(prefix="llmp-export-") as scratch:
            model_dir, out_dir = Path(scratch) / "model", Path(scratch) / "out"
            for artifact in artifacts:
                self.store.download(artifact["key"], model_dir / artifact["path"], expected_sha256=artifact["sha256"])
            config = json.loads((model_dir / "config.json").read_text())
            context = int(config.get("n_positions") or config.get("max_position_embeddings") or 128)
            data = evaldata.load(self.store, tenant, version["dataset_name"], version["dataset_version"],
                                 vocab_size=int(config["vocab_size"]), context_length=context)
            triton_model = contracts.triton_model_name(tenant, name, number) if fmt.startswith("onnx") else ""
            outcome = exporters.export(fmt, model_dir, out_dir, data, triton_model=triton_model,
                                       thresholds=self.thresholds, exporters=self.exporter_table)
            prefix = contracts.model_export_prefix(tenant, name, number, fmt)
            self.store.delete_prefix(prefix)
            stored = []
            # Only an export within parity is published: readers of S3 never find a failed one's files.
            for path in outcome.files if outcome.passed else []:
                obj = self.store.put_file(prefix + path, out_dir / path)
                stored.append({"path": contracts.export_dir(fmt) + path, **obj.as_dict(role=f"export-{fmt}")})
        state = "READY" if outcome.passed else "FAILED"
        error = "" if outcome.passed else "parity check failed: the export does not match the PyTorch model"
        triton = (prefix + "triton/", outcome.triton_model) if outcome.triton_model and outcome.passed else ("", "")
        return state, outcome.report, error, stored, triton
