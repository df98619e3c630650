"""Normalisation, exact-duplicate keys and MinHash near-duplicate detection."""

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
