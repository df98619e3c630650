"""The whole local build: counts, splits, tokenizer files and shards that decode back to the documents."""

import json
from pathlib import Path

import numpy as np
import pytest

from services.common.contracts import MAX_VOCAB_SIZE
from services.common.errors import ValidationFailed
from services.dataset import packing, pipeline
from services.dataset import tokenizer as tokenizers
from services.dataset.options import DatasetOptions, Fractions

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"


def build(tmp_path: Path, documents: list[str], **options) -> pipeline.Built:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    work = tmp_path / "work"
    work.mkdir()
    return pipeline.build(corpus, DatasetOptions(name="t", format="jsonl", **options).validated(), work,
                          shard_tokens=500)


def decoded_split(built: pipeline.Built, name: str) -> list[str]:
    tokenizer = tokenizers.Tokenizer.from_file(str(built.folder / "tokenizer" / "tokenizer.json"))
    tokens = packing.read_tokens(built.splits[name].shards, built.dtype)
    eos = built.tokenizer.eos_token_id
    return [tokenizer.decode(part.tolist()) for part in np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]]


def unique_documents(n: int) -> list[str]:
    return [f"Document number {i} talks about topic {i * 7919 % 1009} and item {i * 104729 % 997}." for i in range(n)]


def test_counts_and_round_trip_for_a_char_dataset(tmp_path):
    docs = unique_documents(300)
    near = docs[5].replace("talks", "talked")  # same shingles after "about": a near copy of document 5
    corpus = [*docs, docs[3], docs[4].replace(" ", " \t ") + "  \n", "x", "y" * 500, near]
    built = build(tmp_path, corpus, tokenizer="char", min_doc_chars=2, max_doc_chars=200,
                  fractions=Fractions(0.7, 0.1, 0.1, 0.1))
    counts = built.cleaning
    assert (counts.documents_in, counts.too_short, counts.too_long) == (305, 1, 1)
    assert counts.exact_duplicates == 2  # docs[3] twice, docs[4] after whitespace normalisation
    assert counts.documents_out == sum(s.documents for s in built.splits.values())
    assert counts.documents_out == 300 + 1 - counts.near_duplicates - counts.leaked_exact - counts.leaked_near
    recovered = [doc for name in ("train", "validation", "test", "calibration") for doc in decoded_split(built, name)]
    assert len(recovered) == counts.documents_out
    assert set(recovered) <= set(docs) | {near}
    for result in built.splits.values():
        assert result.tokens == sum(packing.read_tokens(result.shards, built.dtype).shape)
        assert result.bytes == sum(len(d.encode()) for d in decoded_split(built, result.name))
    assert built.tokenizer.kind == "char" and built.dtype == np.dtype("<u2")
    assert sorted(p.name for p in (built.folder / "tokenizer").iterdir()) == sorted(tokenizers.FILES)


def test_near_duplicate_across_splits_is_removed_from_the_evaluation_split(tmp_path):
    base = " ".join(f"w{i}" for i in range(80))
    variants = [base.replace(f"w{i}", f"v{i}") for i in range(20, 60)]  # 40 near copies of one text
    built = build(tmp_path, [base, *variants, *unique_documents(50)], tokenizer="char",
                  fractions=Fractions(0.5, 0.5, 0.0, 0.0))
    train_copies = [d for d in decoded_split(built, "train") if d.startswith("w0")]
    validation_copies = [d for d in decoded_split(built, "validation") if d.startswith("w0")]
    # of 41 near copies one survives: near duplicates inside a split, leaks out of validation
    assert (len(train_copies), len(validation_copies)) == (1, 0)
    assert built.cleaning.near_duplicates + built.cleaning.leaked_near == 40
    assert built.splits["validation"].leaked_near == built.cleaning.leaked_near
    assert built.cleaning.leaked_near > 0  # both splits drew copies, and train wins


def test_documents_keep_their_split_when_the_corpus_grows(tmp_path):
    docs = unique_documents(400)
    small = build(tmp_path / "a", docs[:200], tokenizer="char")
    grown = build(tmp_path / "b", docs, tokenizer="char")
    for name in ("train", "validation", "test", "calibration"):
        assert set(decoded_split(small, name)) <= set(decoded_split(grown, name))


def test_bpe_dataset_of_shakespeare(tmp_path):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_bytes(SHAKESPEARE.read_bytes()[:200_000])
    events = []
    work = tmp_path / "work"
    work.mkdir()
    built = pipeline.build(corpus, DatasetOptions(name="s", vocab_size=512).validated(), work,
                           progress=lambda *event: events.append(event))
    assert built.tokenizer.vocab_size == 512
    assert built.splits["train"].documents > 1000 and built.splits["validation"].documents > 30
    assert events[-1][0] == "pack" and events[-1][2] == built.cleaning.documents_out
    clean_bytes = [done for phase, done, _ in events if phase == "clean"]
    assert clean_bytes == sorted(clean_bytes) and 199_000 < clean_bytes[-1] <= 200_000
    assert [e[0] for e in events].index("tokenizer") < [e[0] for e in events].index("pack")


def test_everything_filtered_out_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationFailed, match="no training documents left"):
        build(tmp_path, ["a", "b"], tokenizer="char", min_doc_chars=5)


def test_an_evaluation_dataset_puts_every_document_in_test(tmp_path):
    docs = unique_documents(120)
    built = build(tmp_path, docs, tokenizer="char", purpose="evaluation")
    assert {name: split.documents for name, split in built.splits.items()} == \
        {"train": 0, "validation": 0, "test": 120, "calibration": 0}
    assert sorted(decoded_split(built, "test")) == sorted(docs)


def test_an_evaluation_dataset_refuses_fractions(tmp_path):
    with pytest.raises(ValidationFailed, match="fractions"):
        DatasetOptions(name="t", purpose="evaluation", fractions=Fractions(0.5, 0.2, 0.2, 0.1)).validated()
    with pytest.raises(ValidationFailed, match="purpose"):
        DatasetOptions(name="t", purpose="tuning").validated()


def test_the_tokenizer_sample_grows_with_the_vocabulary_past_a_floor():
    assert pipeline.tokenizer_sample_bytes(256) == pipeline.tokenizer_sample_bytes(4096) == 8 << 20
    assert pipeline.tokenizer_sample_bytes(16384) == 32 << 20
    assert pipeline.tokenizer_sample_bytes(MAX_VOCAB_SIZE) == 128 << 20


def test_bpe_learns_from_a_seeded_sample_of_a_train_split_past_the_bound(tmp_path, monkeypatch):
    docs = unique_documents(2000)
    whole = build(tmp_path / "whole", docs, vocab_size=300)
    assert whole.cleaning.documents_out == 2000
    monkeypatch.setattr(pipeline, "TOKENIZER_SAMPLE_FLOOR", 1000)
    monkeypatch.setattr(pipeline, "TOKENIZER_SAMPLE_PER_TOKEN", 64)  # 300 tokens: ~a fifth of the train split
    learned: list[list[str]] = []
    train_bpe = tokenizers.train_bpe
    monkeypatch.setattr(tokenizers, "train_bpe", lambda texts, *a, **k: train_bpe(learned.append(list(texts)) or
                                                                                  learned[-1], *a, **k))
    first = build(tmp_path / "first", docs, vocab_size=300)
    second = build(tmp_path / "second", docs, vocab_size=300)
    with monkeypatch.context() as patch:  # each document elsewhere in the spool, in other blocks
        patch.setattr(pipeline, "SPOOL_BLOCK_BYTES", 4096)
        shuffled = build(tmp_path / "shuffled", docs[::-1], vocab_size=300)
    other_seed = build(tmp_path / "other-seed", docs, vocab_size=300, split_seed=1)
    build(tmp_path / "larger", docs, vocab_size=600)  # twice the vocabulary, twice the sample
    sample = learned[0]
    train = decoded_split(first, "train")
    assert set(sample) < set(train) and 0.15 < len(sample) / len(train) < 0.3  # a share of train, no other split
    assert learned[1] == sample  # seeded: the same corpus and options learn from the same documents
    assert sorted(learned[2]) == sorted(sample)  # whatever the corpus's order
    in_both = set(sample) & set(decoded_split(other_seed, "train"))
    assert len(in_both & set(learned[3])) < 0.5 * len(in_both)  # another seed: of the same documents, another sample
    assert set(learned[4]) < set(train) and 1.7 < len(learned[4]) / len(sample) < 2.3
    for built in (second, shuffled):
        assert (first.folder / "tokenizer" / "tokenizer.json").read_bytes() == \
            (built.folder / "tokenizer" / "tokenizer.json").read_bytes()
    assert decoded_split(first, "train") == decoded_split(whole, "train")  # every train document is still packed


def test_a_spool_reads_back_its_kept_documents_whatever_its_blocks(tmp_path, monkeypatch):
    documents = ["plain", "tab\there", "new\nline", "ünïcode ✓ 漢字", 'quote " and \\ backslash', "",
                 [["user", "hi\tthere"], ["assistant", "yo\n"]], "x" * 300, "last"]
    records = [0, 3, 9, 10, 99, 100, 1234, 5000, 65537]
    status = np.zeros(70000, dtype=np.uint8)
    status[[3, 100, 5000]] = 1  # not kept (an exact duplicate's code)
    spool = pipeline._SplitSpool(tmp_path / "train.docs.jsonl")
    for record, document in zip(records, documents, strict=True):
        spool.add(record, document)
    spool.handle.close()
    expected = [document for record, document in zip(records, documents, strict=True) if status[record] == 0]
    expected_bytes = sum(len(line.partition(b"\t")[2]) for line in spool.path.read_bytes().splitlines(keepends=True)
                         if status[int(line.partition(b"\t")[0])] == 0)
    for block_bytes in (1, 7, 64, 1 << 20):  # lines cut across blocks, and all in one
        monkeypatch.setattr(pipeline, "SPOOL_BLOCK_BYTES", block_bytes)
        assert list(spool.documents(status)) == expected
        assert pipeline._SplitSpool.kept_value_bytes(spool.path, status) == expected_bytes
