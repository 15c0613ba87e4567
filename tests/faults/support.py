"""What the fault tests share: a coordinator process on a file of their own, torture
participants as real processes, rich error details, and what the database holds."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.processes import free_port
from tests.torture.checker import input_digest, read_only
from tests.torture.processes import ManagedProcess

ROOT = Path(__file__).resolve().parents[2]
_DETAILS = "grpc-status-details-bin"


def one_step_definition(name: str = "fuzz", participant: str = "p0") -> dict[str, Any]:
    """A definition of one compensatable step on a torture participant, with fast retries."""
    fast = {"max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "50ms"}
    return {
        "name": name,
        "version": 1,
        "retry": fast,
        "compensation_retry": fast,
        "steps": [
            {
                "name": "only",
                "participant": participant,
                "action": "Do",
                "compensation": "Undo",
                "timeout": "2s",
            }
        ],
    }


@dataclass
class Deployment:
    """A coordinator's configuration directory, and the processes started from it."""

    directory: Path
    port: int
    coordinator: ManagedProcess
    participants: dict[str, ManagedProcess]

    @property
    def config(self) -> Path:
        """The coordinator's configuration file."""
        return self.directory / "saga.yaml"

    @property
    def database(self) -> Path:
        """The coordinator's SQLite file."""
        return self.directory / "saga.db"

    @property
    def target(self) -> str:
        """Where the coordinator listens."""
        return f"127.0.0.1:{self.port}"

    def start_participants(self) -> None:
        """Start every participant and wait until each serves."""
        for process in self.participants.values():
            if not process.alive:
                process.spawn()
        for name, process in self.participants.items():
            port = int(process.argv[process.argv.index("--port") + 1])
            if not wait_healthy(f"127.0.0.1:{port}", 20, process):
                raise RuntimeError(f"participant {name} did not start: {process.log.read_text()}")

    def start_coordinator(self, env: Mapping[str, str] | None = None, timeout: float = 30) -> None:
        """Start the coordinator and wait until it serves."""
        self.coordinator.spawn(env)
        if not wait_healthy(self.target, timeout, self.coordinator):
            raise RuntimeError(f"the coordinator did not start:\n{self.log_tail()}")

    def log_tail(self, size: int = 4000) -> str:
        """The end of the coordinator's output."""
        return self.coordinator.log.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) every process that still runs; this run's pids only."""
        for process in [self.coordinator, *self.participants.values()]:
            if process.alive:
                process.process.terminate()  # type: ignore[union-attr]
                try:
                    process.process.wait(15)  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    process.kill()


def deploy(
    directory: Path,
    definitions: Sequence[Mapping[str, Any]],
    *,
    participants: Sequence[str] = ("p0",),
    participant_delay_ms: str = "0:0",
    seed: int = 1,
    misbehave: bool = False,
    command: Sequence[str] | None = None,
    database: Path | None = None,
    **settings: Any,
) -> Deployment:
    """Write a coordinator configuration for ``definitions`` and torture participants.

    The participants answer every call at once and OK unless ``misbehave`` (then they inject
    UNAVAILABLE answers as in the torture run) or ``participant_delay_ms`` slows them.
    ``command`` runs the coordinator's Python (e.g. under strace); ``settings`` go into the
    configuration file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "definitions").mkdir(exist_ok=True)
    for definition in definitions:
        (directory / "definitions" / f"{definition['name']}.yaml").write_text(
            yaml.safe_dump(dict(definition), sort_keys=False)
        )
    ports = {name: free_port() for name in participants}
    port = free_port()
    (directory / "saga.yaml").write_text(
        yaml.safe_dump(
            {
                "database": f"sqlite:///{database or directory / 'saga.db'}",
                "listen": f"127.0.0.1:{port}",
                "definitions": "definitions",
                "shutdown_grace": 2.0,
                "participants": {name: f"127.0.0.1:{p}" for name, p in ports.items()},
                **settings,
            }
        )
    )
    argv = ["-m", "coordinator.cli", "serve", "--config", str(directory / "saga.yaml")]
    processes = {
        name: ManagedProcess(
            name,
            [
                "-m",
                "tests.torture.participant",
                "--name",
                name,
                "--port",
                str(ports[name]),
                "--dir",
                str(directory / "participants" / name),
                "--seed",
                str(seed),
                "--delay-ms",
                participant_delay_ms,
                *([] if misbehave else ["--well-behaved"]),
            ],
            directory / f"{name}.log",
            cwd=ROOT,
        )
        for name in participants
    }
    coordinator = ManagedProcess(
        "coordinator", argv, directory / "coordinator.log", cwd=ROOT, program=command
    )
    return Deployment(directory, port, coordinator, processes)


def wait_healthy(target: str, timeout: float, process: ManagedProcess | None = None) -> bool:
    """Wait until the server at ``target`` answers SERVING; False if it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive:
            return False
        if healthy(target):
            return True
        time.sleep(0.05)
    return False


def healthy(target: str, timeout: float = 1.0) -> bool:
    """Whether the server at ``target`` answers its health check SERVING right now."""
    return health_status(target, timeout) == "SERVING"


def health_status(target: str, timeout: float = 1.0) -> str | None:
    """What the server at ``target`` answers its health check (``SERVING``, ``NOT_SERVING``),
    or None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_health(target: str, wanted: str, timeout: float = 20.0) -> bool:
    """Wait until the server answers its health check ``wanted``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health_status(target) == wanted:
            return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True)
class ErrorDetails:
    """A failed call as the client sees it."""

    code: grpc.StatusCode
    message: str
    reason: str
    violations: tuple[tuple[str, str], ...]


def details_of(error: grpc.RpcError) -> ErrorDetails:
    """The status code, message, ErrorInfo reason and BadRequest violations of a failed call."""
    reason = ""
    violations: list[tuple[str, str]] = []
    call: Any = error
    for key, value in call.trailing_metadata() or ():
        if key != _DETAILS or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(bad):
                violations.extend((v.field, v.description) for v in bad.field_violations)
    return ErrorDetails(call.code(), call.details() or "", reason, tuple(violations))


@dataclass(frozen=True)
class StoredSaga:
    """A saga row and the size of its log."""

    state: str
    version: int
    input: bytes
    events: int
    creations: int


def stored_sagas(database: Path) -> dict[str, StoredSaga]:
    """Every saga in the file (opened read-only), with its log's length."""
    if not database.exists():
        return {}
    with contextlib.closing(read_only(database)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        events = {
            saga_id: (count, creations)
            for saga_id, count, creations in db.execute(
                "SELECT saga_id, count(*), sum(type = 'saga_created') FROM saga_events "
                "GROUP BY saga_id"
            )
        }
        return {
            saga_id: StoredSaga(state, version, input_, *events.get(saga_id, (0, 0)))
            for saga_id, state, version, input_ in db.execute(
                "SELECT saga_id, state, version, input FROM sagas"
            )
        }


def integrity(database: Path) -> list[str]:
    """``PRAGMA integrity_check`` of the file: ["ok"] when sound."""
    with contextlib.closing(read_only(database)) as db:
        return [str(row[0]) for row in db.execute("PRAGMA integrity_check")]


class AckLog:
    """The client's acknowledgements, in the format the torture checker reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def acknowledge(self, saga_id: str, created: bool, payload: bytes) -> None:
        """Record that CreateSaga answered OK for this request."""
        entry = {
            "kind": "ack",
            "saga_id": saga_id,
            "created": created,
            "input_sha256": input_digest(payload),
        }
        with self.path.open("a") as log:
            log.write(json.dumps(entry) + "\n")


def serve_and_exit(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``saga serve`` expecting it to refuse to start; its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def sqlite_error_free(database: Path) -> bool:
    """Whether the file opens and answers a query."""
    try:
        with contextlib.closing(read_only(database)) as db:
            db.execute("SELECT count(*) FROM sagas").fetchone()
    except sqlite3.Error:
        return False
    return True


SETTLED_STATES = frozenset({"SUCCEEDED", "COMPENSATED", "NEEDS_ATTENTION"})


def wait_settled(database: Path, saga_ids: Sequence[str], timeout: float) -> dict[str, str]:
    """Poll the file until every one of ``saga_ids`` has settled; their states by id."""
    deadline = time.monotonic() + timeout
    while True:
        sagas = stored_sagas(database)
        states = {saga_id: sagas[saga_id].state for saga_id in saga_ids if saga_id in sagas}
        done = len(states) == len(saga_ids) and set(states.values()) <= SETTLED_STATES
        if done or time.monotonic() > deadline:
            return states
        time.sleep(0.1)
