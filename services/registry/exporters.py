"""Export a version's `save_pretrained` folder to a serving format and check it against PyTorch.

Formats:
- `onnx`: the decoder with past key/values (`onnx_export.export_decoder_onnx`, dynamo exporter), or for
  an encoder (BERT, RoBERTa) its last hidden state (`encoder_export.export_encoder_onnx`), for embeddings;
- `onnx-int8`: that graph, statically quantized with ONNX Runtime (`quantize_static`, QDQ, INT8 weights
  and activations of MatMul/Gemm) and calibrated on the dataset's calibration split;
- `torchscript`: `torch.jit.trace` of the model's `input_ids -> logits`.

ONNX exports also get Triton's model repository layout (`{model}/config.pbtxt`, `{model}/1/model.onnx` and its
external data `model.onnx.data`).
Everything here is synchronous and CPU-bound: the service runs it in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from services.common import contracts
from services.common.errors import ValidationFailed
from services.registry import parity

log = logging.getLogger(__name__)

TRITON_MAX_BATCH = 8


@contextlib.contextmanager
def _torchscript_is_requested():
    """TorchScript is deprecated in torch 2.13 but is a format users ask for: silence only that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


@dataclass(frozen=True)
class EvalData:
    """Token windows [n, seq] int64 the checks run on, and where they came from."""

    held_out: np.ndarray  # parity inputs (the test split when the lineage names a dataset)
    test: np.ndarray | None = None  # perplexity windows (int8)
    calibration: np.ndarray | None = None  # int8 calibration windows
    source: str = "random tokens"


@dataclass
class ExportOutcome:
    """Files written under `out_dir` (relative paths) and the parity report."""

    files: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    passed: bool = False
    triton_model: str = ""


# Writes the format's files into out_dir and returns the main file's path.
Exporter = Callable[[Path, Path, EvalData], Path]


def export_onnx(model_dir: Path, out_dir: Path, data: EvalData) -> Path:
    """The decoder with past key/values, or for an encoder (BERT-style) its last hidden state."""
    from services.registry.encoder_export import export_encoder_onnx, is_encoder_dir
    from services.registry.onnx_export import export_decoder_onnx

    path = out_dir / "model.onnx"
    if is_encoder_dir(model_dir):
        export_encoder_onnx(model_dir, path)
    else:
        export_decoder_onnx(model_dir, path)
    return path


def _decoder_only(fmt: str, model_dir: Path) -> None:
    from services.registry.encoder_export import is_encoder_dir

    if is_encoder_dir(model_dir):
        raise ValidationFailed(f"format {fmt!r} is for decoders; an encoder exports as 'onnx' (embeddings)")


def kv_heads(spec: dict) -> int:
    """Key/value heads of a `decoder.json` (one written before grouped-query attention has only n_head)."""
    return int(spec.get("n_kv_head") or spec["n_head"])


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over calibration windows, one window per batch, empty past."""

    def __init__(self, windows: np.ndarray, spec: dict, input_names: list[str]) -> None:
        self._items: Iterator[dict] = iter([self._feeds(window[None, :], spec, input_names) for window in windows])

    @staticmethod
    def _feeds(input_ids: np.ndarray, spec: dict, input_names: list[str]) -> dict:
        seq = input_ids.shape[1]
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones((1, seq), dtype=np.int64),
                 "position_ids": np.arange(seq, dtype=np.int64)[None, :]}
        empty = np.zeros((1, kv_heads(spec), 0, spec["head_dim"]), dtype=np.float32)
        feeds.update({name: empty for name in input_names if name.startswith("past_key_values.")})
        return feeds

    def get_next(self) -> dict | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - part of ONNX Runtime's reader protocol
        pass


def export_onnx_int8(model_dir: Path, out_dir: Path, data: EvalData) -> Path:
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _decoder_only("onnx-int8", model_dir)
    if data.calibration is None or data.test is None:
        raise ValidationFailed("onnx-int8 needs the lineage dataset's calibration and test splits; "
                               "this version names no READY dataset")
    scratch = out_dir / "fp32"
    fp32 = export_onnx(model_dir, scratch, data)
    spec = json.loads((scratch / "decoder.json").read_text())
    inputs = [item.name for item in onnxruntime.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
              .get_inputs()]
    path = out_dir / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ORT's quantizer warns about shape inference on dynamic graphs
        quantize_static(str(fp32), str(path), _CalibrationReader(data.calibration, spec, inputs),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    shutil.copy(scratch / "decoder.json", out_dir / "decoder.json")
    shutil.rmtree(scratch)
    return path


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def export_torchscript(model_dir: Path, out_dir: Path, data: EvalData) -> Path:
    _decoder_only("torchscript", model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.return_dict = True
    # Trace with a batch and length unlike the parity inputs': the check then proves shapes stay dynamic.
    example = torch.from_numpy(data.held_out[:2, : max(2, data.held_out.shape[1] // 2)].copy())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation, and tracer warnings about control flow on shapes
        traced = torch.jit.trace(_LogitsOnly(model), (example,), check_trace=False, strict=False)
    path = out_dir / "model.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with _torchscript_is_requested():
        traced.save(str(path))
    return path


EXPORTERS: dict[str, Exporter] = {"onnx": export_onnx, "onnx-int8": export_onnx_int8, "torchscript": export_torchscript}


def triton_config(model_name: str, spec: dict) -> str:
    """config.pbtxt for the ONNX decoder: batch is Triton's implicit first dimension, dynamic batching on."""
    heads, head_dim, vocab = kv_heads(spec), spec["head_dim"], spec["vocab_size"]

    def tensor(name: str, dtype: str, dims: list[int]) -> str:
        return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }}'

    kv = [f"{i}.{kind}" for i in range(spec["n_layer"]) for kind in ("key", "value")]
    inputs = [tensor("input_ids", "TYPE_INT64", [-1]), tensor("attention_mask", "TYPE_INT64", [-1]),
              tensor("position_ids", "TYPE_INT64", [-1]),
              *(tensor(f"past_key_values.{name}", "TYPE_FP32", [heads, -1, head_dim]) for name in kv)]
    outputs = [tensor("logits", "TYPE_FP32", [-1, vocab]),
               *(tensor(f"present.{name}", "TYPE_FP32", [heads, -1, head_dim]) for name in kv)]
    return (f'name: "{model_name}"\nbackend: "onnxruntime"\nmax_batch_size: {TRITON_MAX_BATCH}\n'
            "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
            "dynamic_batching {\n  max_queue_delay_microseconds: 1000\n}\n"
            "version_policy: { latest: { num_versions: 1 } }\n")


def check(fmt: str, model_dir: Path, path: Path, data: EvalData, thresholds: parity.Thresholds) -> tuple[dict, bool]:
    """Run the format's parity checks of `path` against the PyTorch model in `model_dir`."""
    if (path.parent / contracts.ENCODER_SPEC_FILE).exists():
        return _check_encoder(fmt, model_dir, path, data, thresholds)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    report: dict = {"format": fmt, "inputs_from": data.source}
    if fmt == "torchscript":
        with _torchscript_is_requested():
            scripted = torch.jit.load(str(path)).eval()

        def run(input_ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return scripted(torch.from_numpy(input_ids)).float().numpy()

        report["logits"] = parity.logits_report(model, run, data.held_out, thresholds.max_abs_logit_diff)
        passed = report["logits"]["passed"]
    else:
        import onnxruntime

        spec = json.loads((path.parent / "decoder.json").read_text())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        run = parity.onnx_logits_fn(session, kv_heads(spec), spec["head_dim"])
        if fmt == "onnx":
            bound = thresholds.max_abs_logit_diff
            report["logits"] = parity.logits_report(model, run, data.held_out, bound)
            report["incremental"] = parity.incremental_report(model, session, data.held_out, kv_heads(spec),
                                                              spec["head_dim"], bound)
            passed = report["logits"]["passed"] and report["incremental"]["passed"]
        else:
            report["logits"] = parity.logits_report(model, run, data.held_out, thresholds.int8_max_abs_logit_diff)
            report["perplexity"] = parity.perplexity_report(model, run, data.test,
                                                            thresholds.int8_max_perplexity_increase)
            passed = report["logits"]["passed"] and report["perplexity"]["passed"]
    report["max_abs_logit_diff"] = report["logits"]["max_abs_logit_diff"]
    report["passed"] = bool(passed)
    return report, bool(passed)


def _check_encoder(fmt: str, model_dir: Path, path: Path, data: EvalData,
                   thresholds: parity.Thresholds) -> tuple[dict, bool]:
    """An encoder export: hidden states and mean-pooled embeddings against PyTorch's, on padded rows."""
    import onnxruntime

    from services.registry.encoder_export import load_encoder

    spec = contracts.EncoderSpec.from_json((path.parent / contracts.ENCODER_SPEC_FILE).read_text())
    # The held-out windows are the dataset's tokens (or random ones); an encoder's context may be shorter.
    inputs = np.ascontiguousarray(data.held_out[:, : spec.context_length] % spec.vocab_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    embeddings = parity.encoder_report(load_encoder(model_dir), session, inputs, thresholds.max_abs_logit_diff)
    report = {"format": fmt, "inputs_from": data.source, "kind": "encoder", "embeddings": embeddings,
              "max_abs_logit_diff": embeddings["max_abs_hidden_diff"], "passed": embeddings["passed"]}
    return report, bool(embeddings["passed"])


def export(fmt: str, model_dir: Path, out_dir: Path, data: EvalData, *, triton_model: str = "",
           thresholds: parity.Thresholds | None = None, exporters: dict[str, Exporter] | None = None) -> ExportOutcome:
    """Export `model_dir` as `fmt` into `out_dir`, check parity, lay out the Triton repository for ONNX."""
    thresholds = thresholds or parity.Thresholds()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (exporters or EXPORTERS)[fmt](model_dir, out_dir, data)
    report, passed = check(fmt, model_dir, path, data, thresholds)
    outcome = ExportOutcome(report=report, passed=passed)
    # An encoder is served by llmp's Python-backend model only (model_repository.py), not this layout.
    if fmt in {"onnx", "onnx-int8"} and triton_model and (out_dir / contracts.DECODER_SPEC_FILE).exists():
        spec = json.loads((out_dir / "decoder.json").read_text())
        folder = out_dir / "triton" / triton_model
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(triton_config(triton_model, spec))
        for item in contracts.onnx_files(os.listdir(path.parent)):  # the graph and its external data
            shutil.copy(path.parent / item, folder / "1" / item)
        outcome.triton_model = triton_model
    outcome.files = sorted(str(item.relative_to(out_dir)) for item in out_dir.rglob("*") if item.is_file())
    log.info("exported", extra={"format": fmt, "passed": passed, "max_abs_logit_diff": report["max_abs_logit_diff"]})
    return outcome
