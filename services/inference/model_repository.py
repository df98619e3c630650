"""The Triton model repository the inference service owns (`LLMP_TRITON_MODEL_REPOSITORY`).

One Triton model per registry model version, named by `contracts.triton_model_name(tenant, model, version)`
(a readable prefix and a hash of the three, so two tenants' models never share a name in one Triton).
Laid out as Triton expects:

    <repository>/<triton name>/config.pbtxt
    <repository>/<triton name>/1/model.py      (services/inference/triton_model/model.py)
    <repository>/<triton name>/1/model.onnx    (the registry's ONNX export)
    <repository>/<triton name>/1/model.onnx.data  (its weights, as external data)
    <repository>/<triton name>/1/decoder.json  (its DecoderSpec)

An encoder's export (`encoder.json`, an EncoderSpec, instead of decoder.json) gets the embedding model
instead: triton_model/encoder_model.py as model.py, and encoder_config.pbtxt.template. Either imports
triton_model/ort_session.py, which imports services/common/cpus.py, and triton_model/length_groups.py, all
copied beside it.

The repository is a local folder (`make up`: the local tritonserver reads it) or, in the compose and
Kubernetes form `s3://host:port/bucket/prefix`, a prefix in S3 written through `ObjectStore`, which the
NGC tritonserver reads (its Python backend then needs numpy and onnxruntime in its image).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from google.protobuf.message import DecodeError

from services.common import cpus
from services.common.config import Settings
from services.common.contracts import ENCODER_SPEC_FILE, ONNX_GRAPH_FILE, onnx_files, spec_files
from services.common.errors import InvalidArgument
from services.common.onnx_graph import fold_graph_file
from services.common.s3 import ObjectStore

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "triton_model"
# model.py imports ort_session (which imports cpus) and length_groups: Triton's stub finds them in the version
# folder, beside it
MODULES_BESIDE_THE_MODEL = (TEMPLATE_DIR / "ort_session.py", TEMPLATE_DIR / "length_groups.py", Path(cpus.__file__))


@dataclass(frozen=True)
class BatchingConfig:
    """How Triton batches the decoding steps of concurrent requests, and where it runs them."""

    max_batch_size: int = 64  # most steps one ORT call runs together
    # How long Triton holds a request for company. The service already sends every step it has as one
    # request, so waiting would only add latency; 0 still merges requests queued meanwhile (replicas).
    max_queue_delay_us: int = 0
    intra_op_threads: int = 0  # ORT threads per call; 0: every core Triton may use (LLMP_TRITON_INTRA_OP_THREADS)
    instance_kind: str = "KIND_CPU"  # KIND_GPU on a GPU host (LLMP_TRITON_INSTANCE_KIND)
    # ORT execution providers to try, in order; model.py skips those its ONNX Runtime lacks.
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingConfig:
        return cls(intra_op_threads=settings.triton_intra_op_threads, instance_kind=settings.triton_instance_kind,
                   providers=settings.triton_ort_providers)


def write_model(repository: Path, name: str, onnx_dir: Path, batching: BatchingConfig = BatchingConfig()) -> Path:
    """Write (or refresh) model `name` from an export folder holding `model.onnx` (and, from exports with
    external data, `model.onnx.data`) and `decoder.json` (or an encoder's `encoder.json`)."""
    spec_file = spec_files(os.listdir(onnx_dir))[0]
    for required in (ONNX_GRAPH_FILE, spec_file):
        if not (onnx_dir / required).exists():
            raise FileNotFoundError(f"{onnx_dir} has no {required}")
    encoder = spec_file == ENCODER_SPEC_FILE
    model_dir = repository / name
    version_dir = model_dir / "1"
    staging = repository / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    shutil.copy2(TEMPLATE_DIR / ("encoder_model.py" if encoder else "model.py"), staging / "1" / "model.py")
    for module in MODULES_BESIDE_THE_MODEL:
        shutil.copy2(module, staging / "1" / module.name)
    for item in (*onnx_files(os.listdir(onnx_dir)), spec_file):
        _link_or_copy(onnx_dir / item, staging / "1" / item)
    if not encoder:
        _fold_key_transposes(staging / "1" / ONNX_GRAPH_FILE)
    template = (TEMPLATE_DIR / ("encoder_config.pbtxt.template" if encoder else "config.pbtxt.template")).read_text()
    (staging / "config.pbtxt").write_text(template.format(
        name=name, max_batch_size=batching.max_batch_size, max_queue_delay_us=batching.max_queue_delay_us,
        intra_op_threads=batching.intra_op_threads, instance_kind=batching.instance_kind,
        providers=",".join(batching.providers)))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return version_dir


def remove_model(repository: Path, name: str) -> None:
    shutil.rmtree(repository / name, ignore_errors=True)


def _fold_key_transposes(graph_file: Path) -> None:
    """Fold the key transposes of a decoder exported before the registry did (onnx_graph.py): its steps then stop
    copying the key cache. The graph is rewritten in place of the link, never through it: the export is not touched."""
    try:
        folded = fold_graph_file(graph_file)  # the weights stay in model.onnx.data, linked
    except DecodeError:  # not a graph: left as it came, for Triton's load to report
        return
    if folded:
        log.info("folded %d key transposes of %s", folded, graph_file.parent.parent.name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)


class Repository(Protocol):
    def write(self, name: str, onnx_dir: Path, batching: BatchingConfig) -> None:
        """Write (or refresh) model `name` from an export folder."""

    def remove(self, name: str) -> None:
        """Delete model `name` (after Triton unloaded it)."""


@dataclass(frozen=True)
class LocalRepository:
    """A folder the local tritonserver reads (`--model-repository=<root>`)."""

    root: Path

    def write(self, name: str, onnx_dir: Path, batching: BatchingConfig) -> None:
        write_model(self.root, name, onnx_dir, batching)

    def remove(self, name: str) -> None:
        remove_model(self.root, name)


@dataclass(frozen=True)
class S3Repository:
    """A prefix in S3 the NGC tritonserver reads (`--model-repository=s3://host:port/bucket/prefix`)."""

    store: ObjectStore
    prefix: str  # "" or ending in "/"

    def write(self, name: str, onnx_dir: Path, batching: BatchingConfig) -> None:
        with tempfile.TemporaryDirectory(prefix="llmp-triton-model-") as scratch:
            write_model(Path(scratch), name, onnx_dir, batching)
            self.store.ensure_bucket()
            self.store.delete_prefix(f"{self.prefix}{name}/")
            for path in sorted((Path(scratch) / name).rglob("*")):
                if path.is_file():
                    self.store.put_file(f"{self.prefix}{name}/{path.relative_to(Path(scratch) / name)}", path)

    def remove(self, name: str) -> None:
        self.store.delete_prefix(f"{self.prefix}{name}/")


def open_repository(settings: Settings) -> Repository:
    """LLMP_TRITON_MODEL_REPOSITORY as a repository: a local path (default `<state dir>/triton-models`) or
    `s3://host:port/bucket[/prefix]` (S3 credentials and TLS from the LLMP_S3_* settings)."""
    configured = settings.triton_model_repository
    if not configured.startswith("s3://"):
        root = Path(configured) if configured else settings.state_dir / "triton-models"
        root.mkdir(parents=True, exist_ok=True)
        return LocalRepository(root)
    endpoint, _, path = configured.removeprefix("s3://").partition("/")
    bucket, _, prefix = path.partition("/")
    if not endpoint or not bucket:
        raise InvalidArgument(f"LLMP_TRITON_MODEL_REPOSITORY {configured!r} must look like s3://host:port/bucket/prefix")
    store = ObjectStore(dataclasses.replace(settings.s3, endpoint=endpoint, bucket=bucket))
    return S3Repository(store, prefix.strip("/") + "/" if prefix.strip("/") else "")
