"""Several async streams read as one: each item as it comes, with the index of its stream.

Each stream is drained by its own task, so they progress together (the n choices of one request meet
in the inference service's step batcher; the prompts of one request reach it at once). Leaving early,
or a stream's error, cancels the others, which closes each (a generation frees its Triton state, a gRPC
call is cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

Item = TypeVar("Item")
_DONE = object()


async def merged(streams: list[AsyncIterator[Item]]) -> AsyncIterator[tuple[int, Item]]:
    """(stream index, item) of every stream's items, in the order they arrive; a stream's error is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Item]) -> None:
        try:
            if hasattr(stream, "aclose"):
                async with aclosing(stream) as items:
                    async for item in items:
                        queue.put_nowait((index, item, None))
            else:
                async for item in stream:
                    queue.put_nowait((index, item, None))
        except Exception as error:  # handed to the reader, which raises it
            queue.put_nowait((index, _DONE, error))
            return
        queue.put_nowait((index, _DONE, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
