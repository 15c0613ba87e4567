"""Scripted participants on real loopback gRPC servers, recording every call they receive."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Answer:
    """One scripted answer: OK with an output, or a status code; optionally after a delay."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    output: bytes | None = None
    reason: str = ""
    message: str = ""
    retry_after: timedelta | None = None
    delay: float = 0.0


def ok(output: Any = None, delay: float = 0.0) -> Answer:
    """OK, with ``output`` encoded as JSON (bytes as they are)."""
    data = output if isinstance(output, bytes) or output is None else json.dumps(output).encode()
    return Answer(output=data, delay=delay)


def reject(reason: str = "REFUSED", message: str = "no") -> Answer:
    """A business "no"."""
    return Answer(grpc.StatusCode.FAILED_PRECONDITION, reason=reason, message=message)


def error(code: grpc.StatusCode, message: str = "", retry_after: timedelta | None = None) -> Answer:
    """Any other status."""
    return Answer(code, message=message or code.name.lower(), retry_after=retry_after)


@dataclass(frozen=True)
class Received:
    """One call as the participant received it."""

    operation: str
    request: pb.ExecuteRequest | pb.CompensateRequest

    @property
    def step(self) -> str:
        """The step's name."""
        return self.request.step

    @property
    def execute(self) -> pb.ExecuteRequest:
        """The request, which must be an Execute."""
        assert isinstance(self.request, pb.ExecuteRequest)
        return self.request

    @property
    def compensate(self) -> pb.CompensateRequest:
        """The request, which must be a Compensate."""
        assert isinstance(self.request, pb.CompensateRequest)
        return self.request


@dataclass
class ScriptedParticipant(pb_grpc.ParticipantServiceServicer):
    """Answers each action from its script (then OK); dedupes effects by request_id."""

    name: str
    scripts: dict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    received: list[Received] = field(default_factory=list)
    effects: dict[str, str] = field(default_factory=dict)
    """Applied effects by request_id (what a participant with a barrier would hold)."""
    answers: dict[str, bytes] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    server: grpc.aio.Server | None = None
    rule: Callable[[pb.ExecuteRequest | pb.CompensateRequest], Answer | None] | None = None
    """Answers computed from the request, consulted before the scripts."""
    applied: list[str] = field(default_factory=list)
    """request_id of every effect applied, in order (a duplicate would show twice)."""
    journal: list[tuple[str, str, str, str]] = field(default_factory=list)
    """("begin" | "end", participant, operation, step), shared between participants."""

    def script(self, action: str, *answers: Answer) -> None:
        """Queue answers for an action (or compensation action)."""
        self.scripts[action].extend(answers)

    @property
    def address(self) -> str:
        """Where the participant listens."""
        return f"127.0.0.1:{self.port}"

    def calls(self, operation: str | None = None) -> list[Received]:
        """Calls received, optionally of one operation ("execute" or "compensate")."""
        return [r for r in self.received if operation is None or r.operation == operation]

    async def _answer(
        self,
        operation: str,
        request: pb.ExecuteRequest | pb.CompensateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bytes:
        self.received.append(Received(operation, request))
        self.journal.append(("begin", self.name, operation, request.step))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            answer = self.rule(request) if self.rule is not None else None
            if answer is None:
                queue = self.scripts.get(request.action)
                answer = queue.popleft() if queue else ok()
            if answer.delay:
                await asyncio.sleep(answer.delay)
            if answer.code is not grpc.StatusCode.OK:
                await context.abort_with_status(_status(answer, self.name))
            if request.request_id in self.answers:
                return self.answers[request.request_id]
            output = answer.output
            if output is None:
                output = json.dumps(
                    {"participant": self.name, "action": request.action, "step": request.step}
                ).encode()
            self.effects[request.request_id] = request.action
            self.applied.append(request.request_id)
            self.answers[request.request_id] = output
            return output
        finally:
            self.in_flight -= 1
            self.journal.append(("end", self.name, operation, request.step))

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        return pb.ExecuteResponse(output=await self._answer("execute", request, context))

    async def Compensate(
        self, request: pb.CompensateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CompensateResponse:
        await self._answer("compensate", request, context)
        return pb.CompensateResponse()

    async def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1 (a free port unless one is given)."""
        self.server = grpc.aio.server()
        pb_grpc.add_ParticipantServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()

    async def stop(self) -> None:
        """Stop serving at once."""
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


def _status(answer: Answer, domain: str) -> grpc.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=answer.reason or answer.code.name, domain=domain))
    details.append(info)
    if answer.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(answer.retry_after)
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    status = status_pb2.Status(
        code=getattr(code_pb2, answer.code.name), message=answer.message, details=details
    )
    converted: grpc.Status = rpc_status.to_status(status)
    return converted
