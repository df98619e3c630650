"""Supervised datasets (format pairs and chat): parsing errors that name the line, rendering with the chat
template, the loss mask, splits and dedup by conversation, and a model's own tokenizer."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from services.common import contracts
from services.common.errors import ValidationFailed
from services.dataset import ingest, packing, pipeline, splits
from services.dataset.options import DatasetOptions, Fractions

from ...supervised_dataset import MODEL_CHAT_TEMPLATE, model_tokenizer_folder


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


def build(tmp_path: Path, lines: list[str], model_tokenizer: Path | None = None, **options) -> pipeline.Built:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    opts = DatasetOptions(name="d", fractions=Fractions(1.0, 0.0, 0.0, 0.0), **options).validated()
    return pipeline.build(corpus, opts, work, model_tokenizer=model_tokenizer)


def examples(built: pipeline.Built, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    result = built.splits[split]
    ids = packing.read_tokens(result.shards, built.dtype)
    masks = packing.read_tokens(result.loss_masks, np.dtype(contracts.LOSS_MASK_DTYPE))
    index = np.fromfile(result.examples, dtype=np.dtype(contracts.EXAMPLE_INDEX_DTYPE))
    assert index[-1] == len(ids) == len(masks) == result.tokens
    return [(ids[start:end], masks[start:end]) for start, end in zip(index[:-1], index[1:], strict=True)]


@pytest.mark.parametrize("line, error", [
    ('{"messages": []}', "line 2: field 'messages' must be a non-empty list"),
    ('{"conversation": []}', "line 2: field 'messages' must be a non-empty list .* but it is missing"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"line 2: messages\[0\]: role must be one of system"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"line 2: messages\[0\]: content must be a string"),
    ('{"messages": ["hi"]}', r"line 2: messages\[0\] must be an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the conversation has no assistant message"),
])
def test_a_bad_chat_line_is_named(line, error):
    data = (chat(("user", "hi"), ("assistant", "hello")) + "\n" + line + "\n").encode()
    with pytest.raises(ValidationFailed, match=error):
        ingest.validate(io.BytesIO(data), DatasetOptions(name="d", format="chat"))


def test_a_bad_pair_line_is_named():
    data = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n'
    with pytest.raises(ValidationFailed, match="line 2: field 'completion' must be a string, but it is missing"):
        ingest.validate(io.BytesIO(data), DatasetOptions(name="d", format="pairs"))


def test_a_chat_tokenizer_carries_the_markers_and_the_template_and_renders_as_transformers(tmp_path):
    conversation = [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4."),
                    ("user", "And 3+3?"), ("assistant", "6.")]
    built = build(tmp_path, [chat(*conversation), chat(("user", "hi"), ("assistant", "hello there"))],
                  format="chat", tokenizer="bpe", vocab_size=300)
    folder = built.folder / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == contracts.DEFAULT_CHAT_TEMPLATE
    fast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    for marker in contracts.CHAT_SPECIAL_TOKENS:
        assert len(fast.encode(marker, add_special_tokens=False)) == 1 and marker in fast.all_special_tokens
    ids, mask = next((i, m) for i, m in examples(built) if len(i) > 30)
    messages = [{"role": role, "content": content} for role, content in conversation]
    # The dataset's tokens are what apply_chat_template (and so chat serving) makes of the conversation.
    assert ids.tolist() == fast.apply_chat_template(messages, tokenize=True, return_dict=False)
    answers = fast.decode(ids[mask == 1]).split(contracts.END_OF_TURN)
    assert answers == ["4.", "6.", ""]  # each answer with its end-of-turn, nothing else
    assert built.splits["train"].loss_tokens == int(sum(m.sum() for _, m in examples(built)))


def test_a_pair_learns_its_completion_only(tmp_path):
    lines = [json.dumps({"prompt": f"Translate {word}", "completion": word.upper()}) for word in
             ("apple", "pear", "plum")]
    built = build(tmp_path, lines, format="pairs", tokenizer="char")
    fast = PreTrainedTokenizerFast.from_pretrained(str(built.folder / "tokenizer"))
    learned = sorted(fast.decode(ids[mask == 1]) for ids, mask in examples(built))
    assert learned == ["APPLE<|im_end|>", "PEAR<|im_end|>", "PLUM<|im_end|>"]
    assert all(fast.decode(ids).startswith("<|im_start|>user\nTranslate ") for ids, _ in examples(built))


def test_conversations_are_split_and_deduplicated_whole(tmp_path):
    same = chat(("user", "hello"), ("assistant", "hi there"))
    other_answer = chat(("user", "hello"), ("assistant", "good morning to you"))
    corpus = tmp_path / "corpus.jsonl"
    lines = [same, same, other_answer] + [chat(("user", f"question {i}"), ("assistant", f"number {i} is {i * 7}"))
                                           for i in range(60)]
    corpus.write_text("\n".join(lines) + "\n")
    (tmp_path / "work").mkdir()
    options = DatasetOptions(name="d", format="chat", tokenizer="char").validated()
    built = pipeline.build(corpus, options, tmp_path / "work")
    fast = PreTrainedTokenizerFast.from_pretrained(str(built.folder / "tokenizer"))
    assert built.cleaning.exact_duplicates == 1  # the repeated conversation, not the one sharing its prompt
    assert built.cleaning.documents_out == 62
    # Each conversation is one unit: its split is that of its whole text, and it is packed whole there.
    for line in lines[2:]:
        text = next(ingest.parse(io.BytesIO(line.encode()), options)).text
        split = splits.assign(text, options.split_seed, options.fractions)
        rendered = [fast.decode(ids) for ids, _ in examples(built, split)]
        assert sum(json.loads(line)["messages"][1]["content"] in r for r in rendered) == 1


def test_a_models_tokenizer_is_copied_unchanged_and_frames_documents_as_the_model_expects(tmp_path):
    model = model_tokenizer_folder(tmp_path / "model")
    fast = PreTrainedTokenizerFast.from_pretrained(str(model))
    (tmp_path / "text").mkdir()
    built = build(tmp_path / "text", ["The answer is a number.", "What is the sum?"], model_tokenizer=model,
                  format="text", document_mode="line", tokenizer="model", tokenizer_model="base",
                  tokenizer_model_version=3)
    copied = built.folder / "tokenizer"
    for path in model.iterdir():
        assert (copied / path.name).read_bytes() == path.read_bytes()
    assert built.tokenizer.sha256 == hashlib.sha256((model / "tokenizer.json").read_bytes()).hexdigest()
    assert (built.tokenizer.kind, built.tokenizer.model, built.tokenizer.model_version) == ("model", "base", 3)
    assert built.tokenizer.eos_token_id == fast.eos_token_id and built.tokenizer.vocab_size == len(fast)
    stream = packing.read_tokens(built.splits["train"].shards, built.dtype).tolist()
    expected = [fast.encode(text) + [fast.eos_token_id] for text in ("The answer is a number.", "What is the sum?")]
    assert stream in (expected[0] + expected[1], expected[1] + expected[0])  # each document: BOS … EOS
    assert expected[0][0] == fast.bos_token_id  # BOS from the model's post-processor

    (tmp_path / "chat").mkdir()
    built = build(tmp_path / "chat", [chat(("user", "What is the sum?"), ("assistant", "a number"))],
                  model_tokenizer=model, format="chat", tokenizer="model", tokenizer_model="base",
                  tokenizer_model_version=3)
    [(ids, mask)] = examples(built)
    messages = [{"role": "user", "content": "What is the sum?"}, {"role": "assistant", "content": "a number"}]
    assert fast.apply_chat_template(messages, tokenize=False) == "<s>[user] What is the sum?\na number</s>"
    assert ids.tolist() == fast.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert fast.decode(ids[mask == 1]) == "a number</s>"
    assert MODEL_CHAT_TEMPLATE in (built.folder / "tokenizer" / "chat_template.jinja").read_text()
