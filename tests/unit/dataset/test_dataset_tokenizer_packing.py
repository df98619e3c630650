"""Tokenizers (BPE and char, saved in Hugging Face format) and the packing round trip."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from services.dataset import packing
from services.dataset import tokenizer as tokenizers

TEXTS = ["Hello there, general Kenobi.", "You are a bold one.", "Kill him!\nBack away.", "I will deal with this."] * 5


@pytest.fixture(scope="module")
def bpe():
    return tokenizers.train_bpe(TEXTS, 300)


def test_bpe_vocabulary_and_special_tokens(bpe):
    info = tokenizers.info(bpe, "bpe")
    assert info.kind == "bpe" and 260 <= info.vocab_size <= 300
    assert (info.eos_token_id, info.pad_token_id) == (0, 1)
    assert bpe.decode(bpe.encode("Hello there, stranger ünïcode").ids) == "Hello there, stranger ünïcode"


def test_char_tokenizer_round_trips_and_maps_unknown_characters():
    char = tokenizers.build_char("".join(TEXTS))
    info = tokenizers.info(char, "char")
    assert info.vocab_size == 3 + len(set("".join(TEXTS)))
    ids = char.encode("Hello\nyou").ids
    assert len(ids) == 9 and char.decode(ids) == "Hello\nyou"
    assert char.encode("Hé").ids[1] == char.token_to_id(tokenizers.UNK)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_folder_loads_with_transformers(tmp_path, bpe, kind):
    tokenizer = bpe if kind == "bpe" else tokenizers.build_char("".join(TEXTS))
    files = tokenizers.save(tokenizer, kind, tmp_path)
    assert all(path.exists() for path in files)
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert loaded.eos_token == tokenizers.EOS and loaded.pad_token == tokenizers.PAD
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1
    assert loaded("You are a bold one.")["input_ids"] == tokenizer.encode("You are a bold one.").ids


def test_dtype_follows_the_vocabulary():
    assert packing.dtype_for(65536) == np.dtype("<u2")
    assert packing.dtype_for(65537) == np.dtype("<u4")


@pytest.mark.parametrize("shard_tokens", [7, 1000])
def test_packing_round_trip(tmp_path, bpe, shard_tokens):
    writer = packing.ShardWriter(tmp_path, np.dtype("<u2"), shard_tokens)
    total = packing.pack(bpe, TEXTS, eos_id=0, writer=writer, batch_chars=50)
    paths = writer.close()
    expected = [i for text in TEXTS for i in [*bpe.encode(text).ids, 0]]
    assert total == len(expected) == writer.tokens
    assert [p.name for p in paths][:2] == ["shard-00000.bin", "shard-00001.bin"][:len(paths)]
    assert all(p.stat().st_size == shard_tokens * 2 for p in paths[:-1])
    assert len(paths) == -(-len(expected) // shard_tokens)
    tokens = packing.read_tokens(paths, np.dtype("<u2"))
    assert tokens.tolist() == expected
    documents = [bpe.decode(part.tolist()) for part in np.split(tokens, np.flatnonzero(tokens == 0) + 1)[:-1]]
    assert documents == TEXTS


def test_uint32_shards_are_little_endian(tmp_path):
    writer = packing.ShardWriter(tmp_path, np.dtype("<u4"), 10)
    writer.write(np.array([70000, 1], dtype=np.int64))
    (path,) = writer.close()
    assert path.read_bytes() == (70000).to_bytes(4, "little") + (1).to_bytes(4, "little")


# Documents the joined encoding must not merge or split differently: EOS's text at the end (the document's own
# end: no second EOS), inside, cut short, alone, empty, a long one spanning several joined texts.
AWKWARD = ["Hello there", f"ends with it{tokenizers.EOS}", f"has {tokenizers.EOS} inside", "almost <|endoftext|",
           "<|endoftext", "", "  ", "ünïcode ✓ 漢字", "tab\tand\nnewline", " x" * 3000, tokenizers.EOS, "You are"]


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("batch_chars", [1, 40, 1 << 20])
def test_documents_joined_by_eos_encode_as_one_by_one(monkeypatch, bpe, kind, batch_chars):
    tokenizer = bpe if kind == "bpe" else tokenizers.build_char("".join(TEXTS))
    eos = tokenizer.token_to_id(tokenizers.EOS)
    one_by_one = []
    for text in AWKWARD + TEXTS:
        ids = tokenizer.encode(text).ids
        one_by_one += ids if ids[-1:] == [eos] else [*ids, eos]
    singly = []  # the batches encoded one document at a time
    encode_batch = packing._one_by_one
    monkeypatch.setattr(packing, "_one_by_one", lambda tokenizer, batch, *args: (
        singly.append(batch) or encode_batch(tokenizer, batch, *args)))
    got = np.concatenate(list(packing.encode(tokenizer, AWKWARD + TEXTS, eos, np.dtype("<u2"), batch_chars,
                                             separator=tokenizers.EOS)))
    assert got.tolist() == one_by_one
    # only the batches holding a document that ends with EOS's text went one by one
    assert singly == [batch for batch in packing._batches(AWKWARD + TEXTS, batch_chars)
                      if any(text.endswith(tokenizers.EOS) for text in batch)]
