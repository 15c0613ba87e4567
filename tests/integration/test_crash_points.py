"""Each crash point kills a real coordinator process there; a restart finishes every saga."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from coordinator.crashpoints import CrashPoint, CrashPoints
from tests.support.coordinator import four_step_definition, write_definitions
from tests.support.participants import ScriptedParticipant, reject
from tests.support.processes import CoordinatorProcess


@pytest.fixture
def participants(
    participants: dict[str, ScriptedParticipant],
) -> dict[str, ScriptedParticipant]:
    """Cards refuses sagas whose input asks for it."""
    participants["cards"].rule = lambda r: (
        reject() if r.action == "IssueCard" and json.loads(r.input).get("refuse") else None
    )
    return participants


@pytest.mark.parametrize("point", list(CrashPoint), ids=[p.value for p in CrashPoint])
async def test_the_coordinator_dies_at_the_crash_point_and_recovers(
    tmp_path: Path, participants: dict[str, ScriptedParticipant], point: CrashPoint
) -> None:
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", participants
    )
    process.env = {"SAGA_CRASH_POINT": f"{point.value}:2"}
    await process.start()
    requests = [
        cpb.CreateSagaRequest(
            saga_id=f"s{i}", definition="onboard", input=json.dumps({"refuse": i == 1}).encode()
        )
        for i in range(2)
    ]
    refused = []
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for request in requests:
            try:
                await stub.CreateSaga(request)
            except grpc.aio.AioRpcError as error:  # died before answering: not acknowledged
                refused.append(error.code())
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}
    assert process.process is not None
    assert await asyncio.to_thread(process.process.wait, 20) == -signal.SIGKILL

    process.env = {}
    await process.start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        finals = []
        for request in requests:
            await stub.CreateSaga(request)  # the client's retry: created or found again
            async for change in stub.WatchSaga(
                cpb.WatchSagaRequest(name=f"sagas/{request.saga_id}")
            ):
                final = change.saga
            finals.append(final)
    assert await process.stop() == 0

    assert [f.state for f in finals] == [
        saga_pb2.SAGA_STATE_SUCCEEDED,
        saga_pb2.SAGA_STATE_COMPENSATED,
    ]
    for participant in participants.values():
        assert len(participant.applied) == len(set(participant.applied))


def test_an_unknown_crash_point_is_refused() -> None:
    with pytest.raises(ValueError, match="expected NAME or NAME:N"):
        CrashPoints("after-lunch")
    assert not CrashPoints(None).armed
