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


def test_a_pair_is_the_conversation_user_prompt_assistant_completion():
    data = json.dumps({"prompt": "Q: hi", "completion": "hello"}).encode()
    [document] = parse(data, format="pairs")
    assert document.messages == (("user", "Q: hi"), ("assistant", "hello"))


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


def test_a_line_over_the_limit_is_refused_before_it_is_read_whole(monkeypatch):
    monkeypatch.setattr(ingest, "LINE_LIMIT", 64)
    assert [d.text for d in parse(b"a" * 63 + b"\n", document_mode="line")] == ["a" * 63]  # 63 + newline fit
    with pytest.raises(InvalidArgument, match=r"line 2: longer than the limit of 64 bytes per line"):
        parse(b"short\n" + b"b" * 200, document_mode="line")


def test_a_document_with_no_blank_line_in_sight_is_refused_naming_where_it_began(monkeypatch):
    monkeypatch.setattr(ingest, "DOCUMENT_LIMIT", 100)
    fine = b"\n\n".join([b"x" * 40 + b"\n" + b"y" * 40] * 3)
    assert len(parse(fine)) == 3
    with pytest.raises(InvalidArgument, match=r"line 5: the document starting at line 3 is over the limit of 100 "
                                              r"characters; .*document_mode=line"):
        parse(b"first\n\n" + b"z" * 40 + b"\n" + b"z" * 40 + b"\n" + b"z" * 40 + b"\n")
    assert len(parse(b"z" * 40 + b"\n" + b"z" * 40 + b"\n" + b"z" * 40 + b"\n", document_mode="line")) == 3
