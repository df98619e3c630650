"""Build a version's tokenizer (byte-level BPE or character-level) and save it in Hugging Face format.

Both kinds carry the same special tokens: `<|endoftext|>` (EOS, after every document) and `<|pad|>`;
the character vocabulary also has `<|unk|>` for characters the train split never showed. The saved
folder loads with `transformers.PreTrainedTokenizerFast.from_pretrained(folder)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # bpe | char
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def as_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (special tokens included) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_batched(texts), trainer=trainer)
    return tokenizer


def build_char(characters: Iterable[str]) -> Tokenizer:
    """One token per character (sorted by code point, after the special tokens)."""
    vocab = {token: index for index, token in enumerate((EOS, PAD, UNK))}
    for character in sorted(set(characters)):
        vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS, PAD, UNK])
    return tokenizer


def info(tokenizer: Tokenizer, kind: str) -> TokenizerInfo:
    return TokenizerInfo(kind, tokenizer.get_vocab_size(with_added_tokens=True),
                         tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD))


def save(tokenizer: Tokenizer, kind: str, folder: Path) -> list[Path]:
    """Write the Hugging Face files into `folder`; return their paths."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only where it is needed

    folder.mkdir(parents=True, exist_ok=True)
    special = {"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}
    if kind == "char":
        special["unk_token"] = UNK
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.save_pretrained(str(folder))
    # transformers 5 folds the special tokens into tokenizer_config.json; older readers still look here.
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return [folder / name for name in FILES]


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
