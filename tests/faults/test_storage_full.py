"""A full disk: CreateSaga answers a clear, retryable UNAVAILABLE (STORAGE_UNAVAILABLE, "disk
full"), sagas in flight pause without losing anything, and all resume once space is back.

Twice: in-process, with the store's file capped by ``PRAGMA max_page_count``; and as a real
process on a real, tiny filesystem filled to the last byte (a tmpfs, when this user may mount
one)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc
from saga.v1 import saga_pb2

from coordinator.store.sqlite import SqliteStore
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
from tests.support.coordinator import (
    four_step_definition,
    running_coordinator,
    start_participants,
)
from tests.support.participants import ScriptedParticipant, ok
from tests.torture.checker import check_coordinator

NAMES = ("identity", "accounts", "cards", "billing")


@pytest.fixture
async def slow_participants() -> AsyncIterator[dict[str, ScriptedParticipant]]:
    started = await start_participants(*NAMES)
    for participant in started.values():
        participant.rule = lambda request: ok(delay=0.2)
    yield started
    for participant in started.values():
        await participant.stop()


async def test_a_full_store_refuses_creation_pauses_sagas_and_resumes_when_space_is_back(
    tmp_path: Path, slow_participants: dict[str, ScriptedParticipant]
) -> None:
    async with running_coordinator(
        tmp_path, slow_participants, [four_step_definition("onboard")]
    ) as harness:
        store = harness.coordinator.store
        assert isinstance(store, SqliteStore)
        in_flight = [
            (await harness.create("onboard", b'{"n": %d}' % i, saga_id=f"flight-{i}")).saga_id
            for i in range(20)
        ]
        pages = await store._on_writer(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await store._on_writer(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))

        big = json.dumps({"blob": "x" * 200_000}).encode()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await harness.create("onboard", big, saga_id="big")
        details = details_of(raised.value)
        assert details.code is grpc.StatusCode.UNAVAILABLE, details
        assert details.reason == "STORAGE_UNAVAILABLE", details
        assert "disk full" in details.message, details

        await asyncio.sleep(2.0)  # the sagas in flight get answers they cannot store
        paused = {s: (await harness.coordinator.engine.get_saga(s)).state for s in in_flight}
        assert not harness.coordinator.fatal.done(), "a full disk must not stop the coordinator"
        assert any(not state.is_settled for state in paused.values()), (
            "no saga was paused by the full store: the test proved nothing"
        )

        await store._on_writer(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        finals = [await harness.wait(saga_id, timeout=60) for saga_id in in_flight]
        assert {saga.state for saga in finals} == {saga_pb2.SAGA_STATE_SUCCEEDED}
        again = await harness.create("onboard", big, saga_id="big")
        assert again.saga_id == "big"
        assert (await harness.wait("big", timeout=30)).state == saga_pb2.SAGA_STATE_SUCCEEDED
    for participant in slow_participants.values():
        assert len(participant.applied) == len(set(participant.applied))


# --- a real process on a real full filesystem ----------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", str(mount_point)], check=False)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem has not a byte left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    file.write(b"\0" * chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    return filler


@pytest.fixture
def on_tiny_disk(tmp_path: Path, tiny_disk: Path) -> Iterator[Deployment]:
    deployment = deploy(
        tmp_path / "deployment",
        [one_step_definition("slow")],
        participant_delay_ms="1500:1500",
        database=tiny_disk / "saga.db",
    )
    try:
        deployment.start_participants()
        deployment.start_coordinator()
        yield deployment
    finally:
        deployment.stop()


def test_a_full_filesystem_refuses_creation_pauses_sagas_and_resumes_when_space_is_back(
    on_tiny_disk: Deployment, tiny_disk: Path, tmp_path: Path
) -> None:
    deployment = on_tiny_disk
    database = tiny_disk / "saga.db"
    acks = AckLog(tmp_path / "acks.jsonl")
    in_flight = [f"flight-{i}" for i in range(10)]
    with grpc.insecure_channel(deployment.target) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)
        for saga_id in in_flight:
            request = cpb.CreateSagaRequest(saga_id=saga_id, definition="slow", input=b"{}")
            acks.acknowledge(saga_id, stub.CreateSaga(request, timeout=10).created, request.input)
        filler = _fill(tiny_disk)
        try:
            big = cpb.CreateSagaRequest(
                saga_id="big", definition="slow", input=json.dumps({"b": "x" * 600_000}).encode()
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.CreateSaga(big, timeout=30)
            details = details_of(raised.value)
            time.sleep(2.5)  # the sagas in flight get answers they cannot store
            assert deployment.coordinator.alive, f"a full disk stopped it:\n{deployment.log_tail()}"
            # It tells its health checks the store is gone: no traffic should come its way.
            assert health_status(deployment.target) == "NOT_SERVING", deployment.log_tail()
            paused = stored_sagas(database)
        finally:
            filler.unlink()
        assert wait_health(deployment.target, "SERVING"), deployment.log_tail()
        assert details.code is grpc.StatusCode.UNAVAILABLE, details
        assert details.reason == "STORAGE_UNAVAILABLE", details
        assert "disk full" in details.message, details
        assert "big" not in paused
        assert all(paused[s].state == "RUNNING" for s in in_flight), paused

        answer = stub.CreateSaga(big, timeout=30)  # the client's retry, once space is back
        assert answer.created
        acks.acknowledge("big", answer.created, big.input)
    finals = wait_settled(database, [*in_flight, "big"], timeout=60)
    assert set(finals.values()) == {"SUCCEEDED"}, (finals, deployment.log_tail())
    assert deployment.coordinator.alive
    report = check_coordinator(database, acks.path)
    assert not any(report.figures.values()), dict(report.examples)
    with contextlib.suppress(FileNotFoundError):
        (tiny_disk / "filler").unlink()
