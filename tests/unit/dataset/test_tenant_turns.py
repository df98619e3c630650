"""TenantTurns: a replica's build slot handed out across tenants in turn, not in arrival order."""

import asyncio

import pytest

from services.dataset.turns import TenantTurns


async def _run(turns: TenantTurns, tenant: str, name: str, order: list[str], release: asyncio.Event) -> None:
    async with turns.held(tenant):
        order.append(name)
        await release.wait()


async def _drain(tasks: list[asyncio.Task], releases: dict[str, asyncio.Event], order: list[str]) -> None:
    while not all(task.done() for task in tasks):  # let the holder finish, then the next, one by one
        await asyncio.sleep(0)
        if order:
            releases[order[-1]].set()


async def test_one_tenants_ten_queued_builds_do_not_starve_anothers_single_one():
    turns, order = TenantTurns(1), []
    releases = {name: asyncio.Event() for name in [*(f"a{index}" for index in range(10)), "b0"]}
    tasks = [asyncio.create_task(_run(turns, "acme", f"a{index}", order, releases[f"a{index}"])) for index in range(10)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(_run(turns, "globex", "b0", order, releases["b0"])))
    await asyncio.sleep(0)
    assert order == ["a0"] and turns.waiting("acme") == 9 and turns.waiting("globex") == 1
    await _drain(tasks, releases, order)
    # A plain FIFO (asyncio.Semaphore) would run b0 eleventh.
    assert order == ["a0", "b0", *(f"a{index}" for index in range(1, 10))]
    assert turns.busy == 0


async def test_tenants_alternate_and_a_cancelled_waiter_gives_up_its_turn():
    turns, order = TenantTurns(1), []
    names = ["a0", "a1", "a2", "b0", "b1", "c0"]
    releases = {name: asyncio.Event() for name in names}
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(_run(turns, name[0], name, order, releases[name])))
        await asyncio.sleep(0)
    tasks[4].cancel()  # b1 goes away while waiting
    await _drain(tasks, releases, order)
    assert order == ["a0", "b0", "c0", "a1", "a2"]
    assert turns.busy == 0 and turns.waiting("b") == 0


async def test_a_second_slot_goes_to_another_tenant_while_one_tenants_builds_wait_at_their_bound():
    turns, order = TenantTurns(2, per_tenant=1), []
    names = ["a0", "a1", "a2", "b0"]
    releases = {name: asyncio.Event() for name in names}
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(_run(turns, name[0], name, order, releases[name])))
        await asyncio.sleep(0)
    # a1 does not take the free slot (a holds its one); b0 starts at once, beside a0, not after it
    assert order == ["a0", "b0"] and turns.busy == 2 and turns.waiting("a") == 2
    releases["b0"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a0", "b0"] and turns.busy == 1, "a second build of a started past its bound"
    releases["a0"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a0", "b0", "a1"] and turns.holding("a") == 1
    releases["a1"].set()
    releases["a2"].set()
    await asyncio.gather(*tasks)
    assert order == ["a0", "b0", "a1", "a2"] and turns.busy == 0 and turns.holding("a") == 0


async def test_a_lone_tenant_uses_its_bound_and_no_more():
    turns, order = TenantTurns(3, per_tenant=2), []
    releases = {f"a{index}": asyncio.Event() for index in range(3)}
    tasks = [asyncio.create_task(_run(turns, "a", name, order, release)) for name, release in releases.items()]
    await asyncio.sleep(0)
    assert order == ["a0", "a1"] and turns.busy == 2 and turns.waiting("a") == 1
    releases["a1"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a0", "a1", "a2"] and turns.holding("a") == 2
    releases["a0"].set()
    releases["a2"].set()
    await asyncio.gather(*tasks)
    assert turns.busy == 0


def test_a_bound_above_the_slots_is_the_slots_and_no_slot_is_refused():
    assert TenantTurns(2, per_tenant=5).per_tenant == 2
    assert TenantTurns(3).per_tenant == 3
    with pytest.raises(ValueError):
        TenantTurns(0)
    with pytest.raises(ValueError):
        TenantTurns(2, per_tenant=0)
