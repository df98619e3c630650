"""deploy/triton: the Triton image installs what llmp's Triton model imports, and the model runs where
the configuration says (GPU and ONNX Runtime's CUDA / TensorRT providers on a GPU host, CPU locally)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.common.config import DEFAULTS, Settings
from services.inference import model_repository

ROOT = Path(__file__).resolve().parents[3]
IMAGE = ROOT / "deploy" / "triton"
MODEL_CODE = ROOT / "services" / "inference" / "triton_model"
# Modules Triton's Python backend provides to every model (https://github.com/triton-inference-server/python_backend).
FROM_THE_BACKEND = {"triton_python_backend_utils"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}  # an import under these is a fallback, not taken there


def imported_modules() -> set[str]:
    """What the model's folder imports in Triton: every import of its modules but an `except ImportError`
    fallback (ort_session.py's, for the llmp tree), less the standard library and the modules beside it."""
    found: set[str] = set()
    beside = [*MODEL_CODE.glob("*.py"), *model_repository.MODULES_BESIDE_THE_MODEL]
    for path in beside:
        tree = ast.parse(path.read_text())
        fallbacks = {id(node) for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler)
                     and isinstance(handler.type, ast.Name) and handler.type.id in IMPORT_ERRORS
                     for node in ast.walk(handler)}
        for node in ast.walk(tree):
            if id(node) in fallbacks:
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    siblings = {path.stem for path in beside}  # copied beside model.py (model_repository)
    return {name for name in found if name not in sys.stdlib_module_names | siblings and name != "__future__"}


def installed() -> dict[str, str]:
    """Canonical distribution name -> pinned version, from the image's requirements."""
    lines = [line.strip() for line in (IMAGE / "requirements.txt").read_text().splitlines()]
    pins = {}
    for line in lines:
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line} is not pinned"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_the_image_derives_from_ngc_triton_and_installs_its_requirements():
    dockerfile = (IMAGE / "Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3$", dockerfile, re.MULTILINE)
    assert "FROM ${TRITON_IMAGE}" in dockerfile
    assert "pip install --no-cache-dir --no-deps -r /opt/llmp/requirements.txt" in dockerfile


def test_every_module_the_model_imports_is_installed_pinned():
    modules = imported_modules()
    assert {"onnxruntime", "numpy"} <= modules  # guards the scan
    pins = installed()
    for module in modules - FROM_THE_BACKEND:
        # A module is installed by its distribution, or by that distribution's GPU build (onnxruntime-gpu).
        assert {canonicalize_name(module), canonicalize_name(module) + "-gpu"} & set(pins), module
    assert "onnxruntime-gpu" in pins, "the GPU build: CUDA and TensorRT execution providers"


def test_locally_the_model_runs_on_cpu(tmp_path):
    settings = Settings.from_env({})
    assert DEFAULTS["LLMP_TRITON_INSTANCE_KIND"] == "KIND_CPU"
    config = _written(tmp_path, model_repository.BatchingConfig.from_settings(settings))
    assert "kind: KIND_CPU" in config and 'string_value: "CPUExecutionProvider"' in config


def test_on_a_gpu_host_the_model_runs_on_the_gpu(tmp_path, overlay):
    """What the Kubernetes ConfigMap sets (compose: test_compose.py) reaches the written Triton model."""
    _, objects = overlay
    (config_map,) = [obj for obj in objects if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "llmp-config"]
    settings = Settings.from_env({key: value for key, value in config_map["data"].items()
                                  if key.startswith("LLMP_TRITON_")})
    config = _written(tmp_path, model_repository.BatchingConfig.from_settings(settings))
    assert "kind: KIND_GPU" in config
    providers = re.search(r'key: "providers" value: \{ string_value: "([^"]+)"', config)[1].split(",")
    assert providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def _written(tmp_path: Path, batching: model_repository.BatchingConfig) -> str:
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    (export / "model.onnx").write_bytes(b"onnx")
    (export / "decoder.json").write_text("{}")
    model_repository.write_model(tmp_path / "repo", "m", export, batching)
    return (tmp_path / "repo" / "m" / "config.pbtxt").read_text()
