"""The encoder model's split of a batch into like-length ORT calls (triton_model/encoder_model.py): every
row in exactly one group, in sorted order, and the split the cheapest of all splits (padded tokens plus a
fixed cost per call), checked against every possible split of small batches."""

from __future__ import annotations

import importlib
import itertools
import sys
import types

import pytest

from services.inference import model_repository


@pytest.fixture
def encoder_model(monkeypatch):
    # The model file imports the Python backend's utilities, which exist only inside Triton's stub; the
    # grouping under test uses none of them.
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.syspath_prepend(str(model_repository.TEMPLATE_DIR))
    monkeypatch.delitem(sys.modules, "encoder_model", raising=False)
    return importlib.import_module("encoder_model")


def cost(lengths: list[int], groups: list[range], per_call: int) -> int:
    return sum(len(group) * lengths[group[-1]] + per_call for group in groups)


def every_split(count: int):
    for cuts in itertools.product([False, True], repeat=count - 1):
        starts = [0] + [index + 1 for index, cut in enumerate(cuts) if cut]
        yield [range(start, end) for start, end in zip(starts, starts[1:] + [count], strict=True)]


def test_groups_cover_the_rows_in_order_at_the_least_cost(encoder_model):
    per_call = encoder_model.CALL_COST_TOKENS
    for lengths in ([7], [5, 5, 5, 5], [3, 4, 40, 41], [2, 2, 9, 30, 31, 31, 60, 128], [10, 11, 12, 13, 70, 71]):
        groups = encoder_model.length_groups(lengths)
        assert [row for group in groups for row in group] == list(range(len(lengths)))
        assert cost(lengths, groups, per_call) == min(cost(lengths, split, per_call)
                                                      for split in every_split(len(lengths)))


def test_like_lengths_share_one_call_and_far_ones_do_not(encoder_model):
    assert encoder_model.length_groups([30] * 64) == [range(0, 64)]
    short, long = [10] * 32, [120] * 32  # padding the short rows to 120 wastes far more than one call costs
    assert encoder_model.length_groups(short + long) == [range(0, 32), range(32, 64)]
