"""Rewrites of an exported decoder's ONNX graph that make ONNX Runtime's work per step smaller, outputs unchanged.

The dynamo exporter writes attention's `key.transpose(-2, -1)` as reshape to 3-D, transpose, reshape back, which ONNX
Runtime cannot fuse into the product: it copies the whole key cache, transposed, every step (a quarter of a
batch-16 decoding step at GPT-2 small's shape). `fold_key_transposes` rewrites that chain as the one 4-D transpose
it is, which ORT folds into the product (`FusedMatMul` transB); the outputs are bitwise the same. The registry
applies it when it exports (services/registry/onnx_export.py); the inference service again when it writes a
model for Triton (model_repository.py), so versions exported before the fold existed get it too. It reads the
graph only: the weights (external data) stay where they are.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, shape_inference


def fold_graph_file(path: Path) -> int:
    """`fold_key_transposes` on the graph file at `path` (its weights, external data, are not read); returns how many
    were folded. A folded graph replaces the file, never writes through it: a hard link to an export stays as it was.
    A file that is no ONNX graph raises `google.protobuf.message.DecodeError`."""
    model = onnx.load(str(path), load_external_data=False)
    folded = fold_key_transposes(model)
    if folded:
        path.unlink()
        onnx.save(model, str(path))
    return folded


def fold_key_transposes(model: onnx.ModelProto) -> int:
    """Replace each Reshape [a, b, c, d] -> [a*b, c, d], Transpose [0, 2, 1], Reshape -> [a, b, d, c] in `model`
    by the Transpose [0, 1, 3, 2] it amounts to; returns how many. The shapes are proven by ONNX shape inference
    with data propagation (the reshapes' targets are computed from Shape ops), symbol for symbol: a chain whose
    shapes are not fully known is left alone."""
    graph = model.graph
    candidates = [node for node in graph.node if node.op_type == "Transpose" and _perm(node) == [0, 2, 1]]
    if not candidates:  # an export already folded: no shape inference (the inference service asks on every load)
        return 0
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {info.name: _dims(info) for info in (*inferred.value_info, *inferred.input, *inferred.output)}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept_outputs = {output.name for output in graph.output}
    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for node in candidates:
        after = consumers.get(node.output[0], [])
        first = producer.get(node.input[0])
        if len(after) != 1 or first is None or first.op_type != "Reshape" or after[0].op_type != "Reshape":
            continue
        second = after[0]
        if len(consumers[first.output[0]]) != 1 or {first.output[0], node.output[0]} & kept_outputs:
            continue
        source, flat, result = (shapes.get(name) for name in (first.input[0], first.output[0], second.output[0]))
        if not (source and flat and result and len(source) == 4 and len(flat) == 3 and len(result) == 4):
            continue
        a, b, c, d = source
        if None in source or flat[1:] != [c, d] or result != [a, b, d, c]:
            continue
        replaced[id(second)] = helper.make_node("Transpose", [first.input[0]], [second.output[0]],
                                                name=f"{node.name}_folded", perm=[0, 1, 3, 2])
        removed.update((id(first), id(node)))
    if not replaced:
        return 0
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


def _dims(info: onnx.ValueInfoProto) -> list[str | int | None] | None:
    """A value's dimensions (a number, a symbol, or None where unknown); None when its rank is unknown."""
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor.shape.dim]


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None
