"""Every decoder architecture llmp claims, end to end: a random checkpoint (`save_pretrained` and a tokenizer
trained here) → the registry's ONNX exporter and parity gate → Triton → a completion equal to Transformers'
greedy `generate`, token for token.

GPT-2, Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention), Qwen2 (one key/value head, q/k/v biases,
tied embeddings) and Mistral (a head size other than hidden_size // n_head): the KV cache the Triton model
keeps must have each one's shape, and batched decoding (pasts left-padded to the longest) must mask
correctly with rotary positions too. An export from before grouped-query attention and external data
(one self-contained model.onnx, a decoder.json without n_kv_head) still deploys and serves.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import onnx
import pytest
from llmp.inference.v1 import inference_pb2 as pb

from services.common import contracts
from services.inference.model_source import publish_local_version
from services.registry import exporters, parity

from ...tiny_checkpoints import ARCHITECTURES, HEADS, build_checkpoint, hf_greedy
from .conftest import TENANT

pytestmark = pytest.mark.integration

CONTEXT = 64
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "What is", "O"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def checkpoints(model_root, tmp_path_factory):
    """arch -> (model, tokenizer, parity report), each exported through the registry's exporter and gate and
    published as version 1 of model `arch-<arch>` in the inference tests' local source."""
    root, versions = model_root
    tokenizer = versions[1].tokenizer  # trained here on Shakespeare (conftest)
    work = tmp_path_factory.mktemp("architectures")
    rng = np.random.default_rng(0)
    held_out = rng.integers(0, len(tokenizer), size=(2, 16), dtype=np.int64)
    built = {}
    for arch in ARCHITECTURES:
        model_dir, out_dir = work / arch / "hf", work / arch / "export"
        model = build_checkpoint(arch, model_dir, tokenizer, context=CONTEXT, seed=3)
        outcome = exporters.export("onnx", model_dir, out_dir, exporters.EvalData(held_out=held_out),
                                   triton_model=contracts.triton_model_name(TENANT, f"arch-{arch}", 1),
                                   thresholds=parity.Thresholds())
        assert outcome.passed, outcome.report
        publish_local_version(root, TENANT, f"arch-{arch}", 1, out_dir, model_dir)
        built[arch] = (model, tokenizer, outcome)
    return built


@pytest.mark.parametrize("arch", ARCHITECTURES)
async def test_each_architecture_serves_what_transformers_generates(service, checkpoints, arch):
    model, tokenizer, outcome = checkpoints[arch]
    assert outcome.report["incremental"]["passed"] and outcome.report["max_abs_logit_diff"] < 1e-3
    assert f"triton/{outcome.triton_model}/1/model.onnx.data" in outcome.files  # weights as external data
    spec = json.loads((service.deployments.source.root / contracts.model_version_prefix(TENANT, f"arch-{arch}", 1)
                       / "exports" / "onnx" / "decoder.json").read_text())
    assert (spec["n_head"], spec["n_kv_head"], spec["head_dim"]) == HEADS[arch]
    deployed = await service.call("PutDeployment", pb.PutDeploymentRequest(
        name=f"serve-{arch}", model=f"arch-{arch}", stable_version=1, wait=True))
    assert deployed.deployment.state == "READY", deployed.deployment.message
    # One at a time, then all at once: the second round batches the sequences' steps in one ORT call,
    # pasts of different lengths left-padded, which the rotary models must mask like GPT-2.
    for prompt in PROMPTS:
        completion = await service.generate(prompt, max_tokens=MAX_TOKENS, deployment=f"serve-{arch}")
        assert list(completion.token_ids) == hf_greedy(model, tokenizer, prompt, MAX_TOKENS), (arch, prompt)
    together = await asyncio.gather(*(service.generate(p, max_tokens=MAX_TOKENS, deployment=f"serve-{arch}")
                                      for p in PROMPTS))
    for prompt, completion in zip(PROMPTS, together, strict=True):
        assert list(completion.token_ids) == hf_greedy(model, tokenizer, prompt, MAX_TOKENS), (arch, prompt)


async def test_an_export_stored_before_external_data_and_gqa_still_serves(service, model_root, tmp_path):
    """v1 of `tiny` re-laid as exports used to be: one self-contained model.onnx, decoder.json without n_kv_head."""
    root, versions = model_root
    current = root / contracts.model_version_prefix(TENANT, "tiny", 1) / "exports" / "onnx"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    onnx.save(onnx.load(str(current / "model.onnx")), str(legacy / "model.onnx"))  # weights inline
    spec = json.loads((current / "decoder.json").read_text())
    del spec["n_kv_head"]
    (legacy / "decoder.json").write_text(json.dumps(spec))
    publish_local_version(root, TENANT, "legacy", 1, legacy, root / "tokenizer")
    exported = root / contracts.model_version_prefix(TENANT, "legacy", 1) / "exports" / "onnx"
    assert sorted(path.name for path in exported.iterdir()) == ["decoder.json", "model.onnx"]
    deployed = await service.call("PutDeployment", pb.PutDeploymentRequest(
        name="legacy", model="legacy", stable_version=1, wait=True))
    assert deployed.deployment.state == "READY", deployed.deployment.message
    for prompt in PROMPTS[:2]:
        completion = await service.generate(prompt, max_tokens=MAX_TOKENS, deployment="legacy")
        expected = hf_greedy(versions[1].model, versions[1].tokenizer, prompt, MAX_TOKENS)
        assert list(completion.token_ids) == expected, prompt
