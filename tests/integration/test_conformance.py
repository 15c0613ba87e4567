"""`saga conformance` against the demo's four services, each a real process with its barrier:
three on the Python SDK, Cards on the Node.js SDK."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
INPUT = json.dumps({"company": "Initech", "admin": "bill@initech.example", "plan": "business"})
SERVICES = {
    "identity": ("CreateUser", "DeactivateUser", []),
    "accounts": ("OpenAccount", "CloseAccount", ['create-user={"user_id": "usr_1"}']),
    "cards": ("IssueCard", "CancelCard", ['open-account={"account_id": "acc_1"}']),
    "billing": ("CreateSubscription", "CancelSubscription", ['open-account={"account_id": "a"}']),
}


def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            assert process.poll() is None, f"the service exited:\n{log.read_text()[-3000:]}"
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.RpcError:
                time.sleep(0.05)
    raise AssertionError(f"{address} did not start")


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    name = request.param
    port = free_port()
    arguments = ["--port", str(port), "--database", str(tmp_path / f"{name}.db")]
    command = (
        ["node", str(ROOT / "clients" / "node" / "examples" / "cards.js"), *arguments]
        if name == "cards"
        else [sys.executable, str(ROOT / "scripts" / "demo" / "services.py"), name, *arguments]
    )
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", process, log)
        yield name, f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(15)


@pytest.mark.parametrize("service", sorted(SERVICES), indirect=True)
def test_every_demo_service_passes_the_conformance_kit(service: tuple[str, str]) -> None:
    name, address = service
    action, compensation, previous = SERVICES[name]
    command = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "conformance",
        "--target",
        address,
        "--action",
        action,
        "--compensation",
        compensation,
        "--payload",
        INPUT,
    ]
    for entry in previous:
        command += ["--previous", entry]

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    for check in (
        "duplicate-execute",
        "duplicate-compensate",
        "null-compensation",
        "no-hanging-execute",
        "concurrent-duplicates",
        "past-deadline",
    ):
        assert check in result.stdout
    assert "8 passed, 0 failed" in result.stdout
