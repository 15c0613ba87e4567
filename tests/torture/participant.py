"""A torture participant: a real process serving one participant of the torture definition.

    python -m tests.torture.participant --name p0 --port 50061 --dir DIR --seed 7

It is built from the Python SDK's ``Participant`` with a ``SqliteBarrier``. Every effect is a row
of ``effects`` written in the barrier's transaction (``DIR/barrier.db``); every delivery is a row
of ``deliveries`` in a separate ledger (``DIR/ledger.db``), written in its own autocommit before
the barrier is consulted, and completed with the answer given. It misbehaves as the scenario
says: business rejections and impossible compensations read from the saga's input, and a bounded
number of UNAVAILABLE answers per call, before or after the effect commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from saga_sdk.errors import Rejected
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlite_barrier import SqliteBarrier
from tests.torture.scenario import (
    ACTION,
    COMPENSATION,
    REJECT_REASON,
    STUCK_REASON,
    injected_transient,
)
from tests.torture.tls import TortureTls

EFFECTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    id         INTEGER PRIMARY KEY,
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL,
    request_id TEXT NOT NULL,
    at_ns      INTEGER NOT NULL
)
"""
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id         INTEGER PRIMARY KEY,
    pid        INTEGER NOT NULL,
    operation  TEXT NOT NULL,
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    request_id TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    begin_ns   INTEGER NOT NULL,
    end_ns     INTEGER,
    answer     TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def build_participant(name: str, barrier: SqliteBarrier) -> Participant:
    """The participant's handlers: an effect row each, a "no" or a stuck undo when asked."""
    participant = Participant(name, barrier=barrier)

    def record(tx: sqlite3.Connection, ctx: ExecuteContext | CompensateContext, op: str) -> None:
        tx.execute(
            "INSERT INTO effects (saga_id, step, operation, request_id, at_ns) "
            "VALUES (?, ?, ?, ?, ?)",
            (ctx.saga_id, ctx.step, op, ctx.request_id, time.time_ns()),
        )

    @participant.action(ACTION)
    def do(ctx: ExecuteContext) -> dict[str, str]:
        if isinstance(ctx.input, dict) and ctx.input.get("reject") == ctx.step:
            raise Rejected(REJECT_REASON, f"{name} refuses step {ctx.step}")
        record(ctx.tx, ctx, "execute")
        return {"participant": name, "step": ctx.step}

    @participant.compensation(COMPENSATION)
    def undo(ctx: CompensateContext) -> None:
        if isinstance(ctx.input, dict) and ctx.input.get("stuck") == ctx.step:
            raise Rejected(STUCK_REASON, f"{name} can never undo step {ctx.step}")
        record(ctx.tx, ctx, "compensate")

    return participant


class Ledger:
    """Every delivery, recorded in its own autocommit before anything else happens."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        # A SIGKILL leaves the OS cache to the disk: no fsync needed to survive it.
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.executescript(LEDGER_SCHEMA)
        self._pid = os.getpid()
        self._in_flight = 0
        found = self._db.execute("SELECT value FROM meta WHERE key = 'max_in_flight'").fetchone()
        self._max_in_flight = 0 if found is None else int(found[0])

    def begin(self, operation: str, request: pb.ExecuteRequest | pb.CompensateRequest) -> int:
        self._in_flight += 1
        if self._in_flight > self._max_in_flight:
            self._max_in_flight = self._in_flight
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('max_in_flight', ?)",
                (self._max_in_flight,),
            )
        cursor = self._db.execute(
            "INSERT INTO deliveries (pid, operation, saga_id, step, request_id, attempt, "
            "begin_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                self._pid,
                operation,
                request.saga.removeprefix("sagas/"),
                request.step,
                request.request_id,
                request.attempt,
                time.time_ns(),
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def end(self, row: int, answer: str) -> None:
        self._in_flight -= 1
        self._db.execute(
            "UPDATE deliveries SET end_ns = ?, answer = ? WHERE id = ?",
            (time.time_ns(), answer, row),
        )


class LedgerServicer(pb_grpc.ParticipantServiceServicer):
    """Records each delivery, misbehaves as the scenario says, and lets the SDK answer."""

    def __init__(
        self,
        participant: Participant,
        ledger: Ledger,
        seed: int | None,
        delay: tuple[float, float],
    ) -> None:
        self._participant = participant
        self._ledger = ledger
        self._seed = seed
        self._delay = delay
        self.opened = asyncio.Event()
        """Calls wait for this before they are served (see ``--gate``)."""
        self.opened.set()

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        async def answer(metadata: dict[str, str]) -> bytes | grpc.Status:
            return await self._participant.execute(request, metadata)

        output = await self._serve("execute", request, context, answer)
        return pb.ExecuteResponse(output=output)

    async def Compensate(
        self, request: pb.CompensateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompensateResponse:
        async def answer(metadata: dict[str, str]) -> bytes | grpc.Status:
            return await self._participant.compensate(request, metadata)

        await self._serve("compensate", request, context, answer)
        return pb.CompensateResponse()

    async def _serve(
        self,
        operation: str,
        request: pb.ExecuteRequest | pb.CompensateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        answer: Callable[[dict[str, str]], Awaitable[bytes | grpc.Status]],
    ) -> bytes:
        row = self._ledger.begin(operation, request)
        given = "CANCELLED"
        try:
            await self.opened.wait()
            low, high = self._delay
            if high > 0:
                await asyncio.sleep(low + (high - low) * (row % 97) / 96)
            fault = (
                None
                if self._seed is None
                else injected_transient(self._seed, request.request_id, request.attempt)
            )
            if fault == "before":
                given = "UNAVAILABLE:before"
                await context.abort(grpc.StatusCode.UNAVAILABLE, "torture: unavailable (before)")
            metadata = {
                key: value
                for key, value in context.invocation_metadata() or ()
                if isinstance(value, str)
            }
            result = await answer(metadata)
            if fault == "after":
                given = "UNAVAILABLE:after"
                await context.abort(grpc.StatusCode.UNAVAILABLE, "torture: unavailable (after)")
            if isinstance(result, bytes):
                given = "OK"
                return result
            given = result.code.name
            await context.abort_with_status(result)
            raise AssertionError("abort_with_status returned")
        finally:
            self._ledger.end(row, given)


def prepare(name: str, directory: Path) -> tuple[Participant, Ledger]:
    """The participant and its ledger, their tables created."""
    directory.mkdir(parents=True, exist_ok=True)
    barrier = SqliteBarrier(directory / "barrier.db")
    with contextlib.closing(barrier.connect()) as db:
        db.execute(EFFECTS_SCHEMA)
    return build_participant(name, barrier), Ledger(directory / "ledger.db")


async def serve(
    port: int,
    participant: Participant,
    ledger: Ledger,
    seed: int | None,
    delay: tuple[float, float],
    gate: Path | None = None,
    tls: TortureTls | None = None,
) -> None:
    """Serve until SIGTERM; SIGKILL at any instant is expected and fine."""
    server = grpc.aio.server()
    servicer = LedgerServicer(participant, ledger, seed, delay)
    pb_grpc.add_ParticipantServiceServicer_to_server(servicer, server)
    watching: asyncio.Task[None] | None = None
    if gate is not None:
        servicer.opened.clear()
        watching = asyncio.create_task(_open_when_created(gate, servicer.opened))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"127.0.0.1:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:  # the coordinator's certificate (the run's CA) is required: mTLS
        bound = server.add_secure_port(address, tls.participant_credentials())
    if bound == 0:
        raise SystemExit(f"participant {participant.name}: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if watching is not None:
        watching.cancel()
    await server.stop(1.0)


async def _open_when_created(gate: Path, opened: asyncio.Event) -> None:
    while not await asyncio.to_thread(gate.exists):
        await asyncio.sleep(0.05)
    opened.set()


def main() -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--well-behaved",
        action="store_true",
        help="inject no UNAVAILABLE answers (rejections and stuck undos still follow the input)",
    )
    parser.add_argument(
        "--gate",
        type=Path,
        help="hold every call until this file exists (to get every saga in flight at once)",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="serve mTLS with the run's certificates in this directory (tests.torture.tls)",
    )
    parser.add_argument(
        "--delay-ms",
        default="0:0",
        help="LOW:HIGH milliseconds every call waits before it is served (slow participants)",
    )
    args = parser.parse_args()
    low, _, high = args.delay_ms.partition(":")
    delay = (float(low) / 1000, float(high or low) / 1000)
    participant, ledger = prepare(args.name, args.dir)
    seed = None if args.well_behaved else args.seed
    tls = None if args.tls_dir is None else TortureTls(args.tls_dir)
    asyncio.run(serve(args.port, participant, ledger, seed, delay, args.gate, tls))


if __name__ == "__main__":
    main()
