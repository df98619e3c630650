"""services/common/bounded.py: a memo keyed by what requests choose holds at most its limit, and a hit is a hit."""

from __future__ import annotations

from services.common.bounded import Bounded


def test_a_flood_of_distinct_keys_never_holds_more_than_the_limit():
    memo: Bounded[str, int] = Bounded(3)
    sizes = []
    for number in range(10):
        assert memo.remember(f"k{number}", number) == number
        sizes.append(len(memo))
        assert memo[f"k{number}"] == number  # the newest is always kept
    assert max(sizes) == 3 and sizes == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def test_updating_a_key_already_there_forgets_nothing():
    memo: Bounded[str, int] = Bounded(2)
    memo.remember("a", 1)
    memo.remember("b", 2)
    memo.remember("b", 3)  # full, but no new entry: nothing to make room for
    assert memo == {"a": 1, "b": 3}


def test_it_is_a_dict_for_every_reader():
    memo: Bounded[tuple[str, str], None] = Bounded(4)
    memo.remember(("GET", "/v1/models"), None)
    assert ("GET", "/v1/models") in memo and memo.get(("GET", "/x")) is None and isinstance(memo, dict)
