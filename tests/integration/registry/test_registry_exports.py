import hashlib
import json
from pathlib import Path

import grpc
import onnx
import pytest
import torch
from llmp.common.v1 import common_pb2
from llmp.registry.v1 import registry_pb2 as pb

from services.common import contracts
from services.registry import exporters

from .conftest import upload_dataset

pytestmark = pytest.mark.integration


def ref(name: str, version: int = 1) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


async def export_and_wait(client, name: str, fmt: str) -> pb.Export:
    created = (await client.stub.CreateExport(pb.CreateExportRequest(model=ref(name), format=fmt),
                                              metadata=client.metadata)).export
    assert created.state in (pb.EXPORT_STATE_PENDING, pb.EXPORT_STATE_RUNNING)
    await client.registry.exports.wait()
    return (await client.stub.GetExport(pb.GetExportRequest(model=ref(name), format=fmt),
                                        metadata=client.metadata)).export


async def test_onnx_export_passes_parity_and_lands_in_triton_layout(client, source, registry):
    prefix, _ = source
    await client.register("onnxed", prefix)
    export = await export_and_wait(client, "onnxed", "onnx")
    assert export.state == pb.EXPORT_STATE_READY, export.error
    report = json.loads(export.parity_report_json)
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-3 and report["incremental"]["passed"]
    base = contracts.model_export_prefix(client.tenant, "onnxed", 1, "onnx")
    triton = contracts.triton_model_name(client.tenant, "onnxed", 1)
    assert export.triton_repository_prefix == base + "triton/" and export.triton_model_name == triton
    config = registry.store.get_bytes(f"{base}triton/{triton}/config.pbtxt").decode()
    assert f'name: "{triton}"' in config and "dynamic_batching" in config and 'backend: "onnxruntime"' in config
    graph = onnx.load_from_string(registry.store.get_bytes(f"{base}triton/{triton}/1/model.onnx"))
    assert {i.name for i in graph.graph.input} >= {"input_ids", "past_key_values.1.value"}
    paths = {a.path: a.object.sha256 for a in export.artifacts}
    assert paths["exports/onnx/model.onnx"] == paths[f"exports/onnx/triton/{triton}/1/model.onnx"]
    # The weights are external data beside the graph, recorded and laid out in Triton's folder alike.
    data = "exports/onnx/" + contracts.ONNX_DATA_FILE
    assert paths[data] == paths[f"exports/onnx/triton/{triton}/1/{contracts.ONNX_DATA_FILE}"]
    assert paths[data] == hashlib.sha256(registry.store.get_bytes(base + contracts.ONNX_DATA_FILE)).hexdigest()
    # The version shows its export, and a deployment of the READY export is accepted.
    version = (await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="onnxed", version=1),
                                                 metadata=client.metadata)).version
    assert [e.format for e in version.exports] == ["onnx"]
    marked = await client.stub.MarkDeployed(pb.MarkDeployedRequest(model=ref("onnxed"), deployment="chat",
                                                                      export_format="onnx"), metadata=client.metadata)
    assert list(marked.deployments) == ["chat"]


async def test_torchscript_export_and_int8_calibrated_on_the_dataset(client, source, registry):
    prefix, _ = source
    upload_dataset(registry.store, client.tenant, "corpus", 1)
    await client.register("quant", prefix, dataset="corpus", dataset_version=1)
    scripted = await export_and_wait(client, "quant", "torchscript")
    assert scripted.state == pb.EXPORT_STATE_READY, scripted.error
    assert json.loads(scripted.parity_report_json)["inputs_from"].startswith("dataset corpus v1")
    int8 = await export_and_wait(client, "quant", "onnx-int8")
    assert int8.state == pb.EXPORT_STATE_READY, int8.error
    report = json.loads(int8.parity_report_json)
    assert report["perplexity"]["passed"] and abs(report["perplexity"]["relative_change"]) < 0.1
    assert report["max_abs_logit_diff"] > 0  # quantized: not bit-identical, so the check did run
    # int8 weights really are int8
    key = f"models/{client.tenant}/quant/v1/exports/onnx-int8/model.onnx"
    graph = onnx.load_from_string(registry.store.get_bytes(key))
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.graph.initializer)


async def test_int8_without_a_dataset_fails_with_a_reason(client, source):
    prefix, _ = source
    await client.register("nodata", prefix)
    export = await export_and_wait(client, "nodata", "onnx-int8")
    assert export.state == pb.EXPORT_STATE_FAILED and "calibration" in export.error


async def test_a_lineage_manifest_without_dtype_fails_the_export_instead_of_guessing(client, source, registry):
    prefix, _ = source
    upload_dataset(registry.store, client.tenant, "untyped", 1)
    key = contracts.dataset_manifest_key(client.tenant, "untyped", 1)
    manifest = json.loads(registry.store.get_bytes(key))
    del manifest["dtype"]  # a reader used to assume uint16 here
    registry.store.put_bytes(key, json.dumps(manifest).encode())
    await client.register("untyped", prefix, dataset="untyped", dataset_version=1)
    export = await export_and_wait(client, "untyped", "torchscript")
    assert export.state == pb.EXPORT_STATE_FAILED and "dtype None" in export.error, export.error


def corrupting_torchscript(model_dir: Path, out_dir: Path, data: exporters.EvalData) -> Path:
    """The real exporter, then the embeddings perturbed: what a broken converter would produce."""
    path = exporters.export_torchscript(model_dir, out_dir, data)
    with exporters._torchscript_is_requested():
        module = torch.jit.load(str(path))
        with torch.no_grad():
            weight = next(iter(module.parameters()))
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        module.save(str(path))
    return path


async def test_parity_gate_fails_a_corrupted_export_and_refuses_its_deployment(client, source, registry):
    prefix, _ = source
    await client.register("corrupt", prefix)
    registry.exports.exporter_table = {**exporters.EXPORTERS, "torchscript": corrupting_torchscript}
    export = await export_and_wait(client, "corrupt", "torchscript")
    assert export.state == pb.EXPORT_STATE_FAILED
    report = json.loads(export.parity_report_json)
    assert report["passed"] is False and report["max_abs_logit_diff"] > report["logits"]["threshold"]
    assert list(export.artifacts) == []
    assert registry.store.list(f"models/{client.tenant}/corrupt/v1/exports/") == []  # nothing published
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.MarkDeployed(pb.MarkDeployedRequest(model=ref("corrupt"), deployment="web",
                                                                 export_format="torchscript"), metadata=client.metadata)
    assert dict(caught.value.trailing_metadata())["llmp-error-type"] == "conflict"
    # Retrying with a sound exporter replaces the FAILED export.
    registry.exports.exporter_table = exporters.EXPORTERS
    assert (await export_and_wait(client, "corrupt", "torchscript")).state == pb.EXPORT_STATE_READY


async def test_delete_is_refused_while_deployed_then_removes_everything(client, source, registry):
    prefix, _ = source
    await client.register("gone", prefix)
    await client.stub.MarkDeployed(pb.MarkDeployedRequest(model=ref("gone"), deployment="svc"),
                                   metadata=client.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="gone", version=1),
                                             metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(caught.value.trailing_metadata())["llmp-error-type"] == "conflict"
    assert registry.store.list(f"models/{client.tenant}/gone/v1/")
    left = await client.stub.UnmarkDeployed(pb.UnmarkDeployedRequest(model=ref("gone"), deployment="svc"),
                                            metadata=client.metadata)
    assert list(left.deployments) == []
    deleted = await client.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="gone", version=1),
                                                   metadata=client.metadata)
    assert deleted.objects_deleted >= 5
    assert registry.store.list(f"models/{client.tenant}/gone/v1/") == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.GetModelVersion(pb.GetModelVersionRequest(name="gone", version=1), metadata=client.metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Numbers are never reused: the next registration is v2.
    assert (await client.register("gone", prefix)).ref.version == 2


async def test_exports_interrupted_by_a_restart_are_failed_and_can_be_retried(client, source, registry):
    prefix, _ = source
    await client.register("restarted", prefix)
    async with registry.db.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO registry_exports (id, tenant, name, version, format, state, heartbeat_at) "
            "VALUES (gen_random_uuid(), %s, 'restarted', 1, 'torchscript', 'RUNNING', now() - interval '1 hour')",
            (client.tenant,))
    assert await registry.exports.recover(lease_seconds=60) >= 1
    export = (await client.stub.GetExport(pb.GetExportRequest(model=ref("restarted"), format="torchscript"),
                                          metadata=client.metadata)).export
    assert export.state == pb.EXPORT_STATE_FAILED and "interrupted" in export.error
    assert (await export_and_wait(client, "restarted", "torchscript")).state == pb.EXPORT_STATE_READY
