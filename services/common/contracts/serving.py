"""The served model's description (registry exports → inference) and its name in Triton.

`DecoderSpec` is a plain record: the registry builds it from a model when it exports one
(`services/registry/onnx_export.py: decoder_spec`) and writes it as `decoder.json` beside the graph; the
inference service reads it back to drive the KV cache. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

DECODER_SPEC_FILE = "decoder.json"
_NOT_TRITON = re.compile(r"[^A-Za-z0-9_.-]")  # a Triton model name is a folder name and a URL segment


@dataclass(frozen=True)
class DecoderSpec:
    """What a runtime needs to drive the exported graph; written beside it as `decoder.json`."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    context_length: int  # largest past+seq the model's position embeddings allow
    eos_token_id: int | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DecoderSpec:
        data = json.loads(text)
        data["input_names"] = tuple(data["input_names"])
        data["output_names"] = tuple(data["output_names"])
        return cls(**data)


def triton_model_name(tenant: str, name: str, version: int) -> str:
    """One Triton model per (tenant, model, version): `m-<tenant>-<model>-v<version>-<hash>`.

    The readable part is for people and may be ambiguous (tenant `acme` model `prod-chat` and tenant
    `acme-prod` model `chat` read alike); the hash of the JSON triple is what keeps names apart.
    """
    digest = hashlib.sha256(json.dumps([tenant, name, version]).encode()).hexdigest()[:16]
    return f"m-{_NOT_TRITON.sub('_', tenant)[:32]}-{_NOT_TRITON.sub('_', name)[:63]}-v{version}-{digest}"
