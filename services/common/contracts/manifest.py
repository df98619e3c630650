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
# Token id types of the shards (flat little-endian arrays) and their NumPy spelling.
TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
TOKENIZER_KINDS = ("bpe", "char")


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


@dataclass(frozen=True)
class TokenizerManifest:
    kind: str  # bpe | char
    vocab_size: int
    prefix: str  # the key prefix of the Hugging Face tokenizer files (the version's `tokenizer/`)


@dataclass(frozen=True)
class DatasetManifest:
    """What `datasets/{tenant}/{name}/v{version}/manifest.json` holds (docs/CONTRACTS.md)."""

    name: str
    version: int
    tenant: str
    format: str  # the corpus format it was built from: text | jsonl | pairs
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

    def shards(self, split: str) -> tuple[str, ...]:
        """The split's shard keys; none for a split the version does not have."""
        found = self.splits.get(split)
        return found.shards if found is not None else ()

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["splits"] = {name: {**asdict(split), "shards": list(split.shards)} for name, split in self.splits.items()}
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
            return cls(
                name=name, version=version, tenant=tenant, format=str(body["format"]),
                digest=str(body.get("digest", "")), dtype=dtype, vocab_size=int(body["vocab_size"]),
                eos_token_id=int(body["eos_token_id"]), pad_token_id=int(body["pad_token_id"]),
                tokenizer=TokenizerManifest(tokenizer["kind"], int(tokenizer["vocab_size"]),
                                            str(tokenizer.get("prefix") or dataset_tokenizer_prefix(tenant, name,
                                                                                                    version))),
                splits={split_name: SplitManifest(**{**split, "shards": tuple(split["shards"])})
                        for split_name, split in body["splits"].items()},
                objects=tuple(ManifestObject(**obj) for obj in body.get("objects", [])),
                cleaning=dict(body.get("cleaning", {})), options=dict(body.get("options", {})),
            )
        except KeyError as missing:
            raise ValidationFailed(f"{where}: missing field {missing}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValidationFailed(f"{where}: {error}") from None
