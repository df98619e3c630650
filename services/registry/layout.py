"""Names, S3 keys and artifact roles: where a registered model's objects live and what they are."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from services.common.errors import ValidationFailed

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def validate_name(value: str, what: str) -> str:
    if not NAME.match(value or ""):
        raise ValidationFailed(f"{what} {value!r} must be 1-63 characters of lowercase letters, digits, "
                               "'-', '_' or '.', starting with a letter or digit")
    return value


def validate_version(value: int, what: str = "version") -> int:
    if value < 1:
        raise ValidationFailed(f"{what} must be a positive integer, not {value}")
    return value


def validate_format(value: str) -> str:
    if value not in EXPORT_FORMATS:
        raise ValidationFailed(f"export format {value!r} must be one of {', '.join(EXPORT_FORMATS)}")
    return value


def model_prefix(tenant: str, name: str) -> str:
    return f"models/{tenant}/{name}/"


def version_prefix(tenant: str, name: str, version: int) -> str:
    return f"models/{tenant}/{name}/v{version}/"


def export_prefix(tenant: str, name: str, version: int, fmt: str) -> str:
    return f"{version_prefix(tenant, name, version)}exports/{fmt}/"


def triton_model_name(name: str, version: int) -> str:
    """Triton model folder names allow letters, digits, '-', '_' and '.': ours already do."""
    return f"{name}-v{version}"


def parse_version_key(key: str) -> tuple[str, str, int] | None:
    """(tenant, name, version) of a key under models/{tenant}/{name}/v{version}/, else None."""
    parts = key.split("/")
    if len(parts) < 5 or parts[0] != "models" or not parts[3].startswith("v") or not parts[3][1:].isdigit():
        return None
    return parts[1], parts[2], int(parts[3][1:])


def role_of(path: str) -> str:
    """What an artifact is for, from its file name."""
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
