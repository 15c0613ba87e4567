"""The coordinator as a real process, killed with SIGKILL mid-step and restarted on its file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import saga_pb2

from tests.support.coordinator import NAMES, four_step_definition, write_definitions
from tests.support.participants import Answer, ScriptedParticipant, ok, reject
from tests.support.processes import CoordinatorProcess

SAGAS = 24


def _refuses(request: pb.ExecuteRequest | pb.CompensateRequest) -> bool:
    return bool(json.loads(request.input).get("refuse"))


@pytest.fixture
def participants(
    participants: dict[str, ScriptedParticipant],
) -> dict[str, ScriptedParticipant]:
    """Slow participants; Cards refuses sagas whose input asks for it."""
    started = participants
    for participant in started.values():
        # Slow enough that a kill lands while calls are in flight.
        participant.rule = lambda request: ok(delay=0.15)
    started["cards"].rule = lambda request: (
        reject("CARD_REFUSED")
        if isinstance(request, pb.ExecuteRequest) and _refuses(request)
        else Answer(delay=0.15)
    )
    return started


def _request(index: int) -> cpb.CreateSagaRequest:
    return cpb.CreateSagaRequest(
        saga_id=f"crash-{index:02d}",
        definition="onboard",
        input=json.dumps({"customer": index, "refuse": index % 3 == 0}).encode(),
    )


async def _wait_until_in_flight(participants: dict[str, ScriptedParticipant]) -> None:
    async with asyncio.timeout(10):
        while not any(p.in_flight for p in participants.values()):
            await asyncio.sleep(0.01)


async def test_sigkill_mid_step_then_restart_every_saga_ends_and_each_effect_applies_once(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> None:
    config = tmp_path / "saga.yaml"
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(config, tmp_path / "saga.db", participants)

    acknowledged: dict[str, saga_pb2.Saga] = {}
    await process.start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for index in range(SAGAS):
            response = await stub.CreateSaga(_request(index))
            acknowledged[response.saga.saga_id] = response.saga
    for _ in range(3):  # kill mid-step, restart, repeat
        await _wait_until_in_flight(participants)
        process.kill()
        await process.start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        # A client retrying CreateSaga after the crash gets the same saga back.
        for index in range(SAGAS):
            again = await stub.CreateSaga(_request(index))
            assert not again.created
            assert again.saga.create_time == acknowledged[again.saga.saga_id].create_time
        finals = {}
        async with asyncio.timeout(60):
            for saga_id in acknowledged:
                async for change in stub.WatchSaga(cpb.WatchSagaRequest(name=f"sagas/{saga_id}")):
                    finals[saga_id] = change.saga
    await process.stop()

    for index in range(SAGAS):
        saga = finals[f"crash-{index:02d}"]
        expected = (
            saga_pb2.SAGA_STATE_COMPENSATED if index % 3 == 0 else saga_pb2.SAGA_STATE_SUCCEEDED
        )
        assert saga.state == expected, saga
    for participant in participants.values():
        assert len(participant.applied) == len(set(participant.applied)), participant.name
    for saga_id, saga in finals.items():
        for step, name in zip(saga.steps, NAMES, strict=True):
            applied = [r for r in participants[name].applied if r.startswith(f"sagas/{saga_id}/")]
            if saga.state == saga_pb2.SAGA_STATE_SUCCEEDED:
                assert applied == [f"sagas/{saga_id}/steps/{step.name}:execute"]
            elif step.state == saga_pb2.STEP_STATE_COMPENSATED and name != "cards":
                assert applied == [
                    f"sagas/{saga_id}/steps/{step.name}:execute",
                    f"sagas/{saga_id}/steps/{step.name}:compensate",
                ]
    redelivered = sum(
        len(p.received) - len({(r.operation, r.request.request_id) for r in p.received})
        for p in participants.values()
    )
    assert redelivered > 0, "no call was in flight at any kill: the test proved nothing"
