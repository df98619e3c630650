"""The options that decide a dataset version's content, validated, with defaults filled in.

`DatasetOptions.canonical()` is what the content address hashes: two requests that differ only in
how they spell a default (0 vs 8192 for the vocabulary size) build the same version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from services.common import contracts
from services.common.cleaning import DEFAULT_NEAR_DUP_THRESHOLD
from services.common.contracts import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from services.common.errors import ValidationFailed

FORMATS = contracts.CORPUS_FORMATS  # a manifest names its corpus format
DOCUMENT_MODES = ("blank-line", "line")
TOKENIZERS = contracts.TOKENIZER_KINDS  # a manifest names its tokenizer's kind
DEFAULT_VOCAB_SIZE = 8192
PURPOSES = ("training", "evaluation")  # evaluation: an external test set, the whole corpus in `test`


@dataclass(frozen=True)
class Fractions:
    """Share of documents each split receives."""

    train: float = 0.9
    validation: float = 0.05
    test: float = 0.03
    calibration: float = 0.02

    @property
    def learning_split(self) -> str:
        """The split the tokenizer learns from and that must not end up empty: train, or test for a test set."""
        return "train" if self.train > 0 else "test"

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.train, self.validation, self.test, self.calibration)


EVALUATION_FRACTIONS = Fractions(train=0.0, validation=0.0, test=1.0, calibration=0.0)


@dataclass(frozen=True)
class DatasetOptions:
    """How to read, clean, split and tokenize a corpus."""

    name: str
    format: str = "text"  # text | jsonl | pairs | chat
    document_mode: str = "blank-line"  # text only: blank-line | line
    text_field: str = "text"  # jsonl: the field holding the document
    prompt_field: str = "prompt"  # pairs: the prompt's field
    completion_field: str = "completion"  # pairs: the completion's field
    tokenizer: str = "bpe"  # bpe | char | model
    vocab_size: int = DEFAULT_VOCAB_SIZE  # bpe only; the char vocabulary is what the train split holds
    split_seed: int = 0  # keeps a document in its split as the corpus grows
    fractions: Fractions = field(default_factory=Fractions)
    min_doc_chars: int = 1  # shorter documents (after normalisation) are dropped
    max_doc_chars: int = 0  # longer documents are dropped; 0 = no limit
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD  # Jaccard similarity of near duplicates
    source_uri: str = ""  # s3://bucket/key instead of an upload
    tokenizer_model: str = ""  # tokenizer=model: the registered model whose tokenizer files are used
    tokenizer_model_version: int = 0  # … and its version
    purpose: str = "training"  # training | evaluation (every document in `test`, see PURPOSES)

    def validated(self) -> "DatasetOptions":
        """These options with every rule checked (ValidationFailed names the first broken one)."""
        contracts.validate_name(self.name, "dataset name")
        _one_of("format", self.format, FORMATS)
        _one_of("document_mode", self.document_mode, DOCUMENT_MODES)
        _one_of("tokenizer", self.tokenizer, TOKENIZERS)
        for label in ("text_field", "prompt_field", "completion_field"):
            if not getattr(self, label):
                raise ValidationFailed(f"{label} must not be empty")
        if self.tokenizer == "model":
            if not self.tokenizer_model or self.tokenizer_model_version < 1:
                raise ValidationFailed("tokenizer=model needs tokenizer_model (a model name) and "
                                       "tokenizer_model_version (a version number from 1)")
            contracts.validate_name(self.tokenizer_model, "tokenizer_model")
        elif self.tokenizer_model or self.tokenizer_model_version:
            raise ValidationFailed(f"tokenizer_model and tokenizer_model_version go with tokenizer=model, "
                                   f"not tokenizer={self.tokenizer}")
        if self.tokenizer == "bpe" and not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValidationFailed(f"vocab_size must be between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}, "
                                   f"not {self.vocab_size}")
        _one_of("purpose", self.purpose, PURPOSES)
        if self.purpose == "evaluation":
            if self.fractions not in (Fractions(), EVALUATION_FRACTIONS):
                raise ValidationFailed("fractions: purpose=evaluation puts every document in test; "
                                       "leave fractions out")
            return replace(self, fractions=EVALUATION_FRACTIONS)._checked()
        return self._checked()

    def _checked(self) -> "DatasetOptions":
        shares = self.fractions.as_tuple()
        train_needed = self.purpose == "training"
        if any(share < 0 or share > 1 for share in shares) or (train_needed and self.fractions.train <= 0):
            raise ValidationFailed(f"split fractions must be in [0, 1] with train > 0, not {shares}")
        if abs(sum(shares) - 1.0) > 1e-6:
            raise ValidationFailed(f"split fractions must sum to 1, not {sum(shares):g}")
        if self.min_doc_chars < 1:
            raise ValidationFailed(f"min_doc_chars must be at least 1, not {self.min_doc_chars}")
        if self.max_doc_chars < 0 or (self.max_doc_chars and self.max_doc_chars < self.min_doc_chars):
            raise ValidationFailed(f"max_doc_chars ({self.max_doc_chars}) must be 0 or at least "
                                   f"min_doc_chars ({self.min_doc_chars})")
        if not 0 < self.near_dup_threshold <= 1:
            raise ValidationFailed(f"near_dup_threshold must be in (0, 1], not {self.near_dup_threshold}")
        if self.source_uri and not self.source_uri.startswith("s3://"):
            raise ValidationFailed(f"source_uri must be an s3://bucket/key URI, not {self.source_uri!r}")
        return self

    def canonical(self) -> str:
        """Stable JSON of everything that shapes the content (not the name, not where the bytes came from)."""
        content = asdict(replace(self, name="", source_uri=""))
        del content["name"], content["source_uri"]
        if self.tokenizer != "bpe":
            content["vocab_size"] = 0
        if self.format != "text":
            content["document_mode"] = ""
        if self.tokenizer != "model":  # absent, as before they existed: older versions keep their address
            del content["tokenizer_model"], content["tokenizer_model_version"]
        if self.purpose == "training":  # absent, as before it existed
            del content["purpose"]
        if self.supervised:
            # pairs used to be built as plain text: the same corpus and options now build conversations with
            # loss masks, a different content, so they must not find a version built the old way.
            content["examples"] = "conversations"
        return json.dumps(content, sort_keys=True, separators=(",", ":"))

    @property
    def supervised(self) -> bool:
        return self.format in contracts.SUPERVISED_FORMATS

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DatasetOptions":
        values = dict(data)
        values["fractions"] = Fractions(**values.get("fractions", {}))
        return cls(**values)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3://bucket/key URI."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ValidationFailed(f"source_uri {uri!r} must look like s3://bucket/key")
    if any(segment in {".", ".."} for segment in key.split("/")):
        raise ValidationFailed(f"source_uri {uri!r}: '.' and '..' segments are not allowed in the key")
    return bucket, key


def _one_of(label: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValidationFailed(f"{label} must be one of {', '.join(allowed)}, not {value!r}")
