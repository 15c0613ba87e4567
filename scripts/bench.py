"""Throughput and latency of four-step sagas on loopback, against a baseline of direct calls.

The coordinator runs as its own process (``saga serve``) on a fresh SQLite file; four
participants answer at once from this process. The baseline sends the same four Execute calls
per saga straight to the participants, with the same concurrency, so the ratio is what the
coordinator's durability and bookkeeping cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from saga_sdk.client import AsyncSagaClient
from saga_sdk.model import SagaState

SERVICES = ("identity", "accounts", "cards", "billing")
DEFINITION = {
    "name": "bench",
    "version": 1,
    "steps": [
        {"name": f"step-{name}", "participant": name, "action": "Do", "compensation": "Undo"}
        for name in SERVICES
    ],
}


class InstantParticipant(pb_grpc.ParticipantServiceServicer):
    """Answers OK at once with a small output."""

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        return pb.ExecuteResponse(output=b'{"ok":true}')

    async def Compensate(
        self, request: pb.CompensateRequest, context: Any
    ) -> pb.CompensateResponse:
        return pb.CompensateResponse()


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_serving(target: str) -> None:
    """Wait until the coordinator answers its health check."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(400):
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
    raise SystemExit("the coordinator did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_pool(count: int, concurrency: int, one: Any) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            began = time.perf_counter()
            await one(index)
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, latencies


def report(label: str, count: int, elapsed: float, latencies: list[float]) -> float:
    rate = count / elapsed
    print(
        f"{label:<28} {rate:8.1f} sagas/s   p50 {percentile(latencies, 0.5) * 1000:6.1f} ms   "
        f"p95 {percentile(latencies, 0.95) * 1000:6.1f} ms   "
        f"p99 {percentile(latencies, 0.99) * 1000:6.1f} ms   "
        f"mean {statistics.fmean(latencies) * 1000:6.1f} ms"
    )
    return rate


async def through_coordinator(
    label: str,
    args: argparse.Namespace,
    addresses: dict[str, str],
    extra: dict[str, object],
) -> tuple[float, int]:
    """Run the sagas through a fresh coordinator process; return (sagas/s, failures)."""
    workdir = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    (workdir / "definitions").mkdir()
    (workdir / "definitions" / "bench.yaml").write_text(yaml.safe_dump(DEFINITION))
    target = f"127.0.0.1:{free_port()}"
    (workdir / "saga.yaml").write_text(
        yaml.safe_dump(
            {
                "database": f"sqlite:///{workdir / 'saga.db'}",
                "listen": target,
                "definitions": "definitions",
                "participants": addresses,
                "synchronous": args.synchronous,
                "log_level": "ERROR",
                **extra,
            }
        )
    )
    failures = 0
    with (workdir / "coordinator.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "serve",
                "--config",
                str(workdir / "saga.yaml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_serving(target)
            async with AsyncSagaClient(target) as client:

                async def one(index: int) -> None:
                    nonlocal failures
                    result = await client.create("bench", {"n": index}, saga_id=f"bench-{index}")
                    saga = await client.wait(result.saga.saga_id, timeout=120)
                    failures += saga.state is not SagaState.SUCCEEDED

                elapsed, latencies = await run_pool(args.sagas, args.concurrency, one)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    shutil.rmtree(workdir, ignore_errors=True)
    return report(label, args.sagas, elapsed, latencies), failures


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="also run with traces and metrics exported here (a closed port measures what a "
        "collector that is down costs)",
    )
    args = parser.parse_args()

    servers = []
    addresses = {}
    for name in SERVICES:
        server = grpc.aio.server()
        pb_grpc.add_ParticipantServiceServicer_to_server(InstantParticipant(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses[name] = f"127.0.0.1:{port}"
    print(
        f"{args.sagas} four-step sagas, {args.concurrency} at a time, SQLite "
        f"synchronous={args.synchronous}, {os.cpu_count()} cores"
    )
    try:
        channels = {n: grpc.aio.insecure_channel(a) for n, a in addresses.items()}
        stubs = {n: pb_grpc.ParticipantServiceStub(c) for n, c in channels.items()}

        async def direct(index: int) -> None:
            for name in SERVICES:
                await stubs[name].Execute(
                    pb.ExecuteRequest(saga=f"sagas/direct-{index}", step=name, action="Do")
                )

        elapsed, latencies = await run_pool(args.sagas, args.concurrency, direct)
        baseline = report("baseline (4 direct calls)", args.sagas, elapsed, latencies)
        for channel in channels.values():
            await channel.close()

        rate, failures = await through_coordinator("coordinator, tracing off", args, addresses, {})
        print(f"coordinator / baseline: {rate / baseline:.2f}")
        if args.otlp_endpoint:
            traced, more = await through_coordinator(
                "coordinator, OTLP export",
                args,
                addresses,
                {"otlp_endpoint": args.otlp_endpoint, "otlp_timeout": 1.0},
            )
            failures += more
            print(f"with OTLP export / tracing off: {traced / rate:.2f}")
        print(f"sagas not SUCCEEDED: {failures}")
    finally:
        for server in servers:
            await server.stop(0)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
