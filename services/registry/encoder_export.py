"""Export an encoder (BERT, RoBERTa: a `save_pretrained` folder) to ONNX, for embeddings.

The graph (docs/CONTRACTS.md, "ONNX encoder"): inputs `input_ids`, `attention_mask` int64 [batch, seq]
(0 marks padding); output `last_hidden_state` float32 [batch, seq, hidden]. Pooling (the masked mean) is
left to the server, which knows which rows are padding. Like the decoder (onnx_export.py) it uses the
dynamo exporter and always stores its weights as external data; beside the graph goes `encoder.json`, an
`EncoderSpec`, which is how the registry's checks and the inference service tell an encoder export apart.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from services.common.contracts import ENCODER_SPEC_FILE, EncoderSpec
from services.registry.onnx_export import OPSET

log = logging.getLogger(__name__)

# Transformers model types served as encoders; llmp's `bert` family trains BertForMaskedLM.
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"})


def is_encoder(config: PretrainedConfig) -> bool:
    return config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)


def is_encoder_dir(model_dir: Path) -> bool:
    return is_encoder(AutoConfig.from_pretrained(model_dir))


def encoder_spec(model: PreTrainedModel) -> EncoderSpec:
    config = model.config
    context = config.max_position_embeddings
    if config.model_type in {"roberta", "xlm-roberta", "camembert"}:
        # RoBERTa's positions start after the padding index: two of its embeddings are never a position.
        context -= config.pad_token_id + 1
    return EncoderSpec(n_layer=config.num_hidden_layers, hidden_size=config.hidden_size,
                       vocab_size=config.vocab_size, context_length=int(context),
                       pad_token_id=int(config.pad_token_id or 0))


class _LastHiddenState(torch.nn.Module):
    """The base encoder (no task head) as `(input_ids, attention_mask) -> last_hidden_state`."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def base_encoder(model: PreTrainedModel) -> PreTrainedModel:
    """The encoder under a task head (BertForMaskedLM.bert), or the model itself when it has none."""
    return getattr(model, model.base_model_prefix, model)


def export_encoder_model_onnx(model: PreTrainedModel, out_path: Path) -> EncoderSpec:
    """Export an in-memory encoder to `out_path` (+ `.data`) and write `encoder.json` beside it."""
    model = base_encoder(model).eval().float()
    spec = encoder_spec(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=spec.context_length)
    # Sizes > 1 and distinct, with some padding, so no axis is specialised and the mask is not constant.
    input_ids = torch.full((2, 5), spec.pad_token_id, dtype=torch.long)
    input_ids[:, 0] = 1
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # axis renaming and pytree notes from the exporter
        program = torch.onnx.export(
            _LastHiddenState(model), (input_ids, attention_mask), dynamo=True, opset_version=OPSET,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            input_names=list(spec.input_names), output_names=list(spec.output_names), verbose=False)
        program.save(str(out_path), external_data=True)
    (out_path.parent / ENCODER_SPEC_FILE).write_text(spec.to_json())
    log.info("exported encoder %s layers=%d hidden=%d to %s", type(model).__name__, spec.n_layer,
             spec.hidden_size, out_path)
    return spec


def load_encoder(model_dir: Path) -> PreTrainedModel:
    """The version's base encoder in float32 (a masked-LM checkpoint loads without its head)."""
    return AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def export_encoder_onnx(model_dir: Path, out_path: Path) -> EncoderSpec:
    return export_encoder_model_onnx(load_encoder(model_dir), out_path)
