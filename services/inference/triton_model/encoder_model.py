"""Triton Python-backend model: an exported ONNX encoder (BERT-style) run by ONNX Runtime, for embeddings.

Copied by the inference service into `<repository>/<model>/1/model.py` beside `model.onnx` and
`encoder.json` (a `services.common.contracts.EncoderSpec`). It runs inside Triton's Python stub, so it
imports nothing from llmp; its ONNX Runtime session comes from `ort_session.py` and its split of a batch
from `length_groups.py`, copied beside it.

Protocol: every row of a request is one text to embed, and a request may carry many rows.
- `INPUT_IDS` int64 [n]: the text's tokens (special tokens included), right-padded to the request's longest.
- `INPUT_LENGTH` int32 [1] (optional): how many of the row's INPUT_IDS are real (default all).
- output `EMBEDDING` float32 [hidden]: the mean of the row's last hidden states over its real tokens.

The rows of every request handed to one `execute` (Triton's dynamic batcher merges concurrent requests)
are sorted by length and run in a few ORT calls of like-length rows (`length_groups`), each right-padded
to its longest row with the padding masked out: a padded token costs a real token's compute, and texts
of 8 and 40 words padded together waste most of a batch. The masked mean is taken here, so only one
vector per text crosses the wire.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from length_groups import length_groups as split_by_length
from ort_session import open_session

# What one more ORT call costs, in padded tokens: its fixed overhead, and the smaller matrix products of
# a shorter batch. A padded token costs as much as a real one (every layer runs on it), so splitting the
# sorted rows pays while it saves more padding than this.
CALL_COST_TOKENS = 64


def length_groups(lengths: list[int]) -> list[range]:
    """The encoder's split of rows sorted by length into ORT calls (`length_groups.length_groups`)."""
    return split_by_length(lengths, CALL_COST_TOKENS)


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        with open(os.path.join(here, "encoder.json")) as handle:
            self.spec = json.load(handle)
        self.session = open_session(here, parameters)
        self.context = int(self.spec["context_length"])
        self.hidden = int(self.spec["hidden_size"])
        self.pad = int(self.spec["pad_token_id"])

    def execute(self, requests):
        responses: list = [None] * len(requests)
        rows: list[tuple[int, np.ndarray]] = []  # (request index, tokens)
        for index, request in enumerate(requests):
            try:
                rows.extend((index, tokens) for tokens in self._rows(request))
            except Exception as error:  # a malformed request fails alone
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        try:
            embeddings = self._embed([tokens for _, tokens in rows]) if rows else np.zeros((0, self.hidden))
        except Exception as error:
            for index, _ in rows:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
            return responses
        for index in range(len(requests)):
            if responses[index] is None:
                mine = np.stack([embeddings[n] for n, (owner, _) in enumerate(rows) if owner == index])
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("EMBEDDING", mine.astype(np.float32))])
        return responses

    def _rows(self, request) -> list[np.ndarray]:
        tokens = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
        tokens = tokens.reshape(tokens.shape[0], -1)
        length_tensor = pb_utils.get_input_tensor_by_name(request, "INPUT_LENGTH")
        lengths = (length_tensor.as_numpy().reshape(-1) if length_tensor is not None
                   else np.full(tokens.shape[0], tokens.shape[1]))
        rows = []
        for position in range(tokens.shape[0]):
            length = int(lengths[position])
            if not 1 <= length <= min(self.context, tokens.shape[1]):
                raise ValueError(f"row {position} has {length} tokens; 1 to {self.context} fit the context")
            rows.append(tokens[position, :length])
        return rows

    def _embed(self, rows: list[np.ndarray]) -> np.ndarray:
        """The masked mean of every row's last hidden states, rows of like length run together."""
        out = np.empty((len(rows), self.hidden), np.float32)
        order = sorted(range(len(rows)), key=lambda position: rows[position].shape[0])
        for group in length_groups([rows[position].shape[0] for position in order]):
            members = [order[position] for position in group]
            out[members] = self._embed_padded([rows[position] for position in members])
        return out

    def _embed_padded(self, rows: list[np.ndarray]) -> np.ndarray:
        """Rows in one ORT call, right-padded to the longest; the masked mean of the last hidden states."""
        width = max(row.shape[0] for row in rows)
        ids = np.full((len(rows), width), self.pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for position, row in enumerate(rows):
            ids[position, :row.shape[0]] = row
            mask[position, :row.shape[0]] = 1
        hidden = self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        weights = mask.astype(np.float32)[..., None]
        return (hidden * weights).sum(axis=1) / weights.sum(axis=1)

    def finalize(self):
        pass
