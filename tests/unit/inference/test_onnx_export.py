"""The exported ONNX decoder computes what the PyTorch model computes, prefix and incremental steps alike,
for every architecture served (GPT-2; Llama, Qwen2, Mistral with grouped-query attention)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from services.common import onnx_graph
from services.common.contracts import ONNX_DATA_FILE, DecoderSpec
from services.registry import onnx_export
from services.registry.onnx_export import export_decoder_onnx

from ...tiny_checkpoints import ARCHITECTURES, HEADS
from ...tiny_checkpoints import tiny_model as build_tiny_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_model(request, tmp_path_factory):
    model = build_tiny_model(request.param, 101, context=64, eos_token_id=100)
    model_dir = tmp_path_factory.mktemp("model")
    model.save_pretrained(model_dir)
    return model, model_dir


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    _, model_dir = tiny_model
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    spec = export_decoder_onnx(model_dir, out)
    return spec, ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]), out


def empty_past(spec: DecoderSpec, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, spec.n_kv_head, 0, spec.head_dim)
    return {name: np.zeros(shape, np.float32) for name in spec.input_names if name.startswith("past_key_values.")}


def present_as_past(spec: DecoderSpec, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    named = dict(zip(spec.output_names, outputs, strict=True))
    return {name: named[name.replace("past_key_values.", "present.")]
            for name in spec.input_names if name.startswith("past_key_values.")}


def test_graph_has_the_contracted_inputs_and_outputs(exported, tiny_model):
    spec, session, out = exported
    arch = tiny_model[0].config.model_type
    assert [i.name for i in session.get_inputs()] == list(spec.input_names)
    assert [o.name for o in session.get_outputs()] == list(spec.output_names)
    assert spec.input_names[:3] == ("input_ids", "attention_mask", "position_ids")
    assert "past_key_values.1.value" in spec.input_names and "present.1.value" in spec.output_names
    written = DecoderSpec.from_json((out.parent / "decoder.json").read_text())
    assert written == spec
    assert (spec.n_layer, spec.vocab_size, spec.context_length) == (2, 101, 64)
    assert (spec.n_head, spec.n_kv_head, spec.head_dim) == HEADS[arch]
    assert json.loads(spec.to_json())["eos_token_id"] == 100


def test_prefix_then_incremental_step_match_pytorch(exported, tiny_model):
    spec, session, _ = exported
    model, _ = tiny_model
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    n = prompt.shape[1]
    outputs = session.run(None, {
        "input_ids": prompt.numpy(), "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None], **empty_past(spec, 1),
    })
    with torch.no_grad():
        expected = model(prompt).logits.numpy()
    assert outputs[0].shape == (1, n, spec.vocab_size)
    np.testing.assert_allclose(outputs[0], expected, atol=TOLERANCE, rtol=0)
    assert outputs[1].shape == (1, spec.n_kv_head, n, spec.head_dim)

    # One incremental step: only the new token goes in, the prefix comes from the past.
    next_token = np.array([[int(expected[0, -1].argmax())]])
    step = session.run(None, {
        "input_ids": next_token, "attention_mask": np.ones((1, n + 1), np.int64),
        "position_ids": np.array([[n]], np.int64), **present_as_past(spec, outputs),
    })
    with torch.no_grad():
        full = model(torch.cat([prompt, torch.from_numpy(next_token)], dim=1)).logits.numpy()
    assert step[0].shape == (1, 1, spec.vocab_size)
    np.testing.assert_allclose(step[0][0, -1], full[0, -1], atol=TOLERANCE, rtol=0)
    assert step[1].shape[2] == n + 1


def test_left_padded_batch_matches_each_sequence_alone(exported, tiny_model):
    """Batched decoding pads shorter pasts on the left; the mask must make the padding invisible."""
    spec, session, _ = exported
    model, _ = tiny_model
    short, long = [7, 8, 9], [1, 2, 3, 4, 5, 6]
    width = len(long)
    ids = np.array([[0] * (width - len(short)) + short, long], np.int64)
    mask = np.array([[0] * (width - len(short)) + [1] * len(short), [1] * width], np.int64)
    positions = np.array([[0] * (width - len(short)) + list(range(len(short))), list(range(width))], np.int64)
    outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                 **empty_past(spec, 2)})
    with torch.no_grad():
        alone_short = model(torch.tensor([short])).logits.numpy()[0, -1]
        alone_long = model(torch.tensor([long])).logits.numpy()[0, -1]
    np.testing.assert_allclose(outputs[0][0, -1], alone_short, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(outputs[0][1, -1], alone_long, atol=TOLERANCE, rtol=0)

    # A step for both, still padded on the left.
    step = session.run(None, {
        "input_ids": np.array([[11], [12]], np.int64), "attention_mask": np.concatenate([mask, [[1], [1]]], axis=1),
        "position_ids": np.array([[len(short)], [len(long)]], np.int64), **present_as_past(spec, outputs),
    })
    with torch.no_grad():
        expect_short = model(torch.tensor([short + [11]])).logits.numpy()[0, -1]
        expect_long = model(torch.tensor([long + [12]])).logits.numpy()[0, -1]
    np.testing.assert_allclose(step[0][0, -1], expect_short, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(step[0][1, -1], expect_long, atol=TOLERANCE, rtol=0)


def optimized_perms(path, tmp_path) -> list[list[int]]:
    """The permutations of the Transposes left in the graph ORT runs (its optimizations applied)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    return [list(attribute.ints) for node in graph.node if node.op_type == "Transpose"
            for attribute in node.attribute if attribute.name == "perm"]


def test_the_key_cache_is_not_copied_transposed_each_step(exported, tmp_path):
    """Attention reads the key cache transposed inside the product: no 3-D transpose of the flattened cache is
    left in the graph ORT runs (the exporter's chain copied the whole cache every step), only the new tokens'
    4-D head transposes."""
    _, _, out = exported
    perms = optimized_perms(out, tmp_path)
    assert perms and [0, 2, 1] not in perms
    assert all(perm == [0, 2, 1, 3] for perm in perms)


def test_folding_the_key_transposes_changes_no_output_bit(exported, tiny_model, tmp_path, monkeypatch):
    """The same model exported without the fold gives bitwise the same logits and present key/values, for a
    left-padded batch with a past, and keeps the transposes the fold removes."""
    spec, session, _ = exported
    _, model_dir = tiny_model
    monkeypatch.setattr(onnx_export, "fold_graph_file", lambda path: 0)
    unfolded = tmp_path / "unfolded" / "model.onnx"
    export_decoder_onnx(model_dir, unfolded)
    assert [0, 2, 1] in optimized_perms(unfolded, tmp_path)
    reference = ort.InferenceSession(str(unfolded), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch, past = 3, 9
    feeds = {
        "input_ids": rng.integers(0, spec.vocab_size, (batch, 1)),
        "attention_mask": np.array([[0] * 4 + [1] * 6, [1] * 10, [0] * 7 + [1] * 3], np.int64),
        "position_ids": np.array([[5], [9], [2]], np.int64),
        **{name: rng.standard_normal((batch, spec.n_kv_head, past, spec.head_dim), dtype=np.float32)
           for name in spec.input_names if name.startswith("past_key_values.")},
    }
    for folded, plain in zip(session.run(None, feeds), reference.run(None, feeds), strict=True):
        assert folded.shape == plain.shape and np.array_equal(folded, plain)


def test_a_version_exported_before_the_fold_is_folded_where_triton_reads_it(tiny_model, tmp_path, monkeypatch):
    """The inference service folds an older export as it writes the model for Triton: the written graph copies no
    key cache, computes the same bits, and the export it came from (linked, not copied) is left as it was."""
    from services.inference.model_repository import write_model

    _, model_dir = tiny_model
    monkeypatch.setattr(onnx_export, "fold_graph_file", lambda path: 0)
    old = tmp_path / "old" / "model.onnx"
    spec = export_decoder_onnx(model_dir, old)
    before = old.read_bytes()
    version = write_model(tmp_path / "repository", "m", old.parent)
    assert old.read_bytes() == before
    assert [0, 2, 1] in optimized_perms(old, tmp_path) and [0, 2, 1] not in optimized_perms(version / "model.onnx",
                                                                                            tmp_path)
    assert (version / ONNX_DATA_FILE).stat().st_ino == (old.parent / ONNX_DATA_FILE).stat().st_ino
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, spec.vocab_size, (2, 3)), "attention_mask": np.ones((2, 8), np.int64),
             "position_ids": np.array([[5, 6, 7]] * 2, np.int64),
             **{name: rng.standard_normal((2, spec.n_kv_head, 5, spec.head_dim), dtype=np.float32)
                for name in spec.input_names if name.startswith("past_key_values.")}}
    served = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    exported = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"]).run(None, feeds)
    for mine, theirs in zip(served, exported, strict=True):
        assert np.array_equal(mine, theirs)


def test_a_reshape_chain_that_is_no_key_transpose_is_left_alone():
    """Reshape [a, b, c, d] -> [a, b*c, d], Transpose [0, 2, 1], Reshape -> [a, d, b, c] moves the elements
    otherwise than Transpose [0, 1, 3, 2] would: the fold must not touch it."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["turned"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["turned", "back_shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("flat_shape", TensorProto.INT64, [3], [2, 12, 5]),
         helper.make_tensor("back_shape", TensorProto.INT64, [4], [2, 5, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_graph.fold_key_transposes(model) == 0
    assert [node.op_type for node in model.graph.node] == ["Reshape", "Transpose", "Reshape"]

    # The key's own chain, [a*b, c, d] and back to [a, b, d, c], is folded, and computes the same.
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5), dtype=np.float32)
    model.graph.initializer[0].CopyFrom(helper.make_tensor("flat_shape", TensorProto.INT64, [3], [6, 4, 5]))
    model.graph.initializer[1].CopyFrom(helper.make_tensor("back_shape", TensorProto.INT64, [4], [2, 3, 5, 4]))
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert onnx_graph.fold_key_transposes(model) == 1
    assert [node.op_type for node in model.graph.node] == ["Transpose"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(before[0], after[0]) and np.array_equal(after[0], x.transpose(0, 1, 3, 2))


def test_weights_are_external_data_beside_the_graph(exported, tiny_model):
    """Every export keeps its weights in model.onnx.data, the layout a model past 2 GB needs."""
    _, _, out = exported
    model, _ = tiny_model
    data = out.parent / ONNX_DATA_FILE
    graph = onnx.load(str(out), load_external_data=False)
    external = [init for init in graph.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {entry.value for init in external for entry in init.external_data
                         if entry.key == "location"} == {ONNX_DATA_FILE}
    weights = sum(parameter.numel() for parameter in model.parameters()) * 4
    assert data.stat().st_size >= weights * 0.9  # (tied weights are stored once)
    inline = sum(init.ByteSize() for init in graph.graph.initializer if init not in external)
    assert inline < 0.05 * weights  # what stays in the graph are small vectors (norm weights, biases)


def test_a_spec_written_before_grouped_query_attention_reads_as_one_kv_head_per_head():
    old = {"n_layer": 2, "n_head": 4, "head_dim": 16, "vocab_size": 10, "context_length": 8, "eos_token_id": None,
           "input_names": ["input_ids"], "output_names": ["logits"]}
    spec = DecoderSpec.from_json(json.dumps(old))
    assert spec.n_kv_head == 4
    assert DecoderSpec.from_json(json.dumps({**old, "n_kv_head": 2})).n_kv_head == 2
