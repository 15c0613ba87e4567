"""The coordinator driving SDK participants, and an SDK client waiting for the ending."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from saga_sdk import AsyncSagaClient, SagaState
from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.support.coordinator import four_step_definition, running_coordinator

ACTIONS = {
    "identity": ("CreateUser", "DeactivateUser"),
    "accounts": ("OpenAccount", "CloseAccount"),
    "cards": ("IssueCard", "CancelCard"),
    "billing": ("CreateSubscription", "CancelSubscription"),
}


def ledger_participant(name: str, database: Path) -> Participant:
    """Writes one row per applied effect, in the barrier's transaction."""
    barrier = SqliteBarrier(database)
    with barrier.connect() as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (saga TEXT, what TEXT)")
    participant = Participant(name, barrier=barrier)
    action, compensation = ACTIONS[name]

    @participant.action(action)
    def execute(ctx: ExecuteContext) -> dict[str, Any]:
        if name == "cards" and ctx.input.get("refuse"):
            raise Rejected("CARD_REFUSED", "no card for you")
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, action))
        return {"by": name, "saw": sorted(ctx.previous_outputs)}

    @participant.compensation(compensation)
    async def compensate(ctx: CompensateContext) -> None:
        assert ctx.execute_output is None or ctx.execute_output["by"] == name
        ctx.tx.execute("INSERT INTO ledger VALUES (?, ?)", (ctx.saga_id, compensation))

    return participant


@pytest.fixture
async def participants(tmp_path: Path) -> AsyncIterator[dict[str, tuple[Participant, int]]]:
    started = {}
    for name in ACTIONS:
        participant = ledger_participant(name, tmp_path / f"{name}.db")
        started[name] = (participant, await participant.start("127.0.0.1:0"))
    yield started
    for participant, _ in started.values():
        await participant.stop(0)


def ledger(tmp_path: Path, name: str) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / f"{name}.db") as db:
        return db.execute("SELECT saga, what FROM ledger ORDER BY rowid").fetchall()


async def test_sdk_participants_and_client_run_a_saga_to_each_ending(
    tmp_path: Path, participants: dict[str, tuple[Participant, int]]
) -> None:
    addresses = {name: f"127.0.0.1:{port}" for name, (_, port) in participants.items()}
    async with (
        running_coordinator(tmp_path, addresses, [four_step_definition("onboard")]) as harness,
        AsyncSagaClient(f"127.0.0.1:{harness.coordinator.port}") as client,
    ):
        ok = await client.create("onboard", {"company": "Acme"}, saga_id="acme")
        refused = await client.create("onboard", {"refuse": True}, saga_id="globex")
        done = await client.wait(ok.saga.saga_id, timeout=30)
        undone = await client.wait(refused.saga.saga_id, timeout=30)

    assert done.state is SagaState.SUCCEEDED
    assert done.step("subscribe").output_json() == {
        "by": "billing",
        "saw": ["create-user", "issue-card", "open-account"],
    }
    assert undone.state is SagaState.COMPENSATED
    identity = ledger(tmp_path, "identity")  # the two sagas ran side by side
    assert [what for saga, what in identity if saga == "acme"] == ["CreateUser"]
    assert [what for saga, what in identity if saga == "globex"] == ["CreateUser", "DeactivateUser"]
    assert ledger(tmp_path, "cards") == [("acme", "IssueCard")]  # the refusal applied nothing
    assert ledger(tmp_path, "billing") == [("acme", "CreateSubscription")]
