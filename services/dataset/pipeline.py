"""From a spooled corpus to a folder holding a version's tokenizer and packed shards.

One pass over the corpus parses, normalises, filters and deduplicates the documents, assigns each
to its split and writes it to that split's spool file; only hashes and MinHash indexes stay in
memory. Then the leakage check, the tokenizer (trained on the train split, or a registered model's
copied unchanged) and the packing of every split. `build` is synchronous and CPU-bound: the service runs
it in a worker thread.

Supervised formats (pairs, chat) go through the same steps with a conversation as the unit: its
messages are normalised one by one, and it is split, deduplicated and leak-checked as one document
(the contents of its messages), so no conversation is ever cut across splits. Packing renders each
with the chat template and writes its tokens, its loss mask and its place in the example index.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.common import cleaning
from services.common.contracts import SPLITS
from services.common.errors import ValidationFailed
from services.dataset import conversations, ingest, packing, splits
from services.dataset import tokenizer as tokenizers
from services.dataset.options import DatasetOptions

log = logging.getLogger(__name__)

# progress(phase, bytes_done, documents_done)
ProgressFn = Callable[[str, int, int], None]
PROGRESS_EVERY = 2000  # documents between progress reports


@dataclass
class SplitResult:
    """One split of a built version."""

    name: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[Path] = field(default_factory=list)
    near_duplicates: int = 0
    leaked_exact: int = 0
    leaked_near: int = 0
    loss_tokens: int = 0  # supervised: tokens the loss is computed on
    loss_masks: list[Path] = field(default_factory=list)  # supervised: one per shard
    examples: Path | None = None  # supervised: the example index

    def stats(self) -> dict:
        values = asdict(self)
        del values["shards"], values["name"], values["loss_masks"], values["examples"]
        return values


@dataclass
class CleaningCounts:
    documents_in: int = 0
    documents_out: int = 0
    too_short: int = 0
    too_long: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    leaked_exact: int = 0
    leaked_near: int = 0


@dataclass
class Built:
    """A version's files in a local folder, and what was counted on the way."""

    folder: Path
    splits: dict[str, SplitResult]
    cleaning: CleaningCounts
    tokenizer: tokenizers.TokenizerInfo
    dtype: np.dtype
    tokenizer_files: list[Path]


class _SplitSpool:
    """A split's documents (texts, or conversations as [role, content] lists), one JSON value per line until
    they are packed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "w", encoding="utf-8")
        self.doc_ids: list[int] = []

    def add(self, doc_id: int, document: str | ingest.Messages) -> None:
        self.handle.write(json.dumps(document, ensure_ascii=False))
        self.handle.write("\n")
        self.doc_ids.append(doc_id)

    def documents(self, removed: dict[int, str]) -> Iterator:
        with open(self.path, encoding="utf-8") as handle:
            for doc_id, line in zip(self.doc_ids, handle, strict=True):
                if doc_id not in removed:
                    yield json.loads(line)


def build(corpus: Path, options: DatasetOptions, work: Path, progress: ProgressFn | None = None,
          shard_tokens: int = packing.DEFAULT_SHARD_TOKENS, model_tokenizer: Path | None = None) -> Built:
    """Clean, split, tokenize and pack the corpus at `corpus` into `work` (an empty folder).

    `model_tokenizer`: for `tokenizer=model`, the folder holding the model version's tokenizer files.
    """
    report = progress or (lambda phase, done_bytes, done_docs: None)
    counts = CleaningCounts()
    results = {name: SplitResult(name) for name in SPLITS}
    spools = {name: _SplitSpool(work / f"{name}.docs.jsonl") for name in SPLITS}
    indices = {name: splits.SplitIndex(cleaning.NearDuplicateIndex(options.near_dup_threshold)) for name in SPLITS}
    candidates: dict[str, list[splits.Candidate]] = {name: [] for name in SPLITS[1:]}
    seen: set[bytes] = set()
    train_chars: set[str] = set()
    bytes_done = 0

    try:  # the spools are closed whatever happens (a build stopped mid-way raises from `report`)
        with open(corpus, "rb") as handle:
            for document in ingest.parse(handle, options):
                counts.documents_in += 1
                bytes_done = document.end_offset
                if counts.documents_in % PROGRESS_EVERY == 0:
                    report("clean", bytes_done, counts.documents_in)
                messages = None
                if document.messages is not None:
                    messages = conversations.normalised(document.messages)
                    text = ingest.conversation_text(messages)
                else:
                    text = cleaning.normalise(document.text)
                if len(text) < options.min_doc_chars:
                    counts.too_short += 1
                    continue
                if options.max_doc_chars and len(text) > options.max_doc_chars:
                    counts.too_long += 1
                    continue
                key = cleaning.exact_key(text)
                if key in seen:
                    counts.exact_duplicates += 1
                    continue
                seen.add(key)
                name = splits.assign(text, options.split_seed, options.fractions)
                minhash = cleaning.signature(text)
                index = indices[name]
                if index.near.find(minhash):
                    results[name].near_duplicates += 1
                    continue
                doc_id = counts.documents_in
                index.near.add(doc_id, minhash)
                spools[name].add(doc_id, text if messages is None else messages)
                if name == options.fractions.learning_split:
                    index.leak_keys.add(cleaning.leak_key(text))
                    train_chars.update(text)
                else:
                    candidates[name].append(splits.Candidate(doc_id, cleaning.leak_key(text), minhash))
    finally:
        for spool in spools.values():
            spool.handle.close()
    report("clean", bytes_done, counts.documents_in)
    if counts.documents_in == 0:
        raise ValidationFailed("the corpus holds no documents")

    removed = splits.find_leaks(candidates, indices)
    del seen, indices, candidates
    for name in SPLITS[1:]:
        ids = set(spools[name].doc_ids)
        results[name].leaked_exact = sum(1 for doc_id, kind in removed.items() if kind == "exact" and doc_id in ids)
        results[name].leaked_near = sum(1 for doc_id, kind in removed.items() if kind == "near" and doc_id in ids)
    for name in SPLITS:
        results[name].documents = len(spools[name].doc_ids) - results[name].leaked_exact - results[name].leaked_near
    counts.near_duplicates = sum(result.near_duplicates for result in results.values())
    counts.leaked_exact = sum(result.leaked_exact for result in results.values())
    counts.leaked_near = sum(result.leaked_near for result in results.values())
    counts.documents_out = sum(result.documents for result in results.values())
    learning = options.fractions.learning_split
    learning_label = "training" if learning == "train" else learning
    if results[learning].documents == 0:
        raise ValidationFailed(f"no {learning_label} documents left after cleaning {counts.documents_in} document(s) "
                               f"(too short {counts.too_short}, too long {counts.too_long}, "
                               f"duplicates {counts.exact_duplicates + counts.near_duplicates})")

    report("tokenizer", bytes_done, counts.documents_in)
    loaded, tokenizer_files = _tokenizer(options, spools[learning], removed, train_chars, work / "tokenizer",
                                         model_tokenizer)
    tokenizer, info = loaded.tokenizer, loaded.info
    renderer = conversations.Renderer(loaded.chat_template, loaded.special_tokens)
    dtype = packing.dtype_for(info.vocab_size)

    packed = 0
    for name in SPLITS:
        result = results[name]

        def documents(name: str = name, result: SplitResult = result) -> Iterator:
            nonlocal packed
            for document in spools[name].documents(removed):
                text = document if isinstance(document, str) else ingest.conversation_text(document)
                result.bytes += len(text.encode("utf-8"))
                packed += 1
                if packed % PROGRESS_EVERY == 0:
                    report("pack", bytes_done, packed)
                yield document

        if options.supervised:
            examples = packing.ExampleWriter(work / name, dtype, shard_tokens)
            try:
                for example in conversations.encode(tokenizer, renderer, documents()):
                    examples.write(example.ids, example.mask)
            finally:
                result.shards, result.loss_masks, result.examples = examples.close()
            result.tokens, result.loss_tokens = examples.tokens.tokens, examples.loss_tokens
        else:
            writer = packing.ShardWriter(work / name, dtype, shard_tokens)
            try:
                result.tokens = packing.pack(tokenizer, documents(), info.eos_token_id, writer,
                                             add_special_tokens=loaded.add_special_tokens)
            finally:
                result.shards = writer.close()
        spools[name].path.unlink()
    report("pack", bytes_done, packed)
    log.info("built dataset", extra={"documents_in": counts.documents_in, "documents_out": counts.documents_out,
                                     "tokens": sum(r.tokens for r in results.values())})
    return Built(work, results, counts, info, dtype, tokenizer_files)


def _tokenizer(options: DatasetOptions, train: _SplitSpool, removed: dict[int, str], train_chars: set[str],
               folder: Path, model_tokenizer: Path | None) -> tuple[tokenizers.Loaded, list[Path]]:
    """The version's tokenizer and its files in `folder`: a model's copied unchanged, or one built on train."""
    if options.tokenizer == "model":
        if model_tokenizer is None:
            raise ValueError("tokenizer=model needs the model's tokenizer folder")
        folder.mkdir(parents=True, exist_ok=True)
        files = [Path(shutil.copyfile(path, folder / path.name)) for path in sorted(model_tokenizer.iterdir())
                 if path.is_file()]
        return tokenizers.load_model_tokenizer(folder, options.tokenizer_model, options.tokenizer_model_version), files
    chat = options.supervised
    default = conversations.Renderer(None)

    def texts() -> Iterator[str]:  # what the tokenizer learns from: conversations as the template writes them
        for document in train.documents(removed):
            yield document if isinstance(document, str) else default.render(document)[0]

    if options.tokenizer == "bpe":
        tokenizer = tokenizers.train_bpe(texts(), options.vocab_size, chat=chat)
    else:
        if chat:  # the template's own characters (role names, line breaks) besides the contents'
            for text in texts():
                train_chars.update(text)
        tokenizer = tokenizers.build_char(train_chars, chat=chat)
    files = tokenizers.save(tokenizer, options.tokenizer, folder, chat=chat)
    return tokenizers.built(tokenizer, options.tokenizer, folder, chat), files
