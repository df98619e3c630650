"""Importing Hugging Face checkpoints and downloading versions, through the gateway over HTTP and the CLI,
against the real registry service (in-process gRPC), PostgreSQL and SeaweedFS.

Checkpoints are built here (random weights, save_pretrained, a tokenizer trained here), one per
architecture; what comes back out must load with `from_pretrained` and reproduce the logits exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from llmp.registry.v1 import registry_pb2_grpc

from cli import main
from gateway.app import init_app
from services.common import contracts, topology
from services.common.config import Settings
from services.common.db import Database
from services.common.identity import Caller
from services.common.model_transfer import upload_model_version
from services.registry import imports, registration, server
from tests import identities

from ...tiny_checkpoints import IMPORTABLE, build_importable, importable_config, logits, tar_bytes, tar_of
from ..training import test_training_runtime as training_runtime

pytestmark = [pytest.mark.integration]

ADMIN_KEY = "llmp_bootstrap_model-import-admin"
IMPORT_LIMIT = 2 * 1024 * 1024  # bytes: well above the tiny checkpoints, so the 413 case is cheap


class Stack:
    def __init__(self, http, settings: Settings, registry: server.Registry, db: Database, tenant: str,
                 key: str) -> None:
        self.http, self.settings, self.registry, self.db = http, settings, registry, db
        self.tenant, self.key = tenant, key
        self.port = http.server.port
        self.headers = {"Authorization": f"Bearer {key}"}

    def llmp(self, *args: str) -> int:
        return main.main([*args, "--url", f"http://127.0.0.1:{self.port}", "--key", self.key, "--json"])

    async def wait_import(self, name: str, version: int, timeout: float = 60) -> dict:
        for _ in range(int(timeout / 0.2)):
            got = await self.http.get(f"/v1/models/{name}/imports/{version}", headers=self.headers)
            assert got.status == 200, await got.text()
            body = await got.json()
            if body["state"] != "PENDING":
                return body
            await asyncio.sleep(0.2)
        raise AssertionError(f"import {name} v{version} still PENDING")

    async def left_behind(self, name: str) -> tuple[list[dict], list[str]]:
        """(registry rows, S3 objects) that exist for `name` in this tenant."""
        async with self.db.pool.connection() as conn:
            rows = await (await conn.execute("SELECT version, state FROM registry_versions WHERE tenant = %s AND "
                                             "name = %s", (self.tenant, name))).fetchall()
        prefix = f"{contracts.MODELS}{self.tenant}/{name}/"
        objects = [obj.key for obj in await asyncio.to_thread(self.registry.store.list, prefix)]
        return rows, objects


@pytest.fixture
async def stack(aiohttp_client, settings_env):
    settings = Settings.from_env({**settings_env, "LLMP_ADMIN_KEY": ADMIN_KEY,
                                  "LLMP_MAX_IMPORT_BYTES": str(IMPORT_LIMIT)})
    registry = await server.build(settings)
    await registry.app.start(settings.listen_addr(topology.REGISTRY))
    http = await aiohttp_client(init_app(settings))
    tenant = f"imp{uuid.uuid4().hex[:8]}"
    created = await http.post("/v1/api-keys", json={"tenant": tenant, "role": "developer"},
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert created.status == 201, await created.text()
    db = await Database.connect(settings.database_url, component="test-import")
    yield Stack(http, settings, registry, db, tenant, (await created.json())["key"])
    await db.close()
    await registry.app.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("architecture", IMPORTABLE)
async def test_each_architecture_imports_with_the_cli_and_comes_back_with_the_same_logits(
        stack, tmp_path, capsys, architecture):
    folder = build_importable(tmp_path / "source", architecture)
    name = f"imported-{architecture}"

    code = await asyncio.to_thread(stack.llmp, "models", "import", str(folder), "--name", name)
    out, err = capsys.readouterr()
    assert code == 0, err
    status = json.loads(out)
    assert (status["name"], status["version"], status["state"]) == (name, 1, "READY"), status
    assert status["architecture"] == importable_config(architecture).architectures[0]
    bar = [line for line in err.splitlines() if line.startswith("upload source")]
    assert bar and bar[-1].split("]")[1].strip().startswith("100%"), err  # the bytes sent were counted

    version = await (await stack.http.get(f"/v1/models/{name}/versions/1", headers=stack.headers)).json()
    assert version["lineage"]["origin"] == "imported"
    assert {item["path"]: item["object"]["sha256"] for item in version["artifacts"]} == _files(folder)
    assert "tokenizer.json" in _files(folder)

    downloaded = tmp_path / "downloaded"
    code = await asyncio.to_thread(stack.llmp, "models", "download", name, "1", str(downloaded))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _files(downloaded) == _files(folder)
    assert torch.equal(logits(downloaded), logits(folder))


async def test_sharded_tar_gz_in_a_top_folder_imports_over_http(stack, tmp_path):
    folder = build_importable(tmp_path / "sharded", "llama", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    body = tar_bytes(folder, gzip=True, prefix="my-llama/")

    answer = await stack.http.post("/v1/models/sharded/imports?description=gqa", data=body,
                                   headers={**stack.headers, "Content-Type": "application/gzip"})
    assert answer.status == 202, await answer.text()
    created = await answer.json()
    assert {key: created[key] for key in ("name", "version", "state")} == {"name": "sharded", "version": 1,
                                                                           "state": "PENDING"}
    assert answer.headers["Location"] == "/v1/models/sharded/imports/1"
    done = await stack.wait_import("sharded", 1)
    assert done["state"] == "READY" and done["error"] == "", done
    assert done["architecture"] == "LlamaForCausalLM"
    assert done["files"] == len(_files(folder))

    download = await stack.http.get("/v1/models/sharded/versions/1/download", headers=stack.headers)
    assert download.status == 200 and download.headers["Content-Type"] == "application/x-tar"
    document = await (await stack.http.get("/openapi.json")).json()  # the body is what the document says it is
    assert set(document["paths"]["/v1/models/{name}/versions/{version}/download"]["get"]["responses"]["200"]
               ["content"]) == {download.headers["Content-Type"]}
    raw = await download.read()
    assert len(raw) == int(download.headers["Content-Length"])
    head = await stack.http.head("/v1/models/sharded/versions/1/download", headers=stack.headers)
    assert head.status == 200 and head.headers["Content-Length"] == download.headers["Content-Length"]
    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        archive.extractall(out, filter="data")
    assert _files(out) == _files(folder)
    assert torch.equal(logits(out), logits(folder))

    other = await stack.http.post("/v1/api-keys", json={"tenant": f"{stack.tenant}x", "role": "developer"},
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    stranger = {"Authorization": f"Bearer {(await other.json())['key']}"}
    for path in ("/v1/models/sharded/versions/1/download", "/v1/models/sharded/imports/1"):
        assert (await stack.http.get(path, headers=stranger)).status == 404  # another tenant's model


def _info(name: str, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _edited(folder: Path, **config) -> Path:
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def bad_archive(case: str, tmp: Path) -> bytes:
    good = build_importable(tmp / case, "gpt2")
    files = [(_info(path), (good / path).read_bytes()) for path in _files(good)]
    if case == "traversal":
        return tar_of([*files, (_info("../escaped.txt"), b"out")])
    if case == "absolute":
        return tar_of([*files, (_info("/etc/llmp-escaped"), b"out")])
    if case == "symlink":
        return tar_of([*files, (_info("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), None)])
    if case == "hardlink":
        return tar_of([*files, (_info("hard", type=tarfile.LNKTYPE, linkname="config.json"), None)])
    if case == "no-config":
        return tar_of([item for item in files if item[0].name != "config.json"])
    if case == "more-layers":  # the config describes 3 layers, the weights hold 2
        return tar_bytes(_edited(good, n_layer=3))
    if case == "wider":  # the config's width differs from the weights'
        return tar_bytes(_edited(good, n_embd=48))
    if case == "auto-map":
        return tar_bytes(_edited(good, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}))
    if case == "remote-code-file":
        (good / "modeling_evil.py").write_text("import os\n")
        return tar_bytes(good)
    if case == "unsupported":
        return tar_bytes(_edited(good, model_type="t5", architectures=["T5ForConditionalGeneration"]))
    if case == "pickle":
        (good / "model.safetensors").rename(good / "pytorch_model.bin")
        return tar_bytes(good)
    if case == "no-tokenizer":
        (good / "tokenizer.json").unlink()
        return tar_bytes(good)
    if case == "not-a-tar":
        return b"just some text, not an archive" * 100
    if case == "too-large":
        return tar_of([*files, (_info("padding.bin"), b"\0" * IMPORT_LIMIT)])
    raise ValueError(case)


BAD = {  # case -> (status, words the reason must contain)
    "traversal": (422, "leaves the model directory"),
    "absolute": (422, "leaves the model directory"),
    "symlink": (422, "links are not accepted"),
    "hardlink": (422, "links are not accepted"),
    "no-config": (422, "config.json is missing"),
    "more-layers": (422, "weights do not match config.json"),
    "wider": (422, "weights do not match config.json"),
    "auto-map": (422, "auto_map"),
    "remote-code-file": (422, "remote code"),
    "unsupported": (422, "model_type 't5' is not supported"),
    "pickle": (422, "only safetensors"),
    "no-tokenizer": (422, "tokenizer.json is missing"),
    "not-a-tar": (422, "not a tar"),
    "too-large": (413, "import limit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_bad_archive_is_refused_with_the_reason_and_leaves_nothing(stack, tmp_path, case):
    status, reason = BAD[case]
    name = f"bad-{case}"
    answer = await stack.http.post(f"/v1/models/{name}/imports", data=io.BytesIO(bad_archive(case, tmp_path)),
                                   headers=stack.headers)
    text = await answer.text()
    assert answer.status == status, text
    assert reason in json.loads(text)["error"]["message"], text
    rows, objects = await stack.left_behind(name)
    assert rows == [] and objects == []  # no version number taken, no object stored
    # The unpacked files are gone, and nothing was written beside them ("../escaped.txt") or at "/etc".
    assert not any(Path(stack.registry.imports.work_root).iterdir())
    assert not Path("/etc/llmp-escaped").exists()
    missing = await stack.http.get(f"/v1/models/{name}", headers=stack.headers)
    assert missing.status == 404


async def test_a_download_is_cut_when_a_stored_file_no_longer_matches_its_checksum(stack, tmp_path, capsys):
    folder = build_importable(tmp_path / "source", "qwen2")
    answer = await stack.http.post("/v1/models/tampered/imports", data=tar_bytes(folder),
                                   headers=stack.headers)
    assert answer.status == 202, await answer.text()
    assert (await stack.wait_import("tampered", 1))["state"] == "READY"
    key = contracts.model_version_prefix(stack.tenant, "tampered", 1) + "tokenizer.json"
    await asyncio.to_thread(stack.registry.store.put_bytes, key, b'{"tampered": true}')

    download = await stack.http.get("/v1/models/tampered/versions/1/download", headers=stack.headers)
    assert download.status == 200
    with pytest.raises(Exception):  # noqa: B017 (aiohttp's payload error, or the connection reset)
        await download.read()
    code = await asyncio.to_thread(stack.llmp, "models", "download", "tampered", "1", str(tmp_path / "out"))
    assert code == 1 and "cut" in capsys.readouterr().err


async def test_a_model_llmp_trained_goes_out_and_back_in_with_exactly_its_logits(
        stack, tmp_path, capsys, tiny_dataset, dataset_uploader, settings_env):
    # A real (one-process, few-step) training run of llmp's runtime; its final folder registered as the
    # worker does (reserve, upload, commit).
    root, manifest = tiny_dataset
    manifest_key = await asyncio.to_thread(dataset_uploader, stack.registry.store, root, manifest)
    job_dir, _ = training_runtime.job_file(tmp_path, manifest_key, nproc=1, max_steps=8, eval_interval=4,
                                           checkpoint_interval=8, log_interval=4)
    result = await asyncio.to_thread(training_runtime.launch, job_dir, settings_env, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = training_runtime.read_events(job_dir)[-1]
    assert finished["event"] == "finished"
    trained = Path(finished["final_dir"])
    async with grpc.aio.insecure_channel(stack.settings.listen_addr(topology.REGISTRY)) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        version = await upload_model_version(stub, stack.registry.store, "home-grown", trained,
                                             metadata=identities.metadata(stack.tenant, "registry"))
    assert version.ref.version == 1 and version.lineage.origin == ""

    exported = tmp_path / "exported"
    assert await asyncio.to_thread(stack.llmp, "models", "download", "home-grown", "1", str(exported)) == 0
    assert _files(exported) == _files(trained)
    assert await asyncio.to_thread(stack.llmp, "models", "import", str(exported), "--name", "home-grown") == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex('{\n  "name"'):])["version"] == 2  # the download printed its JSON first
    again = tmp_path / "again"
    assert await asyncio.to_thread(stack.llmp, "models", "download", "home-grown", "2", str(again)) == 0
    assert _files(again) == _files(trained)
    assert torch.equal(logits(again, "ROMEO: to be"), logits(trained, "ROMEO: to be"))
    imported = await (await stack.http.get("/v1/models/home-grown/versions/2", headers=stack.headers)).json()
    assert imported["lineage"]["origin"] == "imported"
    assert imported["lineage"]["environment"]["architecture"] == "GPT2LMHeadModel"


async def test_the_cli_reports_a_refused_import_with_its_reason(stack, tmp_path, capsys):
    mismatched = _edited(build_importable(tmp_path / "mismatched", "mistral"), num_hidden_layers=3)
    code = await asyncio.to_thread(stack.llmp, "models", "import", str(mismatched), "--name", "refused")
    assert code == 1
    assert "422" in (err := capsys.readouterr().err) and "weights do not match config.json" in err, err

    large = build_importable(tmp_path / "large", "gpt2")
    (large / "extra.safetensors.txt").write_bytes(b"\1" * (IMPORT_LIMIT + 1))
    code = await asyncio.to_thread(stack.llmp, "models", "import", str(large), "--name", "refused")
    assert code == 1
    assert "413" in (err := capsys.readouterr().err) and "import limit" in err, err
    assert await stack.left_behind("refused") == ([], [])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
async def test_a_version_with_a_lora_adapter_comes_back_loadable_with_peft(stack, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = build_importable(tmp_path / "with-adapter", "llama")
    torch.manual_seed(1)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(folder / "adapter")
    assert (folder / "adapter" / "adapter_model.safetensors").exists()

    assert await asyncio.to_thread(stack.llmp, "models", "import", str(folder), "--name", "adapted") == 0
    version = await (await stack.http.get("/v1/models/adapted/versions/1", headers=stack.headers)).json()
    roles = {item["path"]: item["object"]["role"] for item in version["artifacts"]}
    assert roles["adapter/adapter_model.safetensors"] == roles["adapter/adapter_config.json"] == "adapter"
    assert roles["model.safetensors"] == "weights"

    out = tmp_path / "out"
    assert await asyncio.to_thread(stack.llmp, "models", "download", "adapted", "1", str(out)) == 0
    capsys.readouterr()
    ids = torch.tensor([[1, 2, 3, 4]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits)


async def test_an_import_whose_registry_died_while_storing_shows_failed_with_the_reason(stack):
    # What ImportModelVersion leaves when its process dies after answering 202: a reservation of origin
    # 'imported' that nobody renews. The sweep fails it; the import says so.
    caller = Caller(stack.tenant, "key-test", "developer")
    await registration.reserve(stack.db, caller, registration.Registration(
        "orphaned", "", registration.Lineage(environment={"architecture": "LlamaForCausalLM", "files": "5"},
                                             origin=imports.ORIGIN)))
    pending = await (await stack.http.get("/v1/models/orphaned/imports/1", headers=stack.headers)).json()
    assert (pending["state"], pending["architecture"], pending["files"]) == ("PENDING", "LlamaForCausalLM", 5)
    assert (await stack.http.get("/v1/models/orphaned/versions/1", headers=stack.headers)).status == 404

    await registration.sweep(stack.db, stack.registry.store, lease_seconds=0, scan_orphans=False)
    failed = await (await stack.http.get("/v1/models/orphaned/imports/1", headers=stack.headers)).json()
    assert failed["state"] == "FAILED" and "registration interrupted" in failed["error"]
    assert (await stack.http.get("/v1/models/orphaned/versions/1/download", headers=stack.headers)).status == 404
