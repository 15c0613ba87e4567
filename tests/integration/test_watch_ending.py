"""WatchSaga with and without ending_only, against a real coordinator on loopback gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import saga_pb2

from tests.support.coordinator import SETTLED, Harness, four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant, error, ok, reject

FIRST_STEP_DELAY = 0.5
"""How long the first step takes: the saga is surely running when the watches begin."""


@pytest.fixture
async def harness(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[Harness]:
    async with running_coordinator(tmp_path, participants, [four_step_definition()]) as running:
        yield running


def script_outcome(participants: dict[str, ScriptedParticipant], outcome: str) -> None:
    """Make the next saga end in ``outcome``, its first step taking FIRST_STEP_DELAY."""
    participants["identity"].script("CreateUser", ok(delay=FIRST_STEP_DELAY))
    if outcome in ("COMPENSATED", "NEEDS_ATTENTION"):
        participants["cards"].script("IssueCard", reject("CARD_LIMIT", "credit limit reached"))
    if outcome == "NEEDS_ATTENTION":
        participants["accounts"].script("CloseAccount", *[error(grpc.StatusCode.UNAVAILABLE)] * 3)


async def collect(
    harness: Harness, saga_id: str, *, ending_only: bool
) -> list[tuple[float, cpb.WatchSagaResponse]]:
    """Every message of one WatchSaga, with when it came, until the stream ends."""
    request = cpb.WatchSagaRequest(name=f"sagas/{saga_id}", ending_only=ending_only)
    messages = []
    async for response in harness.stub.WatchSaga(request, timeout=20):
        messages.append((time.monotonic(), response))
    return messages


async def get(harness: Harness, saga_id: str) -> saga_pb2.Saga:
    return (await harness.stub.GetSaga(cpb.GetSagaRequest(name=f"sagas/{saga_id}"))).saga


def state(saga: saga_pb2.Saga) -> str:
    return saga_pb2.SagaState.Name(saga.state).removeprefix("SAGA_STATE_")


@pytest.mark.parametrize("outcome", ["SUCCEEDED", "COMPENSATED", "NEEDS_ATTENTION"])
async def test_a_watch_of_the_ending_only_of_a_running_saga_yields_the_settled_saga_alone(
    harness: Harness, participants: dict[str, ScriptedParticipant], outcome: str
) -> None:
    script_outcome(participants, outcome)
    await harness.create("onboard", saga_id="s1")
    opened = time.monotonic()
    ending = asyncio.create_task(collect(harness, "s1", ending_only=True))
    every = asyncio.create_task(collect(harness, "s1", ending_only=False))
    running = await get(harness, "s1")
    ending_messages, every_messages = await asyncio.gather(ending, every)
    final = await get(harness, "s1")

    assert running.state not in SETTLED
    assert state(final) == outcome

    # With ending_only: one message, the settled saga, sent as the change that settled it.
    ((arrived, only),) = ending_messages
    assert only.saga == final
    assert only.HasField("event")
    assert only.event.sequence == final.version
    assert arrived - opened >= FIRST_STEP_DELAY * 0.8  # it waited for the ending

    # Without: the state when the watch began, then every change in order, up to the same end.
    first, *changes = [response for _, response in every_messages]
    assert first.saga.state not in SETTLED
    assert not first.HasField("event")
    assert [c.event.sequence for c in changes] == list(
        range(first.saga.version + 1, final.version + 1)
    )
    assert [c.saga.version for c in changes] == [c.event.sequence for c in changes]
    assert all(c.saga.state not in SETTLED for c in changes[:-1])
    assert changes[-1].saga == final
    assert changes[-1].event == only.event
    assert len(changes) >= 4  # at least create-user, open-account, issue-card and the ending


@pytest.mark.parametrize("outcome", ["SUCCEEDED", "COMPENSATED", "NEEDS_ATTENTION"])
async def test_a_watch_of_the_ending_only_of_a_settled_saga_yields_it_at_once_and_ends(
    harness: Harness, participants: dict[str, ScriptedParticipant], outcome: str
) -> None:
    script_outcome(participants, outcome)
    await harness.create("onboard", saga_id="s2")
    await collect(harness, "s2", ending_only=True)  # until it settles
    final = await get(harness, "s2")

    started = time.monotonic()
    ending_messages = await asyncio.wait_for(collect(harness, "s2", ending_only=True), 5)
    every_messages = await asyncio.wait_for(collect(harness, "s2", ending_only=False), 5)

    assert state(final) == outcome
    ((arrived, only),) = ending_messages
    assert arrived - started < 2
    assert only.saga == final
    assert not only.HasField("event")  # the saga as it was when the watch began
    # Without ending_only a settled saga is also one message: there is no change left to come.
    assert [response for _, response in every_messages] == [only]


async def test_many_watches_of_the_ending_only_all_get_the_one_ending(
    harness: Harness, participants: dict[str, ScriptedParticipant]
) -> None:
    script_outcome(participants, "COMPENSATED")
    await harness.create("onboard", saga_id="s3")
    watches = [collect(harness, "s3", ending_only=True) for _ in range(20)]
    results = await asyncio.gather(*watches)
    final = await get(harness, "s3")

    assert state(final) == "COMPENSATED"
    for messages in results:
        ((_, only),) = messages
        assert only.saga == final


async def test_a_watch_of_the_ending_only_of_an_unknown_saga_is_not_found(
    harness: Harness,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(harness, "ghost", ending_only=True)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
