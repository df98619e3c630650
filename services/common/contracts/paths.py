"""Where each service's objects live in the bucket: the only place these keys are spelled.

    datasets/{tenant}/{name}/v{version}/             a dataset version (the dataset service writes it)
        manifest.json, tokenizer/…, {split}/shard-{i:05d}.bin
        {split}/loss-mask-{i:05d}.bin, {split}/examples.bin   supervised formats only
    sources/datasets/{tenant}/{name}/v{version}/corpus   a PENDING version's stored corpus
    imports/{tenant}/…                               corpora a tenant puts there to create datasets from
    jobs/{tenant}/{job_id}/                          what a training job writes
        checkpoints/step-{n}/…, final/…, metrics.json
    models/{tenant}/{name}/v{version}/               a registered model version (the registry writes it)
        exports/{format}/…                           its exports
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = "datasets/"
SOURCES = "sources/"
JOBS = "jobs/"
IMPORTS = "imports/"
MODELS = "models/"

EXPORTS = "exports/"  # a model version's exports, relative to its prefix
DATASET_MANIFEST = "manifest.json"
DATASET_TOKENIZER = "tokenizer/"  # Hugging Face tokenizer files, relative to the version's prefix


def dataset_version_prefix(tenant: str, name: str, version: int) -> str:
    return f"{DATASETS}{tenant}/{name}/v{version}/"


def dataset_manifest_key(tenant: str, name: str, version: int) -> str:
    return dataset_version_prefix(tenant, name, version) + DATASET_MANIFEST


def dataset_tokenizer_prefix(tenant: str, name: str, version: int) -> str:
    return dataset_version_prefix(tenant, name, version) + DATASET_TOKENIZER


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def dataset_shard_key(tenant: str, name: str, version: int, split: str, index: int) -> str:
    return f"{dataset_version_prefix(tenant, name, version)}{split}/{shard_file_name(index)}"


def loss_mask_file_name(index: int) -> str:
    return f"loss-mask-{index:05d}.bin"


def dataset_loss_mask_key(tenant: str, name: str, version: int, split: str, index: int) -> str:
    """The loss mask of shard `index` of a supervised split (one byte per token of that shard)."""
    return f"{dataset_version_prefix(tenant, name, version)}{split}/{loss_mask_file_name(index)}"


def dataset_examples_key(tenant: str, name: str, version: int, split: str) -> str:
    """The example index of a supervised split."""
    return f"{dataset_version_prefix(tenant, name, version)}{split}/examples.bin"


def import_prefix(tenant: str) -> str:
    """Where a tenant puts corpora to create datasets from (`?source=s3://{bucket}/imports/{tenant}/…`): the
    only objects a source may name, so a tenant never reads another's objects with the platform's credentials."""
    return f"{IMPORTS}{tenant}/"


def dataset_corpus_key(tenant: str, name: str, version: int) -> str:
    """Where a PENDING version's corpus is kept (outside the version's prefix, which holds only its files)."""
    return f"{SOURCES}{dataset_version_prefix(tenant, name, version)}corpus"


def within_dataset_version(key: str) -> str:
    """A key relative to its dataset version's prefix (`train/shard-00000.bin`); a relative key unchanged."""
    parts = key.split("/")
    if key.startswith(DATASETS) and len(parts) > 4 and parts[3].startswith("v"):
        return "/".join(parts[4:])
    return key


def model_version_prefix(tenant: str, name: str, version: int) -> str:
    return f"{MODELS}{tenant}/{name}/v{version}/"


def export_dir(fmt: str) -> str:
    """An export's folder relative to its model version's prefix."""
    return f"{EXPORTS}{fmt}/"


def model_export_prefix(tenant: str, name: str, version: int, fmt: str) -> str:
    return model_version_prefix(tenant, name, version) + export_dir(fmt)


def parse_model_version_key(key: str) -> tuple[str, str, int] | None:
    """(tenant, name, version) of a key under models/{tenant}/{name}/v{version}/, else None."""
    parts = key.split("/")
    if len(parts) < 5 or not key.startswith(MODELS) or not parts[3].startswith("v") or not parts[3][1:].isdigit():
        return None
    return parts[1], parts[2], int(parts[3][1:])


def job_prefix(tenant: str, job_id: str) -> str:
    """Everything a training job writes lives under this prefix."""
    return f"{JOBS}{tenant}/{job_id}/"


def registrable_prefixes(tenant: str) -> tuple[str, ...]:
    """Where a tenant's model version may be registered from (`RegisterModelVersion.source_prefix`): its own
    jobs' outputs and its own imports, never another tenant's (the registry copies with the platform's
    credentials, so the prefix is the only thing that keeps a tenant to its own objects)."""
    return f"{JOBS}{tenant}/", import_prefix(tenant)


@dataclass(frozen=True)
class JobLayout:
    """Where a job's objects live in the bucket."""

    tenant: str
    job_id: str

    @property
    def prefix(self) -> str:
        return job_prefix(self.tenant, self.job_id)

    @property
    def checkpoints(self) -> str:
        return self.prefix + "checkpoints/"

    def step(self, step: int) -> str:
        return f"{self.checkpoints}step-{step}/"

    @property
    def final(self) -> str:
        """The finished model: a `save_pretrained` folder with the dataset's tokenizer files."""
        return self.prefix + "final/"

    @property
    def metrics(self) -> str:
        return self.prefix + "metrics.json"
