"""Fine-tuning a registry version through the training service, over gRPC, with the real dataset and
registry services, a real Celery worker and real torchrun.

The base is a random Llama-style checkpoint with grouped-query attention built here, registered directly
into the registry as a READY version with the dataset's tokenizer beside its weights (the import route is
another part of the platform). What a user checks afterwards is checked with what they would use:
`transformers.from_pretrained` on the registered files, `peft.PeftModel.from_pretrained` on its adapter.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import torch
from llmp.common.v1 import common_pb2
from llmp.dataset.v1 import dataset_pb2
from llmp.registry.v1 import registry_pb2
from llmp.training.v1 import training_pb2 as pb
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli import servers
from services.common import model_transfer
from services.common.config import Settings
from services.common.s3 import ObjectStore
from services.training import data
from tests.integration.training.test_training_service import SHAKESPEARE, caller, celery_worker, stack  # noqa: F401
from tests.tiny_checkpoints import write_checkpoint
from tests.tiny_dataset import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BLOCK = 32


@pytest.fixture
def env(settings_env, own_broker_url, tmp_path) -> dict[str, str]:
    return {**settings_env, "LLMP_BROKER_URL": own_broker_url,
            "LLMP_STATE_DIR": str(tmp_path / "state")}


async def register(registry, store: ObjectStore, metadata, name: str, folder: Path) -> registry_pb2.ModelVersion:
    return await model_transfer.upload_model_version(
        registry, store, name, folder, metadata=metadata, description="built in the test",
        lineage=registry_pb2.Lineage(environment={"source": "random weights, tests/tiny_checkpoints.py"}))


def download_version(store: ObjectStore, version: registry_pb2.ModelVersion, folder: Path) -> Path:
    for artifact in version.artifacts:
        model_transfer.fetch_artifact(store, artifact, folder / artifact.path)
    return folder


def validation_loss(model, dataset: data.LocalDataset) -> float:
    """Mean loss over the validation split's fixed evaluation windows, as the runtime measures it."""
    batches = data.eval_batches(dataset.stream("validation"), BLOCK, 8, 8, rank=0, world_size=1)
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=tokens, labels=tokens, use_cache=False).loss) for tokens in batches]
    return sum(losses) / len(losses)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on this Transformers
async def test_lora_fine_tune_of_a_registered_gqa_llama(env, stack, celery_worker, tmp_path):  # noqa: F811
    settings = Settings.from_env(env)
    store = ObjectStore(settings.s3)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    metadata, at_dataset, at_registry = caller(tenant), caller(tenant, "dataset"), caller(tenant, "registry")
    options = dataset_pb2.DatasetOptions(name="shakespeare", tokenizer=dataset_pb2.TOKENIZER_KIND_CHAR, wait=True)
    created = await stack["dataset"].CreateDataset(iter([
        dataset_pb2.CreateDatasetRequest(options=options),
        dataset_pb2.CreateDatasetRequest(chunk=SHAKESPEARE.read_bytes()[:60_000])]), metadata=at_dataset)
    dataset_version = created.version
    assert dataset_version.state == dataset_pb2.VERSION_STATE_READY

    # The base, with the dataset's tokenizer beside its weights; another, tokenized otherwise.
    tokenizer_dir = tmp_path / "dataset-tokenizer"
    for obj in store.list(dataset_version.tokenizer.prefix):
        store.download(obj.key, tokenizer_dir / obj.key[len(dataset_version.tokenizer.prefix):])
    base_dir = tmp_path / "base"
    write_checkpoint(base_dir, "llama", tokenizer_dir, dataset_version.tokenizer.vocab_size, seed=3)
    assert (await register(stack["registry"], store, at_registry, "llama-base", base_dir)).ref.version == 1
    other_dir, other_tokenizer = tmp_path / "other", tmp_path / "other-dataset"
    manifest = write_dataset(other_tokenizer, chars=3_000)
    write_checkpoint(other_dir, "llama", other_tokenizer / "tokenizer", manifest["vocab_size"])
    await register(stack["registry"], store, at_registry, "other-base", other_dir)

    def spec(base: str, adapter: pb.AdapterConfig | None) -> pb.JobSpec:
        return pb.JobSpec(
            dataset=common_pb2.DatasetRef(name="shakespeare", version=1),
            model=pb.ModelConfig(init_from=common_pb2.ModelRef(name=base, version=1), block_size=BLOCK,
                                 adapter=adapter),
            hyperparameters=pb.Hyperparameters(batch_size=8, max_steps=24, learning_rate=1e-2, min_learning_rate=1e-3,
                                               warmup_steps=2, eval_interval=12, eval_batches=4, log_interval=4,
                                               seed=7),
            distributed=pb.Distributed(mode="ddp", nproc_per_node=1))

    training = stack["training"]
    lora = pb.AdapterConfig(type="lora", r=8, alpha=32)
    # A dataset tokenized otherwise than the base: refused at submit, naming both.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await training.SubmitJob(pb.SubmitJobRequest(spec=spec("other-base", lora), model_name="tuned"),
                                 metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset shakespeare v1" in refused.value.details()
    assert "model.init_from other-base v1" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await training.SubmitJob(pb.SubmitJobRequest(spec=spec("nobody", lora)), metadata=metadata)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.init_from nobody v1 does not exist" in missing.value.details()
    listed = await training.ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert list(listed.jobs) == []  # nothing left behind

    # Architecture and adapter targets come from the version.
    submitted = await training.SubmitJob(pb.SubmitJobRequest(spec=spec("llama-base", lora), model_name="tuned"),
                                         metadata=metadata)
    assert submitted.job.spec.model.family == "llama"
    assert list(submitted.job.spec.model.adapter.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    states = []
    async for event in training.WatchJob(pb.WatchJobRequest(id=submitted.job.id), metadata=metadata, timeout=400):
        if event.HasField("state_changed"):
            states.append(pb.JobState.Name(event.state_changed.state))
    job = (await training.GetJob(pb.GetJobRequest(id=submitted.job.id), metadata=metadata)).job
    assert states[-1] == "JOB_STATE_SUCCEEDED", (job.error, servers.log_tail(celery_worker.log_path))

    version = (await stack["registry"].GetModelVersion(
        registry_pb2.GetModelVersionRequest(name="tuned", version=job.model_version.version),
        metadata=at_registry)).version
    assert version.lineage.parent.name == "llama-base" and version.lineage.parent.version == 1
    roles = {artifact.path: artifact.object.role for artifact in version.artifacts}
    assert roles["adapter/adapter_config.json"] == roles["adapter/adapter_model.safetensors"] == "adapter"
    assert roles["model.safetensors"] == "weights" and roles["tokenizer.json"] == "tokenizer"
    base_version = (await stack["registry"].GetModelVersion(
        registry_pb2.GetModelVersionRequest(name="llama-base", version=1), metadata=at_registry)).version
    sha = {artifact.path: artifact.object.sha256 for artifact in base_version.artifacts}
    assert {artifact.path: artifact.object.sha256 for artifact in version.artifacts}["tokenizer.json"] == \
        sha["tokenizer.json"]

    # What the user downloads: merged weights that beat the base, an adapter that peft puts back on the base.
    tuned_dir = download_version(store, version, tmp_path / "tuned")
    base_copy = download_version(store, base_version, tmp_path / "base-copy")
    dataset = data.fetch_dataset(store, dataset_version.manifest_key, tmp_path / "dataset")
    merged = AutoModelForCausalLM.from_pretrained(tuned_dir)
    base_loss = validation_loss(AutoModelForCausalLM.from_pretrained(base_copy), dataset)
    tuned_loss = validation_loss(merged, dataset)
    assert tuned_loss < base_loss - 0.05, (base_loss, tuned_loss)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_copy), tuned_dir / "adapter")
    ids = torch.randint(0, dataset_version.tokenizer.vocab_size, (2, BLOCK))
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
