"""A dataset version's `manifest.json`: written by the dataset service, read by training and the registry.

One type and one reading policy: a manifest whose dtype is missing or unknown, or that lacks a field
readers need, is refused with `ValidationFailed` naming what is wrong, never read with a guessed default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.contracts.paths import dataset_tokenizer_prefix
from services.common.errors import ValidationFailed

SPLITS = ("train", "validation", "test", "calibration")
# What an evaluation (or a promotion gate) measures on: one split, or "all" of them one after the other.
EVALUATION_SPLITS = ("test", "validation", "calibration", "all")


def evaluated_splits(split: str) -> tuple[str, ...]:
    """The dataset splits an evaluation on `split` reads (ValueError for an unknown one)."""
    if split not in EVALUATION_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVALUATION_SPLITS)}, not {split!r}")
    return SPLITS if split == "all" else (split,)
# Token id types of the shards (flat little-endian arrays) and their NumPy spelling.
TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
# bpe and char: trained on the train split by the dataset service; model: a registered model version's own
# tokenizer files, copied unchanged (so its tokenizer.json, the tokenizer's identity, has the model's SHA-256).
TOKENIZER_KINDS = ("bpe", "char", "model")
CORPUS_FORMATS = ("text", "jsonl", "pairs", "chat")
# Formats whose examples are conversations: each split also has loss masks and an example index.
SUPERVISED_FORMATS = ("pairs", "chat")
LOSS_MASK_DTYPE = "<u1"  # one byte per token: 1 where the loss is computed (the answer's tokens), else 0
EXAMPLE_INDEX_DTYPE = "<u8"  # example start offsets into the split's token stream, then its total


@dataclass(frozen=True)
class ManifestObject:
    """One object of the version, with what readers verify it against."""

    key: str
    size: int
    sha256: str
    role: str = ""  # tokenizer, {split}-shard, manifest
    xxh3_128: str = ""  # when the writer took it


@dataclass(frozen=True)
class SplitManifest:
    """One split: its counts and its shards' keys, in stream order."""

    documents: int
    tokens: int
    bytes: int
    shards: tuple[str, ...]
    near_duplicates: int = 0  # documents dropped as near duplicates within the split
    leaked_exact: int = 0  # documents dropped because the train split holds them
    leaked_near: int = 0  # documents dropped because the train split holds a near duplicate
    # Supervised formats only. `loss_masks[i]` holds one LOSS_MASK_DTYPE byte per token of `shards[i]`;
    # `examples` is the key of the example index (EXAMPLE_INDEX_DTYPE: where each example starts in the
    # split's token stream, then the stream's length), so no reader infers boundaries from token ids.
    loss_masks: tuple[str, ...] = ()
    examples: str = ""
    loss_tokens: int = 0  # tokens whose mask is 1


@dataclass(frozen=True)
class TokenizerManifest:
    kind: str  # a TOKENIZER_KINDS value
    vocab_size: int
    prefix: str  # the key prefix of the Hugging Face tokenizer files (the version's `tokenizer/`)
    sha256: str = ""  # of its tokenizer.json: the tokenizer's identity (docs/CONTRACTS.md)
    model: str = ""  # kind model: the registered model whose tokenizer it is
    model_version: int = 0


@dataclass(frozen=True)
class DatasetManifest:
    """What `datasets/{tenant}/{name}/v{version}/manifest.json` holds (docs/CONTRACTS.md)."""

    name: str
    version: int
    tenant: str
    format: str  # the corpus format it was built from: a CORPUS_FORMATS value
    digest: str  # the version's content address
    dtype: str  # a TOKEN_DTYPES key
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    tokenizer: TokenizerManifest
    splits: Mapping[str, SplitManifest]
    objects: tuple[ManifestObject, ...] = ()
    cleaning: Mapping[str, int] = field(default_factory=dict)  # documents in, out, and dropped per reason
    options: Mapping[str, Any] = field(default_factory=dict)  # the resolved DatasetOptions

    @property
    def numpy_dtype(self) -> str:
        """The shards' element type as NumPy spells it (`np.dtype(manifest.numpy_dtype)`)."""
        return TOKEN_DTYPES[self.dtype]

    @property
    def supervised(self) -> bool:
        """Conversations with loss masks (format pairs or chat) rather than one token stream of text."""
        return self.format in SUPERVISED_FORMATS

    def shards(self, split: str) -> tuple[str, ...]:
        """The split's shard keys; none for a split the version does not have."""
        found = self.splits.get(split)
        return found.shards if found is not None else ()

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["splits"] = {name: {**asdict(split), "shards": list(split.shards), "loss_masks": list(split.loss_masks)}
                          for name, split in self.splits.items()}
        # Fields a manifest has only when they apply: supervised splits' masks, a tokenizer's identity and model.
        if not self.supervised:
            for split in body["splits"].values():
                del split["loss_masks"], split["examples"], split["loss_tokens"]
        body["tokenizer"] = {k: v for k, v in body["tokenizer"].items()
                             if v or k not in ("sha256", "model", "model_version")}
        # An object's role and XXH3 are written only when known, as the object store reports them.
        body["objects"] = [{k: v for k, v in asdict(obj).items() if v != "" or k not in ("role", "xxh3_128")}
                           for obj in self.objects]
        return body

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> DatasetManifest:
        try:
            body = json.loads(raw)
        except ValueError as error:
            raise ValidationFailed(f"dataset manifest is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise ValidationFailed("dataset manifest must be a JSON object")
        return cls.from_dict(body)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> DatasetManifest:
        where = f"dataset manifest of {body.get('name', '?')} v{body.get('version', '?')}"
        dtype = body.get("dtype")
        if dtype not in TOKEN_DTYPES:
            raise ValidationFailed(f"{where}: dtype {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        try:
            unknown = sorted(set(body["splits"]) - set(SPLITS))
            if unknown:
                raise ValidationFailed(f"{where}: unknown splits {unknown}; splits are {', '.join(SPLITS)}")
            tokenizer = body["tokenizer"]
            if tokenizer["kind"] not in TOKENIZER_KINDS:
                raise ValidationFailed(f"{where}: tokenizer kind {tokenizer['kind']!r} is not one of "
                                       f"{', '.join(TOKENIZER_KINDS)}")
            name, version, tenant = str(body["name"]), int(body["version"]), str(body["tenant"])
            if body["format"] not in CORPUS_FORMATS:
                raise ValidationFailed(f"{where}: format {body['format']!r} is not one of {', '.join(CORPUS_FORMATS)}")
            manifest = cls(
                name=name, version=version, tenant=tenant, format=str(body["format"]),
                digest=str(body.get("digest", "")), dtype=dtype, vocab_size=int(body["vocab_size"]),
                eos_token_id=int(body["eos_token_id"]), pad_token_id=int(body["pad_token_id"]),
                tokenizer=TokenizerManifest(tokenizer["kind"], int(tokenizer["vocab_size"]),
                                            str(tokenizer.get("prefix") or dataset_tokenizer_prefix(tenant, name,
                                                                                                    version)),
                                            str(tokenizer.get("sha256", "")), str(tokenizer.get("model", "")),
                                            int(tokenizer.get("model_version", 0))),
                splits={split_name: SplitManifest(**{**split, "shards": tuple(split["shards"]),
                                                     "loss_masks": tuple(split.get("loss_masks", ()))})
                        for split_name, split in body["splits"].items()},
                objects=tuple(ManifestObject(**obj) for obj in body.get("objects", [])),
                cleaning=dict(body.get("cleaning", {})), options=dict(body.get("options", {})),
            )
        except KeyError as missing:
            raise ValidationFailed(f"{where}: missing field {missing}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValidationFailed(f"{where}: {error}") from None
        if manifest.supervised:  # a reader must never train on a supervised version as plain text
            for split_name, split in manifest.splits.items():
                if split.shards and (len(split.loss_masks) != len(split.shards) or not split.examples):
                    raise ValidationFailed(f"{where}: format {manifest.format} needs loss masks for every shard and "
                                           f"an example index, which split {split_name} lacks")
        return manifest
