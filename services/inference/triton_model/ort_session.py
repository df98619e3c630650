"""The ONNX Runtime session both Triton models (decoder `model.py`, `encoder_model.py`) run, set up once here.

Copied by the inference service beside the model's `model.py` (`<repository>/<model>/1/`), where Triton's
Python stub imports it from; like the models it imports nothing from llmp.
"""

from __future__ import annotations

import os

import onnxruntime as ort


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, narrowed by a container's CPU quota (cgroup v2
    `cpu.max`, or v1's quota over period), which Kubernetes sets from a CPU limit without touching affinity.
    Without it a 2-CPU pod on a 64-core node would run 64 ORT threads per session, throttled."""
    cores = len(os.sched_getaffinity(0))
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as handle:
                fields = handle.read().split()
            if period_file is not None:
                with open(period_file) as handle:
                    fields.append(handle.read().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota not in {"max", "-1"} and period > 0:
            return max(1, min(cores, int(float(quota) // period)))
    return cores


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
