"""The relay floor: the least CPU any saga orchestrator written in Python on grpc.aio spends.

A relay process receives one unary call per saga and, for it, makes the saga's four Execute
calls to the bench's no-op participants, one after another, passing the outputs along, then
answers. It stores nothing, keeps no state, sends no stream and never retries: whatever a real
coordinator adds (durability, the saga's state machine, watching, the feed, leases) comes on
top of what it spends. The relay serves the participant contract's ``Execute`` itself, so no
other contract is needed: the request's input names the saga.

In the same run, on the same participants, this process also makes the four calls itself (the
``direct`` floor of ``saga bench``) and reads its own CPU; the ratio of the relay's CPU per
saga to the direct client's is the floor of ``saga bench``'s ``CPU÷`` column for any Python
coordinator on grpcio.

    python -m coordinator.bench.relay [--sagas 2000] [--concurrency 1,32] [--output json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from coordinator.bench.client import Direct, closed_loop, percentile
from coordinator.bench.measure import cpu_seconds
from coordinator.bench.processes import LineReader, Participants, stop_process
from coordinator.bench.shape import SUCCEEDING
from coordinator.bench.verify import mismatches

WARMUP = 40


class Relay(pb_grpc.ParticipantServiceServicer):
    """Each Execute it receives is one saga, whose four calls it makes and then answers."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self._direct = Direct(addresses, SUCCEEDING, None)

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        named = json.loads(request.input)
        problem = await self._direct.one(str(named["case"]), int(named["index"]))
        if problem is not None:
            await context.abort(grpc.StatusCode.INTERNAL, problem)
        return pb.ExecuteResponse(output=b"{}")

    async def Compensate(
        self, request: pb.CompensateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompensateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the relay runs succeeding sagas only")


async def _serve(addresses: dict[str, str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ParticipantServiceServicer_to_server(Relay(addresses), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the end of stdin
    await server.stop(1)


async def _through_relay(target: str, case: str, sagas: int, concurrency: int) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ParticipantServiceStub(channel)

        async def one(index: int) -> str | None:
            named = json.dumps({"case": case, "index": index}).encode()
            await stub.Execute(pb.ExecuteRequest(saga=case, request_id=str(index), input=named))
            return None

        await closed_loop(min(WARMUP, sagas), concurrency, one)
        return await closed_loop(sagas, concurrency, one)


async def _direct(addresses: dict[str, str], case: str, sagas: int, concurrency: int) -> Any:
    direct = Direct(addresses, SUCCEEDING, None)
    try:

        async def one(index: int) -> str | None:
            return await direct.one(case, index)

        await closed_loop(min(WARMUP, sagas), concurrency, lambda i: one(sagas + i))
        return await closed_loop(sagas, concurrency, one)
    finally:
        await direct.close()


def _case(
    participants: Participants, relay: str, relay_pid: int, sagas: int, concurrency: int
) -> dict[str, float]:
    addresses = participants.addresses
    case, direct_case = f"relay-c{concurrency}", f"direct-c{concurrency}"
    began = time.process_time()
    elapsed, latencies, problems = asyncio.run(_direct(addresses, direct_case, sagas, concurrency))
    direct_cpu = (time.process_time() - began) / sagas
    direct_rate, direct_p50 = sagas / elapsed, percentile(sorted(latencies), 0.5)
    if problems:
        raise SystemExit(f"the direct calls ended wrong: {dict(problems)}")
    relay_before, began = cpu_seconds(relay_pid), time.process_time()
    elapsed, latencies, problems = asyncio.run(_through_relay(relay, case, sagas, concurrency))
    relay_cpu = (cpu_seconds(relay_pid) - relay_before) / sagas
    client_cpu = (time.process_time() - began) / sagas
    if problems:
        raise SystemExit(f"the relay's sagas ended wrong: {dict(problems)}")
    counts = participants.counts()
    for counted in (case, direct_case):  # every saga made its four calls, once each
        wrong = mismatches(SUCCEEDING, sagas + min(WARMUP, sagas), counts.get(counted, {}), 0)
        if wrong:
            raise SystemExit(f"{counted}: the participants counted {'; '.join(wrong)}")
    return {
        "concurrency": concurrency,
        "direct_sagas_per_second": round(direct_rate, 1),
        "direct_p50_ms": round(direct_p50 * 1000, 2),
        "direct_client_cpu_ms": round(direct_cpu * 1000, 3),
        "relay_sagas_per_second": round(sagas / elapsed, 1),
        "relay_p50_ms": round(percentile(sorted(latencies), 0.5) * 1000, 2),
        "relay_cpu_ms": round(relay_cpu * 1000, 3),
        "relay_client_cpu_ms": round(client_cpu * 1000, 3),
        "relay_over_direct_rate": round((sagas / elapsed) / direct_rate, 2),
        "relay_cpu_over_direct_cpu": round(relay_cpu / direct_cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the relay floor beside the direct floor, in one run; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,32", help="C,C,... (default 1,32)")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    parser.add_argument("--serve", metavar="ADDRESSES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:  # the relay process itself
        asyncio.run(_serve(json.loads(args.serve)))
        return 0
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: expected C,C,... of whole numbers, got {args.concurrency}")
    if args.sagas < 1 or any(c < 1 for c in levels):
        parser.error("--sagas and every concurrency must be at least 1")
    with tempfile.TemporaryDirectory(prefix="saga-relay-") as work:
        participants = Participants(Path(work))
        log = Path(work) / "relay.log"
        with log.open("wb") as errors:
            relay = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "coordinator.bench.relay", "--serve"),
                    json.dumps(participants.addresses),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        try:
            port = LineReader(relay.stdout, "the relay", log).line(60)
            target = f"127.0.0.1:{port}"
            cases = [_case(participants, target, relay.pid, args.sagas, c) for c in levels]
        finally:
            assert relay.stdin is not None
            relay.stdin.close()
            stop_process(relay, relay.pid)
            participants.stop()
    if args.output == "json":
        print(json.dumps({"sagas": args.sagas, "cases": cases}, indent=2))
        return 0
    print(f"relay floor: {args.sagas} four-step sagas per case, closed loop, after {WARMUP}")
    print("   C   direct/s   p50 ms  client CPU ms   relay/s   p50 ms  relay CPU ms   CPU ratio")
    for c in cases:
        print(
            f"{c['concurrency']:>4} {c['direct_sagas_per_second']:>10} {c['direct_p50_ms']:>8}"
            f" {c['direct_client_cpu_ms']:>14} {c['relay_sagas_per_second']:>9}"
            f" {c['relay_p50_ms']:>8} {c['relay_cpu_ms']:>13} {c['relay_cpu_over_direct_cpu']:>11}"
        )
    print("CPU ratio: the relay's CPU per saga over the direct client's, in the same run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
