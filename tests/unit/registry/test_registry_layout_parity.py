import numpy as np
import pytest
import torch

from services.common.errors import ValidationFailed
from services.registry import aliases, evaldata, exporters, layout, parity


def test_artifact_roles():
    assert [layout.role_of(p) for p in ("model.safetensors", "config.json", "tokenizer.json", "special_tokens_map.json",
                                        "README.md")] == ["weights", "config", "tokenizer", "tokenizer", "other"]


def test_content_digest_ignores_order_and_sees_every_change():
    files = [("a", "1" * 64), ("b", "2" * 64)]
    assert layout.content_digest(files) == layout.content_digest(reversed(files))
    assert layout.content_digest(files) != layout.content_digest([("a", "1" * 64), ("b", "3" * 64)])
    assert layout.content_digest(files) != layout.content_digest([("a", "1" * 64), ("c", "2" * 64)])


def test_alias_etags_change_with_every_move():
    first = aliases.etag_for("t", "m", "prod", 1, 1)
    assert first == aliases.etag_for("t", "m", "prod", 1, 1)
    assert len({first, aliases.etag_for("t", "m", "prod", 1, 3), aliases.etag_for("t", "m", "prod", 2, 2),
                aliases.etag_for("u", "m", "prod", 1, 1)}) == 4


def test_triton_config_declares_batching_and_every_kv_tensor():
    config = exporters.triton_config("m-v1", {"n_layer": 2, "n_head": 4, "head_dim": 16, "vocab_size": 100})
    assert 'name: "m-v1"' in config and 'backend: "onnxruntime"' in config and "dynamic_batching" in config
    assert f"max_batch_size: {exporters.TRITON_MAX_BATCH}" in config
    assert config.count("past_key_values.") == 4 and config.count("present.") == 4
    assert 'name: "logits" data_type: TYPE_FP32 dims: [ -1, 100 ]' in config
    assert 'name: "present.1.value" data_type: TYPE_FP32 dims: [ 4, -1, 16 ]' in config


def test_parity_reports_pass_within_threshold_and_fail_beyond():
    vocab = 5

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            logits = torch.nn.functional.one_hot(input_ids, vocab).float()
            return type("Out", (), {"logits": logits})()

    model = Fixed()
    inputs = np.array([[0, 1, 2, 3]], dtype=np.int64)
    exact = parity.logits_report(model, lambda ids: np.eye(vocab, dtype=np.float32)[ids], inputs, 1e-3)
    assert exact["passed"] and exact["max_abs_logit_diff"] == 0.0
    off = parity.logits_report(model, lambda ids: np.eye(vocab, dtype=np.float32)[ids] + 0.01, inputs, 1e-3)
    assert not off["passed"] and off["max_abs_logit_diff"] == pytest.approx(0.01)
    wrong_shape = parity.logits_report(model, lambda ids: np.zeros((1, 4, vocab + 1), np.float32), inputs, 1.0)
    assert not wrong_shape["passed"]
    nan = parity.logits_report(model, lambda ids: np.full((1, 4, vocab), np.nan, np.float32), inputs, 1.0)
    assert not nan["passed"]


def test_perplexity_is_vocab_size_for_uniform_logits_and_gated_on_change():
    ids = np.array([[1, 2, 3, 4, 0]], dtype=np.int64)
    assert parity.perplexity(np.zeros((1, 5, 7), np.float32), ids) == pytest.approx(7.0)

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 7)})()

    worse = parity.perplexity_report(Uniform(), lambda x: np.random.default_rng(0).normal(0, 3, (1, 5, 7)), ids, 0.1)
    assert worse["relative_change"] > 0.1 and not worse["passed"]


def test_windows_shrink_for_small_splits_and_refuse_empty_ones():
    ids = np.arange(100, dtype=np.int64)
    assert evaldata.windows(ids, 4, 16).shape == (4, 16)
    assert evaldata.windows(ids, 4, 64).shape == (4, 25)
    assert evaldata.windows(ids[:3], 4, 16).shape[0] >= 1
    with pytest.raises(ValidationFailed):
        evaldata.windows(ids[:1], 4, 16)
