"""The four no-op participants, in one process: they answer at once and count every call.

Run as ``python -m coordinator.bench.participants``. It prints one JSON line, the address of
each participant, then answers on stdin: ``counts`` prints the calls counted so far, as one
JSON line ``{case: {"execute identity/step-identity": n, ...}}``; ``stop`` or the end of stdin
(or SIGTERM) stops it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter, defaultdict
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from coordinator.bench.shape import (
    COMPENSATE,
    EXECUTE,
    OUTPUT,
    PARTICIPANTS,
    REFUSED_ACTION,
    call_key,
    case_of,
)

Counts = defaultdict[str, Counter[str]]
"""Calls by case key, then by ``call_key``."""


def refusal(participant: str) -> grpc.Status:
    """A business "no", encoded as the SDK's ``Rejected``: FAILED_PRECONDITION + ErrorInfo."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="REFUSED", domain=participant))
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="refused by the bench", details=[info]
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


class NoOpParticipant(pb_grpc.ParticipantServiceServicer):
    """Answers Execute with a small output and Compensate with OK; refuses ``Refuse``."""

    def __init__(self, name: str, counts: Counts) -> None:
        self._name = name
        self._counts = counts
        self._refusal = refusal(name)

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        """Count the call; answer OK, or refuse the refused action."""
        self._counts[case_of(request.saga)][call_key(self._name, request.step, EXECUTE)] += 1
        if request.action == REFUSED_ACTION:
            await context.abort_with_status(self._refusal)
        return pb.ExecuteResponse(output=OUTPUT)

    async def Compensate(
        self, request: pb.CompensateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompensateResponse:
        """Count the call and answer OK."""
        self._counts[case_of(request.saga)][call_key(self._name, request.step, COMPENSATE)] += 1
        return pb.CompensateResponse()


async def serve() -> None:
    """Serve the four participants until told to stop."""
    counts: Counts = defaultdict(Counter)
    servers: list[grpc.aio.Server] = []
    addresses: dict[str, str] = {}
    for name in PARTICIPANTS:
        server = grpc.aio.server()
        pb_grpc.add_ParticipantServiceServicer_to_server(NoOpParticipant(name, counts), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses[name] = f"127.0.0.1:{port}"

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while True:
            raw = await reader.readline()
            line = raw.decode().strip()
            if line == "counts":
                sys.stdout.write(json.dumps({case: dict(c) for case, c in counts.items()}) + "\n")
                sys.stdout.flush()
            elif line == "stop" or not raw:
                stop.set()
                return

    sys.stdout.write(json.dumps(addresses) + "\n")
    sys.stdout.flush()
    listening = asyncio.ensure_future(commands())
    await stop.wait()
    listening.cancel()
    await asyncio.gather(*(server.stop(0) for server in servers))


def main() -> int:
    """Serve until stopped; exit 0."""
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
