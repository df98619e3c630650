"""A real tritonserver (from nvidia-pytriton) and the inference service in-process, serving tiny GPT-2s.

The registry is not involved: versions are published into a local tree in the registry's layout and
deployed through `LocalModelSource` (services/inference/model_source.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from cli.servers import TritonPorts, start_triton, stop
from services.common.config import Settings
from services.common.identity import Caller, caller_metadata
from services.inference import server
from services.inference.model_source import LocalModelSource, publish_local_version
from services.registry.onnx_export import export_model_onnx

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
TENANT = "acme"
MODEL = "tiny"
CONTEXT = 64
EOS = "<|endoftext|>"


def train_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:20_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    fast.save_pretrained(out)
    return fast


@dataclass
class TinyVersion:
    version: int
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> tuple[Path, dict[int, TinyVersion]]:
    """Two versions of model `tiny` (different random weights, same tokenizer) in a local source tree."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(root / "tokenizer")
    versions = {}
    for version, seed in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=CONTEXT,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config).eval()
        export_model_onnx(model, root / f"export-v{version}" / "model.onnx")
        publish_local_version(root, TENANT, MODEL, version, root / f"export-v{version}", root / "tokenizer")
        versions[version] = TinyVersion(version, model, tokenizer)
    return root, versions


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """(grpc url, repository, ports) of a tritonserver for the session."""
    work = tmp_path_factory.mktemp("triton")
    ports = TritonPorts.free()
    repository = work / "repository"
    process = start_triton(repository, ports, work / "triton.log")
    yield f"127.0.0.1:{ports.grpc}", repository
    stop(process)


class Client:
    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, tenant: str = TENANT) -> None:
        self.stub = stub
        self.metadata = caller_metadata(Caller(tenant, "key-test", "developer"))

    async def generate(self, prompt: str, max_tokens: int = 16, deployment: str = "tiny-chat", **sampling):
        routing_key = sampling.pop("routing_key", "")
        request = pb.GenerateRequest(deployment=deployment, prompt=prompt, max_tokens=max_tokens,
                                     sampling=pb.SamplingParameters(**sampling), routing_key=routing_key)
        return (await self.stub.Generate(request, metadata=self.metadata)).completion

    def stream(self, prompt: str, max_tokens: int = 16, deployment: str = "tiny-chat", **sampling):
        request = pb.GenerateRequest(deployment=deployment, prompt=prompt, max_tokens=max_tokens,
                                     sampling=pb.SamplingParameters(**sampling))
        return self.stub.GenerateStream(pb.GenerateStreamRequest(request=request), metadata=self.metadata)

    async def deploy(self, name: str = "tiny-chat", stable: int = 1, canary: tuple[int, int] | None = None,
                     **options) -> pb.PutDeploymentResponse:
        request = pb.PutDeploymentRequest(name=name, model=MODEL, stable_version=stable, wait=True, **options)
        if canary:
            request.canary.CopyFrom(pb.Canary(version=canary[0], weight=canary[1]))
        return await self.stub.PutDeployment(request, metadata=self.metadata)


@pytest.fixture
async def service(settings_env, model_root, triton):
    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_GRPC_URL": url,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    app, deployments = await server.build(settings, LocalModelSource(model_root[0]))
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = Client(inference_pb2_grpc.InferenceServiceStub(channel))
    client.deployments = deployments  # the domain object behind the service, for tests that look inside
    client.address = f"127.0.0.1:{port}"  # where a gateway reaches the service
    yield client
    await channel.close()
    for tenant, name in list(deployments.routes):
        await deployments.delete(tenant, name)
    await app.stop()
