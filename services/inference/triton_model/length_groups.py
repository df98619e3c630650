"""How rows of unlike lengths are split into ORT calls, each right-padded to its longest row: shared by the
decoder's prefill (`model.py`) and the encoder (`encoder_model.py`), copied beside both by the inference
service (model_repository.py), since a model in Triton's stub imports nothing from llmp.

A padded token costs a real token's compute (every layer runs on it), and one more call costs a fixed
amount (a pass over the weights, the overhead of a run): the split minimises padded tokens plus that cost.
"""

from __future__ import annotations


def length_groups(lengths: list[int], call_cost_tokens: int) -> list[range]:
    """Split rows sorted by length (`lengths` ascending) into consecutive groups, each run as one ORT call
    padded to its longest, minimising padded tokens plus `call_cost_tokens` per call (dynamic programming:
    a group always ends at a row, and the best split before it is already known)."""
    best = [0] * (len(lengths) + 1)  # best[end]: the least cost of rows [0, end)
    start_of = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        best[end], start_of[end] = min((best[start] + (end - start) * lengths[end - 1] + call_cost_tokens, start)
                                       for start in range(end))
    groups, end = [], len(lengths)
    while end > 0:
        groups.append(range(start_of[end], end))
        end = start_of[end]
    return groups[::-1]
