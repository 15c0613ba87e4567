"""Several engines on one store: one holds each saga at a time, the others take over when it
dies, its lease runs out or an operator's action reaches them; a stale holder writes nothing.

The store's clock is a test clock here: leases run out when the test says so.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from coordinator.clock import SystemClock
from coordinator.core.calls import ParticipantCall
from coordinator.core.events import Outcome, Succeeded
from coordinator.core.model import SagaState, StepState
from coordinator.engine import Engine, EngineSettings
from coordinator.ports import ChangeFilter
from coordinator.store.memory import MemoryStore

from .test_engine import CATALOG, FakeGateway, settle


class StoreClock:
    """The store's clock, moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hold:
    """A participant that keeps its answers until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reached = asyncio.Event()

    async def __call__(self, call: ParticipantCall) -> Outcome:
        self.reached.set()
        await self.release.wait()
        return Succeeded(b'"late"')


def replica(store: MemoryStore, name: str, gateway: FakeGateway, lease: float = 60) -> Engine:
    settings = EngineSettings(lease=timedelta(seconds=lease), claim_every=0.02)
    return Engine(store, gateway, SystemClock(), CATALOG, settings, replica=name)


async def test_a_replica_that_stops_renewing_loses_its_sagas_to_another_which_finishes_them() -> (
    None
):
    clock = StoreClock()
    store = MemoryStore(clock)
    hold = Hold()
    first = replica(store, "a", FakeGateway(hold), lease=10)
    second_gateway = FakeGateway()
    second = replica(store, "b", second_gateway)
    await first.start()
    await second.start()
    await first.create_saga("s", "two", 0, b"{}")
    await hold.reached.wait()
    await asyncio.sleep(0.1)
    assert second_gateway.calls == []  # held by a live replica: nobody else touches it

    clock.now += 11  # a's lease runs out before its next renewal; b's runs on
    assert await settle(second, "s") is SagaState.SUCCEEDED

    assert second_gateway.of("s") == [("execute", "a", 1), ("execute", "b", 1)]
    hold.release.set()  # a's late answer: its write is refused, nothing changes
    await asyncio.sleep(0.05)
    assert first.stale_writes == 1
    assert first.active_count == 0
    assert [e.sequence for e in await store.events("s")] == [1, 2, 3]
    await first.stop(1)
    await second.stop(1)


async def test_a_cancel_reaching_another_replica_takes_the_saga_over() -> None:
    store = MemoryStore()
    hold = Hold()
    first = replica(store, "a", FakeGateway(hold))
    second_gateway = FakeGateway()
    second = replica(store, "b", second_gateway)
    await first.start()
    await second.start()
    await first.create_saga("s", "two", 0, b"{}")
    await hold.reached.wait()

    cancelled = await second.cancel_saga("s", "changed my mind", "ana")

    assert cancelled.state is SagaState.COMPENSATING
    assert await settle(second, "s") is SagaState.COMPENSATED
    # a's Execute may have taken effect: b compensates it (the barrier absorbs a late one).
    assert second_gateway.of("s") == [("compensate", "a", 1)]
    hold.release.set()
    await asyncio.sleep(0.05)
    assert first.stale_writes == 1
    saga = await store.get("s")
    assert saga is not None
    assert saga.steps[0].state is StepState.COMPENSATED
    await first.stop(1)
    await second.stop(1)


async def test_a_replica_whose_lease_lapsed_joins_again_and_claims_what_is_still_free() -> None:
    clock = StoreClock()
    store = MemoryStore(clock)
    first_calls = Hold()  # the calls made before the lapse never come back

    async def answer(call: ParticipantCall) -> Outcome:
        if call.attempt == 1 and call.step == "a" and not first_calls.release.is_set():
            return await first_calls(call)
        return Succeeded(b'"ok"')

    settings = EngineSettings(lease=timedelta(seconds=0.9), claim_every=0.02)
    engine = Engine(store, FakeGateway(answer), SystemClock(), CATALOG, settings, replica="a")
    await engine.start()
    for index in range(3):
        await engine.create_saga(f"s{index}", "two", 0, b"{}")
    await first_calls.reached.wait()

    clock.now += 5  # the lease runs out; "a" finds out at its next renewal (0.3 s)
    await asyncio.sleep(0.5)
    first_calls.release.set()
    states = await asyncio.gather(*(settle(engine, f"s{index}") for index in range(3)))

    assert set(states) == {SagaState.SUCCEEDED}
    assert engine.lease_lapses == 1
    for index in range(3):  # taken up again at a new epoch: each step once in the log
        assert [e.sequence for e in await store.events(f"s{index}")] == [1, 2, 3]
    await engine.stop(1)


async def test_stopping_lets_go_so_the_next_replica_claims_at_once() -> None:
    store = MemoryStore()
    hold = Hold()
    first = replica(store, "a", FakeGateway(hold))
    await first.start()
    await first.create_saga("s", "two", 0, b"{}")
    await hold.reached.wait()
    await first.stop(0.01)

    second = replica(store, "b", FakeGateway())
    assert await second.start() == 1
    assert await settle(second, "s") is SagaState.SUCCEEDED
    await second.stop(1)


async def test_a_watch_and_the_feed_on_one_replica_see_every_change_another_makes() -> None:
    store = MemoryStore()
    owner_gateway = FakeGateway()
    owner = replica(store, "a", owner_gateway)
    other = replica(store, "b", FakeGateway())
    await owner.start()
    await other.start()
    release = asyncio.Event()

    async def slow(call: ParticipantCall) -> Outcome:
        await release.wait()
        return Succeeded(f'"{call.step}"'.encode())

    owner_gateway._answer = slow
    await owner.create_saga("s", "two", 0, b"{}")
    watched = other.watch("s")
    first = await anext(watched)
    feed = other.changes(0, ChangeFilter())
    release.set()

    changes = [first, *[change async for change in watched]]
    assert [c.saga.version for c in changes] == [1, 2, 3]
    assert [c.saga.state for c in changes][-1] is SagaState.SUCCEEDED
    assert changes[-1].saga == await store.get("s")
    assert [c.event.sequence for c in changes[1:] if c.event is not None] == [2, 3]
    page = await anext(feed)
    assert [(c.saga_id, c.record.sequence) for c in page.changes] == [("s", 1), ("s", 2), ("s", 3)]
    await feed.aclose()  # type: ignore[attr-defined]
    await owner.stop(1)
    await other.stop(1)
