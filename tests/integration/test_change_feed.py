"""The change feed over gRPC: every change of every saga, in commit order, resumable by position,
filtered, across a restart, bounded by retention, and cutting off a consumer that stops reading.
Real gRPC on loopback, a real SQLite file."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from tests.integration.test_operate import reason_of
from tests.support.coordinator import Harness, four_step_definition, running_coordinator
from tests.support.participants import ScriptedParticipant, reject

NEEDS_ATTENTION = saga_pb2.SAGA_STATE_NEEDS_ATTENTION


async def read_feed(harness: Harness, after_position: int = 0) -> list[cpb.SagaChange]:
    """Every change the feed holds after the position (the stream ends, caught up)."""
    changes: list[cpb.SagaChange] = []
    stream = harness.stub.WatchChanges(
        cpb.WatchChangesRequest(no_follow=True, after_position=after_position)
    )
    async for response in stream:
        changes.extend(response.changes)
        if response.changes:
            assert response.position == response.changes[-1].position
    return changes


def events_of(changes: list[cpb.SagaChange]) -> list[tuple[str, int]]:
    return [(change.saga_id, change.event.sequence) for change in changes]


async def test_the_feed_delivers_every_change_in_order_and_resumes_after_a_position(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["cards"].rule = lambda r: (
        reject("CARD_REFUSED", "no") if r.action == "IssueCard" and b"refuse" in r.input else None
    )
    definitions = [four_step_definition("onboard"), four_step_definition("other")]
    async with running_coordinator(tmp_path, participants, definitions) as harness:
        for index in range(6):
            await harness.stub.CreateSaga(
                cpb.CreateSagaRequest(
                    saga_id=f"s-{index}",
                    definition="onboard" if index % 2 else "other",
                    input=b'{"refuse": 1}' if index == 3 else b"{}",
                    labels={"tenant": "acme" if index < 3 else "globex"},
                )
            )
        for index in range(6):
            await harness.wait(f"s-{index}")

        changes = await read_feed(harness)
        positions = [change.position for change in changes]
        assert positions == sorted(set(positions))
        # Per saga: every event of its log, once, in order.
        for index in range(6):
            log = await harness.stub.ListSagaEvents(
                cpb.ListSagaEventsRequest(name=f"sagas/s-{index}")
            )
            mine = [c.event for c in changes if c.saga_id == f"s-{index}"]
            assert [e.sequence for e in mine] == [e.sequence for e in log.events]
            assert [e.type for e in mine] == [e.type for e in log.events]
            assert [e.action for e in mine] == [e.action for e in log.events]
        refused = [c for c in changes if c.saga_id == "s-3"]
        assert [c.event.action for c in refused if c.event.operation == "compensate"] == [
            "CancelCard",
            "CloseAccount",
            "DeactivateUser",
        ]
        assert refused[-1].state == saga_pb2.SAGA_STATE_COMPENSATED
        assert refused[0].definition == "onboard"
        assert dict(refused[0].labels) == {"tenant": "globex"}

        # Resuming after any position gives exactly the rest.
        middle = positions[len(positions) // 2]
        rest = await read_feed(harness, after_position=middle)
        assert [c.position for c in rest] == [p for p in positions if p > middle]

        # Filters: the position still advances past what did not match.
        stream = harness.stub.WatchChanges(
            cpb.WatchChangesRequest(
                no_follow=True,
                definition="onboard",
                states=[saga_pb2.SAGA_STATE_COMPENSATED],
                labels={"tenant": "globex"},
            )
        )
        matched: list[cpb.SagaChange] = []
        last = 0
        async for response in stream:
            matched.extend(response.changes)
            last = response.position
        assert [(c.saga_id, c.state) for c in matched] == [("s-3", saga_pb2.SAGA_STATE_COMPENSATED)]
        assert last == positions[-1]


async def test_a_follower_sees_new_changes_live_and_positions_survive_a_restart(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    definitions = [four_step_definition("onboard")]
    async with running_coordinator(tmp_path, participants, definitions) as harness:
        await harness.wait((await harness.create("onboard", saga_id="before")).saga_id)
        seen: list[cpb.SagaChange] = []
        follower = harness.stub.WatchChanges(cpb.WatchChangesRequest(from_now=True))

        async def follow() -> None:
            async for response in follower:
                seen.extend(response.changes)
                if any(
                    c.saga_id == "live" and c.state == saga_pb2.SAGA_STATE_SUCCEEDED for c in seen
                ):
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        await harness.create("onboard", saga_id="live")
        await asyncio.wait_for(task, timeout=10)
        assert {c.saga_id for c in seen} == {"live"}
        assert [c.event.sequence for c in seen] == [1, 2, 3, 4, 5]
        newest = seen[-1].position
        follower.cancel()

    async with running_coordinator(tmp_path, participants, definitions) as harness:
        await harness.wait((await harness.create("onboard", saga_id="after")).saga_id)
        rest = await read_feed(harness, after_position=newest)
        assert events_of(rest) == [("after", n) for n in range(1, 6)]
        assert rest[0].position > newest
        everything = await read_feed(harness)
        assert [c.saga_id for c in everything].count("live") == 5


async def test_a_position_whose_history_was_pruned_is_refused(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")]
    ) as harness:
        await harness.wait((await harness.create("onboard", saga_id="old")).saga_id)
        await asyncio.sleep(1.1)
        _, pruned = await harness.coordinator.engine.prune(timedelta(seconds=1))
        assert pruned.sagas == 1

        stream = harness.stub.WatchChanges(cpb.WatchChangesRequest(after_position=1))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
        assert refused.value.code() is grpc.StatusCode.OUT_OF_RANGE
        assert reason_of(refused.value) == "FEED_POSITION_PRUNED"
        assert "resume after 5" in (refused.value.details() or "")
        assert await read_feed(harness, after_position=5) == []


async def test_a_consumer_that_stops_reading_is_cut_off_and_resumes(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")], feed_stall_timeout=0.5
    ) as harness:
        # A consumer that asks for the feed and never reads it; every change carries its
        # saga's labels, about 4 KB here, so the unread feed soon fills the consumer's
        # window (kept at its initial 64 KB: no bandwidth probing).
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{harness.coordinator.port}", options=[("grpc.http2.bdp_probe", 0)]
        )
        stalled = cpb_grpc.CoordinatorServiceStub(channel).WatchChanges(cpb.WatchChangesRequest())
        labels = {f"k{i}": "v" * 250 for i in range(16)}
        count = 200
        for index in range(count):
            await harness.stub.CreateSaga(
                cpb.CreateSagaRequest(
                    saga_id=f"s-{index}", definition="onboard", input=b"{}", labels=labels
                )
            )
        for index in range(count):
            await harness.wait(f"s-{index}")  # the sagas end: the stalled consumer holds none

        received: list[cpb.SagaChange] = []

        async def drain() -> None:
            async for response in stalled:
                received.extend(response.changes)

        with pytest.raises(grpc.aio.AioRpcError) as cut_off:
            await asyncio.wait_for(drain(), timeout=30)
        assert cut_off.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(cut_off.value) == "FEED_CONSUMER_TOO_SLOW"
        assert len(received) < count * 5

        after = received[-1].position if received else 0
        resumed = await read_feed(harness, after_position=after)
        assert len(received) + len(resumed) == count * 5
        assert received + resumed == await read_feed(harness)
        await channel.close()
