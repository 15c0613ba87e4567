"""The engine with a fake gateway and clock: ordering, recovery, and races at its edges."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coordinator.clock import SystemClock
from coordinator.core.calls import ParticipantCall
from coordinator.core.definitions import DefinitionCatalog
from coordinator.core.errors import ShuttingDown
from coordinator.core.events import CancelRequested, Outcome, Succeeded, Transient
from coordinator.core.model import (
    Operation,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    StepDefinition,
)
from coordinator.engine import Engine
from coordinator.store.memory import MemoryStore
from coordinator.store.sqlite import SqliteStore

SLOW_RETRY = RetryPolicy(
    max_attempts=5, initial_backoff=timedelta(seconds=1), max_backoff=timedelta(seconds=1), jitter=0
)
FAST_RETRY = RetryPolicy(
    max_attempts=5,
    initial_backoff=timedelta(milliseconds=20),
    max_backoff=timedelta(milliseconds=20),
    jitter=0,
)
TWO_STEPS = SagaDefinition(
    "two", 1, (StepDefinition("a", "p", "A", "UA"), StepDefinition("b", "p", "B", "UB"))
)
ONE_SLOW_RETRY = SagaDefinition("slow", 1, (StepDefinition("a", "p", "A", "UA", retry=SLOW_RETRY),))
ONE_FAST_RETRY = SagaDefinition("fast", 1, (StepDefinition("a", "p", "A", "UA", retry=FAST_RETRY),))
CATALOG = DefinitionCatalog.of([TWO_STEPS, ONE_SLOW_RETRY, ONE_FAST_RETRY])


class FakeGateway:
    """Answers with ``answer(call)``; records calls and how many were in flight at once."""

    def __init__(self, answer: Callable[[ParticipantCall], Awaitable[Outcome]] | None = None):
        self.calls: list[ParticipantCall] = []
        self.in_flight: dict[str, int] = {}
        self.overlaps = 0
        self._answer = answer

    async def send(self, call: ParticipantCall) -> Outcome:
        self.calls.append(call)
        now = self.in_flight.get(call.saga_id, 0) + 1
        self.in_flight[call.saga_id] = now
        self.overlaps += now > 1
        try:
            if self._answer is not None:
                return await self._answer(call)
            return Succeeded(f'"{call.step}"'.encode())
        finally:
            self.in_flight[call.saga_id] -= 1

    async def close(self) -> None:
        pass

    def of(self, saga_id: str) -> list[tuple[str, str, int]]:
        return [(c.operation.value, c.step, c.attempt) for c in self.calls if c.saga_id == saga_id]


class SteppableClock:
    """The system clock, shifted by ``offset`` (a wall clock that NTP can step back)."""

    offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def settle(engine: Engine, saga_id: str) -> SagaState:
    async for change in engine.watch(saga_id):
        state = change.saga.state
    return state


async def test_many_sagas_run_at_once_each_one_call_at_a_time() -> None:
    async def slow(call: ParticipantCall) -> Outcome:
        await asyncio.sleep(0.01)
        return Succeeded()

    gateway = FakeGateway(slow)
    engine = Engine(MemoryStore(), gateway, SystemClock(), CATALOG)
    await engine.start()
    for index in range(200):
        await engine.create_saga(f"s{index}", "two", 0, b"{}")

    states = await asyncio.gather(*(settle(engine, f"s{index}") for index in range(200)))

    assert set(states) == {SagaState.SUCCEEDED}
    assert gateway.overlaps == 0
    assert max(gateway.in_flight.values()) == 0
    assert len(gateway.calls) == 400
    await engine.stop(1)


async def test_a_restarted_engine_resends_the_pending_call_with_the_same_request_id() -> None:
    store = MemoryStore()
    release = asyncio.Event()

    async def hang(call: ParticipantCall) -> Outcome:
        await release.wait()
        return Succeeded()

    first = FakeGateway(hang)
    engine = Engine(store, first, SystemClock(), CATALOG)
    await engine.start()
    await engine.create_saga("s", "two", 0, b"{}")
    await asyncio.sleep(0.05)
    await engine.stop(0.05)  # the call is cut off: nothing was stored about its answer

    second = FakeGateway()
    restarted = Engine(store, second, SystemClock(), CATALOG)
    assert await restarted.start() == 1

    assert await settle(restarted, "s") is SagaState.SUCCEEDED
    assert first.calls[0].request_id == second.calls[0].request_id
    assert second.of("s") == [("execute", "a", 1), ("execute", "b", 1)]
    await restarted.stop(1)


async def test_a_create_cut_off_while_committing_still_starts_its_saga(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "s.db")
    gateway = FakeGateway()
    engine = Engine(store, gateway, SystemClock(), CATALOG)
    await engine.start()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the writer's batch waits for this lock
    create = asyncio.create_task(engine.create_saga("s", "two", 0, b"{}"))
    await asyncio.sleep(0.2)
    create.cancel()  # as gRPC does when the client's deadline expires
    other.execute("COMMIT")
    other.close()
    async with asyncio.timeout(10):  # the writer's batch goes on and commits
        while await store.get("s") is None:
            await asyncio.sleep(0.01)

    assert await settle(engine, "s") is SagaState.SUCCEEDED
    assert gateway.of("s") == [("execute", "a", 1), ("execute", "b", 1)]
    _, created = await engine.create_saga("s", "two", 0, b"{}")  # the client's retry
    assert not created
    await engine.stop(1)
    await store.close()


async def test_a_cancel_cut_off_while_committing_sends_no_further_execute(tmp_path: Path) -> None:
    async def busy_once(call: ParticipantCall) -> Outcome:
        if call.operation is Operation.EXECUTE and call.attempt == 1:
            return Transient("UNAVAILABLE", "busy")
        return Succeeded(b'"done"')

    store = await SqliteStore.open(tmp_path / "s.db")
    gateway = FakeGateway(busy_once)
    engine = Engine(store, gateway, SystemClock(), CATALOG)
    await engine.start()
    await engine.create_saga("s", "slow", 0, b"{}")
    await asyncio.sleep(0.2)  # attempt 1 failed; a 1 s backoff runs
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    cancel = asyncio.create_task(engine.cancel_saga("s", "withdrawn"))
    await asyncio.sleep(0.2)
    cancel.cancel()
    other.execute("COMMIT")
    other.close()

    assert await settle(engine, "s") is SagaState.COMPENSATED
    assert gateway.of("s") == [("execute", "a", 1), ("compensate", "a", 1)]
    events = [r.event for r in await store.events("s")]
    assert any(isinstance(e, CancelRequested) and not e.call_in_flight for e in events)
    await engine.stop(1)
    await store.close()


async def test_a_cancel_while_the_call_is_in_flight_waits_for_its_answer_and_output() -> None:
    release = asyncio.Event()

    async def held(call: ParticipantCall) -> Outcome:
        if call.operation is Operation.EXECUTE:
            await release.wait()
            return Succeeded(b'"card-7"')
        return Succeeded()

    clock = SteppableClock()
    gateway = FakeGateway(held)
    engine = Engine(MemoryStore(), gateway, clock, CATALOG)
    await engine.start()
    await engine.create_saga("s", "two", 0, b"{}")
    await asyncio.sleep(0.05)
    clock.offset = -timedelta(hours=1)  # the wall clock steps back: it must not matter

    cancelled = await engine.cancel_saga("s", "stop")
    assert cancelled.state is SagaState.COMPENSATING
    release.set()

    assert await settle(engine, "s") is SagaState.COMPENSATED
    assert gateway.of("s") == [("execute", "a", 1), ("compensate", "a", 1)]
    assert gateway.calls[-1].execute_output == b'"card-7"'
    assert gateway.overlaps == 0
    await engine.stop(1)


async def test_cancel_and_watch_are_refused_once_the_engine_stops() -> None:
    async def hang(call: ParticipantCall) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError

    store = MemoryStore()
    engine = Engine(store, FakeGateway(hang), SystemClock(), CATALOG)
    await engine.start()
    await engine.create_saga("s", "two", 0, b"{}")
    await asyncio.sleep(0.05)
    await engine.stop(0.05)

    with pytest.raises(ShuttingDown):
        await engine.cancel_saga("s", "too late")
    with pytest.raises(ShuttingDown):
        await anext(engine.watch("s"))
    with pytest.raises(ShuttingDown):
        await engine.create_saga("t", "two", 0, b"{}")
    assert not any(isinstance(r.event, CancelRequested) for r in await store.events("s"))


async def test_a_huge_retry_after_from_a_participant_is_capped_not_fatal() -> None:
    fatal: list[BaseException] = []

    async def back_off_for_ages(call: ParticipantCall) -> Outcome:
        if call.attempt == 1:
            return Transient("UNAVAILABLE", "busy", retry_after=timedelta(days=365 * 9000))
        return Succeeded()

    engine = Engine(
        MemoryStore(), FakeGateway(back_off_for_ages), SystemClock(), CATALOG, on_fatal=fatal.append
    )
    await engine.start()
    await engine.create_saga("s", "fast", 0, b"{}")
    await asyncio.sleep(0.1)

    saga = await engine.get_saga("s")
    due = saga.steps[0].next_attempt_at
    assert due is not None
    assert due - saga.updated_at <= timedelta(hours=1)
    assert fatal == []
    await engine.stop(0.1)
