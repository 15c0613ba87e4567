"""The database locked by another connection past the busy timeout: CreateSaga answers
UNAVAILABLE (STORAGE_UNAVAILABLE), nothing is acknowledged that is not stored, sagas in flight
pause, and everything resumes once the lock is gone."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from tests.faults.support import (
    AckLog,
    Deployment,
    deploy,
    details_of,
    health_status,
    one_step_definition,
    stored_sagas,
    wait_health,
    wait_settled,
)
from tests.torture.checker import check_coordinator, read_only

BUSY_TIMEOUT_MS = 300


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    # Slow participants: the sagas started before the lock are still in flight during it.
    deployment = deploy(
        tmp_path,
        [one_step_definition("slow")],
        participant_delay_ms="1500:1500",
        busy_timeout_ms=BUSY_TIMEOUT_MS,
    )
    try:
        deployment.start_participants()
        deployment.start_coordinator()
        yield deployment
    finally:
        deployment.stop()


def _request(saga_id: str) -> cpb.CreateSagaRequest:
    return cpb.CreateSagaRequest(
        saga_id=saga_id, definition="slow", input=json.dumps({"id": saga_id}).encode()
    )


def test_a_lock_held_past_the_busy_timeout_refuses_creation_and_pauses_sagas_in_flight(
    deployment: Deployment, tmp_path: Path
) -> None:
    acks = AckLog(tmp_path / "acks.jsonl")
    with grpc.insecure_channel(deployment.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for index in range(5):
            request = _request(f"before-{index}")
            answer = stub.CreateSaga(request, timeout=10)
            acks.acknowledge(request.saga_id, answer.created, request.input)

        blocker = sqlite3.connect(deployment.database, isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
            refused = []
            for index in range(5):
                request = _request(f"during-{index}")
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as raised:
                    stub.CreateSaga(request, timeout=10)
                refused.append((details_of(raised.value), time.monotonic() - started))
            time.sleep(2.5)  # the sagas in flight answer, and cannot store the answer
            assert deployment.coordinator.alive, "the coordinator must survive a locked database"
            # It tells its health checks the store is gone: no traffic should come its way.
            assert health_status(deployment.target) == "NOT_SERVING"
            paused = stored_sagas(deployment.database)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
            released_ns = time.time_ns()
        assert wait_health(deployment.target, "SERVING")

        for details, took in refused:
            assert details.code is grpc.StatusCode.UNAVAILABLE, details
            assert details.reason == "STORAGE_UNAVAILABLE", details
            assert "locked" in details.message, details
            assert took >= BUSY_TIMEOUT_MS / 1000 * 0.9, "it waits for the busy timeout first"
        assert {s for s in paused if s.startswith("during-")} == set(), (
            "a refused creation must not be stored"
        )
        assert all(saga.state == "RUNNING" for saga in paused.values()), paused

        # The client retries the refused requests: they are created now, once.
        for index in range(5):
            request = _request(f"during-{index}")
            answer = stub.CreateSaga(request, timeout=10)
            assert answer.created, "nothing had been stored under this id"
            acks.acknowledge(request.saga_id, answer.created, request.input)
    ids = [f"{when}-{i}" for when in ("before", "during") for i in range(5)]
    finals = wait_settled(deployment.database, ids, timeout=60)
    assert set(finals.values()) == {"SUCCEEDED"}, finals
    ledger = deployment.directory / "participants" / "p0" / "ledger.db"
    with contextlib.closing(read_only(ledger)) as db:
        answered = {
            saga_id
            for saga_id, end_ns in db.execute(
                "SELECT saga_id, end_ns FROM deliveries WHERE end_ns IS NOT NULL"
            )
            if end_ns < released_ns
        }
    assert {f"before-{i}" for i in range(5)} <= answered, "the answers came during the lock"
    assert deployment.coordinator.alive, deployment.log_tail()
    report = check_coordinator(deployment.database, acks.path)
    assert not any(report.figures.values()), dict(report.examples)
