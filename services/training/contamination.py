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

    @property
    def share(self) -> float:
        return self.contaminated / self.documents if self.documents else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "datasets": list(self.datasets), "share": self.share}


def documents(dataset: data.LocalDataset, splits: tuple[str, ...]) -> Iterator[str]:
    """The normalised text of every document of `splits`, decoded with the dataset's own tokenizer."""
    tokenizer = Tokenizer.from_file(str(dataset.tokenizer_dir / "tokenizer.json"))
    eos = dataset.info.eos_token_id
    for split in splits:
        if not dataset.has_split(split):
            continue
        stream = dataset.stream(split)
        if isinstance(stream, data.Examples):
            for index in range(len(stream)):
                ids, _ = stream.example(index, int(stream.lengths[index]))
                yield cleaning.normalise(tokenizer.decode(ids.tolist()))
            continue
        tokens = stream.read(0, stream.tokens)
        ends = np.flatnonzero(tokens == eos)
        start = 0
        for end in [*ends.tolist(), len(tokens)]:
            if end > start:
                yield cleaning.normalise(tokenizer.decode(tokens[start:end].tolist()))
            start = end + 1


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
    total = hits = 0
    for text in evaluated:
        if not text:
            continue
        total += 1
        if cleaning.leak_key(text) in keys or index.find(cleaning.signature(text)):
            hits += 1
    return Contamination(total, hits, tuple(training))
