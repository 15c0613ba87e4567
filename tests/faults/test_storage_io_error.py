"""An I/O error on write or fsync: the coordinator stops with a clear message and a non-zero
exit code, having acknowledged nothing it did not store; after a restart on the same file every
acknowledged saga is there, every log folds into its row, and every saga ends.

The error is a real one, returned by the kernel to the coordinator process: the process runs
under ``strace --inject``, which makes the writer's N-th ``fdatasync`` or ``pwrite64`` fail
with EIO (no extra package when strace is installed; the test is skipped otherwise)."""

from __future__ import annotations

import json
import shutil
import sys
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
    integrity,
    one_step_definition,
    wait_settled,
)
from tests.torture.checker import check_coordinator

STRACE = shutil.which("strace")

pytestmark = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (apt-get install -y strace)"
)

# The writer thread's N-th call fails, and every one after it: a disk that went bad.
INJECTIONS = {
    "fsync": ("fdatasync", 10),
    "write": ("pwrite64", 150),
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    deployment = deploy(tmp_path, [one_step_definition("quick")])
    try:
        deployment.start_participants()
        yield deployment
    finally:
        deployment.stop()


def _create(stub: cpb_grpc.CoordinatorServiceStub, acks: AckLog, saga_id: str) -> bool:
    request = cpb.CreateSagaRequest(
        saga_id=saga_id, definition="quick", input=json.dumps({"id": saga_id}).encode()
    )
    try:
        answer = stub.CreateSaga(request, timeout=5)
    except grpc.RpcError:
        return False
    acks.acknowledge(saga_id, answer.created, request.input)
    return True


@pytest.mark.parametrize("failing", list(INJECTIONS))
def test_an_io_error_stops_the_coordinator_and_a_restart_keeps_every_promise(
    deployment: Deployment, tmp_path: Path, failing: str
) -> None:
    syscall, nth = INJECTIONS[failing]
    acks = AckLog(tmp_path / "acks.jsonl")
    # A first life makes the store (its migrations are not what this test is about).
    deployment.start_coordinator()
    with grpc.insecure_channel(deployment.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        assert all(_create(stub, acks, f"first-{i}") for i in range(3))
    wait_settled(deployment.database, [f"first-{i}" for i in range(3)], 30)
    assert deployment.coordinator.process is not None
    deployment.coordinator.process.terminate()
    assert deployment.coordinator.process.wait(30) == 0

    assert STRACE is not None
    deployment.coordinator.program = [
        STRACE,
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-o",
        "/dev/null",
        "-e",
        f"trace={syscall}",
        "-e",
        f"inject={syscall}:error=EIO:when={nth}+",
        sys.executable,
    ]
    deployment.start_coordinator()
    submitted: list[str] = []
    with grpc.insecure_channel(deployment.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        deadline = time.monotonic() + 60
        while deployment.coordinator.alive and time.monotonic() < deadline:
            saga_id = f"second-{len(submitted)}"
            submitted.append(saga_id)
            _create(stub, acks, saga_id)
    process = deployment.coordinator.process
    assert process is not None
    code = process.wait(30)
    output = deployment.log_tail(20_000)
    assert code == 1, f"expected exit code 1 after an I/O error, got {code}:\n{output}"
    assert "I/O error" in output, output
    assert "Traceback" not in output, output

    deployment.coordinator.program = [sys.executable]
    deployment.start_coordinator()
    acknowledged = [json.loads(line)["saga_id"] for line in acks.path.read_text().splitlines()]
    assert any(s.startswith("second-") for s in acknowledged), "nothing ran before the error"
    finals = wait_settled(deployment.database, acknowledged, timeout=60)
    assert set(finals.values()) == {"SUCCEEDED"}, finals
    assert integrity(deployment.database) == ["ok"]
    report = check_coordinator(deployment.database, acks.path)
    assert not any(report.figures.values()), dict(report.examples)
