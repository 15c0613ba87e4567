"""`saga conformance` against the demo's four services, each a real process with its barrier:
three on the Python SDK, Cards on the Node.js SDK."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]
INPUT = json.dumps({"company": "Initech", "admin": "bill@initech.example", "plan": "business"})
SERVICES = {
    "identity": ("CreateUser", "DeactivateUser", []),
    "accounts": ("OpenAccount", "CloseAccount", ['create-user={"user_id": "usr_1"}']),
    "cards": ("IssueCard", "CancelCard", ['open-account={"account_id": "acc_1"}']),
    "billing": ("CreateSubscription", "CancelSubscription", ['open-account={"account_id": "a"}']),
}


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
