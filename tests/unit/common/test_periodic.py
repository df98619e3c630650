"""services.common.periodic: rounds on time, failures survived, close waits for a round in progress (or cuts it
when asked)."""

import asyncio

from services.common.periodic import Periodic


async def test_rounds_repeat_and_a_failing_round_does_not_stop_them(caplog):
    rounds = []

    async def round_() -> None:
        rounds.append(asyncio.get_running_loop().time())
        if len(rounds) == 2:
            raise RuntimeError("server away")

    loop = Periodic("test round", 0.02, round_)
    loop.start()
    await asyncio.sleep(0.2)
    await loop.close()
    assert len(rounds) >= 4
    assert "test round failed" in caplog.text and "server away" in caplog.text
    count = len(rounds)
    await asyncio.sleep(0.06)
    assert len(rounds) == count  # closed: no more rounds


async def test_first_round_waits_an_interval_unless_asked_to_run_at_start():
    for first_at_start, expected in ((False, 0), (True, 1)):
        rounds = []

        async def round_(rounds=rounds) -> None:
            rounds.append(1)

        loop = Periodic("test round", 10, round_, first_at_start=first_at_start)
        loop.start()
        await asyncio.sleep(0.05)
        await loop.close()  # returns at once: the wait for the next round ends with close
        assert len(rounds) == expected


async def test_close_lets_a_round_in_progress_finish():
    finished = asyncio.Event()

    async def slow_round() -> None:
        await asyncio.sleep(0.1)
        finished.set()

    loop = Periodic("test round", 0.01, slow_round, first_at_start=True)
    loop.start()
    await asyncio.sleep(0.02)
    await loop.close()
    assert finished.is_set()


async def test_close_cancels_a_round_in_progress_when_asked():
    started, finished = asyncio.Event(), asyncio.Event()

    async def hanging_round() -> None:
        started.set()
        await asyncio.sleep(30)
        finished.set()

    loop = Periodic("test round", 0.01, hanging_round, first_at_start=True, cancel_at_close=True)
    loop.start()
    await started.wait()
    await asyncio.wait_for(loop.close(), 1)  # would take 30 s if it waited for the round
    assert not finished.is_set()
