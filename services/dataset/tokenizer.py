"""A version's tokenizer: built (byte-level BPE or character-level) and saved in Hugging Face format, or a
registered model's own tokenizer files, used as they are.

Both built kinds carry the same special tokens: `<|endoftext|>` (EOS, after every document) and `<|pad|>`;
the character vocabulary also has `<|unk|>` for characters the train split never showed. One built for
conversations (format pairs or chat) also has the ChatML markers `contracts.CHAT_SPECIAL_TOKENS` as
special tokens and `contracts.DEFAULT_CHAT_TEMPLATE` as the `chat_template` of its
`tokenizer_config.json` (docs/CONTRACTS.md, "Conversations"). The saved folder loads with
`transformers.AutoTokenizer.from_pretrained(folder)`, transformers 4 or 5.

A model's tokenizer (`tokenizer=model`) is never rewritten: its files are copied into the version
byte for byte, so its `tokenizer.json` keeps the SHA-256 that identifies it, and it is read the way
transformers reads it (BOS/EOS as its post-processor and `tokenizer_config.json` say).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.common import contracts
from services.common.errors import ValidationFailed

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
BUILT_KINDS = ("bpe", "char")  # the kinds this service builds: EOS is a special token of theirs, no normalizer
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_JSON = "tokenizer.json"
NO_MAX_LENGTH = int(1e30)  # the model_max_length transformers writes for a tokenizer with no limit of its own
# The files of a model's tokenizer copied into a dataset version (the ones a model version has, of these).
# Training copies a dataset's tokenizer files beside the model it saves: nothing here may be a model file.
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # bpe | char | model
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    sha256: str = ""  # of tokenizer.json: the tokenizer's identity
    model: str = ""  # kind model: the registered model it comes from
    model_version: int = 0

    def as_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "sha256": self.sha256, "model": self.model,
                "model_version": self.model_version}


@dataclass(frozen=True)
class Loaded:
    """A tokenizer ready to encode a dataset: the fast tokenizer, how to frame documents, its template."""

    tokenizer: Tokenizer
    info: TokenizerInfo
    add_special_tokens: bool  # let the post-processor add BOS/EOS as the model expects (model tokenizers)
    chat_template: str | None  # None: contracts.DEFAULT_CHAT_TEMPLATE
    special_tokens: dict[str, str]  # bos_token, eos_token…: what a chat template may print


def _special_tokens(chat: bool) -> list[str]:
    return [EOS, PAD, *(contracts.CHAT_SPECIAL_TOKENS if chat else ())]


def train_bpe(texts: Iterable[str], vocab_size: int, chat: bool = False) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (special tokens included) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_special_tokens(chat), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_batched(texts), trainer=trainer)
    return tokenizer


def build_char(characters: Iterable[str], chat: bool = False) -> Tokenizer:
    """One token per character (sorted by code point, after the special tokens)."""
    special = [*_special_tokens(chat), UNK]
    vocab = {token: index for index, token in enumerate(special)}
    for character in sorted(set(characters)):
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    # What transformers gives a tokenizer without one (adds nothing): the saved tokenizer.json is this tokenizer.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    tokenizer.add_special_tokens(special)
    return tokenizer


def info(tokenizer: Tokenizer, kind: str, folder: Path | None = None) -> TokenizerInfo:
    return TokenizerInfo(kind, tokenizer.get_vocab_size(with_added_tokens=True),
                         tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD),
                         sha256=file_sha256(folder / TOKENIZER_JSON) if folder else "")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(tokenizer: Tokenizer, kind: str, folder: Path, chat: bool = False) -> list[Path]:
    """Write the Hugging Face files into `folder`; return their paths. A chat tokenizer gets its template.

    The files are written directly, with the content transformers 5's `PreTrainedTokenizerFast.save_pretrained`
    writes but for two names that transformers 4 reads too (tests/unit/dataset checks both versions read them
    back as the tokenizer built): importing transformers costs a build about a second, more than writing them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    special: dict = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    if kind == "char":
        special["unk_token"] = UNK
    # Names both transformers 4 and 5 read: transformers 5 writes `TokenizersBackend` (4 has no such class) and
    # `extra_special_tokens` as a list (4 wants a mapping there and fails); 5 reads the class by its old name
    # and `additional_special_tokens` as its extra special tokens.
    config = {"backend": "tokenizers", **special, "model_max_length": NO_MAX_LENGTH,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat:
        # The template inside tokenizer_config.json (not transformers 5's separate chat_template.jinja): one file
        # every reader of the contract looks in.
        config["chat_template"] = contracts.DEFAULT_CHAT_TEMPLATE
        config["additional_special_tokens"] = list(contracts.CHAT_SPECIAL_TOKENS)
        special["additional_special_tokens"] = list(contracts.CHAT_SPECIAL_TOKENS)
    tokenizer.save(str(folder / TOKENIZER_JSON), pretty=True)
    _write_json(folder / "tokenizer_config.json", config)
    # transformers 5 folds the special tokens into tokenizer_config.json; older readers still look here.
    _write_json(folder / "special_tokens_map.json", special)
    return [folder / name for name in FILES]


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def built(tokenizer: Tokenizer, kind: str, folder: Path, chat: bool) -> Loaded:
    """A tokenizer this service built and saved in `folder`: documents framed as the packer frames them."""
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    return Loaded(tokenizer, info(tokenizer, kind, folder), add_special_tokens=False,
                  chat_template=contracts.DEFAULT_CHAT_TEMPLATE if chat else None, special_tokens=special)


def load_model_tokenizer(folder: Path, model: str, version: int) -> Loaded:
    """A registered model's tokenizer files in `folder`, read as transformers reads them (no remote code)."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only where it is needed

    where = f"model {model} version {version}"
    try:
        fast = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as error:  # a file transformers cannot read: the model's tokenizer is unusable
        raise ValidationFailed(f"the tokenizer of {where} does not load: {error}") from None
    eos = fast.eos_token_id
    if eos is None:
        raise ValidationFailed(f"the tokenizer of {where} has no eos_token, so documents cannot be ended")
    pad = fast.pad_token_id if fast.pad_token_id is not None else eos
    special = {name: str(getattr(fast, name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(fast, name, None) is not None}
    template = fast.chat_template if isinstance(fast.chat_template, str) else None
    tokenizer_info = TokenizerInfo("model", len(fast), eos, pad, sha256=file_sha256(folder / TOKENIZER_JSON),
                                   model=model, model_version=version)
    return Loaded(fast.backend_tokenizer, tokenizer_info, add_special_tokens=True, chat_template=template,
                  special_tokens=special)


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def to_json(loaded: Loaded) -> str:
    """All a worker needs to encode as `loaded` does (`from_json`): the tokenizer itself, not its saved files,
    so what it encodes is exactly what this process would."""
    return json.dumps({"tokenizer": loaded.tokenizer.to_str(), "info": loaded.info.as_dict(),
                       "add_special_tokens": loaded.add_special_tokens, "chat_template": loaded.chat_template,
                       "special_tokens": loaded.special_tokens})


def from_json(text: str) -> Loaded:
    values = json.loads(text)
    return Loaded(Tokenizer.from_str(values["tokenizer"]), TokenizerInfo(**values["info"]),
                  values["add_special_tokens"], values["chat_template"], values["special_tokens"])
