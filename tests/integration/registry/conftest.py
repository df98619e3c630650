"""The registry service in-process on a free port, real PostgreSQL and SeaweedFS, and tiny GPT-2 checkpoints."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb
from llmp.registry.v1 import registry_pb2_grpc

from services.common.s3 import ObjectStore
from services.registry import server
from tests import identities

VOCAB = 64  # characters of the tiny tokenizer


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A GPT-2 with 2 layers, 2 heads, 64 dims, saved with a char tokenizer like training's output."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    chars = ["<eos>"] + [chr(c) for c in range(32, 32 + VOCAB - 1)]
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>").save_pretrained(folder)
    return folder


def upload_folder(store: ObjectStore, folder: Path, prefix: str) -> dict[str, str]:
    """Upload like training does; returns {relative path: sha256}."""
    return {str(path.relative_to(folder)): store.put_file(prefix + str(path.relative_to(folder)), path).sha256
            for path in sorted(folder.rglob("*")) if path.is_file()}


def upload_dataset(store: ObjectStore, tenant: str, name: str, version: int, tokens: int = 4096) -> None:
    """A dataset version in the layout of docs/CONTRACTS.md with test and calibration splits."""
    prefix = f"datasets/{tenant}/{name}/v{version}/"
    rng = np.random.default_rng(1)
    splits = {}
    for split in ("train", "validation", "test", "calibration"):
        key = f"{prefix}{split}/shard-00000.bin"
        store.put_bytes(key, rng.integers(1, VOCAB, tokens).astype("<u2").tobytes())
        splits[split] = {"documents": 1, "tokens": tokens, "bytes": tokens * 2, "shards": [key]}
    manifest = {"name": name, "version": version, "tenant": tenant, "format": "text", "dtype": "uint16",
                "vocab_size": VOCAB, "eos_token_id": 0, "pad_token_id": 0,
                "tokenizer": {"kind": "char", "vocab_size": VOCAB}, "splits": splits, "objects": []}
    store.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())


class Client:
    """A stub bound to one tenant, plus the registry's internals for assertions."""

    def __init__(self, stub, registry: server.Registry, tenant: str) -> None:
        self.stub, self.registry, self.tenant = stub, registry, tenant
        self.metadata = identities.metadata(tenant, "registry")

    async def register(self, model: str, source_prefix: str, **lineage) -> pb.ModelVersion:
        request = pb.RegisterModelVersionRequest(
            model_name=model, source_prefix=source_prefix, metrics={"validation_loss": 1.25},
            lineage=pb.Lineage(dataset=common_pb2.DatasetRef(name=lineage.get("dataset", ""),
                                                             version=lineage.get("dataset_version", 0)),
                               training_job_id="job-1", code_version="abc123", environment={"torch": "2.13"}))
        return (await self.stub.RegisterModelVersion(request, metadata=self.metadata)).version


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
async def registry(settings):
    built = await server.build(settings)
    port = await built.app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    built.channel = channel
    built.stub = registry_pb2_grpc.RegistryServiceStub(channel)
    yield built
    await channel.close()
    await built.app.stop()


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(registry, tenant) -> Client:
    return Client(registry.stub, registry, tenant)


@pytest.fixture
def source(registry, checkpoint, tenant) -> tuple[str, dict[str, str]]:
    """The tiny checkpoint uploaded under a training job's final/ prefix: (prefix, {path: sha256})."""
    prefix = f"jobs/{tenant}/{uuid.uuid4().hex[:8]}/final/"
    return prefix, upload_folder(registry.store, checkpoint, prefix)
