"""Triton Python-backend model: an exported ONNX decoder run by ONNX Runtime, with a server-side KV cache.

Copied by the inference service into `<repository>/<model>/1/model.py` beside `model.onnx` and
`decoder.json` (see services/registry/onnx_export.py). It runs inside Triton's Python stub, so it
imports nothing from llmp.

Protocol (one Triton request = one decoding step of one sequence):
- `SEQUENCE_ID` uint64 [1]: the caller's id for the sequence; the past key/values live here, keyed by it.
- `INPUT_IDS` int64 [n]: the tokens new to the model (the whole prompt on the first step, then one token).
- `START` bool [1]: forget any state for the id first (a new sequence).
- `END` bool [1]: free the state after this step; with no INPUT_IDS it only frees.
- output `LOGITS` float32 [1, vocab]: next-token logits after the last input token (empty when nothing ran).

So decoding never recomputes the prefix and only one token crosses the wire per step. Triton's dynamic
batcher hands `execute` every step queued meanwhile: all one-token steps run as ONE ORT call (pasts left-
padded to the longest, the padding masked out); prompts run one per call. State idle for longer than
`STATE_TTL_S` is evicted, so a client that vanished leaks nothing for long.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

STATE_TTL_S = 300.0


class _Sequence:
    __slots__ = ("past", "length", "touched")

    def __init__(self, past: list[np.ndarray], length: int) -> None:
        self.past = past  # per KV input, [1, n_head, length, head_dim]
        self.length = length
        self.touched = time.monotonic()


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        with open(os.path.join(here, "decoder.json")) as handle:
            self.spec = json.load(handle)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.past_names = [name for name in self.spec["input_names"] if name.startswith("past_key_values.")]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        self.kv_shape = (self.spec["n_head"], self.spec["head_dim"])
        self.context = int(self.spec["context_length"])
        self.sequences: dict[int, _Sequence] = {}
        self.logger = pb_utils.Logger

    # -- one ORT call ---------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        n_head, head_dim = self.kv_shape
        return [np.zeros((batch, n_head, 0, head_dim), np.float32) for _ in self.past_names]

    def _prefill(self, state: _Sequence | None, tokens: np.ndarray) -> tuple[np.ndarray, _Sequence]:
        """Run `tokens` after the sequence's past (none for a new one); one sequence, any length."""
        past = state.past if state is not None else self._empty_past(1)
        start = state.length if state is not None else 0
        n = tokens.shape[0]
        logits, present = self._run(
            tokens[None].astype(np.int64), np.ones((1, start + n), np.int64),
            np.arange(start, start + n, dtype=np.int64)[None], past)
        return logits[0, -1], _Sequence(present, start + n)

    def _decode(self, states: list[_Sequence], tokens: np.ndarray) -> list[tuple[np.ndarray, _Sequence]]:
        """One token for each of several sequences in ONE call: pasts left-padded to the longest."""
        width = max(state.length for state in states)
        batch = len(states)
        n_head, head_dim = self.kv_shape
        past = []
        for index in range(len(self.past_names)):
            padded = np.zeros((batch, n_head, width, head_dim), np.float32)
            for row, state in enumerate(states):
                padded[row, :, width - state.length:] = state.past[index][0]
            past.append(padded)
        mask = np.zeros((batch, width + 1), np.int64)
        for row, state in enumerate(states):
            mask[row, width - state.length:] = 1
        positions = np.array([[state.length] for state in states], np.int64)
        logits, present = self._run(tokens.reshape(batch, 1).astype(np.int64), mask, positions, past)
        results = []
        for row, state in enumerate(states):
            kept = [layer[row:row + 1, :, width - state.length:] for layer in present]
            results.append((logits[row, -1], _Sequence(kept, state.length + 1)))
        return results

    # -- Triton entry points --------------------------------------------------------------------------

    def execute(self, requests):
        self._evict_idle()
        responses: list = [None] * len(requests)
        steps: list[tuple[int, int, _Sequence, int, bool]] = []  # (request index, id, state, token, end)
        for index, request in enumerate(requests):
            try:
                sequence_id = int(pb_utils.get_input_tensor_by_name(request, "SEQUENCE_ID").as_numpy().reshape(-1)[0])
                tokens = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy().reshape(-1)
                start = bool(_flag(request, "START"))
                end = bool(_flag(request, "END"))
                if start:
                    self.sequences.pop(sequence_id, None)
                state = self.sequences.get(sequence_id)
                if tokens.size == 0:
                    if end:
                        self.sequences.pop(sequence_id, None)
                    responses[index] = _logits_response(np.zeros((0,), np.float32))
                    continue
                if state is None and not start:
                    raise ValueError(f"unknown sequence {sequence_id}: send START with the prompt first")
                length = (state.length if state is not None else 0) + tokens.size
                if length > self.context:
                    raise ValueError(f"sequence {sequence_id} would reach {length} tokens; the context is "
                                     f"{self.context}")
                if state is not None and tokens.size == 1:
                    steps.append((index, sequence_id, state, int(tokens[0]), end))
                    continue
                logits, new_state = self._prefill(state, tokens)
                self._keep(sequence_id, new_state, end)
                responses[index] = _logits_response(logits)
            except Exception as error:  # one bad request must not fail the batch
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        if steps:
            try:
                results = self._decode([state for _, _, state, _, _ in steps],
                                       np.array([token for _, _, _, token, _ in steps], np.int64))
                for (index, sequence_id, _, _, end), (logits, new_state) in zip(steps, results, strict=True):
                    self._keep(sequence_id, new_state, end)
                    responses[index] = _logits_response(logits)
            except Exception as error:
                for index, *_ in steps:
                    responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        return responses

    def _keep(self, sequence_id: int, state: _Sequence, end: bool) -> None:
        if end:
            self.sequences.pop(sequence_id, None)
        else:
            self.sequences[sequence_id] = state

    def _evict_idle(self) -> None:
        cutoff = time.monotonic() - STATE_TTL_S
        for sequence_id in [key for key, state in self.sequences.items() if state.touched < cutoff]:
            del self.sequences[sequence_id]

    def finalize(self):
        self.sequences.clear()


def _flag(request, name: str) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _logits_response(logits: np.ndarray):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("LOGITS", logits.astype(np.float32)[None])])
