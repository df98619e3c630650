"""A registered model version's tokenizer files, for datasets built with `tokenizer=model`.

The registry says which files the version has (with their size and SHA-256); the files are read
straight from S3 and checked against those digests (`model_transfer.fetch_artifact`). The dataset
service asks for the version twice: when the dataset is created, so a missing version (NotFound) or
one without a tokenizer (ValidationFailed) fails the request itself and nothing is created; and when
the version is built (possibly by another replica, after a restart), to download the files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from llmp.registry.v1 import registry_pb2

from services.common.errors import NotFound, ValidationFailed
from services.common.grpc_client import ServiceClients
from services.common.identity import Caller, acting_as
from services.common.model_transfer import fetch_artifact
from services.common.s3 import ObjectStore
from services.dataset.tokenizer import MODEL_FILES, TOKENIZER_JSON

TIMEOUT = 10.0  # seconds

# resolve(tenant, model, version) -> the version's tokenizer artifacts (tokenizer.json among them)
ResolveTokenizer = Callable[[str, str, int], Awaitable[list[registry_pb2.Artifact]]]


def tokenizer_artifacts(version: registry_pb2.ModelVersion) -> list[registry_pb2.Artifact]:
    """The version's tokenizer files (top level, of `MODEL_FILES`); ValidationFailed without a tokenizer.json."""
    name, number = version.ref.name, version.ref.version
    if version.state != registry_pb2.VERSION_STATE_READY:
        state = registry_pb2.VersionState.Name(version.state).removeprefix("VERSION_STATE_")
        raise ValidationFailed(f"tokenizer_model {name} version {number} is {state}, not READY")
    files = [artifact for artifact in version.artifacts if artifact.path in MODEL_FILES]
    if not any(artifact.path == TOKENIZER_JSON for artifact in files):
        raise ValidationFailed(f"tokenizer_model {name} version {number} has no {TOKENIZER_JSON}: its tokenizer "
                               "cannot tokenize a dataset")
    return files


def registry_tokenizers(clients: ServiceClients) -> ResolveTokenizer:
    """A `ResolveTokenizer` backed by the registry service."""

    async def resolve(tenant: str, model: str, version: int) -> list[registry_pb2.Artifact]:
        request = registry_pb2.GetModelVersionRequest(name=model, version=version)
        # As the tenant (a resumed build runs outside any request): its models are the only ones it may use.
        with acting_as(Caller(tenant=tenant, key_id="dataset-service", role="developer")):
            try:
                response = await clients.registry.GetModelVersion(request, timeout=TIMEOUT)
            except NotFound:
                raise NotFound(f"tokenizer_model {model} has no READY version {version}") from None
        return tokenizer_artifacts(response.version)

    return resolve


def download(store: ObjectStore, artifacts: list[registry_pb2.Artifact], folder: Path) -> Path:
    """The artifacts' files in `folder`, each checked against the registry's size and digest."""
    folder.mkdir(parents=True, exist_ok=True)
    for artifact in artifacts:
        fetch_artifact(store, artifact, folder / artifact.path)
    return folder
