"""Coordinator replicas on one PostgreSQL database, for tests with real processes only.

Each replica is ``saga serve`` in its own process (``CoordinatorProcess``), with its own name,
lease and Prometheus endpoint; the participants are the torture participant processes (the
Python SDK's ``Participant`` with a ``SqliteBarrier``, an effects table and a delivery ledger).
A client spreads ``CreateSaga`` over the replicas and logs each acknowledgement as the torture
client does, so that the torture checker's checks read what a run left: the client's log, the
sagas and their event logs (through the store port), and each participant's effects.
Signals go only to the processes started here, by their pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import coordinator_service_pb2 as cpb
from saga.v1 import coordinator_service_pb2_grpc as cpb_grpc

from tests.support.coordinator import write_definitions
from tests.support.processes import CoordinatorProcess, free_port
from tests.torture.checker import CheckReport, check_run, input_digest, read_only
from tests.torture.processes import ManagedProcess, wait_serving
from tests.torture.scenario import PARTICIPANTS, definition, encode_input

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = "replicated"
UNFINISHED = ("RUNNING", "COMPENSATING")
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CLIENT_OPTIONS = [
    # A replica that dies or pauses should cost a client little: reconnect quickly.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def replicated_definition(timeout: str = "10s") -> dict[str, Any]:
    """The torture definition (four steps on p0, p1, p2, p0, Do and Undo) under its own name,
    with calls that may take ``timeout``: a call held past a replica's pause is still
    answered, not timed out."""
    found = definition()
    found["name"] = DEFINITION
    for step in found["steps"]:
        step["timeout"] = timeout
    return found


def saga_input(index: int, reject: str | None = None) -> bytes:
    """A saga's input as the participants read it: ``reject`` names the step that says no."""
    return encode_input({"n": index, "reject": reject, "stuck": None, "pad": ""})


# --- participants ------------------------------------------------------------------------------


@dataclass
class Participants:
    """The torture participants p0, p1, p2 as real processes, each with its barrier's file."""

    processes: dict[str, ManagedProcess]
    ports: dict[str, int]
    dirs: dict[str, Path]

    @property
    def addresses(self) -> dict[str, str]:
        """Where the coordinator dials each participant."""
        return {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}

    async def stop(self) -> None:
        """SIGTERM each (SIGKILL if it does not stop)."""
        await asyncio.gather(*(p.terminate(10) for p in self.processes.values()))


async def start_participants(
    workdir: Path, *, delay_ms: str = "0:0", gates: Mapping[str, Path] | None = None
) -> Participants:
    """Start p0, p1 and p2 (well behaved: they say no only when a saga's input asks), each call
    waiting ``delay_ms`` (LOW:HIGH); a participant named in ``gates`` holds every call until
    its file exists."""
    started = Participants({}, {}, {})
    try:
        for name in PARTICIPANTS:
            started.dirs[name] = workdir / name
            for attempt in range(_PORT_ATTEMPTS):
                port = free_port()
                argv = [
                    "-m",
                    "tests.torture.participant",
                    "--name",
                    name,
                    "--port",
                    str(port),
                    "--dir",
                    str(started.dirs[name]),
                    "--seed",
                    "0",
                    "--well-behaved",
                    "--delay-ms",
                    delay_ms,
                ]
                if gates and name in gates:
                    argv += ["--gate", str(gates[name])]
                process = ManagedProcess(name, argv, workdir / f"{name}.log", cwd=ROOT)
                process.spawn()
                started.processes[name] = process
                if await wait_serving(process, f"127.0.0.1:{port}", timeout=20):
                    started.ports[name] = port
                    break
                process.kill()
                if attempt == _PORT_ATTEMPTS - 1:  # the port taken meanwhile, or worse
                    raise RuntimeError(f"participant {name} did not start:\n{_tail(process.log)}")
    except BaseException:
        await started.stop()
        raise
    return started


_PORT_ATTEMPTS = 3
"""Starts tried on a free port: another process may take it before the child binds it."""


# --- replicas ----------------------------------------------------------------------------------


@dataclass
class Replica:
    """One ``saga serve`` process among the replicas, under its own name."""

    name: str
    process: CoordinatorProcess
    metrics_port: int

    @property
    def target(self) -> str:
        """Where clients reach it."""
        return self.process.target

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process.process is not None
        return self.process.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.process.process is not None and self.process.process.poll() is None

    def kill(self) -> None:
        """SIGKILL this replica's process (by its pid), and reap it."""
        self.process.kill()

    def pause(self) -> None:
        """SIGSTOP: the process stops dead, its connections stay open."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the paused process goes on as if nothing happened."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process.process is not None
        self.process.process.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM (after a SIGCONT, should it be paused); SIGKILL if it does not stop."""
        if not self.alive:
            return
        self.resume()
        try:
            await self.process.stop(timeout=15)
        except Exception:
            self.kill()

    async def metrics(self) -> dict[str, float]:
        """Its Prometheus samples, summed by metric name over their labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_and_labels, _, value = line.rpartition(" ")
            name = name_and_labels.partition("{")[0]
            samples[name] = samples.get(name, 0.0) + float(value)
        return samples

    async def health(self, timeout: float = 1.0) -> str:
        """Its health check's answer: SERVING, NOT_SERVING, or the gRPC error's code."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                return str(error.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def log_text(self) -> str:
        """Everything the process wrote."""
        return self.process.log.read_text(errors="replace")


def configure_replica(
    workdir: Path,
    name: str,
    database: str,
    participants: Participants,
    *,
    lease: str = "2s",
    **extra: object,
) -> Replica:
    """Write ``name``'s configuration (the definitions in ``workdir/definitions``); not
    started."""
    port = free_port()
    metrics_port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": database,
                "listen": f"127.0.0.1:{port}",
                "definitions": "definitions",
                "shutdown_grace": 1.0,
                "participants": participants.addresses,
                "replica": name,
                "lease": lease,
                "metrics_listen": f"127.0.0.1:{metrics_port}",
                **extra,
            }
        )
    )
    return Replica(name, CoordinatorProcess(config, port, config.with_suffix(".log")), metrics_port)


@contextlib.asynccontextmanager
async def running_replicas(
    workdir: Path,
    database: str,
    participants: Participants,
    names: Sequence[str],
    *,
    lease: str = "2s",
    definitions: Sequence[Mapping[str, Any]] | None = None,
) -> AsyncIterator[list[Replica]]:
    """Start one replica per name on ``database``, each SERVING; stop them all at the end."""
    write_definitions(workdir / "definitions", definitions or [replicated_definition()])
    replicas: list[Replica] = []
    try:
        # One at a time: the first migrates the new database, the others find it migrated.
        for name in names:
            for attempt in range(_PORT_ATTEMPTS):
                replica = configure_replica(workdir, name, database, participants, lease=lease)
                try:
                    await replica.process.start()
                except RuntimeError as error:  # exited: a port taken meanwhile, or worse
                    if "in use" not in str(error) or attempt == _PORT_ATTEMPTS - 1:
                        raise
                    continue
                replicas.append(replica)
                break
        yield replicas
    finally:
        await asyncio.gather(*(replica.stop() for replica in replicas))


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Client:
    """Creates sagas over the replicas, round robin, and logs each acknowledgement (fsynced,
    in the torture client's format). A replica that answers UNAVAILABLE (or not in time) is
    left for the next one, with the same saga id: creation is idempotent."""

    replicas: Sequence[Replica]
    log: Path
    deadline: float = 5.0
    """Seconds one CreateSaga attempt may take."""
    acknowledged: dict[str, bytes] = field(default_factory=dict)
    by_replica: dict[str, int] = field(default_factory=dict)
    """Acknowledgements per replica."""
    retries: int = 0
    _stubs: list[cpb_grpc.CoordinatorServiceAsyncStub] = field(default_factory=list)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def __aenter__(self) -> Client:
        for replica in self.replicas:
            channel = grpc.aio.insecure_channel(replica.target, options=CLIENT_OPTIONS)
            self._channels.append(channel)
            self._stubs.append(cpb_grpc.CoordinatorServiceStub(channel))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self._channels:
            await channel.close()

    def stub(self, index: int) -> cpb_grpc.CoordinatorServiceAsyncStub:
        """The stub of the ``index``-th replica."""
        return self._stubs[index]

    async def create(self, saga_id: str, payload: bytes, first: int, give_up: float = 60) -> str:
        """Create the saga, starting with replica ``first``; return the name of the replica
        that acknowledged it."""
        ends = time.monotonic() + give_up
        index = first
        while True:
            replica = self.replicas[index % len(self.replicas)]
            request = cpb.CreateSagaRequest(saga_id=saga_id, definition=DEFINITION, input=payload)
            try:
                response = await self._stubs[index % len(self._stubs)].CreateSaga(
                    request, timeout=self.deadline
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRIED or time.monotonic() > ends:
                    raise
                self.retries += 1
                index += 1
                await asyncio.sleep(0.02)
                continue
            self._acknowledge(saga_id, payload, response.created)
            self.by_replica[replica.name] = self.by_replica.get(replica.name, 0) + 1
            return replica.name

    def _acknowledge(self, saga_id: str, payload: bytes, created: bool) -> None:
        self.acknowledged[saga_id] = payload
        entry = {
            "kind": "ack",
            "saga_id": saga_id,
            "input_sha256": input_digest(payload),
            "created": created,
        }
        with self.log.open("a") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()


# --- the shared database, looked at from outside -------------------------------------------------


class Database:
    """Plain queries on the replicas' database, for what a test measures (who holds what)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=2
        ) as connection:
            cursor = await connection.execute(query.encode(), params)
            return await cursor.fetchall()

    async def held_by(self, replica: str) -> set[str]:
        """The unfinished sagas ``replica`` holds."""
        rows = await self._rows(
            "SELECT saga_id FROM sagas WHERE owner = %s AND state = ANY(%s)",
            (replica, list(UNFINISHED)),
        )
        return {row[0] for row in rows}

    async def calls_sent_by(self, replica: str) -> set[str]:
        """The sagas ``replica`` holds whose pending call is marked sent (a step RUNNING or
        COMPENSATING): their calls are in flight, or about to be."""
        rows = await self._rows(
            "SELECT DISTINCT s.saga_id FROM sagas AS s JOIN saga_steps AS t"
            " ON t.saga_id = s.saga_id WHERE s.owner = %s AND s.state = ANY(%s)"
            " AND t.state = ANY(%s)",
            (replica, list(UNFINISHED), list(UNFINISHED)),
        )
        return {row[0] for row in rows}

    async def unfinished(self, ids: Sequence[str] | None = None) -> set[str]:
        """Those of ``ids`` (None: all sagas) that have not ended."""
        if ids is None:
            rows = await self._rows(
                "SELECT saga_id FROM sagas WHERE state = ANY(%s)", (list(UNFINISHED),)
            )
        else:
            rows = await self._rows(
                "SELECT saga_id FROM sagas WHERE saga_id = ANY(%s) AND state = ANY(%s)",
                (list(ids), list(UNFINISHED)),
            )
        return {row[0] for row in rows}

    async def owners(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Who holds each of ``ids`` now (None: nobody)."""
        rows = await self._rows(
            "SELECT saga_id, owner FROM sagas WHERE saga_id = ANY(%s)", (list(ids),)
        )
        return {row[0]: row[1] for row in rows}

    async def holds_none(self, replica: str) -> bool:
        """Whether ``replica`` holds no unfinished saga (any more)."""
        return not await self.held_by(replica)

    async def sends_calls(self, replica: str) -> bool:
        """Whether ``replica`` holds sagas with a call in flight."""
        return bool(await self.calls_sent_by(replica))

    async def ended(self, ids: Sequence[str]) -> bool:
        """Whether every one of ``ids`` has ended (or parked)."""
        return not await self.unfinished(ids)

    async def endings(self) -> dict[str, tuple[str, bytes]]:
        """Every saga's state and input."""
        rows = await self._rows("SELECT saga_id, state, input FROM sagas")
        return {row[0]: (row[1], bytes(row[2])) for row in rows}


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str = "the condition",
    interval: float = 0.05,
) -> float:
    """Poll the async ``condition`` until it is true; the monotonic time it was seen true."""
    ends = time.monotonic() + timeout
    while True:
        if await condition():
            return time.monotonic()
        if time.monotonic() > ends:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        await asyncio.sleep(interval)


# --- what the run left ------------------------------------------------------------------------


async def check_replicas_run(
    database: str, client_log: Path, participant_dirs: Mapping[str, Path]
) -> CheckReport:
    """The torture checker on what the replicas left (read once they have stopped): every
    acknowledged saga stored with its input and ended, every event log folding legally into
    its row, each step's effect at most once with compensations matching, every stored answer
    given by a participant."""
    return await asyncio.to_thread(check_run, database, client_log, participant_dirs)


def problems(report: CheckReport) -> str:
    """The broken promises of a report, with examples, for an assertion's message."""
    lines = [f"{name}: {count}" for name, count in report.figures.items() if count]
    for name, examples in report.examples.items():
        lines += [f"  {name}: {example}" for example in examples]
    return "\n".join(lines) or "none"


def deliveries(directory: Path, saga_id: str) -> list[tuple[str, str, str]]:
    """(operation, step, answer) of every call a participant received for the saga, in order,
    from its delivery ledger."""
    with contextlib.closing(read_only(directory / "ledger.db")) as ledger:
        rows = ledger.execute(
            "SELECT operation, step, coalesce(answer, '') FROM deliveries WHERE saga_id = ?"
            " ORDER BY id",
            (saga_id,),
        ).fetchall()
    return [(str(operation), str(step), str(answer)) for operation, step, answer in rows]


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-3000:]
    return "(no log)"
