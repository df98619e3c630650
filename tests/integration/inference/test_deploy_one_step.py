"""Deploy in one step, through the gateway: `PUT /v1/deployments/{name}` naming a version that was never
exported asks the registry for its ONNX export and shows the phases (EXPORTING → LOADING → READY) instead
of a 409; an export that fails its parity gate ends the deployment FAILED with the registry's reason.

Everything is real: the gateway app (aiohttp_client), the registry and inference services in-process on
their configured addresses, PostgreSQL, SeaweedFS and tritonserver. The versions are registered as training
registers its output (a `save_pretrained` folder uploaded to S3): a Llama with grouped-query attention,
and the same model with NaN weights (a diverged run), whose export cannot match PyTorch.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import torch
from llmp.registry.v1 import registry_pb2 as pb

from cli.main import main as cli_main
from gateway.app import init_app
from services.common import topology
from services.common.config import Settings
from services.inference import server as inference_server
from services.registry import server as registry_server
from tests import identities

from ...tiny_checkpoints import build_checkpoint, hf_greedy

pytestmark = pytest.mark.integration

ADMIN_KEY = "llmp_bootstrap_deploy-one-step-admin"
PROMPT = "ROMEO:"


async def register(registry, tenant: str, name: str, folder) -> None:
    """Upload a save_pretrained folder under a job's final/ prefix and register it, as training does."""
    prefix = f"jobs/{tenant}/{uuid.uuid4().hex[:8]}/final/"
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            registry.store.put_file(prefix + str(path.relative_to(folder)), path)
    request = pb.RegisterModelVersionRequest(model_name=name, source_prefix=prefix, lineage=pb.Lineage(
        training_job_id="job-1", code_version="abc123"))
    await registry.servicer_stub.RegisterModelVersion(request, metadata=identities.metadata(tenant, "registry"))


class Inference:
    """The inference service in-process on its configured address; `restart` stops it and starts another."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = self.deployments = None

    async def start(self) -> None:
        self.app, self.deployments = await inference_server.build(self.settings)
        await self.app.start(self.settings.listen_addr(topology.INFERENCE))

    async def restart(self) -> None:
        await self.app.stop()
        await self.start()

    async def stop(self) -> None:
        for owner, name in list(self.deployments.routes):
            await self.deployments.delete(owner, name)
        await self.app.stop()


@pytest.fixture
async def stack(aiohttp_client, settings_env, triton):
    import grpc
    from llmp.registry.v1 import registry_pb2_grpc

    url, repository = triton
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_TRITON_GRPC_URL": url,
                                  "LLMP_TRITON_MODEL_REPOSITORY": str(repository)})
    registry = await registry_server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    channel = grpc.aio.insecure_channel(settings.service_addrs[topology.REGISTRY.name])
    registry.servicer_stub = registry_pb2_grpc.RegistryServiceStub(channel)
    inference = Inference(settings)
    await inference.start()
    client = await aiohttp_client(init_app(settings))
    tenant = f"t{uuid.uuid4().hex[:10]}"
    created = await client.post("/v1/api-keys", json={"tenant": tenant, "role": "developer", "rate_limit": 1000},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status == 201, await created.text()
    client.key = (await created.json())["key"]
    client.auth = {"Authorization": f"Bearer {client.key}"}
    client.inference = inference
    yield client, registry, tenant
    await inference.stop()
    await channel.close()
    await registry.app.stop()


async def watch(client, name: str, timeout: float = 300) -> list[dict]:
    """GET the deployment until READY or FAILED; every distinct state seen, in order, with its body."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await client.get(f"/v1/deployments/{name}", headers=client.auth)
        if (got.status == 404 and not seen) or got.status == 503:  # not created yet; the service restarting
            await asyncio.sleep(0.05)
            continue
        assert got.status == 200, await got.text()
        body = await got.json()
        if not seen or seen[-1]["state"] != body["state"]:
            seen.append(body)
        if body["state"] in ("READY", "FAILED"):
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"deployment {name} did not settle: {[item['state'] for item in seen]}")


async def test_a_version_never_exported_is_exported_then_served(stack, model_root, tmp_path):
    client, registry, tenant = stack
    tokenizer = model_root[1][1].tokenizer
    model = build_checkpoint("llama", tmp_path / "llama", tokenizer, seed=5)
    await register(registry, tenant, "byo", tmp_path / "llama")

    put = await client.put("/v1/deployments/byo", json={"model": "byo", "stable": 1}, headers=client.auth)
    assert put.status == 201, await put.text()
    assert (await put.json())["state"] == "EXPORTING"
    early = await client.post("/v1/completions", json={"model": "byo", "prompt": PROMPT}, headers=client.auth)
    assert early.status == 503 and "ONNX export" in await early.text()  # an export takes seconds, not ms
    states = [item["state"] for item in await watch(client, "byo")]
    assert states[0] == "EXPORTING" and states[-1] == "READY", states
    assert states in (["EXPORTING", "LOADING", "READY"], ["EXPORTING", "READY"])  # LOADING may pass unseen

    version = await client.get("/v1/models/byo/versions/1", headers=client.auth)
    exports = {item["format"]: item for item in (await version.json())["exports"]}
    assert exports["onnx"]["state"] == "READY"
    answer = await client.post("/v1/completions", json={"model": "byo", "prompt": PROMPT, "max_tokens": 16,
                                                        "temperature": 0},
                               headers=client.auth)
    assert answer.status == 200, await answer.text()
    expected = hf_greedy(model, tokenizer, PROMPT, 16)
    assert (await answer.json())["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    # The deployed version is marked in the registry like any other: deleting it is refused.
    deleted = await client.delete("/v1/models/byo/versions/1", headers=client.auth)
    assert deleted.status == 409, await deleted.text()


async def test_an_export_failing_its_parity_gate_fails_the_deployment_with_the_reason(stack, model_root, tmp_path,
                                                                                       capsys):
    """Deployed with the CLI (`llmp deploy --wait`), which follows the phases and exits 1 on FAILED."""
    client, registry, tenant = stack
    model = build_checkpoint("llama", tmp_path / "diverged", model_root[1][1].tokenizer, seed=6)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "diverged")
    await register(registry, tenant, "diverged", tmp_path / "diverged")

    cli = asyncio.create_task(asyncio.to_thread(cli_main, [
        "deploy", "diverged", "--model", "diverged", "--stable", "1", "--wait", "--json",
        "--url", str(client.make_url("")).rstrip("/"), "--key", client.key]))
    seen = await watch(client, "diverged")
    assert await cli == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out)["state"] == "FAILED" and "deploy EXPORTING" in printed.err
    assert [item["state"] for item in seen] == ["EXPORTING", "FAILED"]
    message = seen[-1]["message"]
    assert "ONNX export of model diverged v1 failed" in message and "parity check failed" in message, message
    assert "max abs logit difference nan" in message, message
    answer = await client.post("/v1/completions", json={"model": "diverged", "prompt": PROMPT},
                               headers=client.auth)
    assert answer.status == 503 and "failed" in (await answer.text())
    # Nothing marks the version deployed: it can still be deleted.
    deleted = await client.delete("/v1/models/diverged/versions/1", headers=client.auth)
    assert deleted.status == 204, await deleted.text()


async def test_a_deployment_exporting_when_the_service_restarts_finishes_after_it(stack, model_root, tmp_path):
    """The EXPORTING row outlives the process that was following the export: the next one picks it up."""
    client, registry, tenant = stack
    tokenizer = model_root[1][1].tokenizer
    model = build_checkpoint("qwen2", tmp_path / "qwen2", tokenizer, seed=7)
    await register(registry, tenant, "restarted", tmp_path / "qwen2")
    put = await client.put("/v1/deployments/restarted", json={"model": "restarted", "stable": 1},
                           headers=client.auth)
    assert (await put.json())["state"] == "EXPORTING"
    await client.inference.restart()
    states = [item["state"] for item in await watch(client, "restarted")]
    assert states[0] == "EXPORTING" and states[-1] == "READY", states
    answer = await client.post("/v1/completions", json={"model": "restarted", "prompt": PROMPT, "max_tokens": 12,
                                                        "temperature": 0}, headers=client.auth)
    assert answer.status == 200, await answer.text()
    expected = hf_greedy(model, tokenizer, PROMPT, 12)
    assert (await answer.json())["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
