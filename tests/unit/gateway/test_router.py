"""`TableRouter` answers every request exactly as aiohttp's own router does, on the gateway's real route table
and on templates the tree must leave to aiohttp (a custom regex, a partial segment, a catch-all before others)."""

import itertools

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway import routes
from gateway.app import init_app
from gateway.router import TableRouter
from services.common.config import Settings

# Segment values a parameter meets: plain, encoded slash and percent (aiohttp decodes them in the match),
# unicode, braces (refused by aiohttp's default pattern), an empty segment.
VALUES = ["bench", "a%2Fb", "100%25", "é", "x{y}", "", "1"]
EXTRA_PATHS = ["/", "//", "/v1", "/v1/", "/v1/datasets/", "/v1/datasets//versions/1", "/nope",
               "/v1/datasets/a/b/c/d/e/f", "/console/", "/healthz/", "/openai/v1/models/gpt2/",
               "/v1/models/m/aliases/a/gate/x"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PROPFIND"]


def _paths(templates: list[str]) -> list[str]:
    paths = set(EXTRA_PATHS)
    for template in templates:
        parts = template.split("/")
        slots = [i for i, part in enumerate(parts) if part.startswith("{")]
        # Every value in every slot, and one bad value beside good ones: not every combination (time).
        fills = [[value] * len(slots) for value in VALUES] + [["1"] * at + [bad] + ["1"] * (len(slots) - at - 1)
                                                              for at in range(len(slots)) for bad in ("", "x{y}")]
        for values in fills:
            filled = list(parts)
            for slot, value in zip(slots, values, strict=True):
                filled[slot] = value
            paths.add("/".join(filled))
        paths.add(template.replace("{", "%7B"))
    # The same paths with a query: the router remembers answers by target, query included.
    paths |= {f"{path}?q=%2F{at % 3}" for at, path in enumerate(sorted(paths))}
    return sorted(paths)


async def _same_as_aiohttp(app: web.Application, paths: list[str]) -> int:
    """Resolves each path with each method through `app.router` (twice: found, then remembered) and through
    `UrlDispatcher.resolve` on the same resources; returns how many routes (not the catch-all) the table
    answered without aiohttp's walk."""
    router = app.router
    assert isinstance(router, TableRouter)
    answered, walked = 0, 0
    aiohttps = web.UrlDispatcher.resolve

    async def walk(self, request):  # what the table leaves to aiohttp's walk (super().resolve), counted
        nonlocal walked
        walked += 1
        return await aiohttps(self, request)

    for path, method in itertools.product(paths, METHODS):
        theirs = await aiohttps(router, make_mocked_request(method, path, app=app))
        for attempt in ("found", "remembered"):
            request = make_mocked_request(method, path, app=app)
            before = walked
            web.UrlDispatcher.resolve = walk
            try:
                ours = await router.resolve(request)
            finally:
                web.UrlDispatcher.resolve = aiohttps
            from_table = walked == before
            assert type(ours) is type(theirs), (method, path, attempt)
            if theirs.http_exception is not None:  # 404/405: a new error route each time
                assert ours.http_exception.status == theirs.http_exception.status, (method, path, attempt)
                assert ours.http_exception.headers.get("Allow") == theirs.http_exception.headers.get("Allow")
                continue
            assert ours.route is theirs.route and dict(ours) == dict(theirs), (method, path, attempt, ours, theirs)
            answered += (attempt == "found" and from_table and theirs.route.resource is not None
                         and "{tail}" not in theirs.route.resource.canonical)
    return answered


async def test_the_gateway_resolves_every_route_as_aiohttp_does():
    app = init_app(Settings.from_env({}))
    app.freeze()
    answered = await _same_as_aiohttp(app, _paths([route.path for route in routes.all_routes()]))
    assert answered > 200  # the routes themselves, not only the catch-all's 404s


async def _handler(request: web.Request) -> web.Response:
    return web.Response()


@pytest.mark.parametrize("catch_all_first", [False, True])
async def test_templates_the_tree_leaves_to_aiohttp_resolve_as_aiohttp_does(catch_all_first):
    with pytest.warns(DeprecationWarning):
        app = web.Application(router=TableRouter())
    if catch_all_first:  # a non-default regex that ranks before tree resources: aiohttp must decide
        app.router.add_route("*", "/files/{tail:.*}", _handler)
    for method, path in [("GET", "/files"), ("GET", "/files/{name}"), ("PUT", "/files/{name}"),
                         ("GET", "/files/{name}/{part}"), ("POST", "/files/{other}/{part}"),
                         ("GET", "/files/x/{part}"), ("DELETE", "/files/{name}/y"),
                         ("GET", "/files/{name}/y"),  # its literal is tried first in the tree, ranks after {part}
                         ("GET", "/files/{name}.json"), ("GET", "/files/{name:[0-9]+}/raw")]:  # left to aiohttp
        app.router.add_route(method, path, _handler)
    app.router.add_route("GET", "/files/{name}", _handler)  # a second resource, same template, later rank
    if not catch_all_first:
        app.router.add_route("*", "/{tail:.*}", _handler)
    app.freeze()
    paths = _paths(["/files/{a}", "/files/{a}/{b}", "/files/{a}.json", "/files/{a}/raw", "/files/x/y"])
    answered = await _same_as_aiohttp(app, paths + ["/files/12/raw", "/files/x/y", "/files/x.json", "/files/q/y"])
    assert answered > 20 or catch_all_first  # (the first catch-all answers every path under /files)


async def test_remembered_answers_are_bounded_and_not_shared_between_requests(monkeypatch):
    from gateway import router as router_module

    monkeypatch.setattr(router_module, "KNOWN_TARGETS", 50)
    app = init_app(Settings.from_env({}))
    app.freeze()
    for at in range(200):  # distinct targets: the memo starts over instead of growing
        match = await app.router.resolve(make_mocked_request("GET", f"/v1/datasets/d{at}", app=app))
        assert dict(match) == {"name": f"d{at}"}
        assert len(app.router._known) <= 50
    long_name = "n" * router_module.REMEMBERED_TARGET_CHARS
    app.router._known.clear()
    match = await app.router.resolve(make_mocked_request("GET", f"/v1/datasets/{long_name}", app=app))
    assert dict(match) == {"name": long_name} and not app.router._known  # resolved, not remembered: too long
    first = await app.router.resolve(make_mocked_request("GET", "/v1/datasets/x", app=app))
    first["name"] = "changed"  # a match is the request's own: changing it changes no later request's
    again = await app.router.resolve(make_mocked_request("GET", "/v1/datasets/x", app=app))
    assert dict(again) == {"name": "x"} and again is not first
