"""Split assignment (stable, seeded, proportional) and the leakage check."""

import random
from collections import Counter

from services.common import cleaning
from services.dataset import splits
from services.dataset.options import Fractions

FRACTIONS = Fractions(0.7, 0.1, 0.1, 0.1)


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(500)]
    return [" ".join(rng.choices(words, k=12)) for _ in range(n)]


def test_split_of_a_document_never_changes_as_the_corpus_grows():
    small = corpus(500, seed=1)
    grown = small + corpus(2000, seed=2)
    before = {doc: splits.assign(doc, 7, FRACTIONS) for doc in small}
    after = {doc: splits.assign(doc, 7, FRACTIONS) for doc in reversed(grown)}
    assert all(after[doc] == split for doc, split in before.items())


def test_fractions_are_respected_and_the_seed_matters():
    docs = corpus(10000, seed=3)
    counts = Counter(splits.assign(doc, 0, FRACTIONS) for doc in docs)
    assert abs(counts["train"] / 10000 - 0.7) < 0.02
    for name in ("validation", "test", "calibration"):
        assert abs(counts[name] / 10000 - 0.1) < 0.015
    reseeded = sum(splits.assign(doc, 0, FRACTIONS) != splits.assign(doc, 1, FRACTIONS) for doc in docs)
    assert reseeded > 3000


def test_a_split_with_no_share_gets_nothing():
    docs = corpus(2000, seed=4)
    assert {splits.assign(doc, 0, Fractions(0.9, 0.1, 0.0, 0.0)) for doc in docs} == {"train", "validation"}
    assert {splits.assign(doc, 0, Fractions(1.0, 0.0, 0.0, 0.0)) for doc in docs} == {"train"}


def index_of(docs: dict[int, str]) -> splits.SplitIndex:
    index = splits.SplitIndex(cleaning.NearDuplicateIndex(0.8))
    for doc_id, text in docs.items():
        index.near.add(doc_id, cleaning.signature(text))
    return index


def candidate(doc_id: int, text: str) -> splits.Candidate:
    return splits.Candidate(doc_id, cleaning.leak_key(text), cleaning.signature(text))


def test_leaks_are_removed_from_non_train_splits_only():
    long_text = " ".join(f"token{i}" for i in range(60))
    train = {1: "The Quick brown fox.", 2: long_text}
    indices = {"train": index_of(train)}
    indices["train"].leak_keys.update(cleaning.leak_key(text) for text in train.values())
    validation = {10: "the quick, brown FOX", 11: long_text + " extra", 12: "an unrelated validation line"}
    test = {20: "An unrelated validation line!", 21: "something new for test"}
    indices["validation"] = index_of(validation)
    indices["test"] = index_of(test)
    indices["calibration"] = index_of({})
    candidates = {"validation": [candidate(i, t) for i, t in validation.items()],
                  "test": [candidate(i, t) for i, t in test.items()]}
    removed = splits.find_leaks(candidates, indices)
    # exact (case/punctuation-insensitive) copy of train, near copy of train, exact copy of a kept validation doc
    assert removed == {10: "exact", 11: "near", 20: "exact"}
    # removed documents left their split's index; kept ones stay
    assert indices["validation"].near.find(cleaning.signature(long_text + " extra")) == []
    assert indices["validation"].near.find(cleaning.signature("an unrelated validation line")) == [12]
