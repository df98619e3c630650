"""Receive a corpus into a spool file and parse it into documents, one line at a time.

Nothing here holds a whole corpus in memory: `receive` streams chunks to a file while hashing and
counting them, and `parse` reads that file line by line. Errors name the line (and, for bad UTF-8,
the byte offset) so a user can find the problem in a file of millions of lines.

- `text`: documents separated by blank lines (`blank-line`) or one per non-empty line (`line`).
- `jsonl`: one JSON object per line, the document in `text_field`; blank lines are skipped.
- `pairs`: one JSON object per line with `prompt_field` and `completion_field` strings: the conversation
  [user: prompt, assistant: completion] (`contracts.pair_messages`).
- `chat`: one JSON object per line, `{"messages": [{"role", "content"}…]}`, roles system, user and
  assistant, at least one assistant message (the loss is computed on the assistant's tokens).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from services.common import contracts
from services.common.errors import InvalidArgument, PayloadTooLarge, ValidationFailed
from services.dataset.options import DatasetOptions

BOM = b"\xef\xbb\xbf"
# Bounds that keep parsing in bounded memory whatever the corpus: a line is read whole, and a blank-line
# document is gathered whole, so a file with no line breaks (or no blank lines) would otherwise become
# one string the size of the corpus.
LINE_LIMIT = 16 * 1024 * 1024  # bytes in one line
DOCUMENT_LIMIT = 64 * 1024 * 1024  # characters in one document
MESSAGES_FIELD = "messages"  # format=chat: the field holding the conversation

Messages = tuple[tuple[str, str], ...]  # a conversation: (role, content) per message, in order


@dataclass(frozen=True)
class Received:
    """What `receive` wrote: its size and SHA-256."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Document:
    """One document as parsed, before cleaning."""

    text: str
    line: int  # 1-based line where the document starts
    end_offset: int  # byte offset just past the document's last line (for progress)
    messages: Messages | None = None  # supervised formats: the conversation (`text` is then its contents)


def receive(chunks: Iterable[bytes], spool: BinaryIO, limit: int) -> Received:
    """Write `chunks` to `spool`, refusing more than `limit` bytes in all."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"corpus exceeds the upload limit of {limit} bytes")
        digest.update(chunk)
        spool.write(chunk)
    spool.flush()
    return Received(size, digest.hexdigest())


def _decoded_lines(handle: BinaryIO, at_start: bool = True) -> Iterator[tuple[int, str, int]]:
    """(line number, text without the line break, offset past the line) for each line of `handle`.

    A byte-order mark is dropped only where the corpus starts (`at_start`): a range of it read on its own
    (shards.py) keeps one that begins its first line, as the whole corpus's reading would."""
    offset = 0
    for number, raw in enumerate(iter(lambda: handle.readline(LINE_LIMIT + 1), b""), start=1):
        if len(raw) > LINE_LIMIT:
            raise InvalidArgument(f"line {number}: longer than the limit of {LINE_LIMIT} bytes per line "
                                  "(is the file text with line breaks?)")
        start = offset
        offset += len(raw)
        if number == 1 and at_start and raw.startswith(BOM):
            raw = raw[len(BOM):]
            start += len(BOM)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = raw[error.start:error.start + 1].hex()
            raise InvalidArgument(f"line {number}: invalid UTF-8 (byte 0x{bad} at byte offset "
                                  f"{start + error.start} of the corpus)") from None
        yield number, text.rstrip("\r\n"), offset


def _text_documents(lines: Iterator[tuple[int, str, int]], mode: str) -> Iterator[Document]:
    if mode == "line":
        for number, text, offset in lines:
            if text.strip():
                yield Document(text, number, offset)
        return
    block: list[str] = []
    first = end = size = 0
    for number, text, offset in lines:
        if text.strip():
            if not block:
                first, size = number, 0
            block.append(text)
            size += len(text)
            end = offset
            if size > DOCUMENT_LIMIT:
                raise InvalidArgument(f"line {number}: the document starting at line {first} is over the limit "
                                      f"of {DOCUMENT_LIMIT} characters; separate documents with blank lines, or "
                                      "read one document per line (document_mode=line)")
        elif block:
            yield Document("\n".join(block), first, end)
            block = []
    if block:
        yield Document("\n".join(block), first, end)


def _json_objects(lines: Iterator[tuple[int, str, int]]) -> Iterator[tuple[int, dict, int]]:
    for number, text, offset in lines:
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"line {number}: not valid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"line {number}: expected a JSON object, got {type(value).__name__}")
        yield number, value, offset


def _field(record: dict, name: str, number: int) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise ValidationFailed(f"line {number}: field {name!r} must be a string, but it is {found}")
    return value


def _messages(record: dict, number: int) -> Messages:
    """The conversation of a `format=chat` line, every rule checked (the error names the line and message)."""
    messages = record.get(MESSAGES_FIELD)
    if not isinstance(messages, list) or not messages:
        found = "missing" if messages is None else f"a {type(messages).__name__}" if not isinstance(messages, list) \
            else "empty"
        raise ValidationFailed(f"line {number}: field {MESSAGES_FIELD!r} must be a non-empty list of "
                               f"{{\"role\", \"content\"}} objects, but it is {found}")
    conversation = []
    for index, message in enumerate(messages):
        where = f"line {number}: {MESSAGES_FIELD}[{index}]"
        if not isinstance(message, dict):
            raise ValidationFailed(f"{where} must be an object with \"role\" and \"content\"")
        role, content = message.get("role"), message.get("content")
        if role not in contracts.ROLES:
            raise ValidationFailed(f"{where}: role must be one of {', '.join(contracts.ROLES)}, not {role!r}")
        if not isinstance(content, str):
            found = "missing" if content is None else f"a {type(content).__name__}"
            raise ValidationFailed(f"{where}: content must be a string, but it is {found}")
        conversation.append((role, content))
    if not any(role == contracts.ANSWER_ROLE for role, _ in conversation):
        raise ValidationFailed(f"line {number}: the conversation has no {contracts.ANSWER_ROLE} message, so "
                               "nothing in it would be learned")
    return tuple(conversation)


def conversation_text(messages: Messages) -> str:
    """The contents of a conversation, one message after the other: what cleaning, splits and dedup read."""
    return "\n\n".join(content for _, content in messages)


def _conversation(messages: Messages, number: int, offset: int) -> Document:
    return Document(conversation_text(messages), number, offset, messages)


def parse(handle: BinaryIO, options: DatasetOptions, at_start: bool = True) -> Iterator[Document]:
    """The documents of the corpus in `handle` (opened in binary mode), in order; `at_start`: whether `handle`
    begins where the corpus begins (see `_decoded_lines`)."""
    lines = _decoded_lines(handle, at_start)
    if options.format == "text":
        yield from _text_documents(lines, options.document_mode)
    elif options.format == "jsonl":
        for number, record, offset in _json_objects(lines):
            yield Document(_field(record, options.text_field, number), number, offset)
    elif options.format == "pairs":
        for number, record, offset in _json_objects(lines):
            prompt = _field(record, options.prompt_field, number)
            completion = _field(record, options.completion_field, number)
            pair = contracts.pair_messages(prompt, completion)
            yield _conversation(tuple((m["role"], m["content"]) for m in pair), number, offset)
    else:
        for number, record, offset in _json_objects(lines):
            yield _conversation(_messages(record, number), number, offset)


def validate(handle: BinaryIO, options: DatasetOptions, check: Callable[[Document], None] | None = None) -> int:
    """Parse the whole corpus once, raising on the first bad line; return the number of documents.

    `check` is run on every document too (a model's chat template must render each conversation); what it
    refuses is reported with the document's line.
    """
    count = 0
    for document in parse(handle, options):
        count += 1
        if check is not None:
            try:
                check(document)
            except ValidationFailed as error:
                raise ValidationFailed(f"line {document.line}: {error.message}") from None
    if count == 0:
        raise ValidationFailed("the corpus holds no documents")
    return count
