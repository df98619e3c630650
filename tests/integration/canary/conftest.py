"""A real tritonserver and the inference service (as `server.build` wires it, canary controller included).

Model `tiny` has three versions in a local source tree (services/inference/model_source.py): v1 and
v2 are healthy (the same tiny GPT-2; responses tell them apart by version); v3 is a broken export: its
`decoder.json` says one more dimension per attention head than the ONNX graph has, so Triton loads it
(ONNX Runtime builds the session) but every decoding step fails at run time, as a mis-exported model would.
"""

from __future__ import annotations

import json
import shutil
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
from services.inference.canary import CanaryController
from services.inference.deployments import Deployments
from services.inference.model_source import LocalModelSource, publish_local_version
from services.registry.onnx_export import export_model_onnx

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
TENANT = "acme"
MODEL = "tiny"
BROKEN = 3
EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SHAKESPEARE.read_text()[:20_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(fast), n_positions=64,
                        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    export = root / "export"
    export_model_onnx(GPT2LMHeadModel(config).eval(), export / "model.onnx")  # one export serves every version
    broken = root / "export-broken"
    broken.mkdir()
    shutil.copy2(export / "model.onnx", broken / "model.onnx")
    spec = json.loads((export / "decoder.json").read_text())
    (broken / "decoder.json").write_text(json.dumps({**spec, "head_dim": spec["head_dim"] + 1}))
    for version in (1, 2, BROKEN):
        publish_local_version(root, TENANT, MODEL, version, broken if version == BROKEN else export, root / "tokenizer")
    aliases = root / "models" / TENANT / MODEL / "aliases"
    aliases.mkdir()
    (aliases / "production").write_text("1\n")
    return root


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    ports = TritonPorts.free()
    process = start_triton(work / "repository", ports, work / "triton.log")
    yield f"127.0.0.1:{ports.grpc}", work / "repository"
    stop(process)


class Client:
    """gRPC calls as tenant `acme`, plus the canary controller's Python API."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, deployments: Deployments) -> None:
        self.stub = stub
        self.deployments = deployments
        self.canary = CanaryController(deployments.db, deployments)  # API only; server.build's one drives
        self.metadata = caller_metadata(Caller(TENANT, "key-test", "developer"))

    async def generate(self, deployment: str, routing_key: str) -> pb.Completion:
        request = pb.GenerateRequest(deployment=deployment, prompt="O", max_tokens=1, routing_key=routing_key)
        return (await self.stub.Generate(request, metadata=self.metadata)).completion

    async def deploy(self, name: str, stable: int = 1, canary: tuple[int, int] | None = None,
                     if_match: str = "") -> pb.Deployment:
        request = pb.PutDeploymentRequest(name=name, model=MODEL, stable_version=stable, if_match=if_match, wait=True)
        if canary:
            request.canary.CopyFrom(pb.Canary(version=canary[0], weight=canary[1]))
        return (await self.stub.PutDeployment(request, metadata=self.metadata)).deployment

    async def rollout(self, name: str, version: int, stable: int = 1, if_match: str = "",
                      **policy) -> pb.Deployment:
        """PutDeployment with `canary.rollout`: the controller takes the canary from there."""
        request = pb.PutDeploymentRequest(name=name, model=MODEL, stable_version=stable, if_match=if_match, wait=True,
                                          canary=pb.Canary(version=version, rollout=pb.CanaryRollout(**policy)))
        return (await self.stub.PutDeployment(request, metadata=self.metadata)).deployment

    async def get(self, name: str) -> pb.Deployment:
        return (await self.stub.GetDeployment(pb.GetDeploymentRequest(name=name), metadata=self.metadata)).deployment


@pytest.fixture
async def service(settings_env, model_root, triton):
    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_GRPC_URL": url,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    app, deployments = await server.build(settings, LocalModelSource(model_root))
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Client(inference_pb2_grpc.InferenceServiceStub(channel), deployments)
    await channel.close()
    for tenant, name in list(deployments.routes):
        await deployments.delete(tenant, name)
    await app.stop()
