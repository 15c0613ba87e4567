"""A participant process SIGKILLed in the middle of a Debit, restarted and retried: one effect."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

SCRIPT = Path(__file__).with_name("sdk_participant_process.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ParticipantProcess:
    """Starts the participant script and waits until its health service says SERVING."""

    def __init__(self, database: str, workdir: Path) -> None:
        self.database = database
        self.workdir = workdir
        self.port = free_port()
        self.ready_file = workdir / "ready"
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, mode: str = "") -> subprocess.Popen[bytes]:
        log = (self.workdir / f"participant-{len(self.running)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), self.database, str(self.port), mode],
            env={**os.environ, "READY_FILE": str(self.ready_file)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running.append(process)
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None, self.log()
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return process
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.workdir.glob("participant-*.log")))

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def participant(database: str, tmp_path: Path) -> Iterator[ParticipantProcess]:
    process = ParticipantProcess(database, tmp_path)
    yield process
    process.stop_all()


def query(database: str, sql: str) -> list[tuple[Any, ...]]:
    if database.startswith("postgresql://"):
        with psycopg.connect(database) as connection:
            return list(connection.execute(sql.replace("?", "%s")).fetchall())
    with sqlite3.connect(database) as connection:
        return list(connection.execute(sql))


def debit(request_id: str) -> participant_service_pb2.ExecuteRequest:
    return participant_service_pb2.ExecuteRequest(
        saga="sagas/crash-1",
        definition="pay",
        definition_version=1,
        step="debit",
        action="Debit",
        request_id=request_id,
        attempt=1,
        input=b'{"amount": 5}',
    )


def test_killed_after_the_commit_the_retry_replays_the_answer_without_a_second_effect(
    participant: ParticipantProcess,
) -> None:
    request = debit(uuid.uuid4().hex)
    doomed = participant.start("after-commit")
    with grpc.insecure_channel(participant.target) as channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        with pytest.raises(grpc.RpcError) as lost:
            stub.Execute(request, timeout=20)
    assert doomed.wait(10) == -signal.SIGKILL
    assert query(participant.database, "SELECT request_id, amount FROM ledger") == [
        (request.request_id, -5)
    ]
    stored = query(participant.database, "SELECT output FROM saga_barrier WHERE state = 'done'")

    restarted = participant.start()
    with grpc.insecure_channel(participant.target) as channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        retried = stub.Execute(request, timeout=20)
        again = stub.Execute(request, timeout=20)
    restarted.send_signal(signal.SIGTERM)

    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    assert retried.output == again.output == bytes(stored[0][0])
    assert query(participant.database, "SELECT request_id, amount FROM ledger") == [
        (request.request_id, -5)
    ]
    assert restarted.wait(10) == 0  # SIGTERM stops serve() gracefully


def test_killed_before_the_commit_nothing_stays_and_the_retry_applies_once(
    participant: ParticipantProcess,
) -> None:
    request = debit(uuid.uuid4().hex)
    doomed = participant.start("before-commit")
    with grpc.insecure_channel(participant.target) as channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        pending = stub.Execute.future(request, timeout=30)
        deadline = time.monotonic() + 20
        while not participant.ready_file.exists():
            assert time.monotonic() < deadline, participant.log()
            time.sleep(0.02)
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(10) == -signal.SIGKILL
        lost = pending.exception()
    assert query(participant.database, "SELECT request_id FROM ledger") == []

    restarted = participant.start()
    with grpc.insecure_channel(participant.target) as channel:
        stub = participant_service_pb2_grpc.ParticipantServiceStub(channel)
        retried = stub.Execute(request, timeout=20)
        again = stub.Execute(request, timeout=20)
    restarted.send_signal(signal.SIGTERM)
    restarted.wait(10)

    assert isinstance(lost, grpc.RpcError)
    assert lost.code() == grpc.StatusCode.UNAVAILABLE
    assert retried.output == again.output
    assert query(participant.database, "SELECT request_id, amount FROM ledger") == [
        (request.request_id, -5)
    ]
