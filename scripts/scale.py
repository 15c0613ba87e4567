"""Scale checks against a real coordinator process: figures printed, no timing asserted.

    python scripts/scale.py                              # all three parts, full size (make scale)
    python scripts/scale.py --only flat --sagas 20000    # one part, smaller
    python scripts/scale.py --only startup --store-gb 0.25 --json-out scale.json

flat      N four-step sagas (100,000) through one coordinator on a fresh SQLite file
          (synchronous FULL), closed loop at concurrency 64 (create, then wait for the ending):
          the coordinator's VmRSS and VmHWM after 10%, 50% and 100% of them, and the sagas/s
          of each segment.
recovery  N sagas (10,000) in flight at once, each held at its second step by the participant;
          then SIGKILL the coordinator and restart it with participants that answer at once:
          the time until it answers health SERVING, until every held call has been re-sent
          (distinct request ids seen by the participants), and until every saga has ended.
startup   a store of about G GB (1) of finished sagas and a few hundred unfinished ones: the
          median time from ``saga serve`` starting to health SERVING over three starts, with
          the file evicted from the page cache and with it cached; and, as a contrast, how long
          the on-demand integrity check (a scan of the whole file) takes.

The coordinator runs as ``python -m coordinator.cli serve --config FILE``; the participants,
four no-op ``ParticipantService`` servers, run in one process of their own (this script, with
its internal ``_participants`` command). Everything listens on 127.0.0.1 only; every process is
stopped by its pid; the work directory is removed at the end unless ``--keep``. Each part stops
at ``--max-minutes`` and reports what it reached. Exit code 1 when a saga did not succeed or a
part did not finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import grpc.aio
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from coordinator.core.events import CallAnswered, RecordedEvent, Succeeded
from coordinator.core.machine import fold
from coordinator.core.model import SagaDefinition
from coordinator.core.model import SagaState as CoreState
from coordinator.engine import fingerprint
from coordinator.store.sqlite import SqliteStore
from coordinator.store.sqlite_rows import (
    INSERT_EVENT,
    INSERT_SAGA,
    INSERT_STEP,
    Definitions,
    event_row,
    saga_row,
    step_rows,
)
from coordinator.store.sqlite_schema import check_integrity
from coordinator.transport.definition_files import parse_definition
from saga_sdk.client import AsyncSagaClient
from saga_sdk.errors import DeadlineExceeded, Unavailable
from tests.store.strategies import SagaHistory, run_history
from tests.support.processes import free_port
from tests.torture.checker import read_only
from tests.torture.harness import CLIENT_OPTIONS, ROOT
from tests.torture.processes import ManagedProcess, wait_serving

SCRIPT = Path(__file__).resolve()
PARTICIPANTS_COMMAND = "_participants"
PARTICIPANTS = ("p0", "p1", "p2", "p3")
DEFINITION_NAME = "scale"
DEFINITION: dict[str, Any] = {
    "name": DEFINITION_NAME,
    "version": 1,
    "retry": {"max_attempts": 5, "initial_backoff": "100ms", "max_backoff": "2s"},
    "steps": [
        {
            "name": f"step-{name}",
            "participant": name,
            "action": "Do",
            "compensation": "Undo",
            # Long enough for a call queued behind 10,000 others, or held, never to time out.
            "timeout": "600s",
        }
        for name in PARTICIPANTS
    ],
}
HELD_STEP = "step-p1"
"""The step whose Execute the recovery part holds: the second one."""
HELD_INDEX = 1
OUTPUT = b'{"ok":true}'
UNFINISHED = ("RUNNING", "COMPENSATING")
MB = 1024 * 1024

# What the stored sagas of the start-up part carry: a realistic input and step outputs.
STORE_INPUT = json.dumps(
    {
        "customer": "c-0001234567",
        "company": "Acme Corporation International",
        "plan": "enterprise",
        "seats": 250,
        "billing": {"currency": "EUR", "country": "DE", "vat": "DE123456789"},
        "contact": {"name": "Ada Lovelace", "email": "ada.lovelace@example.com"},
        "notes": "onboarded through the partner portal",
    }
).encode()
STORE_OUTPUTS = [
    json.dumps(
        {"id": f"{name}-7f3a9c2e41", "status": "done", "at": "2025-03-01T12:00:00Z"}
    ).encode()
    for name in PARTICIPANTS
]
TRACE_CONTEXT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def say(line: str = "") -> None:
    print(line, flush=True)


# --- the participants' process ---------------------------------------------------------------


@dataclass
class Tally:
    """What one participant saw."""

    execute: int = 0
    compensate: int = 0
    held: list[str] = field(default_factory=list)
    """Request ids of the Executes held (never answered)."""
    first_seen: dict[str, float] = field(default_factory=dict)
    """Execute request id -> wall-clock time first received (``--record`` only)."""

    def to_json(self) -> dict[str, Any]:
        seen = self.first_seen.values()
        return {
            "execute": self.execute,
            "compensate": self.compensate,
            "held": self.held,
            "distinct_executes": len(self.first_seen),
            "first_execute_at": min(seen, default=None),
            "last_new_execute_at": max(seen, default=None),
            "execute_ids": sorted(self.first_seen),
        }


class NoOpParticipant(pb_grpc.ParticipantServiceServicer):
    """Answers at once, except the Executes of ``hold_step``, which it never answers."""

    def __init__(self, tally: Tally, hold_step: str | None, record: bool) -> None:
        self._tally = tally
        self._hold_step = hold_step
        self._record = record

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        tally = self._tally
        tally.execute += 1
        if self._record and request.request_id not in tally.first_seen:
            tally.first_seen[request.request_id] = time.time()
        if request.step == self._hold_step:
            tally.held.append(request.request_id)
            await asyncio.Event().wait()  # until the caller goes away or the server stops
        return pb.ExecuteResponse(output=OUTPUT)

    async def Compensate(
        self, request: pb.CompensateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompensateResponse:
        self._tally.compensate += 1
        return pb.CompensateResponse()


async def serve_participants(
    ports: Sequence[int], hold_step: str | None, record: bool, report: Path
) -> None:
    """Serve the four participants until SIGTERM, then write what each saw to ``report``."""
    tallies = {name: Tally() for name in PARTICIPANTS}
    servers: list[grpc.aio.Server] = []
    for name, port in zip(PARTICIPANTS, ports, strict=True):
        server = grpc.aio.server()
        pb_grpc.add_ParticipantServiceServicer_to_server(
            NoOpParticipant(tallies[name], hold_step, record), server
        )
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
            raise SystemExit(f"participant {name}: cannot listen on 127.0.0.1:{port}")
        await server.start()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        servers.append(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(server.stop(0) for server in servers))
    seen = json.dumps({name: tally.to_json() for name, tally in tallies.items()})
    await asyncio.to_thread(report.write_text, seen)


def participants_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"scale.py {PARTICIPANTS_COMMAND}")
    parser.add_argument("--ports", required=True, help="four ports, comma-separated")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--hold-step", help="never answer the Executes of this step")
    parser.add_argument("--record", action="store_true", help="record every Execute request id")
    args = parser.parse_args(argv)
    ports = [int(port) for port in args.ports.split(",")]
    asyncio.run(serve_participants(ports, args.hold_step, args.record, args.report))
    return 0


# --- processes and readings ------------------------------------------------------------------


class Participants:
    """The participants' process, on fixed ports so that a second one can take over."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = {name: free_port() for name in PARTICIPANTS}
        self.process: ManagedProcess | None = None
        self.report_file: Path | None = None

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}

    async def start(
        self, label: str, *, hold_step: str | None = None, record: bool = False
    ) -> None:
        assert self.process is None or not self.process.alive
        self.report_file = self.work / f"participants-{label}.json"
        argv = [
            str(SCRIPT),
            PARTICIPANTS_COMMAND,
            "--ports",
            ",".join(str(self.ports[name]) for name in PARTICIPANTS),
            "--report",
            str(self.report_file),
            *(["--hold-step", hold_step] if hold_step else []),
            *(["--record"] if record else []),
        ]
        self.process = ManagedProcess(
            f"participants-{label}", argv, self.work / f"participants-{label}.log", cwd=ROOT
        )
        self.process.spawn()
        for name, address in self.addresses.items():
            if not await wait_serving(self.process, address, 30):
                raise RuntimeError(f"participant {name} did not start; see {self.process.log}")

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, then what each participant saw."""
        assert self.process is not None
        assert self.report_file is not None
        await self.process.terminate(30)
        if not self.report_file.exists():
            return {}
        seen: dict[str, Any] = json.loads(self.report_file.read_text())
        return seen

    def kill(self) -> None:
        if self.process is not None and self.process.alive:
            self.process.kill()


class Coordinator:
    """``saga serve`` on a configuration file written here, restartable on the same port."""

    def __init__(
        self, work: Path, database: Path, participants: Participants, **extra: Any
    ) -> None:
        self.port = free_port()
        definitions = work / "definitions"
        definitions.mkdir(parents=True, exist_ok=True)
        (definitions / f"{DEFINITION_NAME}.yaml").write_text(yaml.safe_dump(DEFINITION))
        config = work / "saga.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": f"sqlite:///{database}",
                    "listen": self.target,
                    "definitions": "definitions",
                    "participants": participants.addresses,
                    "synchronous": "FULL",
                    "log_level": "WARNING",
                    **extra,
                }
            )
        )
        self.database = database
        self.process = ManagedProcess(
            "coordinator",
            ["-m", "coordinator.cli", "serve", "--config", str(config)],
            work / "coordinator.log",
            cwd=ROOT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None
        return pid

    async def start(self, timeout: float = 300.0) -> float:
        """Start it; the seconds from just before the process starts until health SERVING."""
        began = time.monotonic()
        self.process.spawn()
        if not await wait_serving(self.process, self.target, timeout):
            raise RuntimeError(f"the coordinator did not serve; see {self.process.log}")
        return time.monotonic() - began

    async def stop(self) -> int | None:
        return await self.process.terminate(60)

    def kill(self) -> None:
        if self.process.alive:
            self.process.kill()


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MB), CPU seconds so far and open file descriptors of ``pid``."""
    found = {"rss_mb": 0.0, "hwm_mb": 0.0}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                found["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                found["hwm_mb"] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    found["cpu_s"] = (int(fields[11]) + int(fields[12])) / ticks
    found["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    return found


def query(database: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query of the coordinator's store (it keeps writing meanwhile)."""
    with contextlib.closing(read_only(database)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        return db.execute(sql, params).fetchall()


def states(database: Path) -> dict[str, int]:
    return {str(state): int(n) for state, n in query(database, _COUNT_STATES)}


_COUNT_STATES = "SELECT state, count(*) FROM sagas GROUP BY state"


def unsettled(counts: dict[str, int]) -> int:
    return sum(counts.get(state, 0) for state in UNFINISHED)


def file_size(path: Path) -> int:
    """Bytes of a SQLite file and its WAL."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


async def create(client: AsyncSagaClient, saga_id: str, payload: object) -> int:
    """Create a saga, retrying what may pass (the id makes a retry the same request); the
    number of retries."""
    retries = 0
    while True:
        try:
            await client.create(DEFINITION_NAME, payload, saga_id=saga_id)
            return retries
        except (Unavailable, DeadlineExceeded):
            retries += 1
            await asyncio.sleep(0.1)


async def poll(check: Callable[[], Awaitable[bool]], deadline: float, every: float = 0.25) -> bool:
    """Call ``check`` until it is true (True) or the deadline passes (False)."""
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every)
    return False


# --- part 1: many sagas, memory flat ---------------------------------------------------------


async def part_flat(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    total: int = args.sagas
    concurrency: int = args.concurrency
    say(
        f"flat: {total:,} four-step sagas through one coordinator, {concurrency} at a time "
        f"(create, then wait), SQLite synchronous=FULL, no-op participants in their own process"
    )
    deadline = time.monotonic() + args.max_minutes * 60
    marks = sorted({max(1, math.ceil(total * share / 10)) for share in range(1, 11)})
    checkpoints = [max(1, math.ceil(total * share)) for share in (0.1, 0.5, 1.0)]
    result: dict[str, Any] = {
        "sagas": total,
        "concurrency": concurrency,
        "load_start": load_average(),
    }
    participants = Participants(work)
    database = work / "saga.db"
    coordinator = Coordinator(work, database, participants)
    readings: list[dict[str, Any]] = []
    outcomes: dict[str, int] = {}
    retries = 0
    try:
        await participants.start("flat")
        result["start_to_serving_s"] = round(await coordinator.start(), 3)
        idle = memory(coordinator.pid)
        result["idle"] = idle
        say(
            f"  idle after start:   VmRSS {idle['rss_mb']:6.1f} MB   VmHWM {idle['hwm_mb']:6.1f} MB"
        )
        began = time.monotonic()
        last = {"done": 0, "at": began, "cpu_s": idle["cpu_s"]}
        done = 0
        next_index = 0

        def reading() -> None:
            now = time.monotonic()
            found = memory(coordinator.pid)
            segment = (done - last["done"]) / max(now - last["at"], 1e-9)
            cpu = (found["cpu_s"] - last["cpu_s"]) / max(now - last["at"], 1e-9)
            entry = {
                "sagas": done,
                "elapsed_s": round(now - began, 2),
                **{key: round(value, 2) for key, value in found.items()},
                "segment_sagas_per_s": round(segment, 1),
                "segment_coordinator_cpu": round(cpu, 2),
                "store_mb": round(file_size(database) / MB, 1),
            }
            readings.append(entry)
            last.update(done=done, at=now, cpu_s=found["cpu_s"])
            say(
                f"  {done:>9,} sagas  {now - began:7.1f}s  VmRSS {found['rss_mb']:6.1f} MB  "
                f"VmHWM {found['hwm_mb']:6.1f} MB  {segment:7.1f} sagas/s  "
                f"coordinator CPU {cpu:4.2f} cores  store {entry['store_mb']} MB"
            )

        async with AsyncSagaClient(coordinator.target, options=CLIENT_OPTIONS) as client:

            async def worker() -> None:
                nonlocal done, next_index, retries
                while next_index < total and time.monotonic() < deadline:
                    index = next_index
                    next_index += 1
                    saga_id = f"flat-{index}"
                    retries += await create(client, saga_id, {"n": index})
                    saga = await client.wait(saga_id, timeout=600)
                    outcomes[saga.state.value] = outcomes.get(saga.state.value, 0) + 1
                    done += 1
                    if done in marks:
                        reading()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
        result.update(
            done=done,
            elapsed_s=round(elapsed, 1),
            sagas_per_s=round(done / max(elapsed, 1e-9), 1),
            outcomes=outcomes,
            create_retries=retries,
            readings=readings,
            store_mb=round(file_size(database) / MB, 1),
        )
        result["checkpoints"] = [r for r in readings if r["sagas"] in checkpoints]
        result["coordinator_exit_code"] = await coordinator.stop()
        result["participants"] = {
            name: {key: seen[key] for key in ("execute", "compensate")}
            for name, seen in (await participants.stop()).items()
        }
    finally:
        coordinator.kill()
        participants.kill()
    result["load_end"] = load_average()
    problems = []
    if result.get("done") != total:
        problems.append(f"only {result.get('done', 0):,} of {total:,} sagas ran in the time cap")
    if outcomes.get("SUCCEEDED", 0) != result.get("done"):
        problems.append(f"not every saga succeeded: {outcomes}")
    result["problems"] = problems
    return result


def print_flat(result: dict[str, Any]) -> None:
    say("  memory and throughput at the checkpoints:")
    previous = 0
    for entry in result.get("checkpoints", []):
        say(
            f"    after {entry['sagas']:>9,} sagas: VmRSS {entry['rss_mb']:6.1f} MB, "
            f"VmHWM {entry['hwm_mb']:6.1f} MB; sagas {previous:,}-{entry['sagas']:,} at "
            f"{_segment_rate(result, previous, entry):.1f} sagas/s"
        )
        previous = entry["sagas"]
    if "sagas_per_s" in result:
        say(
            f"  overall {result['sagas_per_s']} sagas/s over {result['elapsed_s']}s; outcomes "
            f"{result['outcomes']}; CreateSaga retries {result['create_retries']}; store "
            f"{result['store_mb']} MB; exit code on SIGTERM {result['coordinator_exit_code']}"
        )


def _segment_rate(result: dict[str, Any], since: int, entry: dict[str, Any]) -> float:
    """Sagas/s from the reading at ``since`` sagas (0: the start) to ``entry``."""
    start = 0.0
    for reading in result["readings"]:
        if reading["sagas"] == since:
            start = reading["elapsed_s"]
    return (int(entry["sagas"]) - since) / max(float(entry["elapsed_s"]) - start, 1e-9)


# --- part 2: recovery of many sagas in flight ------------------------------------------------


async def part_recovery(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    total: int = args.in_flight
    say(
        f"recovery: {total:,} sagas in flight, each held at {HELD_STEP} (its Execute never "
        f"answered); SIGKILL the coordinator, restart it with participants that answer at once"
    )
    deadline = time.monotonic() + args.max_minutes * 60
    result: dict[str, Any] = {"in_flight": total, "load_start": load_average()}
    participants = Participants(work)
    database = work / "saga.db"
    coordinator = Coordinator(work, database, participants)
    problems: list[str] = []
    result["problems"] = problems
    try:
        await participants.start("holding", hold_step=HELD_STEP)
        await coordinator.start()
        began = time.monotonic()
        async with AsyncSagaClient(coordinator.target, options=CLIENT_OPTIONS) as client:
            slots = asyncio.Semaphore(128)

            async def submit(index: int) -> int:
                async with slots:
                    return await create(client, f"held-{index}", {"n": index})

            retries = await asyncio.gather(*(submit(i) for i in range(total)))
        result["submit_s"] = round(time.monotonic() - began, 2)
        result["create_retries"] = sum(retries)
        say(f"  {total:,} sagas created in {result['submit_s']}s")

        held_sql = "SELECT count(*) FROM saga_steps WHERE step = ? AND state = 'RUNNING'"

        async def all_held() -> bool:
            rows = await asyncio.to_thread(query, database, held_sql, (HELD_INDEX,))
            return int(rows[0][0]) == total

        if not await poll(all_held, deadline, 0.5):
            problems.append(f"not all {total:,} sagas reached {HELD_STEP} in the time cap")
            return result
        result["until_all_waiting_s"] = round(time.monotonic() - began, 2)
        before = memory(coordinator.pid)
        result["before_kill"] = before
        say(
            f"  all {total:,} stored and waiting on {HELD_STEP} after "
            f"{result['until_all_waiting_s']}s; coordinator VmRSS {before['rss_mb']:.1f} MB, "
            f"VmHWM {before['hwm_mb']:.1f} MB, {before['fds']:.0f} fds"
        )
        killed_pid = coordinator.pid
        coordinator.kill()
        say(f"  SIGKILL coordinator pid {killed_pid}")
        holding = await participants.stop()
        held = holding.get("p1", {}).get("held", [])
        result["held_calls_before_kill"] = len(held)
        await participants.start("answering", record=True)

        restarted_at = time.time()
        result["restart_to_serving_s"] = round(await coordinator.start(), 3)
        say(f"  restarted: health SERVING after {result['restart_to_serving_s']}s")
        result["after_restart"] = memory(coordinator.pid)

        async def all_ended() -> bool:
            counts = await asyncio.to_thread(states, database)
            result["states"] = counts
            return unsettled(counts) == 0 and sum(counts.values()) == total

        ended = await poll(all_ended, deadline)
        result["after_all_ended"] = memory(coordinator.pid)
        ((last_end, succeeded),) = await asyncio.to_thread(
            query, database, "SELECT max(ended_at), count(*) FROM sagas WHERE state = 'SUCCEEDED'"
        )
        result["succeeded"] = succeeded
        if ended and last_end is not None:
            result["restart_to_all_ended_s"] = round(last_end / 1e6 - restarted_at, 3)
        result["coordinator_exit_code"] = await coordinator.stop()
        answering = await participants.stop()
        resent = answering.get("p1", {})
        result["resent_distinct"] = resent.get("distinct_executes", 0)
        if resent.get("first_execute_at") is not None:
            result["restart_to_first_resend_s"] = round(
                resent["first_execute_at"] - restarted_at, 3
            )
        if result["resent_distinct"] == total:
            result["restart_to_all_resent_s"] = round(
                resent["last_new_execute_at"] - restarted_at, 3
            )
        ids = set(resent.get("execute_ids", []))
        result["held_ids_resent_identical"] = sum(1 for rid in set(held) if rid in ids)
        result["participants_after_restart"] = {
            name: {key: seen[key] for key in ("execute", "distinct_executes")}
            for name, seen in answering.items()
        }
        if not ended:
            problems.append(f"not every saga ended in the time cap: {result.get('states')}")
        if succeeded != total:
            problems.append(f"{total - succeeded:,} sagas did not succeed: {result.get('states')}")
        if result["resent_distinct"] != total:
            problems.append(
                f"{result['resent_distinct']:,} distinct {HELD_STEP} Executes re-sent, "
                f"not {total:,}"
            )
        if result["held_ids_resent_identical"] != len(set(held)):
            problems.append("a held call was re-sent under another request id")
    finally:
        coordinator.kill()
        participants.kill()
        result["load_end"] = load_average()
    return result


def print_recovery(result: dict[str, Any]) -> None:
    total = result["in_flight"]
    rows = [
        ("restart to health SERVING", result.get("restart_to_serving_s")),
        ("restart to the first re-sent call", result.get("restart_to_first_resend_s")),
        (f"restart to all {total:,} re-sent", result.get("restart_to_all_resent_s")),
        (f"restart to all {total:,} ended", result.get("restart_to_all_ended_s")),
    ]
    for label, value in rows:
        say(f"    {label:<36} {'-' if value is None else f'{value:.3f}s'}")
    if "resent_distinct" in result:
        say(
            f"  distinct {HELD_STEP} request ids re-sent: {result['resent_distinct']:,}; of the "
            f"{result['held_calls_before_kill']} held at the kill, re-sent with the same id: "
            f"{result['held_ids_resent_identical']}; SUCCEEDED {result['succeeded']:,}"
        )
        after = result["after_all_ended"]
        say(
            f"  coordinator after the restart: VmRSS {after['rss_mb']:.1f} MB, VmHWM "
            f"{after['hwm_mb']:.1f} MB once all ended"
        )


# --- part 3: start-up on a large store -------------------------------------------------------


def scale_definition() -> SagaDefinition:
    """The definition as the coordinator reads it from its file."""
    return parse_definition(DEFINITION, f"{DEFINITION_NAME}.yaml", PARTICIPANTS)


def history(saga_id: str, definition: SagaDefinition, steps_done: int, at: datetime) -> SagaHistory:
    """A saga driven by the real core: created at ``at``, its first ``steps_done`` steps OK."""
    return run_history(
        saga_id,
        [Succeeded(output) for output in STORE_OUTPUTS[:steps_done]],
        definition=definition,
        at=at,
        step=timedelta(milliseconds=7),
        input=STORE_INPUT,
        trace_context=TRACE_CONTEXT,
    )


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def rows_of(saga_history: SagaHistory, definition_id: int) -> Rows:
    """What the store writes for this saga and its whole log, as the row helpers make them."""
    saga = saga_history.last
    return (
        [saga_row(saga, definition_id, fingerprint(DEFINITION_NAME, 0, STORE_INPUT))],
        step_rows(saga),
        [event_row(event) for event in saga_history.log],
    )


class Cloner:
    """Rows of one finished saga, cloned under new ids and shifted in time."""

    def __init__(self, template: SagaHistory, definition_id: int) -> None:
        self.template = template
        self.saga, self.steps, _ = rows_of(template, definition_id)

    def rows(self, saga_id: str, shift: timedelta) -> Rows:
        micros = shift // timedelta(microseconds=1)

        def moved(value: int | None) -> int | None:
            return None if value is None else value + micros

        (saga,) = self.saga
        sagas = [(saga_id, *saga[1:3], *(moved(v) for v in saga[3:6]), *saga[6:])]
        steps = [
            (saga_id, *step[1:7], *(moved(v) for v in step[7:10]), *step[10:])
            for step in self.steps
        ]
        events = []
        for recorded in self.template.log:
            event = recorded.event
            if isinstance(event, CallAnswered) and event.sent_at is not None:
                event = dataclasses.replace(event, sent_at=event.sent_at + shift)
            events.append(
                event_row(
                    RecordedEvent(saga_id, recorded.sequence, recorded.recorded_at + shift, event)
                )
            )
        return sagas, steps, events


def insert(db: sqlite3.Connection, rows: Rows) -> None:
    sagas, steps, events = rows
    db.executemany(INSERT_SAGA, sagas)
    db.executemany(INSERT_STEP, steps)
    db.executemany(INSERT_EVENT, events)


def connect_for_bulk(database: Path) -> sqlite3.Connection:
    db = sqlite3.connect(database, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")  # rebuilt from scratch if the machine stops
    db.execute("PRAGMA cache_size = -262144")  # 256 MB
    return db


def store_definition(db: sqlite3.Connection, definition: SagaDefinition) -> int:
    db.execute("BEGIN IMMEDIATE")
    definition_id = Definitions().store(db, definition)
    db.execute("COMMIT")
    return definition_id


def build_store(database: Path, target_bytes: int, deadline: float, batch: int) -> dict[str, Any]:
    """Fill ``database`` (created and migrated) with finished sagas up to ``target_bytes``."""
    definition = scale_definition()
    begin = datetime.now(UTC) - timedelta(days=60)
    template = history("template", definition, len(PARTICIPANTS), begin)
    assert template.last.state is CoreState.SUCCEEDED
    began = time.monotonic()
    count = 0
    samples: list[str] = []
    with contextlib.closing(connect_for_bulk(database)) as db:
        cloner = Cloner(template, store_definition(db, definition))
        # The main file only: each commit's automatic checkpoint has copied the WAL into it.
        while database.stat().st_size < target_bytes and time.monotonic() < deadline:
            db.execute("BEGIN IMMEDIATE")
            for _ in range(batch):
                saga_id = uuid.uuid4().hex
                # One saga every two seconds: a million of them span about 23 days.
                insert(db, cloner.rows(saga_id, timedelta(seconds=2 * count)))
                count += 1
                if count == 1 or count % 100_000 == 0:
                    samples.append(saga_id)
            db.execute("COMMIT")
            if count // batch % 10 == 0:
                say(f"  ... {count:,} sagas, {database.stat().st_size / MB:,.0f} MB")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        "finished_sagas": count,
        "events_per_saga": len(template.log),
        "build_s": round(time.monotonic() - began, 1),
        "sample_ids": samples,
    }


def add_unfinished(database: Path, count: int, label: str) -> list[str]:
    """Store ``count`` sagas RUNNING at their second step, as a crash would leave them."""
    definition = scale_definition()
    now = datetime.now(UTC)
    ids = [f"unfinished-{label}-{index}" for index in range(count)]
    with contextlib.closing(connect_for_bulk(database)) as db:
        definition_id = store_definition(db, definition)
        db.execute("BEGIN IMMEDIATE")
        for saga_id in ids:
            saga_history = history(saga_id, definition, 1, now - timedelta(seconds=1))
            assert saga_history.last.state is CoreState.RUNNING
            insert(db, rows_of(saga_history, definition_id))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ids


async def replays(database: Path, saga_ids: Sequence[str]) -> bool:
    """Whether these stored sagas read back through the store and replay to their own rows."""
    store = await SqliteStore.open(database)
    try:
        for saga_id in saga_ids:
            saga = await store.get(saga_id)
            events = await store.events(saga_id)
            if saga is None or fold((e.event, e.recorded_at) for e in events) != saga:
                return False
        return True
    finally:
        await store.close()


def evict(database: Path) -> None:
    """Drop this file's pages (and its WAL's) from the page cache: the next read is cold."""
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def timed_starts(
    coordinator: Coordinator, runs: int, unfinished: int, label: str, cold: bool, deadline: float
) -> list[dict[str, float]]:
    """Start the coordinator ``runs`` times, each with ``unfinished`` sagas to resume."""
    found = []
    for run in range(runs):
        if time.monotonic() > deadline:
            break
        await asyncio.to_thread(add_unfinished, coordinator.database, unfinished, f"{label}{run}")
        if cold:
            await asyncio.to_thread(evict, coordinator.database)
        serving = await coordinator.start()
        began = time.monotonic() - serving
        rss = memory(coordinator.pid)

        async def resumed() -> bool:
            counts = await asyncio.to_thread(
                query, coordinator.database, _COUNT_UNFINISHED, UNFINISHED
            )
            return int(counts[0][0]) == 0

        ended = await poll(resumed, deadline, 0.05)
        entry = {
            "to_serving_s": round(serving, 3),
            "to_resumed_ended_s": round(time.monotonic() - began, 3) if ended else -1.0,
            "rss_mb": round(rss["rss_mb"], 1),
        }
        await coordinator.stop()
        found.append(entry)
        say(
            f"  {label} start {run + 1}: health SERVING after {entry['to_serving_s']:.3f}s, "
            f"its {unfinished} unfinished sagas ended after {entry['to_resumed_ended_s']:.3f}s, "
            f"VmRSS {entry['rss_mb']} MB"
        )
    return found


_COUNT_UNFINISHED = "SELECT count(*) FROM sagas WHERE state IN (?, ?)"


def median_of(runs: list[dict[str, float]], key: str) -> float | None:
    return round(statistics.median(run[key] for run in runs), 3) if runs else None


async def part_startup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    target = int(args.store_gb * 1024 * MB)
    say(
        f"startup: a store of {target / MB:,.0f} MB of finished sagas plus {args.unfinished} "
        f"unfinished ones per start; time from process start to health SERVING, "
        f"{args.starts} starts each cold (file evicted from the page cache) and warm"
    )
    deadline = time.monotonic() + args.max_minutes * 60
    result: dict[str, Any] = {
        "target_gb": args.store_gb,
        "unfinished_per_start": args.unfinished,
        "load_start": load_average(),
    }
    problems: list[str] = []
    result["problems"] = problems
    participants = Participants(work)
    baseline_dir = work / "baseline"
    baseline_dir.mkdir()
    baseline = Coordinator(baseline_dir, baseline_dir / "saga.db", participants)
    big_dir = work / "big"
    big_dir.mkdir()
    database = big_dir / "saga.db"
    coordinator = Coordinator(big_dir, database, participants)
    try:
        store = await SqliteStore.open(database)
        await store.close()
        built = await asyncio.to_thread(build_store, database, target, deadline, args.batch)
        result.update(built)
        result["file_bytes"] = database.stat().st_size
        result["file_mb"] = round(result["file_bytes"] / MB, 1)
        say(
            f"  built {built['finished_sagas']:,} finished sagas ({built['events_per_saga']} "
            f"events each) in {built['build_s']}s: {result['file_mb']:,} MB"
        )
        if result["file_bytes"] < target:
            problems.append(f"the store reached {result['file_mb']} MB only, in the time cap")
        result["clones_replay"] = await replays(database, built["sample_ids"])
        if not result["clones_replay"]:
            problems.append("a cloned saga does not replay to its stored row")
        await participants.start("startup")
        store = await SqliteStore.open(baseline_dir / "saga.db")
        await store.close()
        runs = args.starts
        result["empty_store_runs"] = await timed_starts(
            baseline, runs, args.unfinished, "empty store", False, deadline
        )
        result["cold_runs"] = await timed_starts(
            coordinator, runs, args.unfinished, f"{args.store_gb:g} GB cold", True, deadline
        )
        result["warm_runs"] = await timed_starts(
            coordinator, runs, args.unfinished, f"{args.store_gb:g} GB warm", False, deadline
        )
        for kind in ("empty_store", "cold", "warm"):
            result[f"{kind}_median_to_serving_s"] = median_of(
                result[f"{kind}_runs"], "to_serving_s"
            )
        result["file_bytes_after"] = database.stat().st_size
        for temperature in ("cold", "warm"):
            if temperature == "cold":
                await asyncio.to_thread(evict, database)
            began = time.monotonic()
            found = await asyncio.to_thread(check_integrity, database)
            seconds = round(time.monotonic() - began, 2)
            result[f"integrity_check_{temperature}_s"] = seconds
            result["integrity_problems"] = found[:10]
            say(
                f"  check_integrity ({temperature}): {seconds}s, {'ok' if not found else found[:3]}"
            )
        if result["integrity_problems"]:
            problems.append(f"check_integrity found problems: {result['integrity_problems']}")
        await participants.stop()
    finally:
        coordinator.kill()
        baseline.kill()
        participants.kill()
        result["load_end"] = load_average()
    if any(
        run["to_resumed_ended_s"] < 0 for kind in ("cold", "warm") for run in result[f"{kind}_runs"]
    ):
        problems.append("the resumed sagas did not all end in the time cap")
    return result


def print_startup(result: dict[str, Any]) -> None:
    if "file_mb" not in result:
        return
    say(
        f"  store file: {result['file_bytes']:,} bytes ({result['file_mb']:,} MB), "
        f"{result['finished_sagas']:,} finished sagas; clones replay: {result['clones_replay']}"
    )
    for kind, label in (
        ("empty_store", "empty store"),
        ("cold", f"{result['target_gb']:g} GB store, cold cache"),
        ("warm", f"{result['target_gb']:g} GB store, warm cache"),
    ):
        runs = result.get(f"{kind}_runs", [])
        each = ", ".join(f"{run['to_serving_s']:.3f}" for run in runs)
        median = result.get(f"{kind}_median_to_serving_s")
        say(f"    start to SERVING, {label:<26} median {median}s ({each})")
    if "integrity_check_cold_s" in result:
        say(
            f"    check_integrity (whole file)                 {result['integrity_check_cold_s']}s "
            f"cold, {result['integrity_check_warm_s']}s warm"
        )


# --- the command -----------------------------------------------------------------------------

PARTS: dict[str, tuple[Callable[[argparse.Namespace, Path], Awaitable[dict[str, Any]]], Any]] = {
    "flat": (part_flat, print_flat),
    "recovery": (part_recovery, print_recovery),
    "startup": (part_startup, print_startup),
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scale.py",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run this part")
    parser.add_argument("--sagas", type=int, default=100_000, help="flat: sagas in all")
    parser.add_argument("--concurrency", type=int, default=64, help="flat: sagas at a time")
    parser.add_argument("--in-flight", type=int, default=10_000, help="recovery: sagas held")
    parser.add_argument("--store-gb", type=float, default=1.0, help="startup: store size")
    parser.add_argument(
        "--unfinished", type=int, default=300, help="startup: RUNNING sagas to resume per start"
    )
    parser.add_argument("--starts", type=int, default=3, help="startup: timed starts of each kind")
    parser.add_argument(
        "--batch", type=int, default=20_000, help="startup: sagas per bulk transaction"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=60.0, help="time cap of each part (default 60)"
    )
    parser.add_argument("--json-out", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def coordinator_logs(work: Path) -> list[str]:
    """What the coordinators of a part logged (warnings and errors), start lines aside."""
    usual = ("--- start ", "saga coordinator listening on ")
    lines = []
    for log in sorted(work.rglob("coordinator.log")):
        text = log.read_text(errors="replace")
        lines += [line for line in text.splitlines() if not line.startswith(usual)]
    return lines


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"environment": environment(), "parts": {}}
    say(
        f"scale checks on {os.cpu_count()} cores, SQLite {sqlite3.sqlite_version}; "
        f"load average {load_average()}; files in {work}"
    )
    for name in args.only or list(PARTS):
        measure, show = PARTS[name]
        say()
        began = time.monotonic()
        part_dir = work / name
        part_dir.mkdir()
        try:
            result = await measure(args, part_dir)
        except Exception as error:  # one broken part does not lose the others' figures
            result = {"problems": [f"{type(error).__name__}: {error}"]}
        result["part_s"] = round(time.monotonic() - began, 1)
        logged = coordinator_logs(part_dir)
        result["coordinator_log_lines"] = len(logged)
        result["coordinator_log_head"] = logged[:20]
        report["parts"][name] = result
        show(result)
        say(
            f"  {name}: {result['part_s']}s; load average {result.get('load_start')} at the "
            f"start, {result.get('load_end')} at the end"
        )
        say(f"  coordinator log (warnings and errors): {len(logged)} lines")
        for line in logged[:5]:
            say(f"    | {line[:160]}")
        for problem in result["problems"]:
            say(f"  problem: {problem}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == [PARTICIPANTS_COMMAND]:
        return participants_main(arguments[1:])
    args = parse_args(arguments)
    work = Path(tempfile.mkdtemp(prefix="saga-scale-"))
    try:
        report = asyncio.run(run(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        say(f"figures written to {args.json_out}")
    failed = any(part["problems"] for part in report["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
