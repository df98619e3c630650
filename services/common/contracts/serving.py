"""The served model's description (registry exports → inference) and its name in Triton.

`DecoderSpec` (and `EncoderSpec`, its sibling for encoders served as embeddings) is a plain record: the
registry builds it from a model when it exports one
(`services/registry/onnx_export.py: decoder_spec`) and writes it as `decoder.json` beside the graph; the
inference service reads it back to drive the KV cache. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

DECODER_SPEC_FILE = "decoder.json"
ENCODER_SPEC_FILE = "encoder.json"  # written instead of decoder.json for an encoder (BERT-style) export
# The exported graph and its weights. The weights always go to the external-data file beside the graph:
# a protobuf cannot exceed 2 GB, and one layout for every size means the large-model path is the one every
# export (and every test) takes. An export stored before this has no data file; readers accept both.
ONNX_GRAPH_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
_NOT_TRITON = re.compile(r"[^A-Za-z0-9_.-]")  # a Triton model name is a folder name and a URL segment


@dataclass(frozen=True)
class DecoderSpec:
    """What a runtime needs to drive the exported graph; written beside it as `decoder.json`.

    The past key/values of every layer are [batch, n_kv_head, past, head_dim]: with grouped-query
    attention (Llama, Qwen2, Mistral) `n_kv_head` divides `n_head`, and `head_dim` is the model's own
    (`config.head_dim` when it has one), not necessarily hidden_size // n_head.
    """

    n_layer: int
    n_head: int  # query heads
    head_dim: int
    vocab_size: int
    context_length: int  # largest past+seq the model's position embeddings allow
    eos_token_id: int | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # Key/value heads; `decoder.json` written before grouped-query attention lacks it and means n_head.
    n_kv_head: int = 0

    def __post_init__(self) -> None:
        if not self.n_kv_head:
            object.__setattr__(self, "n_kv_head", self.n_head)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DecoderSpec:
        data = json.loads(text)
        data["input_names"] = tuple(data["input_names"])
        data["output_names"] = tuple(data["output_names"])
        return cls(**data)


@dataclass(frozen=True)
class EncoderSpec:
    """An exported encoder (BERT, RoBERTa): `input_ids`, `attention_mask` int64 [batch, seq] in,
    `last_hidden_state` float32 [batch, seq, hidden_size] out. Written beside the graph as `encoder.json`;
    what it serves is the embedding of a text, the mean of its tokens' last hidden states (padding masked)."""

    n_layer: int
    hidden_size: int
    vocab_size: int
    context_length: int  # most tokens (special tokens included) the position embeddings allow
    pad_token_id: int
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    output_names: tuple[str, ...] = ("last_hidden_state",)
    kind: str = "encoder"
    eos_token_id: int | None = None  # an encoder generates nothing; read by code that serves both kinds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        data = json.loads(text)
        data["input_names"] = tuple(data["input_names"])
        data["output_names"] = tuple(data["output_names"])
        return cls(**data)


def spec_files(present: Iterable[str]) -> tuple[str, ...]:
    """The spec file of an export folder among the names `present` in it: `encoder.json` for an encoder,
    else `decoder.json`."""
    return (ENCODER_SPEC_FILE,) if ENCODER_SPEC_FILE in set(present) else (DECODER_SPEC_FILE,)


def onnx_files(present: Iterable[str]) -> tuple[str, ...]:
    """The ONNX files of an export folder, among the names `present` in it: the graph, and its external
    data when there is some (exports made before external data have the graph alone)."""
    names = set(present)
    return (ONNX_GRAPH_FILE,) + ((ONNX_DATA_FILE,) if ONNX_DATA_FILE in names else ())


def triton_model_name(tenant: str, name: str, version: int) -> str:
    """One Triton model per (tenant, model, version): `m-<tenant>-<model>-v<version>-<hash>`.

    The readable part is for people and may be ambiguous (tenant `acme` model `prod-chat` and tenant
    `acme-prod` model `chat` read alike); the hash of the JSON triple is what keeps names apart.
    """
    digest = hashlib.sha256(json.dumps([tenant, name, version]).encode()).hexdigest()[:16]
    return f"m-{_NOT_TRITON.sub('_', tenant)[:32]}-{_NOT_TRITON.sub('_', name)[:63]}-v{version}-{digest}"
