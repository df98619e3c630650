"""Where deployable model versions come from, as local folders in the registry's layout.

A version's files follow the registry's S3 layout (docs/CONTRACTS.md), rooted at a local directory:

    <root>/models/<tenant>/<name>/v<version>/tokenizer.json, tokenizer_config.json, ...
    <root>/models/<tenant>/<name>/v<version>/exports/onnx/model.onnx, decoder.json

`LocalModelSource` reads such a tree directly (tests, benchmarks, and deploying a folder by hand).
`S3ModelSource` resolves aliases through the registry service and mirrors a version's tokenizer and
ONNX export from S3 into a local cache in that same layout, verifying each object's SHA-256.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerFast

from services.common.errors import NotFound, Unavailable
from services.registry.onnx_export import DecoderSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class VersionFiles:
    """A model version on local disk, ready to be written into the Triton repository."""

    model: str
    version: int
    version_dir: Path  # holds the tokenizer files
    onnx_dir: Path  # holds model.onnx and decoder.json
    digest: str = ""

    def spec(self) -> DecoderSpec:
        return DecoderSpec.from_json((self.onnx_dir / "decoder.json").read_text())

    def tokenizer(self) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(str(self.version_dir))


class ModelSource(Protocol):
    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        """The version number `version` (when > 0) or `alias` points at; NotFound when neither exists."""

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        """The version's tokenizer and ONNX export as local files."""


def version_dir(root: Path, tenant: str, model: str, version: int) -> Path:
    return root / "models" / tenant / model / f"v{version}"


def publish_local_version(root: Path, tenant: str, model: str, version: int, onnx_dir: Path,
                          tokenizer_dir: Path) -> VersionFiles:
    """Lay an exported model and its tokenizer out as a local source version (what tests deploy)."""
    target = version_dir(root, tenant, model, version)
    (target / "exports" / "onnx").mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "decoder.json"):
        shutil.copy2(onnx_dir / name, target / "exports" / "onnx" / name)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, target / name)
    return VersionFiles(model, version, target, target / "exports" / "onnx")


class LocalModelSource:
    """Versions from a local tree; an alias is a file `<root>/models/<tenant>/<name>/aliases/<alias>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        if version > 0:
            if not version_dir(self.root, tenant, model, version).exists():
                raise NotFound(f"model {model} has no version {version}")
            return version
        path = self.root / "models" / tenant / model / "aliases" / alias
        if not path.exists():
            raise NotFound(f"model {model} has no alias {alias!r}")
        return int(path.read_text().strip())

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        target = version_dir(self.root, tenant, model, version)
        onnx_dir = target / "exports" / "onnx"
        if not (onnx_dir / "model.onnx").exists():
            raise NotFound(f"model {model} version {version} has no ONNX export")
        return VersionFiles(model, version, target, onnx_dir)


class S3ModelSource:
    """Versions from the registry: aliases through its gRPC API, files straight from S3 (SHA-256 checked)."""

    def __init__(self, clients, store, cache_root: Path) -> None:
        self.clients = clients  # services.common.grpc_client.ServiceClients
        self.store = store  # services.common.s3.ObjectStore
        self.cache_root = cache_root

    async def resolve(self, tenant: str, model: str, version: int, alias: str) -> int:
        from llmp.registry.v1 import registry_pb2

        from services.common.grpc_server import Caller

        caller = Caller(tenant=tenant, key_id="inference", role="admin")
        if version > 0:
            await self.clients.call("registry", "GetModelVersion",
                                    registry_pb2.GetModelVersionRequest(name=model, version=version), caller=caller)
            return version
        request = registry_pb2.ResolveAliasRequest(model_name=model, alias=alias)
        response = await self.clients.call("registry", "ResolveAlias", request, caller=caller)
        return int(response.version.ref.version)

    async def fetch(self, tenant: str, model: str, version: int) -> VersionFiles:
        prefix = f"models/{tenant}/{model}/v{version}/"
        target = version_dir(self.cache_root, tenant, model, version)
        wanted = [f"{prefix}{name}" for name in TOKENIZER_FILES] + [
            f"{prefix}exports/onnx/model.onnx", f"{prefix}exports/onnx/decoder.json"]

        def mirror() -> None:
            for key in wanted:
                if not self.store.exists(key):
                    if key.endswith(("model.onnx", "decoder.json", "tokenizer.json")):
                        raise NotFound(f"model {model} version {version} has no {key[len(prefix):]} in S3")
                    continue
                stat = self.store.stat(key)
                path = target / key[len(prefix):]
                path.parent.mkdir(parents=True, exist_ok=True)
                self.store.download(key, path, expected_sha256=stat.sha256 or None)

        try:
            await asyncio.to_thread(mirror)
        except OSError as error:
            raise Unavailable(f"cannot fetch model {model} v{version} from S3: {error}", retry_after=2) from error
        return VersionFiles(model, version, target, target / "exports" / "onnx")
