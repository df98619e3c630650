"""Contamination: the share of evaluated documents that the model saw in training.

The model's training data is the train split of every dataset version in its lineage: the version's
own dataset, then its parent's (init_from, fine-tunes), up the chain; an imported version ends the
chain (its training data is unknown). Each evaluated document is compared with those documents the
way the dataset leakage check compares splits (services/dataset/splits.py): the same exact leak key
and the same MinHash LSH at the dataset's near-duplicate threshold. Documents are read back from the
shards: a plain split's documents end with the end-of-text token, a supervised split's are its examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from services.common import cleaning
from services.common.cleaning import DEFAULT_NEAR_DUP_THRESHOLD
from services.training import data


@dataclass(frozen=True)
class Contamination:
    documents: int  # evaluated documents
    contaminated: int  # of them, exact or near copies of a training document
    datasets: tuple[str, ...]  # "name@version" of the training data compared with
    # Ordinals (in `spans` order) of the contaminated documents: what the figures without them leave out.
    flagged: tuple[int, ...] = ()

    @property
    def share(self) -> float:
        return self.contaminated / self.documents if self.documents else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "datasets": list(self.datasets), "flagged": list(self.flagged), "share": self.share}


@dataclass(frozen=True)
class Span:
    """Where one document lies: tokens [start, end] of a plain split (its end-of-text token included, when
    it has one), or example `start` of a supervised split (end unused)."""

    split: str
    start: int
    end: int
    example: bool


def spans(dataset: data.LocalDataset, splits: tuple[str, ...]) -> Iterator[Span]:
    """Every document of `splits`, in order (the ordinals `Contamination.flagged` counts)."""
    eos = dataset.info.eos_token_id
    for split in splits:
        if not dataset.has_split(split):
            continue
        stream = dataset.stream(split)
        if isinstance(stream, data.Examples):
            for index in range(len(stream)):
                yield Span(split, index, index, True)
            continue
        ends = np.flatnonzero(stream.read(0, stream.tokens) == eos)
        start = 0
        for end in [*ends.tolist(), stream.tokens]:
            if end > start:
                yield Span(split, start, min(end, stream.tokens - 1), False)
            start = end + 1


def documents(dataset: data.LocalDataset, splits: tuple[str, ...]) -> Iterator[str]:
    """The normalised text of every document of `splits` (in `spans` order), decoded with the dataset's
    own tokenizer: a plain split's documents end with the end-of-text token, a supervised split's are its examples."""
    tokenizer = Tokenizer.from_file(str(dataset.tokenizer_dir / "tokenizer.json"))
    eos = dataset.info.eos_token_id
    streams: dict[str, Any] = {}
    for span in spans(dataset, splits):
        stream = streams.get(span.split) or streams.setdefault(span.split, dataset.stream(span.split))
        if span.example:
            ids, _ = stream.example(span.start, int(stream.lengths[span.start]))
            ids = ids.tolist()
        else:
            ids = [token for token in stream.read(span.start, span.end + 1 - span.start).tolist() if token != eos]
        yield cleaning.normalise(tokenizer.decode(ids))


def token_mask(dataset: data.LocalDataset, split: str, flagged: set[int], splits: tuple[str, ...]) -> np.ndarray | None:
    """For a plain split: True on the tokens of the flagged documents (None when it has none).
    For a supervised split: True at the flagged examples' indices."""
    stream = dataset.stream(split)
    size = len(stream) if isinstance(stream, data.Examples) else stream.tokens
    mask = np.zeros(size, dtype=bool)
    hit = False
    for ordinal, span in enumerate(spans(dataset, splits)):
        if span.split == split and ordinal in flagged:
            mask[span.start:span.end + 1] = True
            hit = True
    return mask if hit else None


def measure(evaluated: Iterator[str], training: dict[str, data.LocalDataset],
            threshold: float = DEFAULT_NEAR_DUP_THRESHOLD) -> Contamination:
    """Compare the evaluated documents with the train split of every dataset in `training` ("name@version")."""
    index, keys = cleaning.NearDuplicateIndex(threshold), set()
    for label, dataset in training.items():
        for number, text in enumerate(documents(dataset, ("train",))):
            if not text:
                continue
            keys.add(cleaning.leak_key(text))
            index.add((label, number), cleaning.signature(text))
    total = 0
    flagged = []
    for ordinal, text in enumerate(evaluated):
        if not text:
            continue
        total += 1
        if cleaning.leak_key(text) in keys or index.find(cleaning.signature(text)):
            flagged.append(ordinal)
    return Contamination(total, len(flagged), tuple(training), tuple(flagged))
