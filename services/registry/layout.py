"""What a registered model's objects are: artifact roles and the version's content digest.

Where they live (`models/{tenant}/{name}/v{version}/`), the name rule and the export formats are
shared with other services and defined in `services.common.contracts`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# A version's weights: one file, or the index of sharded safetensors (model-00001-of-0000N.safetensors…).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ADAPTER_DIR = "adapter/"  # a LoRA fine-tune's adapter (adapter_config.json, adapter_model.safetensors), for peft


def role_of(path: str) -> str:
    """What an artifact is for, from its file name (and folder: a LoRA fine-tune's adapter lives in `adapter/`)."""
    if path.startswith(ADAPTER_DIR):
        return "adapter"
    leaf = path.rsplit("/", 1)[-1]
    if leaf in WEIGHT_FILES or leaf.endswith((".safetensors", ".bin", ".pt")):
        return "weights"
    if leaf in {"config.json", "generation_config.json"}:
        return "config"
    if leaf.startswith("tokenizer") or leaf in {"special_tokens_map.json", "vocab.json", "merges.txt",
                                                 "added_tokens.json", "vocab.txt"}:
        return "tokenizer"
    return "other"


def content_digest(artifacts: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over (path, sha256) pairs, sorted: the same files give the same digest."""
    digest = hashlib.sha256()
    for path, sha256 in sorted(artifacts):
        digest.update(f"{path}\0{sha256}\n".encode())
    return digest.hexdigest()
