"""A real coordinator reading the SDK's errors that steer retries: RetryLater, PermanentFailure."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from saga_sdk import AsyncSagaClient, SagaEvent, SagaEventType, SagaState
from saga_sdk.errors import PermanentFailure, RetryLater
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.support.coordinator import running_coordinator

RETRY_AFTER = timedelta(seconds=1)
# Without the RetryInfo, the step's own backoff would retry within 50 ms.
FAST_RETRY = {"max_attempts": 5, "initial_backoff": "10ms", "max_backoff": "50ms"}
DEFINITION = {
    "name": "order",
    "version": 1,
    "retry": FAST_RETRY,
    "compensation_retry": FAST_RETRY,
    "steps": [
        {"name": "reserve", "participant": "stock", "action": "Reserve", "compensation": "Release"},
        {"name": "charge", "participant": "payments", "action": "Charge", "compensation": "Refund"},
    ],
}


def ledger_participant(name: str, database: Path, calls: list[tuple[str, int]]) -> Participant:
    """Writes one ledger row per applied effect; `calls` records every handler call."""
    barrier = SqliteBarrier(database)
    with barrier.connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (saga TEXT, what TEXT)")
    participant = Participant(name, barrier=barrier)
    action, compensation = ("Reserve", "Release") if name == "stock" else ("Charge", "Refund")

    @participant.action(action)
    def execute(ctx: ExecuteContext) -> dict[str, Any]:
        calls.append((action, ctx.attempt))
        if name == "payments" and ctx.input["mode"] == "later" and ctx.attempt == 1:
            raise RetryLater("the card network is catching up", retry_after=RETRY_AFTER,
                             reason="NETWORK_CATCHING_UP")  # fmt: skip
        if name == "payments" and ctx.input["mode"] == "never":
            raise PermanentFailure(
                "this shop does not take dogecoin", reason="CURRENCY_UNSUPPORTED"
            )
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, action))
        return {"by": name}

    @participant.compensation(compensation)
    def compensate(ctx: CompensateContext) -> None:
        calls.append((compensation, ctx.attempt))
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, compensation))

    return participant


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[tuple[AsyncSagaClient, dict[str, Any]]]:
    calls: dict[str, list[tuple[str, int]]] = {"stock": [], "payments": []}
    started = {}
    for name in calls:
        participant = ledger_participant(name, tmp_path / f"{name}.db", calls[name])
        started[name] = (participant, await participant.start("127.0.0.1:0"))
    addresses = {name: f"127.0.0.1:{port}" for name, (_, port) in started.items()}
    try:
        async with (
            running_coordinator(tmp_path, addresses, [DEFINITION]) as running,
            AsyncSagaClient(f"127.0.0.1:{running.coordinator.port}") as client,
        ):
            yield client, {"calls": calls, "tmp_path": tmp_path}
    finally:
        for participant, _ in started.values():
            await participant.stop(0)


def ledger(tmp_path: Path, name: str) -> list[str]:
    with sqlite3.connect(tmp_path / f"{name}.db") as db:
        return [r[0] for r in db.execute("SELECT what FROM ledger ORDER BY rowid")]


async def events_of(client: AsyncSagaClient, saga_id: str, step: str) -> list[SagaEvent]:
    return [event async for event in client.events(saga_id) if event.step == step]


async def test_retry_later_is_retried_no_sooner_than_its_retry_after(
    harness: tuple[AsyncSagaClient, dict[str, Any]],
) -> None:
    client, seen = harness
    await client.create("order", {"mode": "later"}, saga_id="later")
    saga = await client.wait("later", timeout=30)
    charge = await events_of(client, "later", "charge")

    assert saga.state is SagaState.SUCCEEDED
    assert [e.type for e in charge] == [
        SagaEventType.STEP_ATTEMPT_FAILED,
        SagaEventType.STEP_SUCCEEDED,
    ]
    failed, succeeded = charge
    assert failed.failure is not None
    assert (failed.failure.code, failed.failure.reason) == ("UNAVAILABLE", "NETWORK_CATCHING_UP")
    assert failed.time is not None
    assert succeeded.time is not None
    # The log's own clock: the second attempt's answer came at least retry_after after the
    # first attempt's answer was recorded (the step's backoff alone is at most 50 ms).
    assert succeeded.time - failed.time >= RETRY_AFTER
    assert seen["calls"]["payments"] == [("Charge", 1), ("Charge", 2)]
    assert ledger(seen["tmp_path"], "payments") == ["Charge"]


async def test_a_permanent_failure_is_not_retried_and_the_saga_compensates(
    harness: tuple[AsyncSagaClient, dict[str, Any]],
) -> None:
    client, seen = harness
    await client.create("order", {"mode": "never"}, saga_id="never")
    saga = await client.wait("never", timeout=30)
    charge = await events_of(client, "never", "charge")
    executes = [e for e in charge if e.operation == "execute"]

    assert saga.state is SagaState.COMPENSATED
    assert [e.type for e in executes] == [SagaEventType.STEP_FAILED]
    assert executes[0].attempt == 1
    assert executes[0].failure is not None
    assert (executes[0].failure.code, executes[0].failure.reason) == (
        "INVALID_ARGUMENT",
        "CURRENCY_UNSUPPORTED",
    )
    assert saga.step("charge").execute_attempts == 1
    # Exactly one Execute reached the handler; its Compensate found the stored failure in the
    # barrier and was a null compensation (the handler was not called).
    assert seen["calls"]["payments"] == [("Charge", 1)]
    assert seen["calls"]["stock"] == [("Reserve", 1), ("Release", 1)]
    assert ledger(seen["tmp_path"], "stock") == ["Reserve", "Release"]
    assert ledger(seen["tmp_path"], "payments") == []
