"""What each piece of the gateway's 304 path costs per request, in µs, timed in-process on the live app of
`bench/gateway.py --pieces` (its key, its READY dataset version, its validators).

Each piece is called in loops of about `SLICE` seconds on the request the load process sends, built with aiohttp's
`make_mocked_request`; the best of `REPEATS` loops counts (the machine is shared: the minimum is the piece's
own cost, the rest is neighbours). Pieces whose result aiohttp caches on the request (`path_qs`, `query`)
run on a fresh `clone()` each time, the clone's own cost subtracted. Socket I/O and HTTP parsing are not
here: both sides pay them alike, and the bare handler's whole `_handle` is printed beside the gateway's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from yarl import URL

# Loops short enough to fit between two of the scheduler's preemptions on a shared machine (a long loop's
# minimum still holds other processes' slices), many of them.
SLICE = 0.0005  # seconds per loop
REPEATS = 400


def _best(loop_once: Callable[[int], None]) -> float:
    started = time.perf_counter()
    loop_once(100)
    n = max(5, int(100 * SLICE / max(time.perf_counter() - started, 1e-9)))
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        loop_once(n)
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


async def _best_async(call: Callable[[], Awaitable]) -> float:
    async def loop_once(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await call()
        return time.perf_counter() - started

    n = max(5, int(100 * SLICE / max(await loop_once(100), 1e-9)))
    best = float("inf")
    for _ in range(REPEATS):
        best = min(best, await loop_once(n))
    return best / n * 1e6


def _request(app: web.Application, path: str, headers: dict[str, str]) -> web.Request:
    return make_mocked_request("GET", path, headers=headers, app=app)


class _Protocol:
    """What `web.Request` reads of its connection (a `Mock` costs microseconds per attribute)."""

    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8080)


def _fresh_source(request: web.Request) -> Callable[[], web.Request]:
    """New requests like `request`, as the server makes one per message: nothing cached on them or their URL."""
    message, payload, writer, task, loop = (request._message, request._payload, request._payload_writer,
                                            request._task, request._loop)
    protocol, target = _Protocol(), str(request.rel_url)

    def fresh() -> web.Request:
        return web.Request(message._replace(url=URL(target, encoded=True)), payload, protocol, writer, task, loop)

    return fresh


async def _resolved(app: web.Application, path: str, headers: dict[str, str]) -> web.Request:
    request = _request(app, path, headers)
    match_info = await app.router.resolve(request)
    match_info.add_app(app)
    match_info.freeze()
    request._match_info = match_info
    return request


async def _constant(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@web.middleware
async def _noop(request: web.Request, handler) -> web.StreamResponse:
    return await handler(request)


async def _middleware_cost() -> float:
    """Any middleware costs every request aiohttp's chain (a cached build, partials, its current-app middleware)."""
    costs = []
    for middlewares in ([], [_noop]):
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/constant", _constant)
        app.freeze()
        fresh = _fresh_source(await _resolved(app, "/constant", {}))

        async def handle(app=app, fresh=fresh) -> web.StreamResponse:
            return await app._handle(fresh())

        costs.append(await _best_async(handle))
    return costs[1] - costs[0]


async def measure(app: web.Application, bare: web.Application, path: str, header_lines: list[str]
                  ) -> list[tuple[str, float]]:
    """(piece, µs per request) for the gateway's 304 path and, for comparison, the bare handler's."""
    from gateway import app as gateway_app
    from gateway import auth, http, state

    headers = dict(line.split(": ", 1) for line in header_lines)
    key = gateway_app._bearer(_request(app, path, headers))
    request = await _resolved(app, path, headers)
    keys, quotas, limiter, validators = app[state.KEYS], app[state.QUOTAS], app[state.LIMITER], app[http.VALIDATORS]
    who, rate = keys.cached(key)
    await quotas.take(who.tenant)  # a batch in hand, as under load
    condition = headers["If-None-Match"]
    found = validators.lookup(who.tenant, request.raw_path)
    assert found is not None, "the validators of the bench's version are not cached"
    results: list[tuple[str, float]] = []

    def piece(name: str, micros: float) -> None:
        results.append((name, micros))

    bare_request = await _resolved(bare, "/constant", {})
    clone, clone_bare = _fresh_source(request), _fresh_source(bare_request)
    clone_cost = _best(lambda n: [clone() for _ in range(n)])
    clone_bare_cost = _best(lambda n: [clone_bare() for _ in range(n)])

    async def handle() -> web.StreamResponse:
        return await app._handle(clone())

    async def handle_bare() -> web.StreamResponse:
        return await bare._handle(clone_bare())

    response = await handle()
    assert response.status == 304, response.status
    if os.environ.get("LLMP_PIECES_PROFILE"):
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(2000):
            await handle()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    piece("whole gateway `_handle` (route, middleware, 304 response object)", await _best_async(handle) - clone_cost)
    piece("whole bare `_handle` (route, constant handler, 200 response object)",
          await _best_async(handle_bare) - clone_bare_cost)
    piece("route resolution (the app's router: `gateway.router.TableRouter`, answer remembered), gateway",
          await _best_async(lambda: app.router.resolve(clone())) - clone_cost)
    path_safe = request.rel_url.path_safe
    piece("route resolution, a target not seen before (`TableRouter`'s tree walk)",
          _best(lambda n: [app.router._look_up("GET", path_safe) for _ in range(n)]))
    piece("route resolution (aiohttp's `UrlDispatcher`), bare",
          await _best_async(lambda: bare.router.resolve(clone_bare())) - clone_bare_cost)

    piece("aiohttp middleware chain (what one no-op middleware adds to the bare app)", await _middleware_cost())

    ids, request_id = gateway_app._request_ids, gateway_app.logs.request_id

    def request_id_piece(n: int) -> None:
        for _ in range(n):
            value = request.headers.get("X-Request-Id") or next(ids)
            request_id.reset(request_id.set(value))

    piece("request id (header or counter) + log context set/reset", _best(request_id_piece))
    piece("route metadata lookup (canonical path, table)", _best(
        lambda n: [request.match_info.route.resource.canonical for _ in range(n)]))
    route = next(route for route in app[state.ROUTE_TABLE]
                 if route.method == "GET" and route.path == request.match_info.route.resource.canonical)
    plan = gateway_app._Plan(route.method, route.path, route)
    plan.check_target(request)
    piece("query and path checks, target remembered (`_Plan.check_target`)",
          _best(lambda n: [plan.check_target(request) for _ in range(n)]))
    piece("query and path checks, a target not seen before (`validate_path`)",
          _best(lambda n: [http.validate_path(plan.path_checks, request.match_info) for _ in range(n)]))
    piece("Authorization header → key (`_bearer`)", _best(lambda n: [gateway_app._bearer(request) for _ in range(n)]))
    piece("verified key cache hit (`KeyStore.cached`)", _best(lambda n: [keys.cached(key) for _ in range(n)]))
    piece("one clock reading (`time.monotonic`, shared by the caches and buckets)",
          _best(lambda n: [time.monotonic() for _ in range(n)]))
    piece("tenant quota, batch in hand (`take_local`)", _best(lambda n: [quotas.take_local(who.tenant)
                                                                          for _ in range(n)]))
    piece("per-key rate limit (`RateLimiter.take`)", _best(lambda n: [limiter.take(who.key_id, 1e12)
                                                                       for _ in range(n)]))

    def path_qs(n: int) -> None:
        for _ in range(n):
            _ = clone().path_qs

    def raw_path(n: int) -> None:
        for _ in range(n):
            _ = clone().raw_path

    piece("request.path_qs (aiohttp, rebuilt per request; the validators' key before)", _best(path_qs) - clone_cost)
    piece("request.raw_path (the target as parsed; the validators' key)", _best(raw_path) - clone_cost)
    piece("validator lookup + If-None-Match compare", _best(
        lambda n: [http.none_match(condition, validators.lookup(who.tenant, path)["ETag"]) for _ in range(n)]))
    piece("304 response object, as before (`web.Response(status=304, headers=…)`)", _best(
        lambda n: [web.Response(status=304, headers=found) for _ in range(n)]))
    piece("304 response object (`web.StreamResponse(status=304, headers=…)`)", _best(
        lambda n: [web.StreamResponse(status=304, headers=found) for _ in range(n)]))

    def extra_headers(n: int) -> None:
        for _ in range(n):
            headers = web.StreamResponse(status=304, headers=found).headers
            headers["X-Request-Id"] = "0123456789abcdef0123456789abcdef"
            headers["X-Content-Type-Options"] = "nosniff"
            if "Cache-Control" not in headers:
                headers["Cache-Control"] = "no-store"

    response_only = _best(lambda n: [web.StreamResponse(status=304, headers=found) for _ in range(n)])
    piece("request id, nosniff and Cache-Control headers on the response", _best(extra_headers) - response_only)

    from aiohttp.http_writer import _serialize_headers

    sent = (await handle()).headers
    bare_sent = (await handle_bare()).headers
    for headers_out in (sent, bare_sent):  # what `prepare` adds to both
        headers_out["Date"], headers_out["Server"] = "Sun, 06 Dec 2026 05:00:00 GMT", "Python/3.11 aiohttp/3.14.5"
    bare_sent["Content-Length"] = "2"
    piece(f"response head serialised, gateway ({len(_serialize_headers('HTTP/1.1 304 Not Modified', sent))} bytes)",
          _best(lambda n: [_serialize_headers("HTTP/1.1 304 Not Modified", sent) for _ in range(n)]))
    piece(f"response head serialised, bare ({len(_serialize_headers('HTTP/1.1 200 OK', bare_sent))} bytes)",
          _best(lambda n: [_serialize_headers("HTTP/1.1 200 OK", bare_sent) for _ in range(n)]))

    def metrics(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            observed = gateway_app._observed_for("GET", "/x", 304)
            observed.count.value += 1
            observed.latency.observe(time.perf_counter() - started)
            gateway_app.access_log.isEnabledFor(logging.INFO)

    piece("metrics (count + latency histogram) + access log level check", _best(metrics))
    # For scale: what a key not in the cache costs (the PostgreSQL query and the SHA-256), once per
    # key per `auth.CACHE_SECONDS`.
    best = float("inf")
    for _ in range(REPEATS):
        keys._cache.pop(key, None)
        started = time.perf_counter()
        await keys.authenticate(key)
        best = min(best, time.perf_counter() - started)
    piece(f"for scale: key not cached (query + SHA-256), once per key per {auth.CACHE_SECONDS:g} s", best * 1e6)
    return results


async def report(app: web.Application, bare: web.Application, path: str, header_lines: list[str]) -> None:
    results = await measure(app, bare, path, header_lines)
    width = max(len(name) for name, _ in results)
    print(f"pieces of the 304 path (µs per request, best of {REPEATS} loops of ~{SLICE * 1000:g} ms):")
    for name, micros in results:
        print(f"  {name:<{width}}  {micros:7.2f}")
    await asyncio.sleep(0)
