"""A dict that starts over when full, for what a process remembers per request-chosen key (a target, an API key,
an address): a flood of distinct keys holds at most `limit` entries instead of growing memory without end.

It starts over rather than evicting the oldest (as an LRU does) so the hit path stays one plain dict lookup, with
no bookkeeping per hit: every entry is cheap to work out again, and a burst of misses after a flood is the price.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Bounded(dict[K, V], Generic[K, V]):
    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> V:
        """`self[key] = value`, first forgetting everything if that would pass `limit` entries; returns `value`."""
        if len(self) >= self.limit and key not in self:
            self.clear()
        self[key] = value
        return value
