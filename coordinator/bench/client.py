"""The bench's client, a process of its own: runs sagas closed-loop and prints its figures.

Run as ``python -m coordinator.bench.client --mode MODE --variant VARIANT ...``. It warms up
(sagas under the case key ``warmup-{case}``), prints ``ready``, waits for ``go`` on stdin, runs
``--sagas`` sagas with ``--concurrency`` asyncio tasks each doing one saga after another, and
prints one JSON line: elapsed seconds, latency percentiles, its own CPU seconds over that window
and how many sagas ended wrong. Modes:

- ``coordinator``: CreateSaga then wait for the ending, through the coordinator at ``--target``
  (with several ``--target``, replicas of one store: saga ``i`` goes to the ``i % n``-th);
- ``direct``: the calls the coordinator would make, straight to the participants;
- ``durable``: as ``direct``, plus one SQLite commit (WAL) per call, on one writer thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from coordinator.bench.shape import (
    COMPENSATE,
    COMPENSATING,
    COMPENSATION,
    COORDINATOR,
    DEFINITION,
    DIRECT,
    DURABLE,
    EXECUTE,
    MODES,
    PARTICIPANTS,
    SUCCEEDING,
    VARIANTS,
    Step,
    saga_id,
    steps,
)
from saga_sdk.client import AsyncSagaClient
from saga_sdk.model import SagaState

READY = "ready"
GO = "go"


class Runner(Protocol):
    """Runs one saga of a case; answers None when it ended as the variant should, else why not."""

    async def one(self, case: str, index: int) -> str | None: ...

    async def close(self) -> None: ...


def round_robin(index: int, targets: Sequence[str]) -> str:
    """The coordinator that runs saga ``index``: each in turn, so each gets an equal share."""
    return targets[index % len(targets)]


class ThroughCoordinator:
    """Each saga: ``AsyncSagaClient.create``, then ``AsyncSagaClient.wait``, on one coordinator.

    With several targets (replicas of one store), the sagas are spread over them round robin;
    a saga is awaited where it was created, on the replica that holds it.
    """

    def __init__(self, targets: Sequence[str], variant: str) -> None:
        self._targets = list(targets)
        self._clients = {target: AsyncSagaClient(target) for target in self._targets}
        self._definition = DEFINITION[variant]
        self._expected = SagaState.SUCCEEDED if variant == SUCCEEDING else SagaState.COMPENSATED

    async def one(self, case: str, index: int) -> str | None:
        """Start the saga and wait for its ending."""
        client = self._clients[round_robin(index, self._targets)]
        key = saga_id(case, index)
        result = await client.create(self._definition, {"n": index}, saga_id=key)
        saga = await client.wait(result.saga.saga_id, timeout=120)
        return None if saga.state is self._expected else f"ended {saga.state.value}"

    async def close(self) -> None:
        """Close the channels."""
        for client in self._clients.values():
            await client.close()


class Journal:
    """One small SQLite commit per call, on a dedicated writer thread (the durable floor)."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-journal")
        self._connection: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open the database in WAL mode, on the writer thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._open)

    def _open(self) -> None:
        connection = sqlite3.connect(self._path, isolation_level=None)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS calls (saga TEXT NOT NULL, step TEXT NOT NULL, "
            "operation TEXT NOT NULL)"
        )
        self._connection = connection

    def _insert(self, saga: str, step: str, operation: str) -> None:
        assert self._connection is not None
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute("INSERT INTO calls VALUES (?, ?, ?)", (saga, step, operation))
        self._connection.execute("COMMIT")

    async def record(self, saga: str, step: str, operation: str) -> None:
        """Commit one row, in a transaction of its own."""
        await asyncio.get_running_loop().run_in_executor(
            self._thread, self._insert, saga, step, operation
        )

    async def close(self) -> None:
        """Close the database and end the writer thread."""
        connection = self._connection
        if connection is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, connection.close)
        self._thread.shutdown(wait=True)


class Direct:
    """Each saga: the Execute and Compensate calls the coordinator would make, made directly."""

    def __init__(self, addresses: dict[str, str], variant: str, journal: Journal | None) -> None:
        self._channels = [grpc.aio.insecure_channel(addresses[name]) for name in PARTICIPANTS]
        self._stubs = {
            name: pb_grpc.ParticipantServiceStub(channel)
            for name, channel in zip(PARTICIPANTS, self._channels, strict=True)
        }
        self._variant = variant
        self._definition = DEFINITION[variant]
        self._steps = steps(variant)
        self._journal = journal

    async def one(self, case: str, index: int) -> str | None:
        """Execute the steps in order; after a refusal, compensate those sent, newest first."""
        saga = f"sagas/{saga_id(case, index)}"
        payload = json.dumps({"n": index}).encode()
        outputs: dict[str, bytes] = {}
        sent: list[tuple[Step, bytes | None, str]] = []
        refused = False
        for step in self._steps:
            request_id = f"{saga}/{step.name}/{EXECUTE}"
            if self._journal is not None:
                await self._journal.record(saga, step.name, EXECUTE)
            try:
                response = await self._stubs[step.participant].Execute(
                    pb.ExecuteRequest(
                        saga=saga,
                        definition=self._definition,
                        definition_version=1,
                        step=step.name,
                        action=step.action,
                        request_id=request_id,
                        attempt=1,
                        input=payload,
                        previous_outputs=outputs,
                    )
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    return f"{step.name} answered {error.code().name}"
                sent.append((step, None, request_id))
                refused = True
                break
            outputs[step.name] = response.output
            sent.append((step, response.output, request_id))
        if refused != (self._variant == COMPENSATING):
            return "refused" if refused else "not refused"
        if not refused:
            return None
        for step, output, execute_request_id in reversed(sent):
            if self._journal is not None:
                await self._journal.record(saga, step.name, COMPENSATE)
            await self._stubs[step.participant].Compensate(
                pb.CompensateRequest(
                    saga=saga,
                    definition=self._definition,
                    definition_version=1,
                    step=step.name,
                    action=COMPENSATION,
                    request_id=f"{saga}/{step.name}/{COMPENSATE}",
                    attempt=1,
                    input=payload,
                    execute_output=output,
                    execute_request_id=execute_request_id,
                )
            )
        return None

    async def close(self) -> None:
        """Close the channels and the journal."""
        for channel in self._channels:
            await channel.close()
        if self._journal is not None:
            await self._journal.close()


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile of sorted values."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


async def closed_loop(
    count: int, concurrency: int, one: Callable[[int], Awaitable[str | None]]
) -> tuple[float, list[float], Counter[str]]:
    """Run ``count`` sagas, ``concurrency`` at a time; (elapsed seconds, latencies, problems)."""
    latencies: list[float] = []
    problems: Counter[str] = Counter()
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            began = time.perf_counter()
            try:
                problem = await one(index)
            except Exception as error:  # counted as a saga that ended wrong, and named
                problem = f"{type(error).__name__}: {error}"[:200]
            latencies.append(time.perf_counter() - began)
            if problem is not None:
                problems[problem] += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return time.perf_counter() - began, latencies, problems


def _address(value: str) -> tuple[str, str]:
    name, sep, address = value.partition("=")
    if not sep or name not in PARTICIPANTS:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT of {PARTICIPANTS}")
    return name, address


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--case", required=True, help="case key, the saga ids' prefix")
    parser.add_argument("--sagas", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=40, help="sagas before the measurement")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        help="the coordinator (mode coordinator); repeated: replicas, used round robin",
    )
    parser.add_argument(
        "--participant", type=_address, action="append", default=[], metavar="NAME=HOST:PORT"
    )
    parser.add_argument("--database", type=Path, help="the journal's file (mode durable)")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    return parser


async def _runner(args: argparse.Namespace) -> Runner:
    if args.mode == COORDINATOR:
        if not args.target:
            raise SystemExit("--target is needed in mode coordinator")
        return ThroughCoordinator(args.target, args.variant)
    addresses = dict(args.participant)
    if set(addresses) != set(PARTICIPANTS):
        raise SystemExit(f"--participant is needed for each of {', '.join(PARTICIPANTS)}")
    journal = None
    if args.mode == DURABLE:
        if args.database is None:
            raise SystemExit("--database is needed in mode durable")
        journal = Journal(args.database, args.synchronous)
        await journal.open()
    assert args.mode in (DIRECT, DURABLE)
    return Direct(addresses, args.variant, journal)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    """Warm up, say ready, wait for go, run the sagas; the figures of the measured window."""
    runner = await _runner(args)
    try:
        warmup_case = f"warmup-{args.case}"
        _, _, warmup_problems = await closed_loop(
            args.warmup, args.concurrency, lambda index: runner.one(warmup_case, index)
        )
        print(READY, flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != GO:
            raise SystemExit(f"expected {GO!r} on stdin, got {line!r}")
        cpu_began = time.process_time()
        elapsed, latencies, problems = await closed_loop(
            args.sagas, args.concurrency, lambda index: runner.one(args.case, index)
        )
        cpu = time.process_time() - cpu_began
    finally:
        await runner.close()
    ordered = sorted(latencies)
    return {
        "mode": args.mode,
        "variant": args.variant,
        "case": args.case,
        "sagas": args.sagas,
        "concurrency": args.concurrency,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "latency_ms": {
            "p50": percentile(ordered, 0.50) * 1000,
            "p95": percentile(ordered, 0.95) * 1000,
            "p99": percentile(ordered, 0.99) * 1000,
            "mean": statistics.fmean(ordered) * 1000,
            "max": ordered[-1] * 1000,
        },
        "wrong": sum(problems.values()),
        "problems": dict(problems.most_common(5)),
        "warmup_wrong": sum(warmup_problems.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; print its figures as one JSON line."""
    args = _parser().parse_args(argv)
    if args.sagas < 1 or args.concurrency < 1:
        raise SystemExit("--sagas and --concurrency must be at least 1")
    figures = asyncio.run(measure(args))
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
