"""Parsing corpora: formats, document modes, and errors that name the line."""

import io
import json

import pytest

from services.common.errors import InvalidArgument, PayloadTooLarge, ValidationFailed
from services.dataset import ingest
from services.dataset.options import DatasetOptions


def parse(data: bytes, **options) -> list[ingest.Document]:
    return list(ingest.parse(io.BytesIO(data), DatasetOptions(name="d", **options)))


def test_blank_lines_separate_documents():
    docs = parse(b"\xef\xbb\xbfFirst line\nsame doc\n\n\n  \nSecond doc\r\n")
    assert [d.text for d in docs] == ["First line\nsame doc", "Second doc"]
    assert [d.line for d in docs] == [1, 6]
    assert docs[-1].end_offset == len(b"\xef\xbb\xbfFirst line\nsame doc\n\n\n  \nSecond doc\r\n")


def test_line_mode_makes_each_non_empty_line_a_document():
    assert [d.text for d in parse(b"a\n\nb\nc", document_mode="line")] == ["a", "b", "c"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines():
    data = b'{"text": "one"}\n\n{"text": "two", "other": 1}\n'
    assert [(d.text, d.line) for d in parse(data, format="jsonl")] == [("one", 1), ("two", 3)]
    assert [d.text for d in parse(b'{"body": "x"}\n', format="jsonl", text_field="body")] == ["x"]


def test_pairs_join_prompt_and_completion():
    data = json.dumps({"prompt": "Q: hi\nA:", "completion": " hello"}).encode()
    assert [d.text for d in parse(data, format="pairs")] == ["Q: hi\nA: hello"]


def test_invalid_utf8_names_line_and_byte_offset():
    with pytest.raises(InvalidArgument, match=r"line 2: invalid UTF-8 \(byte 0xff at byte offset 13 "):
        parse(b"fine one\nbad \xff here\n")


def test_malformed_jsonl_line_is_named():
    with pytest.raises(InvalidArgument, match=r"line 2: not valid JSON"):
        parse(b'{"text": "ok"}\n{"text": oops}\n', format="jsonl")
    with pytest.raises(InvalidArgument, match=r"line 1: expected a JSON object, got list"):
        parse(b'["text"]\n', format="jsonl")


def test_missing_or_non_string_field_is_a_validation_error():
    with pytest.raises(ValidationFailed, match=r"line 1: field 'text' must be a string, but it is missing"):
        parse(b'{"body": "x"}\n', format="jsonl")
    with pytest.raises(ValidationFailed, match=r"line 1: field 'completion' must be a string, but it is a int"):
        parse(b'{"prompt": "x", "completion": 3}\n', format="pairs")


def test_validate_refuses_an_empty_corpus():
    options = DatasetOptions(name="d")
    with pytest.raises(ValidationFailed, match="no documents"):
        ingest.validate(io.BytesIO(b"\n \n\t\n"), options)
    assert ingest.validate(io.BytesIO(b"a\n\nb\n"), options) == 2


def test_receive_spools_hashes_and_enforces_the_limit():
    spool = io.BytesIO()
    received = ingest.receive([b"abc", b"def"], spool, limit=6)
    assert spool.getvalue() == b"abcdef"
    assert received == ingest.Received(6, "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721")
    with pytest.raises(PayloadTooLarge, match="limit of 5 bytes"):
        ingest.receive([b"abc", b"def"], io.BytesIO(), limit=5)
