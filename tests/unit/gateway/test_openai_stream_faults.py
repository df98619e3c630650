"""A fault of the gateway's own after a streamed OpenAI answer has started must end the stream with an error
event and `[DONE]`: the headers are sent, so the middleware can no longer answer 500, and before this the
client waited for an end that never came."""

from __future__ import annotations

import json

from aiohttp import web
from llmp.inference.v1 import inference_pb2

from gateway.views import openai_compat


async def test_a_fault_after_the_first_piece_ends_the_stream_with_an_error_event(aiohttp_client, monkeypatch):
    async def pieces(request, message):
        yield inference_pb2.GenerateStreamResponse(text="hel")
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(openai_compat, "_pieces", pieces)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        return await openai_compat._stream(request, [inference_pb2.GenerateRequest(deployment="m")],
                                           openai_compat._ChatEvents(body, 1))

    app = web.Application()
    app.router.add_post("/chat", handler)
    client = await aiohttp_client(app)
    response = await client.post("/chat", timeout=10)
    text = await response.text()
    events = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    assert response.status == 200 and events[-1] == "[DONE]", text
    error = json.loads(events[-2])["error"]
    assert error["type"] and "stream failed" in error["message"], error
    assert any("hel" in event for event in events[:-2])  # the piece before the fault was sent
