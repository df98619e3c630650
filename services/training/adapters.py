"""LoRA adapters through `peft`: wrapping a loaded model, its trainable state, and what a fine-tune leaves.

Only the adapter's low-rank matrices train: the base weights are frozen (`requires_grad=False`), so
the optimizer (`train.make_optimizer` takes trainable parameters only) holds AdamW moments for the
adapter alone, the averaging modes exchange the adapter alone (`distributed.trainable`), and
checkpoints hold the adapter alone (`model/` is `PeftModel.save_pretrained`: adapter_config.json and
adapter_model.safetensors). The base is the `init_from` version, fetched again on resume.

A finished fine-tune is written as two things in one folder (`write_final`): the merged model
(W + (alpha / r) * B @ A folded into every target layer, a plain `save_pretrained` directory any
Transformers or serving code loads) and `adapter/`, which `peft.PeftModel.from_pretrained(base,
"adapter")` puts back on the base.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from services.training.spec import AdapterSpec

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_DIR = "adapter"  # the fine-tuned version's adapter folder (registry role `adapter`)
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_TASKS = {"bert": None, "t5": "SEQ_2_SEQ_LM"}  # everything else fine-tuned is a causal LM


def wrap(model: PreTrainedModel, spec: AdapterSpec, family: str, *, seed: int) -> PeftModel:
    """`model` with a fresh LoRA adapter on `spec.target_modules`, its base frozen.

    The adapter's initial A matrices are drawn from `seed` (B starts at zero, so the wrapped model
    computes exactly what the base does until the first step).
    """
    from peft import LoraConfig, get_peft_model  # imported when needed: peft adds seconds to every job's start-up

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none",
                        task_type=_TASKS.get(family, "CAUSAL_LM"),
                        fan_in_fan_out=family == "gpt2")  # GPT-2's Conv1D stores weights transposed
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft (locked version) still asks for the property Transformers renamed; harmless until v6.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_adapted(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported: no model was wrapped (wrap and load import it)
    return peft is not None and isinstance(model, peft.PeftModel)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train, on the host: all of them for a full fine-tune, the adapter's for LoRA."""
    if not is_adapted(model):
        return {name: value.cpu() for name, value in model.state_dict().items()}
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: value.cpu() for name, value in model.state_dict().items() if name in names}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`: every trainable weight must be there (the frozen base is not)."""
    if not is_adapted(model):
        model.load_state_dict(state)
        return
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if name in dict(model.named_parameters())
               and dict(model.named_parameters())[name].requires_grad]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"adapter state does not fit the model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")


def load_checkpoint(model: PeftModel, folder: Path) -> None:
    """Put the adapter weights a checkpoint's `model/` holds (PeftModel.save_pretrained) on `model`."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(folder / ADAPTER_WEIGHTS))


def write_final(model: PeftModel, final_dir: Path, base: str) -> PreTrainedModel:
    """Write `final_dir/adapter/` (the adapter, naming `base` as its base model) and, in `final_dir`, the
    merged model; returns the merged model.

    Merging folds the adapter into the layers in place: `model` is spent afterwards (the run is over).
    """
    for config in model.peft_config.values():
        config.base_model_name_or_path = base  # not the scratch folder it was loaded from
    model.save_pretrained(final_dir / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
    merged = model.merge_and_unload()
    merged.save_pretrained(final_dir, safe_serialization=True)
    return merged
