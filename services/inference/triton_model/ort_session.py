"""The ONNX Runtime session both Triton models (decoder `model.py`, `encoder_model.py`) run, set up once here.

Copied by the inference service beside the model's `model.py` (`<repository>/<model>/1/`), where Triton's
Python stub imports it from, with `cpus.py` (services/common/cpus.py); like the models it imports nothing
else from llmp.
"""

from __future__ import annotations

import math
import os

import onnxruntime as ort

try:  # beside it in the model's folder, as the inference service copies it (model_repository.py)
    from cpus import usable_cpus
except ModuleNotFoundError as missing:  # imported from the llmp tree (tests); an error inside cpus.py is raised
    if missing.name != "cpus":
        raise
    from services.common.cpus import usable_cpus


def usable_cores() -> int:
    """The cores ORT may spin threads on (cpus.py): without a container's quota, a 2-CPU pod on a 64-core node
    would run 64 ORT threads per session, throttled. A fractional quota rounds down."""
    return usable_cpus(math.floor)


def open_session(folder: str, parameters: dict[str, str]) -> ort.InferenceSession:
    """`folder`/model.onnx with the configuration's `intra_op_threads` and `providers` (config.pbtxt)."""
    options = ort.SessionOptions()
    # 0: every core this process may use (ORT's own 0 counts the machine's physical cores, not the affinity
    # or a container's CPU limit).
    options.intra_op_num_threads = int(parameters.get("intra_op_threads", "1")) or usable_cores()
    # Idle threads sleep instead of spinning between calls: the cores go to the service and gateway processes
    # handling the tokens between steps, and to the other models of this Triton.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    # The providers the configuration asks for (TensorRT, CUDA on a GPU host), those this ONNX Runtime has.
    available = set(ort.get_available_providers())
    wanted = parameters.get("providers", "CPUExecutionProvider").split(",")
    providers = [name for name in wanted if name in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=providers)
