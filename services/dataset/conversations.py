"""Supervised examples: a conversation rendered with its tokenizer's chat template, tokenized, and masked.

The rendering is the one of `contracts.chat` (the tokenizer's `chat_template`, else
`contracts.DEFAULT_CHAT_TEMPLATE`), run by transformers' own Jinja renderer so a conversation reads
exactly as `apply_chat_template` (and chat serving) writes it. The loss mask says which tokens the
model learns to produce: an assistant message's text as the template writes it, from the end of the
generation prompt that opens its turn through the end-of-turn marker that closes it (the whitespace
the template puts after that marker is not part of the answer: generation stops at the marker).

Where each assistant turn starts and ends is found by rendering prefixes of the conversation: the
answer of message `i` is what `render(messages[:i + 1])` adds to `render(messages[:i],
add_generation_prompt=True)`. A template that does not render a conversation prefix by prefix (one
that rewrites earlier turns) cannot be masked this way and is refused with the reason.

The whole rendered text is tokenized at once (as serving tokenizes a prompt), and a token belongs to
the answer when its characters overlap an answer's span.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from services.common import contracts
from services.common.cleaning import normalise
from services.common.errors import ValidationFailed
from services.dataset.ingest import Messages


def normalised(messages: Messages) -> Messages:
    """Each message's content normalised as documents are (`cleaning.normalise`)."""
    return tuple((role, normalise(content)) for role, content in messages)


def as_dicts(messages: Messages) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


class Renderer:
    """Renders conversations with one chat template and the special tokens it may refer to."""

    def __init__(self, template: str | None, special_tokens: dict[str, str] | None = None) -> None:
        self.template = template or contracts.DEFAULT_CHAT_TEMPLATE
        self.variables = dict(special_tokens or {})  # bos_token, eos_token…: what templates may print

    def texts(self, chats: Sequence[Sequence[dict[str, str]]], add_generation_prompt: bool = False) -> list[str]:
        """Several conversations rendered in one call (the template is compiled once and cached)."""
        from transformers.utils.chat_template_utils import render_jinja_template  # heavy import, used here only

        if not chats:
            return []
        try:
            rendered, _ = render_jinja_template(conversations=[list(chat) for chat in chats],
                                                chat_template=self.template,
                                                add_generation_prompt=add_generation_prompt, **self.variables)
        except Exception as error:  # the template's own raise_exception, or a Jinja error
            raise ValidationFailed(f"the chat template cannot render this conversation: {error}") from None
        return rendered

    def text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.texts([messages], add_generation_prompt)[0]

    def render(self, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the [start, end) character spans of its answers."""
        chat = as_dicts(messages)
        answers = [index for index, (role, _) in enumerate(messages) if role == contracts.ANSWER_ROLE]
        closed = self.texts([chat[:index + 1] for index in answers])  # through each answer
        full = closed[-1] if answers and answers[-1] == len(chat) - 1 else self.text(chat)
        opened = self.texts([chat[:index] for index in answers if index], add_generation_prompt=True)
        if answers and answers[0] == 0:  # a conversation that starts with an answer
            opened.insert(0, self._opening())
        spans = []
        for before, through in zip(opened, closed, strict=True):
            if not (through.startswith(before) and full.startswith(through)):
                raise ValidationFailed("the chat template does not render a conversation prefix by prefix, so the "
                                       "assistant's tokens cannot be told from the rest")
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return full, spans

    def _opening(self) -> str:
        """The generation prompt of a conversation that starts with an answer (some templates refuse an
        empty conversation: then there is no text before the first answer but the generation prompt of one)."""
        try:
            return self.text([], add_generation_prompt=True)
        except ValidationFailed:
            return ""


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: its token ids and loss mask (1 on answer tokens), of equal length."""

    ids: np.ndarray
    mask: np.ndarray


def answer_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose characters overlap an answer span, else 0 (spans sorted, disjoint)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span < len(spans) and end > start and start < spans[span][1] and end > spans[span][0]:
            mask[index] = 1
    return mask


def encode(tokenizer: Tokenizer, renderer: Renderer, conversations: Iterable[Messages],
           batch: int = 256) -> Iterator[Example]:
    """Each conversation rendered, tokenized (no special tokens added: the template writes them) and masked."""
    pending: list[tuple[str, list[tuple[int, int]]]] = []

    def flush() -> Iterator[Example]:
        encodings = tokenizer.encode_batch([text for text, _ in pending], add_special_tokens=False)
        for encoding, (_, spans) in zip(encodings, pending, strict=True):
            yield Example(np.asarray(encoding.ids, dtype=np.int64), answer_mask(encoding.offsets, spans))
        pending.clear()

    for messages in conversations:
        pending.append(renderer.render(messages))
        if len(pending) == batch:
            yield from flush()
    if pending:
        yield from flush()
