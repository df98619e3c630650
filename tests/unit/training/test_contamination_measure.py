"""contamination.measure flags the evaluated documents an in-memory index of the training data would: exact
copies (same leak key) and near copies (MinHash LSH, verified at the threshold), across every dataset of the
lineage, counting ordinals past empty documents, with the partitions read whole or split. The reference is
the in-memory algorithm it replaced (`cleaning.NearDuplicateIndex` and a set of leak keys), not the code
under test."""

from __future__ import annotations

import random
from unittest import mock

import pytest

from services.common import cleaning, dedup
from services.training import contamination, data
from tests import tiny_dataset

THRESHOLD = cleaning.DEFAULT_NEAR_DUP_THRESHOLD


def reference(evaluated: list[str], trained: list[str]) -> tuple[int, list[int], set[int]]:
    """(documents, flagged ordinals, the flagged ones only a near copy explains) as the in-memory index finds."""
    index, keys = cleaning.NearDuplicateIndex(THRESHOLD), set()
    for number, text in enumerate(trained):
        keys.add(cleaning.leak_key(text))
        index.add(number, cleaning.signature(text))
    flagged, near_only = [], set()
    for ordinal, text in enumerate(evaluated):
        if not text:
            continue
        exact = cleaning.leak_key(text) in keys
        if exact or index.find(cleaning.signature(text)):
            flagged.append(ordinal)
            if not exact:
                near_only.add(ordinal)
    return sum(1 for text in evaluated if text), flagged, near_only


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> dict[str, data.LocalDataset]:
    """Three versions whose train splits overlap (each corpus starts with the one before's), the last with
    documents that normalise to nothing (control characters only) among its paragraphs."""
    text = tiny_dataset.SHAKESPEARE.read_text()
    paragraphs = text[:60_000].split("\n\n")
    blanks = "\n\n".join(paragraph if number % 7 else "\x07\x07" for number, paragraph in enumerate(paragraphs))
    corpora = {1: text[:40_000], 2: text[:60_000], 3: blanks}
    found = {}
    for version, corpus in corpora.items():
        root = tmp_path_factory.mktemp(f"lineage-v{version}")
        (root / "corpus.txt").write_text(corpus)
        with mock.patch.object(tiny_dataset, "SHAKESPEARE", root / "corpus.txt"):
            tiny_dataset.write_dataset(root / "version", chars=len(corpus), version=version)
        found[f"shakespeare@{version}"] = data.LocalDataset.open(root / "version")
    assert "" in contamination.documents(found["shakespeare@3"], ("train",))  # blank documents are read
    return found


@pytest.fixture(scope="module")
def evaluated(lineage) -> list[str]:
    """Copies, near copies (one word changed in a long document), fresh text and empty documents, shuffled."""
    rng = random.Random(7)
    trained = [text for dataset in lineage.values() for text in contamination.documents(dataset, ("train",)) if text]
    long = [text for text in trained if len(text.split()) >= 40]
    words = sorted({word for text in trained for word in text.split()})
    copies = rng.sample(trained, 12)
    near = []
    for text in rng.sample(long, 12):
        tokens = text.split(" ")
        tokens[len(tokens) // 2] = "zounds"
        near.append(cleaning.normalise(" ".join(tokens)))
    fresh = [cleaning.normalise(" ".join(rng.choice(words) for _ in range(30))) for _ in range(40)]
    documents = copies + near + fresh + [""] * 5
    rng.shuffle(documents)
    return documents


@pytest.mark.parametrize("part_bytes", [dedup.PART_BYTES, 2048], ids=["whole-partitions", "split-partitions"])
def test_measure_flags_what_an_in_memory_index_of_the_training_data_flags(lineage, evaluated, tmp_path,
                                                                         monkeypatch, part_bytes):
    monkeypatch.setattr(dedup, "PART_BYTES", part_bytes)  # 2 KiB: every partition is split, some twice
    trained = [text for dataset in lineage.values() for text in contamination.documents(dataset, ("train",)) if text]
    documents, flagged, near_only = reference(evaluated, trained)
    assert len(flagged) >= 20 and len(near_only) >= 5  # copies and near copies both found: not vacuous
    assert len(flagged) < documents - 30  # the fresh text is not

    found = contamination.measure(lambda: iter(evaluated), lineage, tmp_path / "work", THRESHOLD)

    assert (found.documents, list(found.flagged)) == (documents, flagged)
    assert found.contaminated == len(flagged) and found.datasets == tuple(lineage)
    assert not (tmp_path / "work").exists()  # its files go with it


def test_nothing_evaluated_or_nothing_trained_is_nothing_contaminated(lineage, tmp_path):
    assert contamination.measure(lambda: iter(["", ""]), lineage, tmp_path / "a").as_dict()["share"] == 0.0
    found = contamination.measure(lambda: iter(["to be or not to be"]), {}, tmp_path / "b")
    assert (found.documents, found.contaminated, found.flagged) == (1, 0, ())
