"""The Triton model's decoding batch (triton_model/model.py) run in process on a real export with ONNX Runtime:
sequences joining take the rows of sequences that ended instead of the whole cache being gathered anew, and
every sequence's tokens still equal those it gets decoding alone.

The model's Triton entry points are not used here (test_generation.py runs them in a real Triton); only the
module import of Triton's `triton_python_backend_utils`, which exists inside Triton's stub alone, is given
an empty module so that the batching code can run step by step."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from services.inference import model_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def decoder(model_root, monkeypatch_module):
    root, _ = model_root
    folder = root / "export-v1"
    monkeypatch_module.setitem(sys.modules, "triton_python_backend_utils",
                               types.ModuleType("triton_python_backend_utils"))
    monkeypatch_module.syspath_prepend(str(model_repository.TEMPLATE_DIR))  # model.py imports ort_session
    spec = importlib.util.spec_from_file_location("decoder_model", model_repository.TEMPLATE_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(folder.parent), "model_version": folder.name,
                      "model_config": json.dumps({"parameters": {"intra_op_threads": {"string_value": "1"}}})})
    return module, model


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def run_step(module, model, steps: list[tuple[int, list[int], bool]]) -> dict[int, int]:
    """One execute's worth of rows (sequence id, new tokens, end), decoding rows and prefills as execute
    groups them; each sequence's greedy next token."""
    rows = []
    for sequence_id, tokens, end in steps:
        row = module._Row(0, len(rows), sequence_id, np.array(tokens, np.int64), end)
        row.state = model.sequences.get(sequence_id)
        rows.append(row)
    decode = [row for row in rows if row.state is not None]
    prefill = [row for row in rows if row.state is None]
    if decode:
        model._decode(decode)
    if prefill:
        model._prefill(prefill)
    for row in rows:
        model._keep(row.sequence_id, row.state, row.end)
    return {row.sequence_id: int(np.argmax(row.logits)) for row in rows}


def alone(model, prompt: list[int], count: int) -> list[int]:
    """Greedy tokens of one sequence, the whole prefix recomputed each step: no cache, no batch."""
    ids, tokens = list(prompt), []
    for _ in range(count):
        logits, _ = model._run(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64),
                               np.arange(len(ids), dtype=np.int64)[None], model._empty_past(1))
        tokens.append(int(np.argmax(logits[0, -1])))
        ids.append(tokens[-1])
    return tokens


def test_joining_sequences_take_ended_rows_and_decode_as_alone(decoder):
    module, model = decoder
    rng = np.random.default_rng(0)
    vocab = model.vocab
    # (first step, prompt, tokens): eight start together; the short ones end while late ones arrive
    plan = {1 + index: (0, rng.integers(0, vocab, 3 + index).tolist(), 4 + 3 * index) for index in range(8)}
    plan.update({20 + index: (6 + 2 * index, rng.integers(0, vocab, 2 + 2 * index).tolist(), 5)
                 for index in range(4)})
    generated = {sequence_id: [] for sequence_id in plan}
    gathers, in_place, joined = 0, 0, 0
    original = model._in_place

    def watched(states):
        nonlocal gathers, in_place, joined
        reused = original(states)
        if reused is None:
            gathers += 1
        else:
            in_place += 1
            joined += sum(state.batch is None for state in states)
        return reused

    model._in_place = watched
    for step in range(40):
        rows = []
        for sequence_id, (first, prompt, count) in plan.items():
            done = len(generated[sequence_id])
            if step == first:
                rows.append((sequence_id, prompt, count == 1))
            elif first < step and done < count:
                rows.append((sequence_id, generated[sequence_id][-1:], done + 1 >= count))
        if rows:
            for sequence_id, token in run_step(module, model, rows).items():
                generated[sequence_id].append(token)
    del model._in_place
    assert not model.sequences  # every sequence ended and freed its state
    for sequence_id, (_, prompt, count) in plan.items():
        assert generated[sequence_id] == alone(model, prompt, count), sequence_id
    assert joined >= 3, f"late sequences joined in place {joined} times: the ended rows were not reused"
    assert in_place > gathers, f"{in_place} steps reused the batch, {gathers} gathered it"


def test_prompts_of_unlike_lengths_prefill_in_like_length_calls_with_the_tokens_of_each_alone(decoder):
    """Prompts arriving together are split into calls of like lengths: two short prompts are not padded to a
    long one's length (which would cost them the long one's compute), and every prompt's next tokens are those
    it gets alone."""
    module, model = decoder
    rng = np.random.default_rng(1)
    prompts = {31: rng.integers(0, model.vocab, 3).tolist(), 32: rng.integers(0, model.vocab, 60).tolist(),
               33: rng.integers(0, model.vocab, 4).tolist()}
    widths = []
    original = model._prefill_padded

    def watched(rows):
        widths.append(sorted(row.tokens.shape[0] for row in rows))
        return original(rows)

    model._prefill_padded = watched
    try:
        first = run_step(module, model, [(sequence_id, prompt, False) for sequence_id, prompt in prompts.items()])
    finally:
        del model._prefill_padded
    assert widths == [[3, 4], [60]]
    second = run_step(module, model, [(sequence_id, [token], True) for sequence_id, token in first.items()])
    assert not model.sequences
    for sequence_id, prompt in prompts.items():
        assert [first[sequence_id], second[sequence_id]] == alone(model, prompt, 2), sequence_id
