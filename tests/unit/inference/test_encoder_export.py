"""An encoder (llmp's `bert` family: BertForMaskedLM; an imported RoBERTa) exports through the registry's
`onnx` exporter to a graph whose last hidden states are PyTorch's, passes the parity gate, and is laid out
in Triton's repository as the embedding model; a broken export fails the gate, and decoder-only formats
refuse an encoder with a reason."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaModel

from services.common.contracts import ENCODER_SPEC_FILE, ONNX_DATA_FILE, EncoderSpec
from services.common.errors import ValidationFailed
from services.inference import model_repository
from services.registry import exporters, parity
from services.registry.encoder_export import load_encoder

VOCAB = 90


def _bert(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=40))


def _roberta(seed: int = 1) -> RobertaModel:
    torch.manual_seed(seed)
    return RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=42, pad_token_id=1))


@pytest.fixture(scope="module", params=["bert", "roberta"])
def exported(request, tmp_path_factory):
    model = _bert() if request.param == "bert" else _roberta()
    model_dir = tmp_path_factory.mktemp("model")
    model.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("onnx")
    held_out = np.random.default_rng(0).integers(0, VOCAB, (3, 64), dtype=np.int64)  # longer than the context
    outcome = exporters.export("onnx", model_dir, out, exporters.EvalData(held_out=held_out), triton_model="m")
    return request.param, model_dir, out, outcome


def test_the_export_passes_the_gate_and_describes_the_encoder(exported):
    kind, _, out, outcome = exported
    assert outcome.passed, outcome.report
    assert outcome.report["kind"] == "encoder" and outcome.report["embeddings"]["max_abs_embedding_diff"] < 1e-4
    spec = EncoderSpec.from_json((out / ENCODER_SPEC_FILE).read_text())
    assert (spec.hidden_size, spec.n_layer, spec.vocab_size) == (32, 2, VOCAB)
    assert spec.context_length == 40  # RoBERTa's two first position embeddings are never positions
    assert ONNX_DATA_FILE in outcome.files and "decoder.json" not in outcome.files
    assert not any(path.startswith("triton/") for path in outcome.files)  # served by llmp's encoder model only


def test_masked_mean_of_the_graph_is_hfs(exported):
    _, model_dir, out, _ = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(2).integers(3, VOCAB, (4, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:], mask[2, 3:], mask[3, 1:] = 0, 0, 0
    hidden = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        reference = load_encoder(model_dir)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    expected = parity.mean_pooled(reference.last_hidden_state.numpy(), mask)
    np.testing.assert_allclose(parity.mean_pooled(hidden, mask), expected, atol=1e-5, rtol=0)
    # Padding masked: a row's embedding does not depend on how far it was padded.
    alone = session.run(["last_hidden_state"], {"input_ids": ids[1:2, :7], "attention_mask": mask[1:2, :7]})[0]
    np.testing.assert_allclose(parity.mean_pooled(alone, mask[1:2, :7])[0], expected[1], atol=1e-5, rtol=0)


def test_the_gate_fails_an_export_of_other_weights(exported, tmp_path):
    kind, _, out, _ = exported
    other = tmp_path / "other"
    (_bert(seed=7) if kind == "bert" else _roberta(seed=7)).save_pretrained(other)
    held_out = np.random.default_rng(0).integers(0, VOCAB, (3, 16), dtype=np.int64)
    report, passed = exporters.check("onnx", other, out / "model.onnx", exporters.EvalData(held_out=held_out),
                                     parity.Thresholds())
    assert not passed and report["embeddings"]["max_abs_hidden_diff"] > 1e-2


def test_decoder_formats_refuse_an_encoder(exported, tmp_path):
    _, model_dir, _, _ = exported
    data = exporters.EvalData(held_out=np.zeros((2, 8), np.int64), test=np.zeros((2, 8), np.int64),
                              calibration=np.zeros((2, 8), np.int64))
    for fmt in ("onnx-int8", "torchscript"):
        with pytest.raises(ValidationFailed, match="encoder exports as 'onnx'"):
            exporters.EXPORTERS[fmt](model_dir, tmp_path / fmt, data)


def test_the_triton_repository_gets_the_encoder_model(exported, tmp_path):
    _, _, out, _ = exported
    version_dir = model_repository.write_model(tmp_path, "m-enc", out)
    assert (version_dir / ENCODER_SPEC_FILE).exists() and not (version_dir / "decoder.json").exists()
    assert "EMBEDDING" in (version_dir / "model.py").read_text()
    config = (tmp_path / "m-enc" / "config.pbtxt").read_text()
    assert 'name: "EMBEDDING"' in config and "SEQUENCE_ID" not in config
    shutil.rmtree(tmp_path / "m-enc")
