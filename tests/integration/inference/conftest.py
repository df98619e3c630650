"""A real tritonserver (from nvidia-pytriton) and the inference service in-process (as `server.build` wires it,
canary controller included), serving tiny GPT-2s.

The registry is not involved: versions are published into a local tree in the registry's layout and
deployed through `LocalModelSource` (services/inference/model_source.py). Model `tiny` has three versions:
v1 and v2 are healthy (different random weights, the same tokenizer; responses tell them apart by version);
v3 (`BROKEN`) is a mis-export: its `decoder.json` says one more dimension per attention head than the ONNX
graph has, so Triton loads it (ONNX Runtime builds the session) but every decoding step fails at run time.
Alias `production` names v1.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from cli.servers import TritonPorts, start_triton, stop
from services.common.config import Settings
from services.inference import server
from services.inference.canary import CanaryController
from services.inference.deployments import Deployments
from services.inference.model_source import LocalModelSource, publish_local_version
from services.registry.onnx_export import export_model_onnx
from tests import identities

from ...tiny_checkpoints import train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[4] / "shared" / "data" / "tinyshakespeare.txt"
TENANT = "acme"
MODEL = "tiny"
BROKEN = 3
CONTEXT = 64


@dataclass
class TinyVersion:
    version: int
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> tuple[Path, dict[int, TinyVersion]]:
    """(root, healthy versions) of model `tiny` in a local source tree: v1 and v2, and the broken v3."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(SHAKESPEARE.read_text()[:20_000], root / "tokenizer")
    versions = {}
    for version, seed in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=CONTEXT,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config).eval()
        export_model_onnx(model, root / f"export-v{version}" / "model.onnx")
        publish_local_version(root, TENANT, MODEL, version, root / f"export-v{version}", root / "tokenizer")
        versions[version] = TinyVersion(version, model, tokenizer)
    broken = root / f"export-v{BROKEN}"
    broken.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy2(root / "export-v2" / name, broken / name)
    spec = json.loads((root / "export-v2" / "decoder.json").read_text())
    (broken / "decoder.json").write_text(json.dumps({**spec, "head_dim": spec["head_dim"] + 1}))
    publish_local_version(root, TENANT, MODEL, BROKEN, broken, root / "tokenizer")
    aliases = root / "models" / TENANT / MODEL / "aliases"
    aliases.mkdir()
    (aliases / "production").write_text("1\n")
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
    """gRPC calls as a tenant (`acme` unless named), the domain object behind the service, and the canary
    controller's Python API."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, deployments: Deployments, address: str,
                 tenant: str = TENANT) -> None:
        self.stub = stub
        self.deployments = deployments  # for tests that look inside
        self.canary = CanaryController(deployments.db, deployments)  # API only; server.build's one drives
        self.address = address  # where a gateway reaches the service
        self.metadata = identities.metadata(tenant, "inference")

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

    async def rollout(self, name: str, version: int, stable: int = 1, if_match: str = "",
                      **policy) -> pb.Deployment:
        """PutDeployment with `canary.rollout`: the controller takes the canary from there."""
        request = pb.PutDeploymentRequest(name=name, model=MODEL, stable_version=stable, if_match=if_match, wait=True,
                                          canary=pb.Canary(version=version, rollout=pb.CanaryRollout(**policy)))
        return (await self.stub.PutDeployment(request, metadata=self.metadata)).deployment

    async def get(self, name: str) -> pb.Deployment:
        return (await self.stub.GetDeployment(pb.GetDeploymentRequest(name=name), metadata=self.metadata)).deployment

    async def call(self, method: str, request):
        return await getattr(self.stub, method)(request, metadata=self.metadata)


@pytest.fixture
async def service(settings_env, model_root, triton):
    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_GRPC_URL": url,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    app, deployments = await server.build(settings, LocalModelSource(model_root[0]))
    port = await app.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Client(inference_pb2_grpc.InferenceServiceStub(channel), deployments, f"127.0.0.1:{port}")
    await channel.close()
    for tenant, name in list(deployments.routes):
        await deployments.delete(tenant, name)
    await app.stop()
