"""The Triton model repository the inference service owns (`LLMP_TRITON_MODEL_REPOSITORY`).

One Triton model per registry model version, named `m-<tenant>-<model>-v<version>` (Triton names
allow letters, digits, '-', '_' and '.'), laid out as Triton expects:

    <repository>/<triton name>/config.pbtxt
    <repository>/<triton name>/1/model.py      (services/inference/triton_model/model.py)
    <repository>/<triton name>/1/model.onnx    (the registry's ONNX export)
    <repository>/<triton name>/1/decoder.json  (its DecoderSpec)
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "triton_model"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class BatchingConfig:
    """How Triton batches the decoding steps of concurrent requests."""

    max_batch_size: int = 64  # most steps one ORT call runs together
    max_queue_delay_us: int = 2000  # how long the first queued step waits for company
    intra_op_threads: int = 1  # ORT threads per call (the machine is shared)


def triton_model_name(tenant: str, model: str, version: int) -> str:
    return f"m-{_UNSAFE.sub('_', tenant)}-{_UNSAFE.sub('_', model)}-v{version}"


def write_model(repository: Path, name: str, onnx_dir: Path, batching: BatchingConfig = BatchingConfig()) -> Path:
    """Write (or refresh) model `name` from an export folder holding `model.onnx` and `decoder.json`."""
    for required in ("model.onnx", "decoder.json"):
        if not (onnx_dir / required).exists():
            raise FileNotFoundError(f"{onnx_dir} has no {required}")
    model_dir = repository / name
    version_dir = model_dir / "1"
    staging = repository / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    shutil.copy2(TEMPLATE_DIR / "model.py", staging / "1" / "model.py")
    for item in ("model.onnx", "decoder.json"):
        _link_or_copy(onnx_dir / item, staging / "1" / item)
    template = (TEMPLATE_DIR / "config.pbtxt.template").read_text()
    (staging / "config.pbtxt").write_text(template.format(
        name=name, max_batch_size=batching.max_batch_size, max_queue_delay_us=batching.max_queue_delay_us,
        intra_op_threads=batching.intra_op_threads))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return version_dir


def remove_model(repository: Path, name: str) -> None:
    shutil.rmtree(repository / name, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)
