"""The Triton model repository in both forms: a local folder (`make up`) and an S3 prefix (compose, Kubernetes)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from services.common.config import Settings
from services.common.contracts import triton_model_name
from services.inference import model_repository, server
from services.inference.model_source import LocalModelSource

pytestmark = pytest.mark.integration

NAME = triton_model_name("acme", "tiny", 1)


def test_triton_names_start_readable_and_keep_tenants_apart():
    assert NAME.startswith("m-acme-tiny-v1-")
    assert triton_model_name("a/b", "tiny", 1).startswith("m-a_b-tiny-v1-")
    assert triton_model_name("a/b", "tiny", 1) != triton_model_name("a_b", "tiny", 1)


async def test_an_s3_repository_is_written_through_the_object_store_and_the_service_starts(settings_env,
                                                                                            model_root):
    url = f"s3://{settings_env['LLMP_S3_ENDPOINT']}/triton-repository/prod/models"
    settings = Settings.from_env({**settings_env, "LLMP_TRITON_MODEL_REPOSITORY": url})
    repository = model_repository.open_repository(settings)
    assert isinstance(repository, model_repository.S3Repository) and repository.prefix == "prod/models/"
    assert repository.store.bucket == "triton-repository"
    files = await LocalModelSource(model_root[0]).fetch("acme", "tiny", 1)
    await asyncio.to_thread(repository.write, NAME, files.onnx_dir, model_repository.BatchingConfig())
    stored = {item.key: item for item in repository.store.list(f"prod/models/{NAME}/")}
    assert set(stored) == {f"prod/models/{NAME}/{path}" for path in
                           ("config.pbtxt", "1/model.py", "1/ort_session.py", "1/length_groups.py", "1/cpus.py",
                            "1/model.onnx", "1/model.onnx.data", "1/decoder.json")}
    assert stored[f"prod/models/{NAME}/1/model.onnx"].size == (files.onnx_dir / "model.onnx").stat().st_size
    config = repository.store.get_bytes(f"prod/models/{NAME}/config.pbtxt").decode()
    assert f'name: "{NAME}"' in config and 'backend: "python"' in config
    await asyncio.to_thread(repository.remove, NAME)
    assert repository.store.list(f"prod/models/{NAME}/") == []

    app, deployments = await server.build(settings, LocalModelSource(model_root[0]))
    try:
        await app.start("127.0.0.1:0")
        used = deployments.repository
        assert isinstance(used, model_repository.S3Repository)
        assert (used.store.bucket, used.prefix) == ("triton-repository", "prod/models/")
    finally:
        await app.stop()


def test_a_malformed_s3_repository_is_refused(settings_env):
    from services.common.errors import InvalidArgument

    settings = Settings.from_env({**settings_env, "LLMP_TRITON_MODEL_REPOSITORY": "s3://host:9000"})
    with pytest.raises(InvalidArgument, match="s3://host:port/bucket/prefix"):
        model_repository.open_repository(settings)


def test_a_written_model_folder_imports_its_session_without_llmp(model_root, tmp_path):
    """Triton's Python stub imports the model's modules from its version folder alone: ort_session.py's CPU count
    comes from the cpus.py copied beside it, not from an llmp it cannot reach."""
    files = asyncio.run(LocalModelSource(model_root[0]).fetch("acme", "tiny", 1))
    model_repository.LocalRepository(tmp_path).write(NAME, files.onnx_dir, model_repository.BatchingConfig())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]; "
            "sys.path.insert(0, '.'); import ort_session; "
            "print(ort_session.usable_cpus.__module__, ort_session.usable_cores())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / NAME / "1", env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    module, cores = done.stdout.split()
    assert module == "cpus" and int(cores) >= 1
