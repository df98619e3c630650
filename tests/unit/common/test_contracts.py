"""The contracts between services: names, keys, the dataset manifest and the served-model description."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from gateway.http import Validator
from services.common import contracts
from services.common.errors import InvalidArgument, ValidationFailed

TRITON_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a folder name Triton loads and a URL segment it serves


def test_triton_names_of_lookalike_tenants_do_not_collide():
    # Both read "acme-prod-chat": tenant acme's model prod-chat, and tenant acme-prod's model chat.
    first = contracts.triton_model_name("acme", "prod-chat", 1)
    second = contracts.triton_model_name("acme-prod", "chat", 1)
    assert first != second
    assert first.startswith("m-acme-prod-chat-v1-") and second.startswith("m-acme-prod-chat-v1-")


def test_triton_names_are_stable_distinct_and_safe():
    name = contracts.triton_model_name("acme", "tiny", 3)
    assert name == contracts.triton_model_name("acme", "tiny", 3)
    others = {contracts.triton_model_name(*key) for key in (("acme", "tiny", 4), ("acme", "tinz", 3),
                                                             ("acmf", "tiny", 3), ("a/b", "tiny", 3))}
    assert name not in others and len(others) == 4
    for tenant in ("acme", "a/b", "Ünïcode tenant", "x" * 300):
        made = contracts.triton_model_name(tenant, "m" * 63, contracts.MAX_VERSION)
        assert TRITON_NAME.match(made) and len(made) < 200


def test_the_name_rule():
    for good in ("a", "gpt-2", "v1.0_final", "x" * 63):
        assert contracts.validate_name(good, "model name") == good
        assert re.match(contracts.NAME_PATTERN, good)
    for bad in ("", "Upper", "-lead", ".lead", "a/b", "a b", "x" * 64, "é"):
        with pytest.raises(ValidationFailed, match="model name"):
            contracts.validate_name(bad, "model name")
        assert not re.match(contracts.NAME_PATTERN, bad)  # what the gateway's JSON schemas use
    for bad in ("chat\n", "a\x00", "\x1f"):  # Python's `$` alone matches before a final "\n"
        with pytest.raises(ValidationFailed, match="model name"):
            contracts.validate_name(bad, "model name")
        assert not Validator({"type": "string", "pattern": contracts.NAME_PATTERN}).is_valid(bad)
    with pytest.raises(ValidationFailed):
        contracts.validate_version(0)
    with pytest.raises(ValidationFailed):
        contracts.validate_version(contracts.MAX_VERSION + 1)
    with pytest.raises(ValidationFailed, match="tensorrt"):
        contracts.validate_export_format("tensorrt")


def test_page_sizes():
    assert contracts.page_size(0) == contracts.DEFAULT_PAGE_SIZE
    assert contracts.page_size(7) == 7
    assert contracts.page_size(contracts.MAX_PAGE_SIZE + 1) == contracts.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument):
        contracts.page_size(-1)


def test_storage_keys():
    assert contracts.dataset_version_prefix("acme", "wiki", 2) == "datasets/acme/wiki/v2/"
    assert contracts.dataset_manifest_key("acme", "wiki", 2) == "datasets/acme/wiki/v2/manifest.json"
    assert contracts.dataset_tokenizer_prefix("acme", "wiki", 2) == "datasets/acme/wiki/v2/tokenizer/"
    assert contracts.dataset_shard_key("acme", "wiki", 2, "train", 3) == "datasets/acme/wiki/v2/train/shard-00003.bin"
    assert contracts.dataset_corpus_key("acme", "wiki", 2) == "sources/datasets/acme/wiki/v2/corpus"
    assert contracts.within_dataset_version("datasets/acme/wiki/v2/train/shard-00003.bin") == "train/shard-00003.bin"
    assert contracts.within_dataset_version("train/shard-00003.bin") == "train/shard-00003.bin"
    assert contracts.model_version_prefix("acme", "gpt", 3) == "models/acme/gpt/v3/"
    assert contracts.model_export_prefix("acme", "gpt", 3, "onnx") == "models/acme/gpt/v3/exports/onnx/"
    assert contracts.parse_model_version_key("models/acme/gpt/v12/exports/onnx/model.onnx") == ("acme", "gpt", 12)
    assert contracts.parse_model_version_key("models/acme/gpt/latest/x") is None
    assert contracts.parse_model_version_key("jobs/acme/1/final/config.json") is None
    job = contracts.JobLayout("acme", "j1")
    assert (job.prefix, job.step(5), job.final, job.metrics) == (
        "jobs/acme/j1/", "jobs/acme/j1/checkpoints/step-5/", "jobs/acme/j1/final/", "jobs/acme/j1/metrics.json")
    assert contracts.job_prefix("acme", "j1") == job.prefix


def _manifest() -> contracts.DatasetManifest:
    prefix = contracts.dataset_version_prefix("acme", "wiki", 1)
    return contracts.DatasetManifest(
        name="wiki", version=1, tenant="acme", format="text", digest="d" * 64, dtype="uint32", vocab_size=70000,
        eos_token_id=0, pad_token_id=1,
        tokenizer=contracts.TokenizerManifest("bpe", 70000, contracts.dataset_tokenizer_prefix("acme", "wiki", 1)),
        splits={"train": contracts.SplitManifest(3, 30, 120, (prefix + "train/shard-00000.bin",), near_duplicates=2),
                "test": contracts.SplitManifest(0, 0, 0, ())},
        objects=(contracts.ManifestObject(prefix + "train/shard-00000.bin", 120, "a" * 64, "train-shard", "f" * 32),
                 contracts.ManifestObject(prefix + "tokenizer/tokenizer.json", 9, "b" * 64, "tokenizer")),
        cleaning={"documents_in": 5, "documents_out": 3}, options={"name": "wiki", "tokenizer": "bpe"})


def test_a_manifest_round_trips():
    manifest = _manifest()
    assert contracts.DatasetManifest.from_json(manifest.to_json()) == manifest
    body = json.loads(manifest.to_json())
    assert body["splits"]["train"]["shards"] == ["datasets/acme/wiki/v1/train/shard-00000.bin"]
    assert body["tokenizer"] == {"kind": "bpe", "vocab_size": 70000, "prefix": "datasets/acme/wiki/v1/tokenizer/"}
    assert manifest.numpy_dtype == "<u4" and manifest.shards("validation") == ()


def test_a_supervised_manifest_round_trips_with_its_masks_and_tokenizer_identity():
    train = contracts.SplitManifest(documents=2, tokens=40, bytes=30, shards=("train/shard-00000.bin",),
                                    loss_masks=("train/loss-mask-00000.bin",), examples="train/examples.bin",
                                    loss_tokens=9)
    manifest = dataclasses.replace(
        _manifest(), format="chat", splits={"train": train},
        tokenizer=contracts.TokenizerManifest("model", 300, "tokenizer/", sha256="ab" * 32, model="base",
                                              model_version=2))
    assert manifest.supervised and contracts.DatasetManifest.from_json(manifest.to_json()) == manifest
    body = json.loads(manifest.to_json())
    assert body["splits"]["train"]["loss_masks"] == ["train/loss-mask-00000.bin"]
    assert body["tokenizer"]["model"] == "base" and body["tokenizer"]["model_version"] == 2


@pytest.mark.parametrize("change, message", [
    ({"dtype": None}, "dtype None"),
    ({"dtype": "int8"}, "dtype 'int8'"),
    ({"vocab_size": None}, "missing field 'vocab_size'"),
    ({"splits": {"holdout": {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}}}, "unknown splits"),
    ({"tokenizer": {"kind": "wordpiece", "vocab_size": 3}}, "tokenizer kind 'wordpiece'"),
    ({"eos_token_id": "three"}, "dataset manifest of wiki v1"),
    ({"format": "csv"}, "format 'csv' is not one of text, jsonl, pairs, chat"),
    ({"format": "chat"}, "format chat needs loss masks for every shard and an example index, which split train"),
])
def test_a_manifest_without_what_readers_need_is_refused(change, message):
    body = json.loads(_manifest().to_json())
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    with pytest.raises(ValidationFailed, match=re.escape(message)):
        contracts.DatasetManifest.from_json(json.dumps(body))


def test_a_manifest_that_is_not_json_is_refused():
    with pytest.raises(ValidationFailed, match="not JSON"):
        contracts.DatasetManifest.from_json(b"{")


def test_the_tokenizer_prefix_defaults_to_the_versions_folder():
    body = json.loads(_manifest().to_json())
    del body["tokenizer"]["prefix"]
    assert contracts.DatasetManifest.from_json(json.dumps(body)).tokenizer.prefix == "datasets/acme/wiki/v1/tokenizer/"


def test_a_decoder_spec_round_trips_without_torch():
    spec = contracts.DecoderSpec(n_layer=1, n_head=2, head_dim=4, vocab_size=10, context_length=16, eos_token_id=None,
                                 input_names=("input_ids",), output_names=("logits",))
    assert contracts.DecoderSpec.from_json(spec.to_json()) == spec
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, services.common.contracts; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy'}))"],
        capture_output=True, text=True, check=True)
    assert heavy.stdout.strip() == "[]"
