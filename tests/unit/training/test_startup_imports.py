"""What a job's start-up imports: every module a process of the chain worker → guard → torchrun → train.py
imports is paid, one after the other, before the first step (bench-training's e2e scenario shows each phase)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imported_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running `statement`."""
    script = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_guard_imports_nothing_of_the_service():
    # It starts first, for every job: the service's clients (PostgreSQL, S3, gRPC) would delay torchrun by seconds.
    modules = imported_after("import services.training.guard")
    assert not modules & {"psycopg", "psycopg_pool", "minio", "grpc", "torch", "celery"}, modules


def test_the_runtime_imports_peft_only_for_a_job_with_an_adapter():
    modules = imported_after("import services.training.train")
    assert "torch" in modules and "peft" not in modules
    wrapped = imported_after(
        "from services.training import adapters, models\n"
        "from services.training.spec import AdapterSpec, ModelSpec\n"
        "spec = ModelSpec(n_layer=1, n_head=1, n_embd=8, block_size=8)\n"
        "model = models.build_model(spec, models.Vocabulary(16, 15, 15), seed=1)\n"
        "assert not adapters.is_adapted(model)\n"
        "model = adapters.wrap(model, AdapterSpec(r=2, alpha=4, target_modules=['c_attn']), 'gpt2', seed=2)\n"
        "assert adapters.is_adapted(model)")
    assert "peft" in wrapped


def test_the_worker_side_of_the_warm_runtime_imports_no_torch():
    # The Celery pool process starts spares and supervises jobs: torch (and its threads) stay in the spare.
    modules = imported_after("import services.training.warm")
    assert "torch" not in modules and "transformers" not in modules, modules
