"""``saga-barrier prune --coordinator`` (Python) and ``prune({ended: endedOn(client)})``
(Node.js): only the barrier rows of sagas the coordinator says have ended go, against a real
coordinator with a succeeded, a parked and a forgotten saga."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
from saga.v1 import saga_pb2

from saga_sdk.barrier import BarrierKey, Operation
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.support.coordinator import four_step_definition, running_coordinator, start_participants
from tests.support.participants import error, reject


def aged_rows(path: Path, saga_ids: list[str], days: int) -> None:
    """One Execute row per saga in a SQLite barrier, first seen ``days`` ago."""
    barrier = SqliteBarrier(path)
    for saga_id in saga_ids:
        key = BarrierKey(saga_id, "open-account", Operation.EXECUTE, uuid.uuid4().hex)
        barrier.run(key, lambda tx: b"{}")
    barrier.close()
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE saga_barrier SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', created_at, ?)",
            (f"-{timedelta(days=days).total_seconds()} seconds",),
        )


def remaining(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT saga_id FROM saga_barrier"))


ROOT = Path(__file__).resolve().parents[2]
NODE_PRUNE = """
import { SagaClient, SqliteBarrier, endedOn } from './src/index.js';
const [database, target] = process.argv.slice(1);
const client = new SagaClient(target);
const barrier = new SqliteBarrier(database);
const options = { olderThanMs: 30 * 24 * 3600 * 1000, ended: endedOn(client) };
const counted = await barrier.prune({ ...options, dryRun: true });
const deleted = await barrier.prune(options);
console.log(JSON.stringify({ counted, deleted }));
barrier.close();
client.close();
"""


def node_prune(database: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", "--input-type=module", "-e", NODE_PRUNE, str(database), target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT / "clients" / "node",
    )


def prune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga_sdk.retention", "prune", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_only_the_rows_of_sagas_the_coordinator_says_have_ended_are_pruned(
    tmp_path: Path,
) -> None:
    participants = await start_participants("identity", "accounts", "cards", "billing")
    async with running_coordinator(
        tmp_path, participants, [four_step_definition("onboard")]
    ) as harness:
        await harness.create("onboard", saga_id="done")
        assert (await harness.wait("done")).state == saga_pb2.SAGA_STATE_SUCCEEDED
        participants["cards"].script("IssueCard", reject("CARD_LIMIT", "limit too high"))
        participants["accounts"].rule = lambda request: (
            error(grpc.StatusCode.UNAVAILABLE, "ledger down")
            if request.action == "CloseAccount"
            else None
        )
        await harness.create("onboard", saga_id="parked")
        assert (await harness.wait("parked")).state == saga_pb2.SAGA_STATE_NEEDS_ATTENTION
        barrier, node_barrier = tmp_path / "accounts.db", tmp_path / "cards.db"
        # "forgotten": a saga the coordinator no longer knows (pruned after it ended).
        aged_rows(barrier, ["done", "parked", "forgotten"], days=40)
        aged_rows(node_barrier, ["done", "parked", "forgotten"], days=40)
        target = f"127.0.0.1:{harness.coordinator.port}"
        database = ["--database", f"sqlite:///{barrier}", "--older-than", "30d"]

        dry = await asyncio.to_thread(prune, *database, "--coordinator", target, "--dry-run")
        pruned = await asyncio.to_thread(prune, *database, "--coordinator", target)
        down = await asyncio.to_thread(prune, *database, "--coordinator", "127.0.0.1:1")
        from_node = await asyncio.to_thread(node_prune, node_barrier, target)

    for participant in participants.values():
        await participant.stop()
    assert (dry.returncode, dry.stdout.strip()) == (
        0,
        "would delete 2 barrier row(s) of ended sagas older than 30d",
    ), dry.stderr
    assert (pruned.returncode, pruned.stdout.strip()) == (
        0,
        "deleted 2 barrier row(s) of ended sagas older than 30d",
    ), pruned.stderr
    # Parked for longer than the window: its rows stay for the day an operator resumes it.
    assert remaining(barrier) == ["parked"]
    # A coordinator that cannot be asked prunes nothing.
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr or "Unavailable" in down.stderr
    # The Node.js SDK's barrier, on the same table, asks the same coordinator.
    assert from_node.returncode == 0, from_node.stderr
    assert from_node.stdout.strip() == '{"counted":2,"deleted":2}'
    assert remaining(node_barrier) == ["parked"]
