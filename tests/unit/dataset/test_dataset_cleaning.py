"""Normalisation, exact-duplicate keys and MinHash near-duplicate detection."""

import tracemalloc

import numpy as np
from datasketch import MinHash

from services.common import cleaning

BASE = " ".join(f"word{i}" for i in range(60))  # 58 distinct word trigrams


def test_normalise_nfc_whitespace_and_control_characters():
    decomposed = "cafe\u0301"
    assert cleaning.normalise(f"\n\n  Hello,\t\t {decomposed}  \r\n\r\n\r\n\nnext\x07   line \u2028end\n") == \
        "  Hello, caf\u00e9\n\nnext line\nend"


def test_normalise_keeps_indentation():
    assert cleaning.normalise("def f():\n    return  1\n") == "def f():\n    return 1"


def test_exact_key_equal_only_for_equal_text():
    assert cleaning.exact_key("a b") == cleaning.exact_key("a b")
    assert cleaning.exact_key("a b") != cleaning.exact_key("A b")


def test_leak_key_ignores_case_punctuation_and_spacing():
    assert cleaning.leak_key("Hello, World!") == cleaning.leak_key("hello world")
    assert cleaning.leak_key("Hello, World!") != cleaning.leak_key("hello word")


def test_near_duplicates_found_and_distinct_documents_not():
    index = cleaning.NearDuplicateIndex(threshold=0.8)
    index.add("base", cleaning.signature(BASE))
    assert index.find(cleaning.signature(BASE.replace("word30", "WORD30!"))) == ["base"]
    assert index.find(cleaning.signature(BASE.replace("word30", "changed"))) == ["base"]  # Jaccard 55/61
    assert index.find(cleaning.signature("A completely different sentence about the sea and ships.")) == []
    index.remove("base")
    assert index.find(cleaning.signature(BASE)) == []


def test_short_documents_have_one_shingle():
    assert cleaning.shingles("Hi there") == {b"hi there"}
    assert len(cleaning.shingles("one two three four")) == 2


VARIED = [  # no words, fewer than 3, exactly 3, unicode, copies within the batch, repeated trigrams, long
    "", "   ", "!!! ???", "word", "two words", "exactly three words", "four words, not three",
    "Ça va? Дом 東京 naïve CAFÉ café", "tab\tand\nnewline separated words here", BASE,
    BASE.replace("word30", "changed"), BASE, "word", " ".join(f"w{i % 97}" for i in range(3000)),
    "The quick brown fox jumps over the lazy dog. " * 40,
]


def datasketch_values(text: str) -> np.ndarray:
    """The reference: datasketch's own MinHash (its default permutations and scheme) of the shingles."""
    minhash = MinHash(num_perm=cleaning.NUM_PERM)
    minhash.update_batch(list(cleaning.shingles(text)))
    return minhash.hashvalues


def test_signatures_equal_datasketch_minhash_bit_for_bit():
    values = cleaning.signatures(VARIED)
    assert values.dtype == np.uint32 and values.shape == (len(VARIED), cleaning.NUM_PERM)
    assert (values == np.array([datasketch_values(text) for text in VARIED])).all()
    assert (values == np.array([cleaning.signature(text).hashvalues for text in VARIED])).all()
    assert (cleaning.signatures([BASE]) == values[VARIED.index(BASE)]).all()  # a batch of one
    assert cleaning.signatures([]).shape == (0, cleaning.NUM_PERM)


def test_signatures_across_permuted_blocks(monkeypatch):
    """Documents split over blocks of 3 shingles (and one over hundreds of them) get the same values."""
    monkeypatch.setattr(cleaning, "_PERMUTED_CELLS", 3 * cleaning.NUM_PERM)
    assert (cleaning.signatures(VARIED) == np.array([datasketch_values(text) for text in VARIED])).all()


def test_signatures_memory_bounded_for_a_long_document():
    """The permuted values of a long document are not all held at once (~25 MB peak here, 114 MB if they were)."""
    text = " ".join(f"w{i}" for i in range(100_000))  # 99,998 shingles: 51 MB of values if permuted at once
    tracemalloc.start()
    try:
        cleaning.signatures([text])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 99_998 * cleaning.NUM_PERM * 4
