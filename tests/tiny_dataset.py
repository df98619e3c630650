"""A tiny dataset version (docs/CONTRACTS.md format) the training tests write themselves, written locally:
no server. Unit and integration tests both use it, so tests/conftest.py registers these fixtures.

Character-level: every distinct character of a slice of tinyshakespeare is a token, plus `<eos>`
(also the pad token). Paragraphs are documents; the train split is cut into two shards so readers
cross a shard boundary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def write_dataset(root: Path, *, chars: int = 40_000, tenant: str = "acme", name: str = "shakespeare",
                  version: int = 1, dtype: str = "uint16") -> dict:
    """Write manifest.json, tokenizer/ and the shards under `root`; return the manifest."""
    text = SHAKESPEARE.read_text()[:chars]
    alphabet = sorted(set(text))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    eos = len(vocab)
    vocab["<eos>"] = eos
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(root / "tokenizer")

    documents = [doc for doc in text.split("\n\n") if doc.strip()]
    n = len(documents)
    bounds = {"train": (0, int(n * 0.8)), "validation": (int(n * 0.8), int(n * 0.9)),
              "test": (int(n * 0.9), n)}
    prefix = f"datasets/{tenant}/{name}/v{version}/"
    splits, objects = {}, []
    for split, (lo, hi) in bounds.items():
        ids = [tid for doc in documents[lo:hi] for tid in [vocab[ch] for ch in doc] + [eos]]
        array = np.asarray(ids, dtype=np.dtype("<u2") if dtype == "uint16" else np.dtype("<u4"))
        pieces = np.array_split(array, 2) if split == "train" else [array]
        keys = []
        for i, piece in enumerate(pieces):
            key = f"{split}/shard-{i:05d}.bin"
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(piece.tobytes())
            keys.append(prefix + key)
        splits[split] = {"documents": hi - lo, "tokens": len(array), "bytes": array.nbytes, "shards": keys}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            role = "tokenizer" if rel.startswith("tokenizer/") else "shard"
            objects.append({"key": prefix + rel, "size": path.stat().st_size,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "role": role})
    manifest = {"name": name, "version": version, "tenant": tenant, "format": "text", "dtype": dtype,
                "vocab_size": len(vocab), "eos_token_id": eos, "pad_token_id": eos,
                "tokenizer": {"kind": "char", "vocab_size": len(vocab)}, "splits": splits, "objects": objects}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def upload_dataset(store, root: Path, manifest: dict) -> str:
    """Upload a dataset written by `write_dataset`; return its manifest key."""
    prefix = f"datasets/{manifest['tenant']}/{manifest['name']}/v{manifest['version']}/"
    for path in sorted(root.rglob("*")):
        if path.is_file():
            store.put_file(prefix + path.relative_to(root).as_posix(), path)
    return prefix + "manifest.json"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, dict]:
    """A local dataset version (root folder, manifest) of ~40k characters."""
    root = tmp_path_factory.mktemp("tiny-dataset")
    return root, write_dataset(root)


@pytest.fixture(scope="session")
def dataset_uploader():
    """`upload_dataset` (test modules cannot import conftest under --import-mode=importlib)."""
    return upload_dataset


@pytest.fixture(name="write_dataset", scope="session")
def write_dataset_fixture():
    """`write_dataset` as a fixture, for the same reason."""
    return write_dataset
