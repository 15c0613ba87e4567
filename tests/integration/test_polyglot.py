"""Sagas across languages: Python participants and a Node.js one, and a Node.js client."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saga_sdk import AsyncSagaClient, SagaState
from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.support.coordinator import four_step_definition, running_coordinator
from tests.support.otlp import OtlpReceiver
from tests.support.processes import free_port

NODE = Path(__file__).resolve().parents[2] / "clients" / "node"
PYTHON_SERVICES = {
    "identity": ("CreateUser", "DeactivateUser"),
    "accounts": ("OpenAccount", "CloseAccount"),
    "billing": ("CreateSubscription", "CancelSubscription"),
}


def python_participant(name: str, database: Path) -> Participant:
    barrier = SqliteBarrier(database)
    with barrier.connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (saga TEXT, what TEXT)")
    participant = Participant(name, barrier=barrier)
    action, compensation = PYTHON_SERVICES[name]

    @participant.action(action)
    def execute(ctx: ExecuteContext) -> dict[str, Any]:
        time.sleep(ctx.input.get("slow", 0))  # a worker thread: the event loop goes on
        if name == "billing" and ctx.input.get("no_billing"):
            raise Rejected("BILLING_REFUSED", "no subscription for this client")
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, action))
        return {"by": name, "card": ctx.previous_outputs.get("issue-card")}

    @participant.compensation(compensation)
    def compensate(ctx: CompensateContext) -> None:
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, compensation))

    return participant


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver()
    started.start()
    yield started
    started.stop()


@pytest.fixture
async def node_cards(tmp_path: Path, receiver: OtlpReceiver) -> AsyncIterator[str]:
    port = free_port()
    log = (tmp_path / "cards.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE / "examples" / "cards.js"),
        "--port",
        str(port),
        "--database",
        str(tmp_path / "cards.db"),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        },
    )
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        async with asyncio.timeout(30):
            while True:
                assert process.returncode is None, (tmp_path / "cards.log").read_text()
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=0.5
                    )
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
    yield address
    process.send_signal(signal.SIGTERM)  # flushes its spans on the way out
    assert await asyncio.wait_for(process.wait(), 30) == 0
    log.close()


async def run_node_client(
    target: str, saga_id: str, payload: dict[str, Any]
) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE / "examples" / "onboard.js"),
        "--target",
        target,
        "--definition",
        "onboard",
        "--id",
        saga_id,
        "--input",
        json.dumps(payload),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_a_saga_runs_across_python_and_node_participants_and_a_node_client(
    tmp_path: Path, receiver: OtlpReceiver, node_cards: str
) -> None:
    participants = {n: python_participant(n, tmp_path / f"{n}.db") for n in PYTHON_SERVICES}
    addresses = {n: f"127.0.0.1:{await p.start('127.0.0.1:0')}" for n, p in participants.items()}
    addresses["cards"] = node_cards
    try:
        async with (
            running_coordinator(
                tmp_path,
                addresses,
                [four_step_definition("onboard")],
                otlp_endpoint=receiver.endpoint,
            ) as harness,
            AsyncSagaClient(f"127.0.0.1:{harness.coordinator.port}") as client,
        ):
            target = f"127.0.0.1:{harness.coordinator.port}"
            await client.create("onboard", {"company": "Acme"}, saga_id="poly-ok")
            await client.create(
                "onboard", {"company": "Globex", "no_billing": True}, saga_id="poly-undo"
            )
            ok = await client.wait("poly-ok", timeout=30)
            undone = await client.wait("poly-undo", timeout=30)
            watched = await run_node_client(
                target, "from-node", {"company": "Initech", "slow": 0.3}
            )
            from_node = await client.get("from-node")
    finally:
        for participant in participants.values():
            await participant.stop(0)

    assert ok.state is SagaState.SUCCEEDED
    card = ok.step("issue-card").output_json()
    assert card["card_id"].startswith("card-")
    assert ok.step("subscribe").output_json()["card"] == card  # Node output, read by Python
    # Compensated through the Node.js service: its card for poly-undo is cancelled.
    assert undone.state is SagaState.COMPENSATED
    assert [s.state.value for s in undone.steps] == ["COMPENSATED"] * 4  # k included
    with sqlite3.connect(tmp_path / "cards.db") as db:
        cards = dict(db.execute("SELECT saga_id, state FROM cards").fetchall())
    assert cards == {"poly-ok": "active", "poly-undo": "cancelled", "from-node": "active"}
    # The Node.js client saw the saga from its state when the watch began to its ending, in
    # order, missing no change in between.
    assert watched[0]["event"] is None
    steps = [line["step"] for line in watched[1:]]
    assert steps
    assert steps == ["create-user", "open-account", "issue-card", "subscribe"][-len(steps) :]
    assert all(line["event"] == "STEP_SUCCEEDED" for line in watched[1:])
    assert watched[-1]["state"] == "SUCCEEDED"
    assert from_node.state is SagaState.SUCCEEDED

    # The Node.js participant's spans are inside each saga's trace, under the attempt spans.
    await receiver.wait_for(lambda r: any(s.service == "cards" for s in r.spans))
    roots = {
        s.attributes["saga.id"]: s
        for s in receiver.spans
        if s.is_root and s.service == "saga-coordinator"
    }
    for saga_id in ("poly-ok", "poly-undo"):
        trace = receiver.of_trace(roots[saga_id].trace_id)
        attempts = {s.span_id for s in trace if s.service == "saga-coordinator"}
        node_spans = [s for s in trace if s.service == "cards"]
        assert node_spans, saga_id
        assert all(s.parent_span_id in attempts for s in node_spans)
    undo_names = sorted(
        s.name for s in receiver.of_trace(roots["poly-undo"].trace_id) if s.service == "cards"
    )
    assert undo_names == ["Compensate CancelCard", "Execute IssueCard"]
