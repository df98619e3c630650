"""Route resolution from a table built once, answering exactly what aiohttp's router would.

aiohttp's `UrlDispatcher.resolve` walks the path's prefixes from the longest (`/v1/datasets/x/versions/1`,
`…/versions`, `…/x`, `/v1/datasets`) and, under each, awaits every resource indexed there in turn, each
trying its regex: on the gateway's 304 path that was 9 µs against 1.7 for the one route of a bare app,
the biggest single piece of the gateway's own work (bench/RESULTS.md). `TableRouter` keeps every resource
registered as usual (the same resources, routes, match info, 404/405 and `Allow`) but, once the app is
frozen, resolves a path through a tree of its segments: a literal segment is a dict lookup, a `{name}`
parameter takes any one segment.

Only resources whose match is exactly that are in the tree: plain paths, and dynamic ones whose every
parameter fills a whole segment with aiohttp's default pattern (`[^{}/]+`: a non-empty segment without
braces), checked against the resource's own compiled pattern. Everything else (a `{tail:.*}`, `{x}.json`,
static files, sub-apps) is left to aiohttp: a path the tree does not answer, or one where such a resource
could come first, goes through `UrlDispatcher.resolve` unchanged. Where several resources match, the one
aiohttp's walk tries first wins: the longer index prefix, then the earlier registered.

The answer is a function of the method and the target as sent alone, so it is remembered per (method,
target), bounded (`KNOWN_TARGETS`, targets of at most `REMEMBERED_TARGET_CHARS`): under load the walk cost
4 µs a request in place (twice its tight-loop time: the objects it touches are out of cache by the next
request), a remembered answer one dict lookup.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, DynamicResource, PlainResource, UrlMappingMatchInfo

from services.common.bounded import Bounded

_PARAMETER = re.compile(r"\{([_a-zA-Z][_a-zA-Z0-9]*)\}")  # aiohttp's `DynamicResource.DYN`
KNOWN_TARGETS = 10_000  # resolutions remembered before the memo starts over: memory stays bounded
# Longer targets are resolved each time, never remembered: 10,000 of aiohttp's 8 KiB request lines would hold 80 MB.
REMEMBERED_TARGET_CHARS = 256
_LEFT = object()  # remembered for a target the tree leaves to aiohttp's walk


@dataclass(slots=True)
class _Entry:
    """One resource at the end of a branch: its rank in aiohttp's walk, routes by method, parameters."""

    rank: tuple[int, int]
    ours: bool  # ranks before every resource left to aiohttp: if it matches, aiohttp's walk would take it
    routes: dict[str, web.AbstractRoute]
    any_route: web.AbstractRoute | None
    parameters: tuple[tuple[int, str], ...]  # (segment index, name)


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    parameter: _Node | None = None
    entries: list[_Entry] = field(default_factory=list)


def _segments(resource: AbstractResource) -> list[str | None] | None:
    """The resource's path split at `/`, None for a whole-segment parameter; None if aiohttp's match of it
    is not exactly that (then aiohttp resolves paths it could take)."""
    if type(resource) is PlainResource:
        path = resource.canonical
        return path.split("/") if path.startswith("/") and "%" not in path else None
    if type(resource) is not DynamicResource:
        return None
    segments: list[str | None] = []
    pattern = []
    for part in resource.canonical.split("/"):
        named = _PARAMETER.fullmatch(part)
        if named is not None:
            segments.append(None)
            pattern.append(f"(?P<{named.group(1)}>{DynamicResource.GOOD})")
        elif "{" in part or "}" in part or "%" in part:
            return None
        else:
            segments.append(part)
            pattern.append(re.escape(part))
    # The canonical form drops a parameter's own regex (`{tail:.*}` reads `{tail}`): only a resource whose
    # compiled pattern is the default one for every parameter matches segment by segment.
    if resource.get_info()["pattern"].pattern != "/".join(pattern):
        return None
    return segments


def _unquote_path_safe(value: str) -> str:
    # What aiohttp does to a matched parameter of `path_safe` (where only %2F and %25 stay encoded).
    return value if "%" not in value else value.replace("%2F", "/").replace("%25", "%")


class TableRouter(web.UrlDispatcher):
    """`UrlDispatcher` whose `resolve` looks a path up in a segment tree built at `freeze()`; see the module."""

    def __init__(self) -> None:
        super().__init__()
        self._tree: _Node | None = None
        # (method, target as sent) -> what the tree answered: most requests repeat a target seen a moment ago
        # (the 304 path's revalidations), and the answer is a function of the two alone.
        self._known: Bounded[tuple[str, str], tuple[dict[str, str], web.AbstractRoute] | object] = Bounded(
            KNOWN_TARGETS)

    def freeze(self) -> None:
        super().freeze()
        if self._matched_sub_app_resources:  # tried before any walk: leave everything to aiohttp
            return
        ranked = [((-len(self._get_resource_index_key(resource)), order), resource, _segments(resource))
                  for order, resource in enumerate(self._resources)]
        first_left = min((rank for rank, _, segments in ranked if segments is None), default=(1, 0))
        tree, ends = _Node(), []
        for rank, resource, segments in ranked:
            if segments is None:
                continue
            node = tree
            for segment in segments:
                if segment is None:
                    node.parameter = node = node.parameter or _Node()
                else:
                    node = node.literal.setdefault(segment, _Node())
            routes = {route.method: route for route in resource}
            names = [name for name in _PARAMETER.findall(resource.canonical)]
            positions = [at for at, segment in enumerate(segments) if segment is None]
            node.entries.append(_Entry(rank, rank < first_left, routes, routes.get("*"),
                                       tuple(zip(positions, names, strict=True))))
            ends.append(node)
        for node in ends:  # the order aiohttp's walk tries them in
            node.entries.sort(key=_rank)
        self._tree = tree

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        if self._tree is not None:
            key = (request.method, request.raw_path)
            known = self._known.get(key)
            if known is None:
                known = self._look_up(request.method, request.rel_url.path_safe)
                if len(key[1]) <= REMEMBERED_TARGET_CHARS:
                    self._known.remember(key, known)
            if known is not _LEFT:
                return UrlMappingMatchInfo(*known)  # copies the match: the remembered one stays as it was
        return await super().resolve(request)

    def _look_up(self, method: str, path_safe: str) -> tuple[dict[str, str], web.AbstractRoute] | object:
        """(match, route) for a path the tree answers, else `_LEFT` (aiohttp's walk resolves it)."""
        parts = path_safe.split("/")
        found: list[list[_Entry]] = []
        _collect(self._tree, parts, 0, found)
        if found:
            # Usually one node matches; else their entries merge in aiohttp's order.
            for entry in found[0] if len(found) == 1 else sorted(itertools.chain(*found), key=_rank):
                if not entry.ours:
                    break
                route = entry.routes.get(method, entry.any_route)
                if route is not None:
                    return {name: _unquote_path_safe(parts[at]) for at, name in entry.parameters}, route
        return _LEFT


def _rank(entry: _Entry) -> tuple[int, int]:
    return entry.rank


def _collect(node: _Node, parts: list[str], at: int, found: list[list[_Entry]]) -> None:
    """The entries of every node whose segments match `parts[at:]` below `node` (literal and parameter
    branches both)."""
    while at < len(parts):
        part = parts[at]
        parameter = node.parameter
        if parameter is not None and part and "{" not in part and "}" not in part:
            literal = node.literal.get(part)
            if literal is not None:
                _collect(literal, parts, at + 1, found)
            node = parameter
        else:
            node = node.literal.get(part)
            if node is None:
                return
        at += 1
    if node.entries:
        found.append(node.entries)
