"""A training job's specification: dataset, model, hyper-parameters and distributed layout.

The shape is the body of `POST /v1/training-jobs` (docs/API.md). `JobSpec.from_dict` parses and
`validate()` checks it; both raise `ValidationFailed` naming the offending field (e.g.
`hyperparameters.learning_rate`), so the coordinator refuses a bad spec at submit (422) and the
runtime never discovers it. `to_dict()` is the resolved spec, every default filled in, that travels in
the job file and is stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.common import contracts
from services.common.errors import ValidationFailed

if TYPE_CHECKING:
    from services.common.config import Settings

FAMILIES = contracts.MODEL_FAMILIES
FINETUNE_FAMILIES = contracts.FINETUNE_FAMILIES
MODES = contracts.DISTRIBUTED_MODES
PRECISIONS = contracts.PRECISIONS
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass
class DatasetRef:
    """Which dataset version the job trains on (only READY versions are accepted by the coordinator)."""

    name: str = ""  # dataset name; required
    version: int = 0  # dataset version, >= 1; required


@dataclass
class ModelRef:
    """A registry model version to initialise the weights from."""

    name: str = ""  # registered model name
    version: int = 0  # its version, >= 1


# LoRA's default target modules per architecture: the attention projections, where LoRA's authors found
# most of the gain (Hu et al. 2021, section 7.1). GPT-2's `c_proj` names both the attention output and the
# MLP output projection (both are adapted).
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
# The linear layers of each architecture's blocks that an adapter may target (checked at submit, so a
# misspelt name is a 422, not a job that fails when peft finds nothing to adapt).
LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass
class AdapterSpec:
    """A parameter-efficient fine-tune: only the adapter's weights train (see `adapters.py`)."""

    type: str = "lora"  # lora (low-rank updates W + (alpha / r) * B @ A of the target layers)
    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=list)  # layer names; [] = the architecture's default


@dataclass
class ModelSpec:
    """The architecture, built from a Transformers config (see `models.py`), or a registry version's."""

    # gpt2 (decoder, causal LM), bert (encoder, masked LM), t5 (encoder-decoder); with `init_from`, the
    # version's architecture (also llama, qwen2, mistral), filled in at submit when left out.
    family: str = "gpt2"
    n_layer: int = 4  # transformer blocks (per stack for t5)
    n_head: int = 4  # attention heads; must divide n_embd
    n_embd: int = 128  # hidden size
    block_size: int = 128  # tokens per training sequence (the model's context for gpt2/bert)
    dropout: float = 0.0  # dropout on embeddings, residuals and attention; 0 for small data is fine
    init_from: ModelRef | None = None  # start from a registry version instead of from scratch
    adapter: AdapterSpec | None = None  # with init_from: train an adapter instead of every weight

    def resolve_base(self, family: str) -> None:
        """Fill in what the `init_from` version decides: its architecture, the adapter's default targets.

        ValidationFailed naming the field when the spec asks for something the version cannot be.
        """
        if self.family and self.family != family:
            raise ValidationFailed(f"model.family is {self.family} but model.init_from "
                                   f"{self.init_from.name} v{self.init_from.version} is a {family} model")
        _check(family in FINETUNE_FAMILIES, "model.init_from",
               f"is a {family} model; fine-tuning supports {', '.join(FINETUNE_FAMILIES)}")
        self.family = family
        adapter = self.adapter
        if adapter is None:
            return
        known = LINEAR_MODULES.get(family)
        if not adapter.target_modules:
            _check(family in LORA_TARGET_MODULES, "model.adapter.target_modules",
                   f"has no default for {family} models: name the layers to adapt")
            adapter.target_modules = list(LORA_TARGET_MODULES[family])
        elif known is not None:
            for name in adapter.target_modules:
                _check(name in known, "model.adapter.target_modules",
                       f"names {name!r}, not a linear layer of {family} blocks ({', '.join(known)})")


@dataclass
class HyperParameters:
    """Optimisation: AdamW, linear warmup then cosine decay to `min_learning_rate` (nanoGPT's recipe)."""

    batch_size: int = 16  # sequences per micro-batch per process
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_learning_rate: float = 6e-5  # floor of the cosine decay, reached at max_steps
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate; may be 0
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not on biases and norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.95 is steadier than 0.999 for LMs)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_interval: int = 100  # evaluate on the validation split every N steps (and at the end)
    eval_batches: int = 20  # micro-batches per evaluation (split across processes)
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0 disables
    checkpoint_interval: int = 0  # checkpoint every N steps; 0 means every eval_interval; always at the end
    log_interval: int = 10  # emit a train event every N steps
    precision: str = "fp32"  # fp32, or bf16 autocast (weights and optimizer stay fp32)
    seed: int = 1337  # seeds the initial weights, data order, masking and dropout
    mlm_probability: float = 0.15  # bert only: fraction of tokens masked

    @property
    def effective_checkpoint_interval(self) -> int:
        return self.checkpoint_interval or self.eval_interval


@dataclass
class DistributedSpec:
    """How the job is spread over processes (see `distributed.py` for the modes)."""

    mode: str = "ddp"  # ddp (all-reduce every step), local-sgd (periodic averaging), async (overlapped averaging)
    nproc_per_node: int = 1  # processes per node (one per GPU on GPU machines)
    nnodes: int = 1  # nodes, each joining the same rendezvous
    sync_interval: int = 8  # local-sgd and async: optimizer steps between model averagings

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class FleetLimits:
    """What this deployment's fleet can run, from its settings (LLMP_TRAINING_*): tighter than the rules of
    `JobSpec.validate`, which hold on any fleet. Checked at submit, so a job the fleet cannot run is refused
    (422 naming the field and the setting) instead of waiting forever or hogging the fleet."""

    max_nnodes: int = 8  # LLMP_TRAINING_WORKERS: nodes a job may span, at most every worker
    max_n_embd: int = 4096  # LLMP_TRAINING_MAX_N_EMBD
    max_n_layer: int = 48  # LLMP_TRAINING_MAX_N_LAYER
    max_steps: int = 1_000_000  # LLMP_TRAINING_MAX_STEPS

    @classmethod
    def from_settings(cls, settings: Settings) -> FleetLimits:
        return cls(max_nnodes=settings.training_workers, max_n_embd=settings.training_max_n_embd,
                   max_n_layer=settings.training_max_n_layer, max_steps=settings.training_max_steps)


@dataclass
class JobSpec:
    dataset: DatasetRef = field(default_factory=DatasetRef)
    model: ModelSpec = field(default_factory=ModelSpec)
    hyperparameters: HyperParameters = field(default_factory=HyperParameters)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Parse a JSON-like dict; unknown fields and wrong types raise `ValidationFailed` naming the field.

        A fine-tune (`model.init_from`) that names no family gets the version's own (`resolve_base`).
        """
        spec = _build(cls, data, "")
        model = data.get("model") or {}
        if spec.model.init_from is not None and not model.get("family"):
            spec.model.family = ""
        spec.validate()
        return spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every rule; the first broken one raises `ValidationFailed` naming its field."""
        d, m, h, x = self.dataset, self.model, self.hyperparameters, self.distributed
        contracts.validate_name(d.name, "dataset.name")
        _check(d.version >= 1, "dataset.version", "must be >= 1")
        if m.init_from is None:
            _check(m.family in FAMILIES, "model.family",
                   f"must be one of {', '.join(FAMILIES)} (other architectures need model.init_from)")
        else:  # "" until the coordinator reads the version's architecture
            _check(m.family in ("", *FINETUNE_FAMILIES), "model.family",
                   f"must be one of {', '.join(FINETUNE_FAMILIES)}")
        _check(1 <= m.n_layer <= 128, "model.n_layer", "must be between 1 and 128")
        _check(1 <= m.n_head <= 128, "model.n_head", "must be between 1 and 128")
        _check(1 <= m.n_embd <= 16384, "model.n_embd", "must be between 1 and 16384")
        _check(m.n_embd % m.n_head == 0, "model.n_embd", f"must be a multiple of model.n_head ({m.n_head})")
        _check(2 <= m.block_size <= 32768, "model.block_size", "must be between 2 and 32768")
        _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        if m.init_from is not None:
            contracts.validate_name(m.init_from.name, "model.init_from.name")  # a registry path segment
            _check(m.init_from.version >= 1, "model.init_from.version", "must be >= 1")
        if m.adapter is not None:
            a = m.adapter
            _check(m.init_from is not None, "model.adapter", "needs model.init_from (an adapter adapts a model)")
            _check(a.type in contracts.ADAPTER_TYPES, "model.adapter.type",
                   f"must be one of {', '.join(contracts.ADAPTER_TYPES)}")
            _check(1 <= a.r <= 1024, "model.adapter.r", "must be between 1 and 1024")
            _check(0.0 < a.alpha <= 65536.0, "model.adapter.alpha", "must be in (0, 65536]")
            _check(0.0 <= a.dropout < 1.0, "model.adapter.dropout", "must be in [0, 1)")
            _check(len(a.target_modules) <= 64, "model.adapter.target_modules", "must name at most 64 layers")
            for name in a.target_modules:
                _check(bool(_MODULE_NAME.match(name)), "model.adapter.target_modules",
                       f"names {name!r}: layer names are letters, digits and underscores")
            _check(len(set(a.target_modules)) == len(a.target_modules), "model.adapter.target_modules",
                   "names a layer twice")
        _check(1 <= h.batch_size <= 65536, "hyperparameters.batch_size", "must be between 1 and 65536")
        _check(1 <= h.max_steps <= 10_000_000, "hyperparameters.max_steps", "must be between 1 and 10000000")
        _check(0.0 < h.learning_rate <= 1.0, "hyperparameters.learning_rate", "must be in (0, 1]")
        _check(0.0 <= h.min_learning_rate <= h.learning_rate, "hyperparameters.min_learning_rate",
               "must be in [0, learning_rate]")
        _check(0 <= h.warmup_steps <= h.max_steps, "hyperparameters.warmup_steps", "must be in [0, max_steps]")
        _check(0.0 <= h.weight_decay <= 1.0, "hyperparameters.weight_decay", "must be in [0, 1]")
        _check(0.0 <= h.beta1 < 1.0, "hyperparameters.beta1", "must be in [0, 1)")
        _check(0.0 <= h.beta2 < 1.0, "hyperparameters.beta2", "must be in [0, 1)")
        _check(h.grad_clip >= 0.0, "hyperparameters.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(1 <= h.grad_accum <= 4096, "hyperparameters.grad_accum", "must be between 1 and 4096")
        _check(h.eval_interval >= 1, "hyperparameters.eval_interval", "must be >= 1")
        _check(h.eval_batches >= 1, "hyperparameters.eval_batches", "must be >= 1")
        _check(h.early_stopping_patience >= 0, "hyperparameters.early_stopping_patience", "must be >= 0")
        _check(h.checkpoint_interval >= 0, "hyperparameters.checkpoint_interval", "must be >= 0")
        _check(h.log_interval >= 1, "hyperparameters.log_interval", "must be >= 1")
        _check(h.precision in PRECISIONS, "hyperparameters.precision", f"must be one of {', '.join(PRECISIONS)}")
        _check(0 <= h.seed < 2**32, "hyperparameters.seed", "must be in [0, 2**32)")
        _check(0.0 < h.mlm_probability < 1.0, "hyperparameters.mlm_probability", "must be in (0, 1)")
        _check(x.mode in MODES, "distributed.mode", f"must be one of {', '.join(MODES)}")
        _check(1 <= x.nproc_per_node <= 64, "distributed.nproc_per_node", "must be between 1 and 64")
        _check(1 <= x.nnodes <= 64, "distributed.nnodes", "must be between 1 and 64")
        _check(x.sync_interval >= 1, "distributed.sync_interval", "must be >= 1")

    def check_fleet(self, limits: FleetLimits) -> None:
        """The bounds of what this deployment's fleet runs (`FleetLimits`), each refusal naming the field."""
        m, h, x = self.model, self.hyperparameters, self.distributed
        _check(x.nnodes <= limits.max_nnodes, "distributed.nnodes",
               f"is {x.nnodes} but the fleet runs {limits.max_nnodes} training nodes (LLMP_TRAINING_WORKERS)")
        _check(m.n_embd <= limits.max_n_embd, "model.n_embd",
               f"must be at most {limits.max_n_embd} on this deployment (LLMP_TRAINING_MAX_N_EMBD)")
        _check(m.n_layer <= limits.max_n_layer, "model.n_layer",
               f"must be at most {limits.max_n_layer} on this deployment (LLMP_TRAINING_MAX_N_LAYER)")
        _check(h.max_steps <= limits.max_steps, "hyperparameters.max_steps",
               f"must be at most {limits.max_steps} on this deployment (LLMP_TRAINING_MAX_STEPS)")

    def check_dataset(self, vocab_size: int, train_tokens: int, validation_tokens: int) -> None:
        """Rules that need the dataset's manifest (the coordinator has it at submit, the runtime at start)."""
        _check(vocab_size >= 2, "dataset", f"has a vocabulary of {vocab_size} tokens")
        needed = self.model.block_size + 1
        _check(train_tokens >= needed, "model.block_size",
               f"is {self.model.block_size} but the train split has only {train_tokens} tokens")
        _check(validation_tokens >= needed, "model.block_size",
               f"is {self.model.block_size} but the validation split has only {validation_tokens} tokens")

    def check_supervised_dataset(self, train_examples: int, validation_examples: int) -> None:
        """Rules for a supervised dataset (format pairs or chat), whose loss is on the answers' tokens of a
        causal language model and whose rows are whole examples (so no minimum of tokens)."""
        _check(self.model.family not in NOT_CAUSAL_FAMILIES, "model.family",
               f"{self.model.family} does not train on supervised data (format pairs or chat): its loss is on "
               "answer tokens of a causal language model, e.g. gpt2")
        _check(train_examples > 0, "dataset", "has no examples in its train split")
        _check(validation_examples > 0, "dataset", "has no examples in its validation split")


NOT_CAUSAL_FAMILIES = ("bert", "t5")  # objectives other than next-token prediction over one sequence


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValidationFailed(f"{name} {message}")


_SCALARS = {int: "an integer", float: "a number", str: "a string"}


def _build(cls: type, data: Any, path: str) -> Any:
    """Instantiate the dataclass `cls` from `data`, checking names and types field by field."""
    if not isinstance(data, dict):
        raise ValidationFailed(f"{path.rstrip('.') or 'spec'} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValidationFailed(f"{path}{unknown[0]} is not a known field")
    values = {}
    for name, value in data.items():
        kind = _FIELD_TYPES[cls][name]
        where = f"{path}{name}"
        if dataclasses.is_dataclass(kind):
            optional = name in ("init_from", "adapter")
            values[name] = None if value is None and optional else _build(kind, value, where + ".")
        elif kind is list:
            values[name] = _strings(value, where)
        else:
            values[name] = _scalar(kind, value, where)
    return cls(**values)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValidationFailed(f"{where} must be a list of strings")
    return list(value)


def _scalar(kind: type, value: Any, where: str) -> Any:
    # bool is an int in Python: refuse it explicitly; accept integral floats for ints (JSON writers differ).
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValidationFailed(f"{where} must be {_SCALARS[kind]}")
    if kind is str:
        if not isinstance(value, str):
            raise ValidationFailed(f"{where} must be a string")
        return value
    if isinstance(value, str):
        raise ValidationFailed(f"{where} must be {_SCALARS[kind]}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValidationFailed(f"{where} must be an integer")
        return int(value)
    return float(value)


# Field types resolved once (the annotations are strings under `from __future__ import annotations`).
_FIELD_TYPES: dict[type, dict[str, type]] = {
    DatasetRef: {"name": str, "version": int},
    ModelRef: {"name": str, "version": int},
    AdapterSpec: {"type": str, "r": int, "alpha": float, "dropout": float, "target_modules": list},
    ModelSpec: {"family": str, "n_layer": int, "n_head": int, "n_embd": int, "block_size": int,
                "dropout": float, "init_from": ModelRef, "adapter": AdapterSpec},
    HyperParameters: {f.name: {"int": int, "float": float, "str": str}[f.type]
                      for f in dataclasses.fields(HyperParameters)},
    DistributedSpec: {f.name: {"int": int, "float": float, "str": str}[f.type]
                      for f in dataclasses.fields(DistributedSpec)},
    JobSpec: {"dataset": DatasetRef, "model": ModelSpec, "hyperparameters": HyperParameters,
              "distributed": DistributedSpec},
}
