"""Where deployable model versions come from, as local folders in the registry's layout.

A version's files follow the registry's S3 layout (`contracts.model_version_prefix`), rooted at a local
directory:

    <root>/models/<tenant>/<name>/v<version>/tokenizer.json, tokenizer_config.json, ...
    <root>/models/<tenant>/<name>/v<version>/exports/onnx/model.onnx, model.onnx.data, decoder.json

`LocalModelSource` reads such a tree directly (tests, benchmarks, and deploying a folder by hand).
`S3ModelSource` asks the registry service: aliases through `ResolveAlias`, the version's artifacts
through `GetModelVersion`, its ONNX export through `GetExport(format="onnx")`, which must be READY (an
export that failed its parity check cannot be deployed), and it mirrors the tokenizer and the export's
`model.onnx`, its external data `model.onnx.data` and `decoder.json` (`encoder.json` for an encoder) from
S3 into a local cache in that same layout, verifying each object's SHA-256 against the registry's record.
While a deployment serves a version, the registry knows (`MarkDeployed` with the export format,
`UnmarkDeployed`), so deleting that version is refused (409). A version with no ONNX export yet is
exported on demand: `request_export` asks the registry for it (`CreateExport`) and `export_status`
follows it to READY or FAILED, so one `PUT /v1/deployments/{name}` both exports and deploys
(services/inference/deployments.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerFast

from services.common import contracts
from services.common.contracts import (
    DECODER_SPEC_FILE,
    ENCODER_SPEC_FILE,
    ONNX_GRAPH_FILE,
    DecoderSpec,
    EncoderSpec,
    spec_files,
)
from services.common.errors import Conflict, NotFound, Unavailable
from services.common.identity import acting_as, acting_for

# The tokenizer files a version serves with; transformers 5 writes the chat template to its own file.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EXPORT_FORMAT = "onnx"  # what the Triton model runs (services/inference/triton_model/model.py)


@dataclass(frozen=True)
class VersionFiles:
    """A model version on local disk, ready to be written into the Triton repository."""

    model: str
    version: int
    version_dir: Path  # holds the tokenizer files
    onnx_dir: Path  # holds model.onnx (with model.onnx.data, its weights) and decoder.json or encoder.json
    digest: str = ""

    def spec(self) -> DecoderSpec | EncoderSpec:
        """The export's description: an `EncoderSpec` when it is an encoder's (embeddings), else a decoder's."""
        if (self.onnx_dir / ENCODER_SPEC_FILE).exists():
            return EncoderSpec.from_json((self.onnx_dir / ENCODER_SPEC_FILE).read_text())
        return DecoderSpec.from_json((self.onnx_dir / DECODER_SPEC_FILE).read_text())

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(str(self.version_dir))


@dataclass(frozen=True)
class ExportStatus:
    """Where a version's ONNX export stands: MISSING (never asked for), PENDING, RUNNING, READY or FAILED."""

    state: str
    error: str = ""  # why it FAILED

    @property
    def finished(self) -> bool:
        return self.state in ("READY", "FAILED")


class ModelSource(Protocol):
    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        """The version number `version` (when > 0) or `alias` points at; NotFound when neither exists."""

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        """The version's tokenizer and ONNX export as local files; Conflict when the export is not READY."""

    async def export_status(self, tenant: str, model: str, version: int) -> ExportStatus:
        """The version's ONNX export as it stands now (MISSING when none was asked for)."""

    async def request_export(self, tenant: str, model: str, version: int) -> ExportStatus:
        """Ask for the version's ONNX export (again, when it FAILED); an existing one is left as it is."""

    async def mark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        """Record that `deployment` serves the version (Conflict when its ONNX export cannot be deployed)."""

    async def unmark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        """Forget that `deployment` serves the version."""


def version_dir(root: Path, tenant: str, model: str, version: int) -> Path:
    return root / contracts.model_version_prefix(tenant, model, version)


def _alias_file(root: Path, tenant: str, model: str, alias: str) -> Path:
    """`<root>/models/<tenant>/<name>/aliases/<alias>`: beside the model's version folders."""
    return version_dir(root, tenant, model, 1).parent / "aliases" / alias


def publish_local_version(root: Path, tenant: str, model: str, version: int, onnx_dir: Path,
                          tokenizer_dir: Path) -> VersionFiles:
    """Lay an exported model and its tokenizer out as a local source version (what tests deploy)."""
    target = version_dir(root, tenant, model, version)
    export = target / contracts.export_dir(EXPORT_FORMAT)
    export.mkdir(parents=True, exist_ok=True)
    for name in (*contracts.onnx_files(os.listdir(onnx_dir)), *spec_files(os.listdir(onnx_dir))):
        shutil.copy2(onnx_dir / name, export / name)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, target / name)
    return VersionFiles(model, version, target, export)


def _status(export) -> ExportStatus:
    """A registry `Export` message as an ExportStatus; a parity failure says by how much it missed."""
    from llmp.registry.v1 import registry_pb2

    state = registry_pb2.ExportState.Name(export.state).removeprefix("EXPORT_STATE_")
    error = export.error
    if state == "FAILED" and export.parity_report_json:
        report = json.loads(export.parity_report_json)
        if "max_abs_logit_diff" in report and "logits" in report:
            error += (f" (max abs logit difference {report['max_abs_logit_diff']}, "
                      f"threshold {report['logits'].get('threshold')})")
    return ExportStatus(state, error)


def _weights_digest(sha256s: list[str]) -> str:
    """What identifies the served weights: the graph's SHA-256, or with external data (where the graph holds
    almost no weights) the SHA-256 of both files' SHA-256s."""
    if len(sha256s) == 1:
        return sha256s[0]
    return hashlib.sha256(":".join(sha256s).encode()).hexdigest()


class LocalModelSource:
    """Versions from a local tree; an alias is a file `<root>/models/<tenant>/<name>/aliases/<alias>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.deployed: dict[tuple[str, str, int], set[str]] = {}  # what the registry would record

    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        if version > 0:
            if not version_dir(self.root, tenant, model, version).exists():
                raise NotFound(f"model {model} has no version {version}")
            return version
        path = _alias_file(self.root, tenant, model, alias)
        if not path.exists():
            raise NotFound(f"model {model} has no alias {alias!r}")
        return int(path.read_text().strip())

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        target = version_dir(self.root, tenant, model, version)
        onnx_dir = target / contracts.export_dir(EXPORT_FORMAT)
        if not (onnx_dir / ONNX_GRAPH_FILE).exists():
            raise NotFound(f"model {model} version {version} has no ONNX export")
        return VersionFiles(model, version, target, onnx_dir)

    async def export_status(self, tenant: str, model: str, version: int) -> ExportStatus:
        onnx_dir = version_dir(self.root, tenant, model, version) / contracts.export_dir(EXPORT_FORMAT)
        return ExportStatus("READY" if (onnx_dir / ONNX_GRAPH_FILE).exists() else "MISSING")

    async def request_export(self, tenant: str, model: str, version: int) -> ExportStatus:
        status = await self.export_status(tenant, model, version)
        if status.state != "READY":  # a folder of files has no exporter: publish_local_version lays exports out
            return ExportStatus("FAILED", "a local model source cannot export; publish the ONNX export into it")
        return status

    async def mark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        await self.fetch(tenant, model, version)  # NotFound without an export
        self.deployed.setdefault((tenant, model, version), set()).add(deployment)

    async def unmark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        self.deployed.get((tenant, model, version), set()).discard(deployment)


class S3ModelSource:
    """Versions from the registry: aliases through its gRPC API, files straight from S3 (SHA-256 checked)."""

    def __init__(self, clients, store, cache_root: Path) -> None:
        self.clients = clients  # services.common.grpc_client.ServiceClients
        self.store = store  # services.common.s3.ObjectStore
        self.cache_root = cache_root

    @staticmethod
    def _for(tenant: str):
        """The inference service calls the registry for the deployment's tenant: passing on the token of the
        user whose request this is, or as itself (`service:inference`, granted only the reads and marks it
        makes) for work of its own (loading deployments at start)."""
        return acting_as(acting_for(tenant))

    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        from llmp.registry.v1 import registry_pb2

        if version > 0:
            with self._for(tenant):
                await self.clients.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(name=model,
                                                                                                version=version))
            return version
        with self._for(tenant):
            response = await self.clients.registry.ResolveAlias(registry_pb2.ResolveAliasRequest(model_name=model,
                                                                                                 alias=alias))
        return int(response.version.ref.version)

    async def check_gates(self, tenant: str, model: str, stable: int, candidate: int) -> None:
        """Ask the gate of every alias pointing at `stable` whether it may move to `candidate` (a canary
        rollout would put it there): the registry answers 409 naming why not, and records the refusal."""
        from llmp.registry.v1 import registry_pb2

        with self._for(tenant):
            found = await self.clients.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(
                name=model, version=stable))
            for alias in found.version.aliases:
                await self.clients.registry.CheckAliasGate(registry_pb2.CheckAliasGateRequest(
                    model_name=model, alias=alias, version=candidate))

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        from llmp.common.v1 import common_pb2
        from llmp.registry.v1 import registry_pb2

        ref = common_pb2.ModelRef(name=model, version=version)
        with self._for(tenant):
            export = (await self.clients.registry.GetExport(
                registry_pb2.GetExportRequest(model=ref, format=EXPORT_FORMAT))).export
            state = registry_pb2.ExportState.Name(export.state).removeprefix("EXPORT_STATE_")
            if state != "READY":
                raise Conflict(f"the {EXPORT_FORMAT} export of model {model} v{version} is {state}, not READY: "
                               "it cannot be deployed" + (f" ({export.error})" if export.error else ""))
            listed = (await self.clients.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=model, version=version))).version
        # path inside the version -> (S3 key, sha256): the tokenizer files and the export's decoder files
        wanted = {a.path: (a.object.key, a.object.sha256) for a in listed.artifacts if a.path in TOKENIZER_FILES}
        export_dir = contracts.export_dir(EXPORT_FORMAT)
        onnx = [export_dir + item for item in contracts.onnx_files(a.path.removeprefix(export_dir)
                                                                    for a in export.artifacts)]
        # An encoder's export describes itself in encoder.json, a decoder's in decoder.json.
        spec_file = export_dir + spec_files(a.path.removeprefix(export_dir) for a in export.artifacts)[0]
        wanted.update({a.path: (a.object.key, a.object.sha256) for a in export.artifacts
                       if a.path in (*onnx, spec_file)})
        for required in ("tokenizer.json", export_dir + "model.onnx", spec_file):
            if required not in wanted:
                raise NotFound(f"model {model} version {version} has no {required} in the registry")
        target = version_dir(self.cache_root, tenant, model, version)

        def mirror() -> None:
            for path, (key, sha256) in wanted.items():
                local = target / path
                local.parent.mkdir(parents=True, exist_ok=True)
                self.store.download(key, local, expected_sha256=sha256 or None)

        try:
            await asyncio.to_thread(mirror)
        except OSError as error:
            raise Unavailable(f"cannot fetch model {model} v{version} from S3: {error}", retry_after=2) from error
        digest = _weights_digest([wanted[path][1] for path in onnx])
        return VersionFiles(model, version, target, target / export_dir, digest)

    async def export_status(self, tenant: str, model: str, version: int) -> ExportStatus:
        from llmp.common.v1 import common_pb2
        from llmp.registry.v1 import registry_pb2

        ref = common_pb2.ModelRef(name=model, version=version)
        try:
            with self._for(tenant):
                export = (await self.clients.registry.GetExport(
                    registry_pb2.GetExportRequest(model=ref, format=EXPORT_FORMAT))).export
        except NotFound:
            await self.resolve(tenant, model, version, "")  # NotFound for the version itself propagates
            return ExportStatus("MISSING")
        return _status(export)

    async def request_export(self, tenant: str, model: str, version: int) -> ExportStatus:
        from llmp.common.v1 import common_pb2
        from llmp.registry.v1 import registry_pb2

        with self._for(tenant):
            export = (await self.clients.registry.CreateExport(registry_pb2.CreateExportRequest(
                model=common_pb2.ModelRef(name=model, version=version), format=EXPORT_FORMAT))).export
        return _status(export)

    async def mark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        from llmp.common.v1 import common_pb2
        from llmp.registry.v1 import registry_pb2

        with self._for(tenant):
            await self.clients.registry.MarkDeployed(registry_pb2.MarkDeployedRequest(
                model=common_pb2.ModelRef(name=model, version=version), deployment=deployment,
                export_format=EXPORT_FORMAT))

    async def unmark_deployed(self, tenant: str, model: str, version: int, deployment: str) -> None:
        from llmp.common.v1 import common_pb2
        from llmp.registry.v1 import registry_pb2

        with self._for(tenant):
            await self.clients.registry.UnmarkDeployed(registry_pb2.UnmarkDeployedRequest(
                model=common_pb2.ModelRef(name=model, version=version), deployment=deployment))
