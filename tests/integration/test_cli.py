"""The ``saga`` command as a user runs it: real processes, a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.coordinator import four_step_definition, write_definitions
from tests.support.participants import ScriptedParticipant, ok, reject
from tests.support.processes import CoordinatorProcess


def saga(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def run_saga(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(saga, *args)


@pytest.fixture
async def coordinator(
    tmp_path: Path, participants: dict[str, ScriptedParticipant]
) -> AsyncIterator[CoordinatorProcess]:
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", participants
    )
    await process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        await process.stop()


async def test_start_wait_get_list_and_cancel_from_the_command_line(
    coordinator: CoordinatorProcess, participants: dict[str, ScriptedParticipant]
) -> None:
    target = ("--target", coordinator.target)
    participants["cards"].rule = lambda r: (
        reject("CARD_REFUSED") if b"refuse" in r.input and r.action == "IssueCard" else None
    )

    started = await run_saga(
        "start", "onboard", "--input", '{"company": "Acme"}', "--id", "acme", "--wait", *target
    )
    assert started.returncode == 0, started.stderr
    assert "SUCCEEDED" in started.stdout
    assert "create-user" in started.stdout

    refused = await run_saga(
        "start", "onboard", "--input", '{"refuse": 1}', "--id", "nope", "--wait", "--json", *target
    )
    assert refused.returncode == 1  # the saga did not succeed
    shown = json.loads(refused.stdout)
    assert shown["state"] == "COMPENSATED"
    assert [s["state"] for s in shown["steps"]] == ["COMPENSATED"] * 3 + ["PENDING"]

    got = await run_saga("get", "acme", "--json", *target)
    assert json.loads(got.stdout)["input"] == {"company": "Acme"}

    listed = await run_saga("list", "--state", "compensated", "--json", *target)
    assert [s["saga_id"] for s in json.loads(listed.stdout)] == ["nope"]

    cancel = await run_saga("cancel", "acme", *target)
    assert cancel.returncode == 1
    assert "FAILED_PRECONDITION SAGA_ENDED" in cancel.stderr

    missing = await run_saga("get", "ghost", *target)
    assert missing.returncode == 3  # not found
    assert "NOT_FOUND" in missing.stderr

    bad = await run_saga("start", "onboard", "--input", "{not json", *target)
    assert bad.returncode == 2
    assert "not valid JSON" in bad.stderr


async def test_serve_offers_health_checking_and_reflection(coordinator: CoordinatorProcess) -> None:
    async with grpc.aio.insecure_channel(coordinator.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="saga.v1.CoordinatorService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = set()
        async for response in stream:
            services = {s.name for s in response.list_services_response.service}
            break
    assert "saga.v1.CoordinatorService" in services


async def test_sigterm_finishes_the_call_in_flight_and_exits_zero(
    coordinator: CoordinatorProcess, participants: dict[str, ScriptedParticipant]
) -> None:
    participants["accounts"].script("OpenAccount", ok(delay=0.8))
    started = await run_saga("start", "onboard", "--id", "graceful", "--target", coordinator.target)
    assert started.returncode == 0, started.stderr
    async with asyncio.timeout(10):
        while not participants["accounts"].in_flight:
            await asyncio.sleep(0.01)

    assert await coordinator.stop() == 0

    # The answer that came back during shutdown was stored: after a restart the saga goes on
    # from step three, and OpenAccount is never sent again.
    assert len(participants["accounts"].received) == 1
    await coordinator.start()
    done = await run_saga(
        "start", "onboard", "--id", "graceful", "--wait", "--json", "--target", coordinator.target
    )
    assert json.loads(done.stdout)["state"] == "SUCCEEDED"
    assert len(participants["accounts"].received) == 1


def test_serve_refuses_an_invalid_definition_naming_the_file_and_field(tmp_path: Path) -> None:
    definitions = tmp_path / "definitions"
    definitions.mkdir()
    (definitions / "broken.yaml").write_text(
        "name: broken\nversion: 1\nsteps:\n  - {name: a, participant: identity, action: A}\n"
    )

    result = saga(
        "serve",
        "--definitions",
        str(definitions),
        "--participant",
        "identity=127.0.0.1:1",
        "--database",
        f"sqlite:///{tmp_path / 'x.db'}",
    )

    assert result.returncode == 2
    assert "broken.yaml" in result.stderr
    assert "steps[0].compensation" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_serve_refuses_a_bad_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "saga.yaml"
    config.write_text("listen: 127.0.0.1:0\nparticipants:\n  identity: not-an-address\n")

    result = saga("serve", "--config", str(config))

    assert result.returncode == 2
    assert "participants.identity.address" in result.stderr


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serve_runs_sagas_on_either_event_loop(
    tmp_path: Path, participants: dict[str, ScriptedParticipant], event_loop: str
) -> None:
    write_definitions(tmp_path / "definitions", [four_step_definition("onboard")])
    process = CoordinatorProcess.configure(
        tmp_path / "saga.yaml", tmp_path / "saga.db", participants, event_loop=event_loop
    )
    await process.start()
    try:
        result = await run_saga(
            "start", "onboard", "--target", process.target, "--wait", "--json", "--timeout", "30"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["state"] == "SUCCEEDED"
    finally:
        await process.stop()


def test_serve_refuses_an_unknown_event_loop(tmp_path: Path) -> None:
    config = tmp_path / "saga.yaml"
    config.write_text("listen: 127.0.0.1:0\nevent_loop: trio\n")

    result = saga("serve", "--config", str(config))

    assert result.returncode == 2
    assert "event_loop: expected one of asyncio, uvloop" in result.stderr


def test_check_store_scans_on_demand_and_names_the_damage(tmp_path: Path) -> None:
    database = tmp_path / "saga.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    connection.execute("CREATE INDEX t_by_v ON t (v)")
    connection.executemany(
        "INSERT INTO t (v) VALUES (?)", [(f"v{i:05d}" * 20,) for i in range(2000)]
    )
    connection.commit()
    (index_page,) = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 't_by_v'"
    ).fetchone()
    connection.close()

    sound = saga("check-store", f"sqlite:///{database}")
    assert sound.returncode == 0, sound.stderr
    assert "ok" in sound.stdout

    data = bytearray(database.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    start = (index_page - 1) * page_size + 8
    data[start : start + 8] = b"\xff" * 8
    database.write_bytes(bytes(data))

    damaged = saga("check-store", str(database))
    assert damaged.returncode == 1
    assert "damaged" in damaged.stderr
    assert database.read_bytes() == bytes(data), "the check never writes"

    missing = saga("check-store", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2
    assert "no saga store" in missing.stderr


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        (("--retention", "3x"), "flags: retention: expected a duration like 90s"),
        (("--retention", "30s"), "flags: retention: at least 1m"),
        ((), "saga.yaml: retention: expected a duration like 90s"),
    ],
)
def test_serve_refuses_a_bad_retention(
    tmp_path: Path, where: tuple[str, ...], problem: str
) -> None:
    config = tmp_path / "saga.yaml"
    config.write_text("listen: 127.0.0.1:0\n" + ("" if where else "retention: soon\n"))

    result = saga("serve", "--config", str(config), *where)

    assert result.returncode == 2
    assert problem in result.stderr


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        (("--lease", "10"), "flags: lease: expected a duration like 90s"),
        (("--lease", "100ms"), "flags: lease: at least 500ms"),
        (("--replica", "two words"), "flags: replica: 1 to 100 letters, digits"),
        ((), "saga.yaml: lease: at least 500ms"),
    ],
)
def test_serve_refuses_a_bad_lease_or_replica_name(
    tmp_path: Path, where: tuple[str, ...], problem: str
) -> None:
    config = tmp_path / "saga.yaml"
    config.write_text("listen: 127.0.0.1:0\n" + ("" if where else "lease: 0.1\n"))

    result = saga("serve", "--config", str(config), *where)

    assert result.returncode == 2
    assert problem in result.stderr
