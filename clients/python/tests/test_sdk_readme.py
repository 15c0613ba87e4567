"""The README's examples: the participant runs as written and passes the conformance kit."""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saga_sdk.conformance import run

# The SDK's README and the project's both carry the participant example.
READMES = [
    Path(__file__).parent.parent / "README.md",
    Path(__file__).parents[3] / "README.md",
]
ADDRESS = "127.0.0.1:50051"
SERVING = health_pb2.HealthCheckResponse.SERVING


def python_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)


def participant_example(readme: Path) -> str:
    (example,) = [block for block in python_blocks(readme) if "Participant(" in block]
    return example


@pytest.mark.parametrize("readme", READMES, ids=["sdk", "project"])
def test_the_participant_example_is_at_most_30_lines(readme: Path) -> None:
    assert len(participant_example(readme).strip().splitlines()) <= 30


@pytest.mark.parametrize("readme", READMES, ids=["sdk", "project"])
def test_every_example_compiles(readme: Path) -> None:
    for block in python_blocks(readme):
        compile(block, str(readme), "exec")


@pytest.mark.parametrize("readme", READMES, ids=["sdk", "project"])
def test_the_participant_example_serves_and_passes_the_conformance_kit(
    tmp_path: Path, readme: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    example = participant_example(readme)
    assert ADDRESS in example
    script = tmp_path / "participant.py"
    script.write_text(example.replace(ADDRESS, f"127.0.0.1:{port}"))
    log = (tmp_path / "log").open("wb")
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None, (tmp_path / "log").read_text()
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                        break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)

        results = run(target, "OpenAccount", "CloseAccount", {"owner": "ACME"})
        refused = run(target, "OpenAccount", "CloseAccount", {})
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert all(r.passed for r in results), results
    assert (tmp_path / "accounts.db").exists()
    assert not next(r for r in refused if r.name == "execute-ok").passed
    assert "OWNER_MISSING" in next(r for r in refused if r.name == "execute-ok").detail


def example_with(text: str) -> str:
    (example,) = [block for block in python_blocks(READMES[0]) if text in block]
    return example


def test_the_handler_kit_example_passes_on_the_readme_participant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    service: dict[str, object] = {"__name__": "accounts_service"}
    exec(compile(participant_example(READMES[0]), "participant", "exec"), service)
    kit_test: dict[str, object] = {"__name__": "test_accounts"}
    exec(compile(example_with("HandlerKit"), "kit example", "exec"), kit_test)
    test = kit_test["test_accounts_are_safe_to_retry"]
    assert callable(test)

    test(service["participant"], tmp_path)


def test_the_bring_your_own_transaction_example_commits_with_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    example: dict[str, object] = {"__name__": "example"}
    exec(compile(example_with("run_in("), "run_in example", "exec"), example)

    with sqlite3.connect(tmp_path / "accounts.db") as db:
        rows = db.execute("SELECT saga_id, request_id, state, output FROM saga_barrier").fetchall()
    assert rows == [("saga-1", "request-1", "done", b"opened")]
