"""The Node.js SDK's errors steer a real coordinator (``saga serve``): ``RetryLater`` makes it
wait at least the asked delay before the next attempt, read from the saga's event log (by the
Node.js client, checked against the Python one), and ``PermanentFailure`` fails the step after
exactly one attempt, then the saga compensates."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saga_sdk import AsyncSagaClient, SagaEvent, SagaEventType, SagaState
from tests.support.coordinator import write_definitions
from tests.support.processes import CoordinatorProcess, free_port

NODE = shutil.which("node")
PARTICIPANT = (
    Path(__file__).resolve().parents[2]
    / "clients"
    / "node"
    / "fixtures"
    / "steering_participant.js"
)

# One coordinator and one participant serve both tests: starting them is most of the cost.
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20.6) is not on PATH"),
    pytest.mark.asyncio(loop_scope="module"),
]

# Fast retries of the step's own: without RetryInfo the next attempt would follow within 50 ms.
FAST_RETRY = {"max_attempts": 5, "initial_backoff": "10ms", "max_backoff": "50ms"}
PAYMENT = {
    "name": "payment",
    "version": 1,
    "retry": FAST_RETRY,
    "compensation_retry": FAST_RETRY,
    "steps": [
        {
            "name": "reserve",
            "participant": "payments",
            "action": "Reserve",
            "compensation": "Release",
        },
        {"name": "charge", "participant": "payments", "action": "Charge", "compensation": "Refund"},
    ],
}
RETRY_AFTER_MS = 1500


@dataclass
class NodeParticipant:
    """The steering participant, its standard output (one line per call received) in a file."""

    address: str
    output: Path

    def calls(self, saga_id: str) -> list[str]:
        """The calls received for one saga: "Execute Charge attempt=1", ..."""
        lines = self.output.read_text().splitlines()
        return [
            line.removeprefix("received ").replace(f" sagas/{saga_id}", "")
            for line in lines
            if line.startswith("received ") and f" sagas/{saga_id} " in line
        ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node-errors")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def payments(workdir: Path) -> AsyncIterator[NodeParticipant]:
    tmp_path = workdir
    port = free_port()
    output = tmp_path / "payments.out"
    assert NODE is not None
    with output.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(PARTICIPANT),
            str(port),
            str(tmp_path / "payments.db"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            async with asyncio.timeout(30):
                while True:
                    assert process.returncode is None, output.read_text()
                    try:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=0.5
                        )
                        break
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)
        yield NodeParticipant(address, output)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 15)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coordinator(workdir: Path, payments: NodeParticipant) -> AsyncIterator[str]:
    tmp_path = workdir
    write_definitions(tmp_path / "definitions", [PAYMENT])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", {"payments": payments.address}
    )
    await process.start()
    try:
        yield process.target
    finally:
        assert await process.stop() == 0


def of_step(events: list[SagaEvent], step: str) -> list[SagaEvent]:
    return [event for event in events if event.step == step]


READ_EVENTS = """
import { SagaClient } from './src/index.js';
const [target, sagaId, order] = process.argv.slice(1);
const client = new SagaClient(target);
const newestFirst = order === 'newest-first';
for await (const e of client.events(sagaId, { pageSize: 2, newestFirst })) {
  console.log(JSON.stringify({ type: e.type, step: e.step, attempt: e.attempt,
    operation: e.operation, time: e.time.getTime(), code: e.failure?.code ?? '' }));
}
client.close();
"""


async def node_events(
    target: str, saga_id: str, *, newest_first: bool = False
) -> list[dict[str, Any]]:
    """The saga's event log as the Node.js client reads it, two events a page."""
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        "--input-type=module",
        "-e",
        READ_EVENTS,
        target,
        saga_id,
        "newest-first" if newest_first else "oldest-first",
        cwd=PARTICIPANT.parents[1],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_retry_later_makes_the_coordinator_wait_the_asked_delay(
    coordinator: str, payments: NodeParticipant
) -> None:
    async with AsyncSagaClient(coordinator) as client:
        await client.create(
            "payment", {"mode": "later", "retry_after_ms": RETRY_AFTER_MS}, saga_id="later-1"
        )
        saga = await client.wait("later-1", timeout=30)
        events = [event async for event in client.events("later-1")]

    assert saga.state is SagaState.SUCCEEDED
    charge = of_step(events, "charge")
    assert [(e.type, e.attempt) for e in charge] == [
        (SagaEventType.STEP_ATTEMPT_FAILED, 1),
        (SagaEventType.STEP_SUCCEEDED, 2),
    ]
    failed, succeeded = charge
    from_node = await node_events(coordinator, "later-1")
    assert [(e["type"], e["step"], e["attempt"], e["operation"]) for e in from_node] == [
        (e.type.value, e.step, e.attempt, e.operation) for e in events
    ]
    assert await node_events(coordinator, "later-1", newest_first=True) == from_node[::-1]
    node_charge = [e for e in from_node if e["step"] == "charge"]
    assert node_charge[0]["code"] == "UNAVAILABLE"
    node_gap = (node_charge[1]["time"] - node_charge[0]["time"]) / 1000
    assert failed.failure is not None
    assert (failed.failure.code, failed.failure.reason) == ("UNAVAILABLE", "CARD_NETWORK_BUSY")
    assert failed.time is not None
    assert succeeded.time is not None
    gap = (succeeded.time - failed.time).total_seconds()
    assert abs(node_gap - gap) < 0.002, (node_gap, gap)  # the same log, at millisecond precision
    # The step's own backoff is at most 50 ms: only the RetryInfo explains a wait this long.
    assert gap >= RETRY_AFTER_MS / 1000, f"attempt 2 came {gap:.3f} s after attempt 1"
    print(f"\nRetryLater({RETRY_AFTER_MS} ms): attempt 2 recorded {gap:.3f} s after attempt 1")
    assert payments.calls("later-1") == [
        "Execute Reserve attempt=1",
        "Execute Charge attempt=1",
        "Execute Charge attempt=2",
    ]


async def test_permanent_failure_is_not_retried_and_the_saga_compensates(
    coordinator: str, payments: NodeParticipant
) -> None:
    async with AsyncSagaClient(coordinator) as client:
        await client.create("payment", {"mode": "never", "currency": "XTS"}, saga_id="never-1")
        saga = await client.wait("never-1", timeout=30)
        events = [event async for event in client.events("never-1")]

    assert saga.state is SagaState.COMPENSATED
    charge = of_step(events, "charge")
    assert [(e.type, e.attempt) for e in charge if e.operation == "execute"] == [
        (SagaEventType.STEP_FAILED, 1)
    ]
    failure = charge[0].failure
    assert failure is not None
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "UNSUPPORTED_CURRENCY")
    assert failure.message == "no XTS payments here"
    # Exactly one Execute of Charge reached the participant; then every step whose Execute was
    # sent is compensated, newest first.
    assert payments.calls("never-1") == [
        "Execute Reserve attempt=1",
        "Execute Charge attempt=1",
        "Compensate Refund attempt=1",
        "Compensate Release attempt=1",
    ]
    compensated = [e.step for e in events if e.type is SagaEventType.COMPENSATION_SUCCEEDED]
    assert compensated == ["charge", "reserve"]
