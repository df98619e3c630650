"""Export a causal decoder (a `save_pretrained` folder) to ONNX with past key/values, for incremental decoding.

The graph (docs/CONTRACTS.md, "ONNX decoder"):
- inputs: `input_ids` int64 [batch, seq]; `attention_mask` int64 [batch, past+seq] (0 marks padding);
  `position_ids` int64 [batch, seq]; `past_key_values.{i}.key` / `.value` float32 [batch, n_head, past, head_dim]
  for every layer i (past may be 0 for the first call).
- outputs: `logits` float32 [batch, seq, vocab]; `present.{i}.key` / `.value` float32
  [batch, n_head, past+seq, head_dim], fed back as the next call's past.

It uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`): with transformers 5 the legacy
TorchScript exporter fails on `aten::diff`. Beside the graph goes `decoder.json`, a
`services.common.contracts.DecoderSpec` (`decoder_spec(model)`), which the inference service reads.

The saved graph's attention key transposes are folded (services/common/onnx_graph.py `fold_graph_file`):
as the exporter writes them, ONNX Runtime copies the whole key cache every step.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from services.common.contracts import DECODER_SPEC_FILE, DecoderSpec
from services.common.onnx_graph import fold_graph_file

log = logging.getLogger(__name__)

OPSET = 18


def decoder_spec(model: PreTrainedModel) -> DecoderSpec:
    """The served-model description of a Transformers causal LM (its graph's names, shapes and EOS)."""
    config = model.config.get_text_config(decoder=True)
    n_layer = config.num_hidden_layers
    n_head = config.num_attention_heads
    # Grouped-query attention caches fewer key/value heads than it has query heads; a model may also set
    # its head size apart from hidden_size // n_head (Qwen2 and Mistral configs carry `head_dim`).
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = [f"{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return DecoderSpec(
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(n_kv_head),
        head_dim=int(head_dim),
        vocab_size=config.vocab_size,
        context_length=int(context),
        eos_token_id=eos if eos is not None else config.eos_token_id,
        input_names=("input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in names)),
        output_names=("logits", *(f"present.{n}" for n in names)),
    )


class _DecoderWithPast(torch.nn.Module):
    """Flat tensors in and out around a Transformers causal LM, so the graph has named KV inputs/outputs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        cache = DynamicCache([(key, value) for key, value in past_key_values])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.logits, present


def _sample_inputs(spec: DecoderSpec, batch: int = 2, seq: int = 3, past: int = 4):
    """Example tensors for tracing. Sizes are > 1 and distinct so no dynamic axis is specialised."""
    input_ids = torch.zeros(batch, seq, dtype=torch.long)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq, dtype=torch.long).expand(batch, seq).contiguous()
    shape = (batch, spec.n_kv_head, past, spec.head_dim)
    past_kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(spec.n_layer)]
    return input_ids, attention_mask, position_ids, past_kv


def _dynamic_shapes(spec: DecoderSpec) -> dict:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=spec.context_length)
    past = torch.export.Dim("past", min=0, max=spec.context_length)
    total = torch.export.Dim("total", min=1, max=2 * spec.context_length)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(spec.n_layer)],
    }


def export_model_onnx(model: PreTrainedModel, out_path: Path) -> DecoderSpec:
    """Export an in-memory causal LM to `out_path` (the graph, its weights in `out_path` + ".data") and write
    its spec beside it."""
    model = model.eval().float()
    spec = decoder_spec(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns about axis renaming and pytree internals; none of it concerns the result.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _DecoderWithPast(model), _sample_inputs(spec), dynamo=True, opset_version=OPSET,
            dynamic_shapes=_dynamic_shapes(spec), input_names=list(spec.input_names),
            output_names=list(spec.output_names), verbose=False,
        )
        # Weights as external data always (`contracts.ONNX_DATA_FILE`): past 2 GB one file cannot hold them.
        program.save(str(out_path), external_data=True)
    folded = fold_graph_file(out_path)
    (out_path.parent / DECODER_SPEC_FILE).write_text(spec.to_json())
    log.info("exported %s layers=%d vocab=%d to %s (%d key transposes folded)", type(model).__name__, spec.n_layer,
             spec.vocab_size, out_path, folded)
    return spec


def export_decoder_onnx(model_dir: Path, out_path: Path) -> DecoderSpec:
    """Export the `save_pretrained` folder `model_dir` to `out_path` (e.g. `.../exports/onnx/model.onnx`).

    Writes `decoder.json` (a `DecoderSpec`) beside the graph. Returns the spec.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return export_model_onnx(model, out_path)
