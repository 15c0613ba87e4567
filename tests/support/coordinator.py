"""An in-process coordinator on a real SQLite file and real loopback gRPC, for tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import yaml
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from coordinator.config import ParticipantEndpoint, Settings
from coordinator.serve import Coordinator, start_coordinator
from tests.support.participants import ScriptedParticipant

SETTLED = (
    saga_pb2.SAGA_STATE_SUCCEEDED,
    saga_pb2.SAGA_STATE_COMPENSATED,
    saga_pb2.SAGA_STATE_NEEDS_ATTENTION,
)
NAMES = ("identity", "accounts", "cards", "billing")
"""The participants that ``four_step_definition`` names, in step order."""
FAST_RETRY = {"max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "50ms"}


def four_step_definition(name: str = "onboard", **step_overrides: Any) -> dict[str, Any]:
    """Identity, Accounts, Cards, Billing: the user's onboarding saga, with fast retries."""
    steps = [
        {
            "name": "create-user",
            "participant": "identity",
            "action": "CreateUser",
            "compensation": "DeactivateUser",
        },
        {
            "name": "open-account",
            "participant": "accounts",
            "action": "OpenAccount",
            "compensation": "CloseAccount",
        },
        {
            "name": "issue-card",
            "participant": "cards",
            "action": "IssueCard",
            "compensation": "CancelCard",
        },
        {
            "name": "subscribe",
            "participant": "billing",
            "action": "CreateSubscription",
            "compensation": "CancelSubscription",
        },
    ]
    for step in steps:
        step.update(step_overrides.get(str(step["name"]), {}))
    return {
        "name": name,
        "version": 1,
        "retry": FAST_RETRY,
        "compensation_retry": FAST_RETRY,
        "steps": steps,
    }


def write_definitions(directory: Path, definitions: Sequence[Mapping[str, Any]]) -> Path:
    """Write each definition as a YAML file; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for definition in definitions:
        path = directory / f"{definition['name']}-v{definition.get('version', 1)}.yaml"
        path.write_text(yaml.safe_dump(dict(definition), sort_keys=False))
    return directory


@dataclass
class Harness:
    """A running coordinator and a client stub to it."""

    coordinator: Coordinator
    stub: cpb_grpc.CoordinatorServiceAsyncStub
    channel: grpc.aio.Channel

    async def create(
        self, definition: str, payload: bytes = b"{}", saga_id: str = ""
    ) -> saga_pb2.Saga:
        """CreateSaga, returning the saga."""
        response = await self.stub.CreateSaga(
            cpb.CreateSagaRequest(saga_id=saga_id, definition=definition, input=payload)
        )
        return response.saga

    async def wait(self, saga_id: str, timeout: float = 20.0) -> saga_pb2.Saga:
        """Watch the saga until it settles; return its last state."""

        async def watch() -> saga_pb2.Saga:
            last = None
            async for change in self.stub.WatchSaga(cpb.WatchSagaRequest(name=f"sagas/{saga_id}")):
                last = change.saga
            assert last is not None
            return last

        return await asyncio.wait_for(watch(), timeout)


async def start_participants(*names: str) -> dict[str, ScriptedParticipant]:
    """Scripted participants, started on free loopback ports."""
    journal: list[tuple[str, str, str, str]] = []
    participants = {name: ScriptedParticipant(name, journal=journal) for name in names}
    for participant in participants.values():
        await participant.start()
    return participants


@asynccontextmanager
async def running_coordinator(
    tmp_path: Path,
    participants: Mapping[str, ScriptedParticipant | str],
    definitions: Sequence[Mapping[str, Any]],
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A coordinator on ``tmp_path/saga.db`` serving on a free loopback port.

    ``participants`` maps names to scripted participants or to addresses.
    """
    base = Settings(
        database=f"sqlite:///{tmp_path / 'saga.db'}",
        listen="127.0.0.1:0",
        definitions=write_definitions(tmp_path / "definitions", definitions),
        participants={
            name: ParticipantEndpoint(p if isinstance(p, str) else p.address)
            for name, p in participants.items()
        },
        shutdown_grace=1.0,
    )
    coordinator = await start_coordinator(replace(base, **settings))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}")
    try:
        yield Harness(coordinator, cpb_grpc.CoordinatorServiceStub(channel), channel)
    finally:
        await channel.close()
        await coordinator.stop()
