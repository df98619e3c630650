"""Triton Python-backend model: an exported ONNX decoder run by ONNX Runtime, with a server-side KV cache.

Copied by the inference service into `<repository>/<model>/1/model.py` beside `model.onnx` and
`decoder.json` (a `services.common.contracts.DecoderSpec`). It runs inside Triton's Python stub, so it
imports nothing from llmp; its ONNX Runtime session comes from `ort_session.py`, and the split of prompts
into like-length calls from `length_groups.py`, copied beside it.

Protocol: every row of a request is one decoding step of one sequence, and a request may carry many
rows (the service batches the steps of its in-flight sequences; Triton's dynamic batcher merges requests).
- `SEQUENCE_ID` uint64 [1]: the caller's id for the sequence; the past key/values live here, keyed by it.
- `INPUT_IDS` int64 [n]: the tokens new to the model (the prompt on the first step, then one token),
  right-padded to the request's longest row.
- `INPUT_LENGTH` int32 [1] (optional): how many of the row's INPUT_IDS are real (default all); 0 with
  END only frees the sequence's state.
- `START` bool [1]: forget any state for the id first (a new sequence).
- `END` bool [1]: free the state after this step.
- output `NEXT_TOKEN` int64 [1]: the argmax of the next-token logits (greedy decoding needs nothing else);
  -1 for a row that only freed state or that failed (unknown sequence, context exceeded).
- output `LOGITS` float32 [vocab]: the next-token logits, computed only when requested (sampling).

So decoding never recomputes the prefix and only one token crosses the wire per step and sequence. All
one-token steps handed to one `execute` run as ONE ORT call (pasts left-padded to the longest, the
padding masked out; the previous call's output is the next call's input as it is when the same sequences
step again, a sequence joining after its prefill taking the row of one that ended); new prompts run
sorted by length in a few calls of like-length prompts (right-padded: causal attention never lets a real
token see the padding; a padded token costs a real one's compute). State idle for
longer than `STATE_TTL_S` is evicted, so a client that vanished leaks nothing for long.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from length_groups import length_groups
from ort_session import open_session

STATE_TTL_S = 300.0
# A decoding batch keeps rows whose sequence ended for a joining one to take, up to this share of its rows.
IDLE_ROWS = 0.25
# Unused left padding (columns no live row reaches) a batch keeps before it is gathered anew without it.
MIN_TRIM = 32
# What one more prefill call costs, in padded prompt tokens: a pass over the weights, about a one-row decoding
# step (20-25 ms at GPT-2 small's shape on 2 cores) against 0.6-0.85 ms a prompt token.
PREFILL_CALL_TOKENS = 32


class _Sequence:
    __slots__ = ("past", "length", "touched", "batch", "slot")

    def __init__(self, past: list[np.ndarray], length: int, batch: list[np.ndarray] | None = None,
                 slot: int = 0) -> None:
        self.past = past  # per KV input, [1, n_kv_head, length, head_dim]
        self.length = length
        self.touched = time.monotonic()
        # After a batched decode step: that step's present key/values (per KV input, [batch, n_kv_head, width,
        # head_dim], each row left-padded) and this sequence's row in them; `past` is a view of that row.
        self.batch = batch
        self.slot = slot


class _Row:
    """One step of one sequence: where it came from and what it produced."""

    __slots__ = ("request", "row", "sequence_id", "tokens", "end", "state", "logits", "error")

    def __init__(self, request: int, row: int, sequence_id: int, tokens: np.ndarray, end: bool) -> None:
        self.request, self.row, self.sequence_id, self.tokens, self.end = request, row, sequence_id, tokens, end
        self.state: _Sequence | None = None
        self.logits: np.ndarray | None = None  # [vocab] once run
        self.error = ""


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        with open(os.path.join(here, "decoder.json")) as handle:
            self.spec = json.load(handle)
        self.session = open_session(here, parameters)
        self.past_names = [name for name in self.spec["input_names"] if name.startswith("past_key_values.")]
        self.present_names = [name.replace("past_key_values.", "present.") for name in self.past_names]
        # Grouped-query attention caches fewer heads than it queries; a decoder.json from before it says n_head only.
        self.kv_shape = (int(self.spec.get("n_kv_head") or self.spec["n_head"]), int(self.spec["head_dim"]))
        self.context = int(self.spec["context_length"])
        self.vocab = int(self.spec["vocab_size"])
        self.sequences: dict[int, _Sequence] = {}

    # -- ORT calls ------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        n_kv_head, head_dim = self.kv_shape
        return [np.zeros((batch, n_kv_head, 0, head_dim), np.float32) for _ in self.past_names]

    def _continue(self, row: _Row) -> None:
        """Several tokens after an existing past (one sequence, any length)."""
        state, tokens = row.state, row.tokens
        n = tokens.shape[0]
        logits, present = self._run(
            tokens[None].astype(np.int64), np.ones((1, state.length + n), np.int64),
            np.arange(state.length, state.length + n, dtype=np.int64)[None], state.past)
        row.logits, row.state = logits[0, -1], _Sequence(present, state.length + n)

    def _prefill(self, rows: list[_Row]) -> None:
        """New prompts, sorted by length, in a few calls of like-length prompts (`length_groups`): prompts of
        13 and 120 tokens padded into one call cost two 120-token prompts."""
        order = sorted(rows, key=lambda row: row.tokens.shape[0])
        for group in length_groups([row.tokens.shape[0] for row in order], PREFILL_CALL_TOKENS):
            self._prefill_padded(order[group.start:group.stop])

    def _prefill_padded(self, rows: list[_Row]) -> None:
        """New prompts in ONE call, right-padded to the longest."""
        width = max(row.tokens.shape[0] for row in rows)
        batch = len(rows)
        ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width), np.int64)
        for index, row in enumerate(rows):
            n = row.tokens.shape[0]
            ids[index, :n] = row.tokens
            mask[index, :n] = 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy()
        logits, present = self._run(ids, mask, positions, self._empty_past(batch))
        for index, row in enumerate(rows):
            n = row.tokens.shape[0]
            row.logits = logits[index, n - 1]
            row.state = _Sequence([layer[index:index + 1, :, :n] for layer in present], n)

    def _decode(self, rows: list[_Row]) -> None:
        """One token for each of several sequences in ONE call: pasts left-padded to the longest.

        The running batch's rows are reused in place when they can be (`_in_place`): a sequence that ended
        leaves its row idle until a joining one takes it. Otherwise the pasts are gathered into fresh arrays."""
        states = [row.state for row in rows]
        reused = self._in_place(states)
        if reused is not None:
            past, slots = reused
            width = past[0].shape[2]
        else:
            width = max(state.length for state in states)
            past, slots = self._batched_past(states, width), list(range(len(states)))
        batch = past[0].shape[0]
        # Every row sees its own token, so an idle row (no sequence this step) computes finite values too.
        mask = np.zeros((batch, width + 1), np.int64)
        mask[:, width] = 1
        positions = np.zeros((batch, 1), np.int64)
        tokens = np.zeros((batch, 1), np.int64)
        for row, state, slot in zip(rows, states, slots, strict=True):
            mask[slot, width - state.length:] = 1
            positions[slot, 0] = state.length
            tokens[slot, 0] = row.tokens[0]
        logits, present = self._run(tokens, mask, positions, past)
        for row, state, slot in zip(rows, states, slots, strict=True):
            row.logits = logits[slot, -1]
            row.state = _Sequence([layer[slot:slot + 1, :, width - state.length:] for layer in present],
                                  state.length + 1, present, slot)

    def _in_place(self, states: list[_Sequence]) -> tuple[list[np.ndarray], list[int]] | None:
        """The previous step's present key/values as this step's past, unchanged in shape, and each state's row
        in it; None when the batch must be gathered anew (`_batched_past`).

        Sequences joining the batch (after their prefill) are written into rows no live sequence holds (those
        of sequences that ended), one row's copy each, instead of gathering the whole cache into new arrays,
        which at 16 sequences costs about half a decoding step and happened at every arrival and departure.
        Idle rows cost their share of each step, so past `IDLE_ROWS` of the batch, or when the rows leave
        most of the width unused (the longest sequence ended), the batch is gathered anew, compact."""
        batch = None
        for state in states:
            if state.batch is not None:
                if batch is not None and state.batch is not batch:
                    return None  # rows of two batches: gather
                batch = state.batch
        if batch is None:
            return None
        size, full = batch[0].shape[0], batch[0].shape[2]
        # Rows held by a live sequence (stepping now or not) keep their past; the rest are free.
        held = {state.slot for state in self.sequences.values() if state.batch is batch}
        held.update(state.slot for state in states if state.batch is batch)
        joining = [position for position, state in enumerate(states) if state.batch is None]
        free = [slot for slot in range(size) if slot not in held]
        idle = len(free) - len(joining)
        longest = max(state.length for state in states)
        if (idle < 0 or idle > size * IDLE_ROWS or full - longest > max(MIN_TRIM, full // 2)
                or any(states[position].length > full for position in joining)):
            return None
        slots = [state.slot for state in states]
        for position, slot in zip(joining, free, strict=False):
            state = states[position]
            for layer, own in zip(batch, state.past, strict=True):
                layer[slot, :, full - state.length:] = own[0]
            slots[position] = slot
        return batch, slots

    def _batched_past(self, states: list[_Sequence], width: int) -> list[np.ndarray]:
        """The pasts of `states` as ORT's batched input, each row left-padded to `width`.

        Sequences decoding together come back every step as rows of the previous step's present key/values,
        already laid out so: the same rows in the same order are handed to ORT as they are; otherwise each
        such group's rows move in one copy per KV input, and only a sequence new to decoding (after its
        prefill) is copied on its own. Copying every row into fresh padded arrays, as before, copied the whole
        cache each token, which cost about as much as the model's own work at 16 sequences."""
        groups: dict[int, tuple[list[np.ndarray], list[int], list[int]]] = {}
        alone: list[int] = []
        for position, state in enumerate(states):
            if state.batch is None:
                alone.append(position)
                continue
            _, positions, slots = groups.setdefault(id(state.batch), (state.batch, [], []))
            positions.append(position)
            slots.append(state.slot)
        if len(groups) == 1 and not alone:
            batch, _, slots = next(iter(groups.values()))
            full = batch[0].shape[2]  # >= width: each row's length and its left padding
            if full == width and slots == list(range(batch[0].shape[0])):
                return batch
            rows = np.array(slots, np.intp)
            return [layer[rows, :, full - width:] for layer in batch]
        n_kv_head, head_dim = self.kv_shape
        past = [np.zeros((len(states), n_kv_head, width, head_dim), np.float32) for _ in self.past_names]
        for batch, positions, slots in groups.values():
            keep = min(width, batch[0].shape[2])  # a group's padding beyond `width` is no row's past
            into, rows = np.array(positions, np.intp), np.array(slots, np.intp)
            for padded, layer in zip(past, batch, strict=True):
                padded[into, :, width - keep:] = layer[rows, :, layer.shape[2] - keep:]
        for position in alone:
            state = states[position]
            for padded, layer in zip(past, state.past, strict=True):
                padded[position, :, width - state.length:] = layer[0]
        return past

    # -- Triton entry points --------------------------------------------------------------------------

    def execute(self, requests):
        self._evict_idle()
        responses: list = [None] * len(requests)
        parsed: list[list[_Row] | None] = []
        wants_logits: list[bool] = []
        decode, prefill, more = [], [], []
        for index, request in enumerate(requests):
            try:
                rows = self._rows(index, request)
                wants_logits.append("LOGITS" in request.requested_output_names())
            except Exception as error:  # a malformed request fails alone
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
                parsed.append(None)
                wants_logits.append(False)
                continue
            parsed.append(rows)
            for row in rows:
                if row.error or row.tokens.size == 0:
                    continue
                if row.state is None:
                    prefill.append(row)
                elif row.tokens.size == 1:
                    decode.append(row)
                else:
                    more.append(row)
        for group, run in ((decode, self._decode), (prefill, self._prefill)):
            if group:
                try:
                    run(group)
                except Exception as error:  # the rows fail, the other groups still run
                    for row in group:
                        row.error = str(error)
        for row in more:
            try:
                self._continue(row)
            except Exception as error:
                row.error = str(error)
        for rows in parsed:
            for row in rows or ():
                if row.logits is not None and not row.error:
                    self._keep(row.sequence_id, row.state, row.end)
                elif row.end or row.error:
                    self.sequences.pop(row.sequence_id, None)
        for index, rows in enumerate(parsed):
            if rows is not None:
                responses[index] = self._response(rows, wants_logits[index])
        return responses

    def _rows(self, index: int, request) -> list[_Row]:
        ids = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_ID").as_numpy().reshape(-1)
        batch = ids.shape[0]
        tokens = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy().reshape(batch, -1)
        length_tensor = pb_utils.get_input_tensor_by_name(request, "INPUT_LENGTH")
        lengths = (length_tensor.as_numpy().reshape(-1) if length_tensor is not None
                   else np.full(batch, tokens.shape[1], np.int64))
        start, end = _flags(request, "START", batch), _flags(request, "END", batch)
        rows = []
        for position in range(batch):
            sequence_id = int(ids[position])
            row = _Row(index, position, sequence_id, tokens[position, :int(lengths[position])], bool(end[position]))
            if start[position]:
                self.sequences.pop(sequence_id, None)
            row.state = self.sequences.get(sequence_id)
            if row.tokens.size:
                length = (row.state.length if row.state is not None else 0) + row.tokens.size
                if row.state is None and not start[position]:
                    row.error = f"unknown sequence {sequence_id}: send START with the prompt first"
                elif length > self.context:
                    row.error = f"sequence {sequence_id} would reach {length} tokens; the context is {self.context}"
            rows.append(row)
        return rows

    def _response(self, rows: list[_Row], wants_logits: bool):
        next_tokens = np.full((len(rows), 1), -1, np.int64)
        logits = np.zeros((len(rows), self.vocab), np.float32) if wants_logits else None
        for position, row in enumerate(rows):
            if row.logits is None or row.error:
                continue
            next_tokens[position, 0] = int(np.argmax(row.logits))
            if logits is not None:
                logits[position] = row.logits
        outputs = [pb_utils.Tensor("NEXT_TOKEN", next_tokens)]
        if logits is not None:
            outputs.append(pb_utils.Tensor("LOGITS", logits))
        return pb_utils.InferenceResponse(output_tensors=outputs)

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


def _flags(request, name: str, batch: int) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return np.zeros(batch, np.bool_)
    return tensor.as_numpy().reshape(-1).astype(np.bool_)
