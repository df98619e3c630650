"""Tokenizers (BPE and char, saved in Hugging Face format) and the packing round trip."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from services.common import contracts
from services.dataset import packing
from services.dataset import tokenizer as tokenizers

ROOT = Path(__file__).resolve().parents[3]
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


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_folder_loads_with_transformers_as_the_tokenizer_built(tmp_path, kind, chat):
    tokenizer = tokenizers.train_bpe(TEXTS, 300, chat=chat) if kind == "bpe" else \
        tokenizers.build_char("".join(TEXTS), chat=chat)
    files = tokenizers.save(tokenizer, kind, tmp_path, chat=chat)
    assert all(path.exists() for path in files)
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tokenizers.EOS, tokenizers.EOS, tokenizers.PAD)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (0, 1)
    assert loaded.unk_token == (tokenizers.UNK if kind == "char" else None)
    text = "You are a bold one.\nHé, ünïcode!"
    ids = tokenizer.encode(text).ids
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)
    assert len(loaded) == tokenizer.get_vocab_size(with_added_tokens=True)
    special = [tokenizers.EOS, tokenizers.PAD, *(contracts.CHAT_SPECIAL_TOKENS if chat else ())]
    assert {token: loaded.convert_tokens_to_ids(token) for token in special} == \
        {token: tokenizer.token_to_id(token) for token in special}
    assert set(special) <= set(loaded.all_special_tokens)
    if chat:
        messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi."}]
        rendered = loaded.apply_chat_template(messages, tokenize=False)
        assert rendered == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nGeneral Kenobi.<|im_end|>\n"
        assert loaded.apply_chat_template(messages, tokenize=True, return_dict=False) == \
            tokenizer.encode(rendered).ids
    else:
        assert loaded.chat_template is None


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_saved_files_are_what_transformers_5_writes_but_for_two_names_4_reads(tmp_path, kind, chat):
    tokenizer = tokenizers.train_bpe(TEXTS, 300, chat=chat) if kind == "bpe" else \
        tokenizers.build_char("".join(TEXTS), chat=chat)
    tokenizers.save(tokenizer, kind, tmp_path / "ours", chat=chat)
    special = {"bos_token": tokenizers.EOS, "eos_token": tokenizers.EOS, "pad_token": tokenizers.PAD}
    if kind == "char":
        special["unk_token"] = tokenizers.UNK
    extra = {"additional_special_tokens": list(contracts.CHAT_SPECIAL_TOKENS)} if chat else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special, **extra)
    if chat:
        fast.chat_template = contracts.DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(str(tmp_path / "transformers"), save_jinja_files=False)
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == \
        (tmp_path / "transformers" / "tokenizer.json").read_bytes()
    ours, theirs = (json.loads((tmp_path / side / "tokenizer_config.json").read_text())
                    for side in ("ours", "transformers"))
    assert (ours.pop("tokenizer_class"), theirs.pop("tokenizer_class")) == \
        ("PreTrainedTokenizerFast", "TokenizersBackend")
    if chat:
        assert ours.pop("additional_special_tokens") == theirs.pop("extra_special_tokens") == \
            list(contracts.CHAT_SPECIAL_TOKENS)
    assert ours == theirs  # special_tokens_map.json: transformers 5 writes none


# What each transformers reads from the folders given after the text and the conversation (JSON on stdout).
_READ_BACK = """
import json, sys
import transformers
from transformers import AutoTokenizer
text, messages = sys.argv[1], json.loads(sys.argv[2])
read = {"version": transformers.__version__}
for folder in sys.argv[3:]:
    loaded = AutoTokenizer.from_pretrained(folder)
    ids = loaded(text)["input_ids"]
    read[folder] = {"special": [loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token],
                    "all_special": loaded.all_special_tokens, "ids": ids, "decoded": loaded.decode(ids),
                    "size": len(loaded),
                    "chat": loaded.apply_chat_template(messages, tokenize=False) if loaded.chat_template else None}
print(json.dumps(read))
"""
TRANSFORMERS_4 = Path(sys.prefix) / "transformers4"  # `make install` puts transformers 4 there (pip --target)


@pytest.mark.parametrize("major", [4, 5])
def test_transformers_4_and_5_read_the_saved_folders_as_the_tokenizers_built(tmp_path, major):
    built = {}
    for kind, chat in itertools.product(("bpe", "char"), (False, True)):
        tokenizer = tokenizers.train_bpe(TEXTS, 300, chat=chat) if kind == "bpe" else \
            tokenizers.build_char("".join(TEXTS), chat=chat)
        folder = tmp_path / f"{kind}-{'chat' if chat else 'plain'}"
        tokenizers.save(tokenizer, kind, folder, chat=chat)
        built[str(folder)] = (tokenizer, kind, chat)
    environment = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    if major == 4:
        assert (TRANSFORMERS_4 / "transformers").is_dir(), f"no transformers 4 in {TRANSFORMERS_4}: make install"
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRANSFORMERS_4), os.environ.get("PYTHONPATH")]))
    text = "You are a bold one.\nHé, ünïcode! <|im_start|>assistant"
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi."}]
    result = subprocess.run([sys.executable, "-c", _READ_BACK, text, json.dumps(messages), *built],
                            env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout)
    assert read.pop("version").split(".")[0] == str(major)
    for folder, (tokenizer, kind, chat) in built.items():
        ids = tokenizer.encode(text).ids
        chat_tokens = list(contracts.CHAT_SPECIAL_TOKENS) if chat else []
        unk = [tokenizers.UNK] if kind == "char" else []
        assert read[folder] == {
            "special": [tokenizers.EOS, tokenizers.EOS, tokenizers.PAD, tokenizers.UNK if kind == "char" else None],
            "all_special": [tokenizers.EOS, *unk, tokenizers.PAD, *chat_tokens],
            "ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False),
            "size": tokenizer.get_vocab_size(with_added_tokens=True),
            "chat": "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nGeneral Kenobi.<|im_end|>\n"
            if chat else None}, folder


def test_saving_does_not_import_transformers(tmp_path):
    script = f"""
import sys
from pathlib import Path
from services.dataset import tokenizer as tokenizers
texts = {TEXTS!r}
tokenizers.save(tokenizers.train_bpe(texts, 300, chat=True), "bpe", Path({str(tmp_path / "bpe")!r}), chat=True)
tokenizers.save(tokenizers.build_char("".join(texts)), "char", Path({str(tmp_path / "char")!r}))
assert "transformers" not in sys.modules, "transformers was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    assert (tmp_path / "bpe" / "tokenizer_config.json").exists() and (tmp_path / "char" / "tokenizer.json").exists()


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
