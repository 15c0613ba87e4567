"""The participant helper: serves `ParticipantService` from decorated action handlers.

    participant = Participant("accounts", barrier=SqliteBarrier("accounts.db"))

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        ctx.tx.execute("INSERT INTO accounts (id, owner) VALUES (?, ?)", ...)
        return {"account": ...}

    @participant.compensation("CloseAccount")
    def close_account(ctx: CompensateContext) -> None:
        ctx.tx.execute("DELETE FROM accounts WHERE id = ?", (ctx.execute_output["account"],))

    participant.run("0.0.0.0:50051", tls=ServerTLS.from_files("accounts.pem", "accounts.key"))

Handlers may be plain functions (run in a worker thread, so they never block the event loop)
or coroutine functions. With a barrier, each handler runs inside the barrier's transaction and
gets its connection as `ctx.tx`: duplicates, null compensations and late Executes are then
handled by the barrier, and the handler is only called when its effect must be applied.

How answers map to the contract:

- the handler returns          -> OK, with its value as the output (UTF-8 JSON, or bytes raw)
- the handler raises Rejected  -> FAILED_PRECONDITION + ErrorInfo(reason, domain=participant)
                                 (a business "no": no retry, the saga compensates)
- it raises RetryLater         -> UNAVAILABLE + RetryInfo(retry_after) + ErrorInfo(reason)
                                 (transient: retried, no sooner than retry_after)
- it raises PermanentFailure   -> INVALID_ARGUMENT + ErrorInfo(reason) (the step fails, no
                                 retry, the saga compensates)
- no handler for the action    -> UNIMPLEMENTED (the step fails, no retry)
- the payload is not JSON      -> INVALID_ARGUMENT (the step fails, no retry)
- any other exception          -> INTERNAL + ErrorInfo(HANDLER_FAILED), logged (transient: the
                                 coordinator retries)

A call whose deadline expired still completes and commits its effect; the coordinator retries
it with the same request_id, and the barrier answers the retry with the stored answer.

Serving: plaintext by default, for development on loopback; `tls=ServerTLS(...)` serves TLS,
and with its `client_ca` only callers with a certificate from that CA get through the
handshake (mTLS), so only the coordinator reaches the handlers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import ipaddress
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from saga.v1 import participant_service_pb2, participant_service_pb2_grpc

from saga_sdk.barrier import Barrier, BarrierKey
from saga_sdk.errors import PermanentFailure, Rejected, RetryLater
from saga_sdk.requests import encode_payload
from saga_sdk.telemetry import ParticipantTracer
from saga_sdk.tls import ServerTLS as ServerTLS  # re-exported: what start() takes

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAME = participant_service_pb2.DESCRIPTOR.services_by_name["ParticipantService"].full_name


@dataclass(frozen=True)
class ExecuteContext:
    """What an action handler is given about the Execute it answers."""

    saga_id: str
    definition: str
    definition_version: int
    step: str
    action: str
    request_id: str
    """Identical on every retry of this Execute."""
    attempt: int
    """From 1."""
    input: Any
    """The saga's input, decoded from JSON (None when empty), or bytes for a raw handler."""
    previous_outputs: Mapping[str, Any]
    """Outputs of the earlier steps by step name, decoded from JSON when they are JSON (else
    bytes), or all bytes for a raw handler."""
    metadata: Mapping[str, str]
    """The call's gRPC metadata, e.g. the W3C `traceparent`."""
    tx: Any = None
    """The barrier's open connection (sqlite3, psycopg or psycopg async, by backend and handler
    kind); do the business writes on it and never commit it. None without a barrier."""


@dataclass(frozen=True)
class CompensateContext:
    """What a compensation handler is given about the Compensate it answers."""

    saga_id: str
    definition: str
    definition_version: int
    step: str
    action: str
    """The compensation action."""
    request_id: str
    execute_request_id: str
    """request_id of the Execute being compensated."""
    attempt: int
    input: Any
    """The saga's input, decoded from JSON, or bytes for a raw handler."""
    execute_output: Any
    """This step's Execute output, decoded from JSON, or bytes for a raw handler; None when
    the Execute never answered OK to the coordinator (with a barrier, the handler is called
    only when the Execute took effect here)."""
    metadata: Mapping[str, str]
    tx: Any = None
    """The barrier's open connection; see `ExecuteContext.tx`."""


ActionHandler = Callable[[ExecuteContext], Any]
"""Returns the output (JSON-serialisable, or bytes when raw), or an awaitable of it."""
CompensationHandler = Callable[[CompensateContext], Any]
"""Returns nothing useful (its value is ignored), or an awaitable."""

_A = TypeVar("_A", bound=ActionHandler)
_C = TypeVar("_C", bound=CompensationHandler)


@dataclass(frozen=True)
class _Handler:
    function: Callable[[Any], Any]
    raw: bool

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    def encode(self, value: object) -> bytes:
        if self.raw:
            if value is None:
                return b""
            if not isinstance(value, bytes):
                raise TypeError(f"a raw handler must return bytes, not {type(value).__name__}")
            return value
        return encode_payload(value)


class _BadPayload(Exception):
    """A payload that a JSON handler cannot decode."""

    def __init__(self, field: str, error: Exception) -> None:
        super().__init__(f"{field} is not UTF-8 JSON: {error}")
        self.field = field


def _decode(payload: bytes, field: str) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _BadPayload(field, error) from error


def _decode_leniently(payload: bytes) -> Any:
    # Earlier steps may belong to participants that send raw bytes; this step did not choose
    # their format, so an output that is not JSON is passed on as bytes rather than refused.
    try:
        return _decode(payload, "previous_outputs")
    except _BadPayload:
        return payload


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
    violation: tuple[str, str] | None = None,
    retry_after: timedelta | None = None,
) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {}))
    details = [info]
    if retry_after is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromTimedelta(retry_after)
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    if violation is not None:
        bad = any_pb2.Any()
        field, description = violation
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field, description=description
                    )
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


class Participant:
    """A domain service's side of the saga contract, built from handlers.

    `name` identifies the participant in logs and is the `domain` of its error infos.
    `barrier` (e.g. `SqliteBarrier(path)` or `PostgresBarrier(conninfo)`) makes every handler
    idempotent and hang-free by running it in the barrier's transaction; without one the
    handlers must dedupe on `ctx.request_id` themselves.
    """

    def __init__(
        self,
        name: str,
        *,
        barrier: Barrier | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.name = name
        self.barrier = barrier
        # Handlers run inside a span continuing the saga's trace; with no OpenTelemetry SDK
        # configured (or no tracer_provider given) the span is a no-op, and without the
        # `otel` extra there is no span at all.
        self._tracer = ParticipantTracer(tracer_provider)
        self._actions: dict[str, _Handler] = {}
        self._compensations: dict[str, _Handler] = {}
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._observers: list[Callable[[ExecuteContext | CompensateContext], None]] = []

    def observe_handler_calls(
        self, observer: Callable[[ExecuteContext | CompensateContext], None]
    ) -> Callable[[], None]:
        """Call `observer` with the context of every handler call, just before the handler
        runs (with a barrier, a replayed duplicate calls no handler). Returns the function that
        stops the observation. Used by `saga_sdk.testing`."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def _observed(self, context: ExecuteContext | CompensateContext) -> None:
        for observer in list(self._observers):
            observer(context)

    # --- registration -------------------------------------------------------------------------

    def action(self, name: str, *, raw: bool = False) -> Callable[[_A], _A]:
        """Register the decorated function as the handler of the Execute action `name`.

        With `raw=True` the handler gets the input and previous outputs as bytes and must
        return bytes (or None); otherwise they are decoded from JSON and the return value is
        encoded as JSON.
        """

        def register(function: _A) -> _A:
            self._register(self._actions, "action", name, function, raw)
            return function

        return register

    def compensation(self, name: str, *, raw: bool = False) -> Callable[[_C], _C]:
        """Register the decorated function as the handler of the compensation action `name`."""

        def register(function: _C) -> _C:
            self._register(self._compensations, "compensation", name, function, raw)
            return function

        return register

    def _register(
        self,
        table: dict[str, _Handler],
        kind: str,
        name: str,
        function: Callable[[Any], Any],
        raw: bool,
    ) -> None:
        if not name:
            raise ValueError(f"an {kind} needs a name")
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = _Handler(function, raw)

    # --- serving ------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Mount the ParticipantService and the standard gRPC health service on `server`."""
        participant_service_pb2_grpc.add_ParticipantServiceServicer_to_server(
            _Servicer(self), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)

    async def start(
        self,
        address: str = "127.0.0.1:0",
        *,
        tls: ServerTLS | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """Serve on `address` ("host:port"; port 0 picks one) and return the bound port.

        `tls` serves TLS with its certificate, and requires callers' certificates from its
        `client_ca` when it has one (mTLS); `credentials` takes any gRPC server credentials
        instead. Neither: plaintext, meant for loopback (a warning is logged otherwise).
        """
        if self._server is not None:
            raise RuntimeError(f"participant {self.name!r} is already serving")
        if tls is not None and credentials is not None:
            raise ValueError("pass tls or credentials, not both")
        if tls is not None:
            credentials = tls.credentials()
        server = grpc.aio.server()
        self.add_to_server(server)
        if credentials is None:
            if not _is_loopback(address):
                log.warning(
                    "participant %s serves plaintext on %s: anyone who reaches it can call it "
                    "unencrypted; pass tls=ServerTLS(...) to serve TLS",
                    self.name,
                    address,
                )
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        assert self._health is not None
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "participant %s serving on port %d (%s)",
            self.name,
            port,
            "plaintext"
            if credentials is None
            else "mTLS"
            if tls is not None and tls.requires_client_certificate
            else "TLS",
        )
        return port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving: report NOT_SERVING, refuse new calls, let running ones finish for
        `grace` seconds (None: until they finish), then cancel what is left."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await server.stop(grace)

    async def serve(
        self,
        address: str,
        *,
        grace: float = 5.0,
        tls: ServerTLS | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """Serve on `address` until SIGTERM or SIGINT, then stop gracefully; `tls` and
        `credentials` as in `start`."""
        await self.start(address, tls=tls, credentials=credentials)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.stop(grace)

    def run(
        self,
        address: str,
        *,
        grace: float = 5.0,
        tls: ServerTLS | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """Blocking form of `serve`, for a script's last line."""
        asyncio.run(self.serve(address, grace=grace, tls=tls, credentials=credentials))

    # --- dispatch -----------------------------------------------------------------------------

    async def _invoke(
        self,
        handler: _Handler,
        context: ExecuteContext | CompensateContext,
        key: BarrierKey | None,
    ) -> bytes:
        if self.barrier is None or key is None:
            self._observed(context)
            if handler.is_async:
                value = await handler.function(context)
            else:
                value = await asyncio.to_thread(handler.function, context)
            return handler.encode(value)
        if handler.is_async:

            async def effect_async(tx: Any) -> bytes:
                self._observed(context)
                return handler.encode(await handler.function(dataclasses.replace(context, tx=tx)))

            return (await self.barrier.run_async(key, effect_async)).output

        def effect(tx: Any) -> bytes:
            self._observed(context)
            return handler.encode(handler.function(dataclasses.replace(context, tx=tx)))

        return (await asyncio.to_thread(self.barrier.run, key, effect)).output

    async def _answer(
        self,
        operation: Literal["Execute", "Compensate"],
        request: participant_service_pb2.ExecuteRequest | participant_service_pb2.CompensateRequest,
        call: Callable[[], Awaitable[bytes]],
        metadata: Mapping[str, str],
    ) -> bytes | grpc.Status:
        """Answer inside a span that continues the coordinator's trace (its W3C traceparent)."""
        with self._tracer.span(
            f"{operation} {request.action}",
            metadata,
            {
                "saga.id": request.saga.removeprefix("sagas/"),
                "saga.definition": request.definition,
                "saga.step": request.step,
                "saga.operation": operation.lower(),
                "saga.attempt": request.attempt,
                "saga.request_id": request.request_id,
                "saga.participant": self.name,
                "rpc.system": "grpc",
                "rpc.service": "saga.v1.ParticipantService",
                "rpc.method": operation,
            },
        ) as span:
            answer = await self._answer_untraced(operation, request, call)
            if isinstance(answer, grpc.Status):
                span.failed(answer.code.value[0], answer.details)
            return answer

    async def _answer_untraced(
        self,
        operation: Literal["Execute", "Compensate"],
        request: participant_service_pb2.ExecuteRequest | participant_service_pb2.CompensateRequest,
        call: Callable[[], Awaitable[bytes]],
    ) -> bytes | grpc.Status:
        """Run one call and turn its outcome into an output or the status to abort with."""
        where = {"saga": request.saga, "step": request.step, "request_id": request.request_id}
        try:
            return await call()
        except Rejected as rejected:
            return _status(
                grpc.StatusCode.FAILED_PRECONDITION,
                rejected.message or rejected.reason,
                rejected.reason,
                self.name,
                where,
            )
        except RetryLater as later:
            log.info(
                "participant %s: %s %r of %s step %s asks to be retried after %s: %s",
                self.name,
                operation,
                request.action,
                request.saga,
                request.step,
                later.retry_after,
                later.message,
            )
            return _status(
                grpc.StatusCode.UNAVAILABLE,
                later.message or later.reason,
                later.reason,
                self.name,
                where,
                retry_after=later.retry_after,
            )
        except PermanentFailure as failure:
            return _status(
                grpc.StatusCode.INVALID_ARGUMENT,
                failure.message or failure.reason,
                failure.reason,
                self.name,
                where,
            )
        except _BadPayload as bad:
            return _status(
                grpc.StatusCode.INVALID_ARGUMENT,
                str(bad),
                "INVALID_PAYLOAD",
                self.name,
                where,
                (bad.field, "must be UTF-8 JSON"),
            )
        except Exception as error:
            log.exception(
                "participant %s: %s %r of %s step %s failed",
                self.name,
                operation,
                request.action,
                request.saga,
                request.step,
            )
            return _status(
                grpc.StatusCode.INTERNAL,
                f"{operation} {request.action!r} failed: {type(error).__name__}: {error}",
                "HANDLER_FAILED",
                self.name,
                where,
            )

    async def execute(
        self, request: participant_service_pb2.ExecuteRequest, metadata: Mapping[str, str]
    ) -> bytes | grpc.Status:
        """Answer an ExecuteRequest: its output, or the non-OK status to answer with."""
        handler = self._actions.get(request.action)
        if handler is None:
            return self._unimplemented("action", request.action, sorted(self._actions))

        async def call() -> bytes:
            raw = handler.raw
            context = ExecuteContext(
                saga_id=request.saga.removeprefix("sagas/"),
                definition=request.definition,
                definition_version=request.definition_version,
                step=request.step,
                action=request.action,
                request_id=request.request_id,
                attempt=request.attempt,
                input=request.input if raw else _decode(request.input, "input"),
                previous_outputs=MappingProxyType(
                    {
                        step: output if raw else _decode_leniently(output)
                        for step, output in request.previous_outputs.items()
                    }
                ),
                metadata=metadata,
            )
            return await self._invoke(handler, context, BarrierKey.for_execute(request))

        return await self._answer("Execute", request, call, metadata)

    async def compensate(
        self, request: participant_service_pb2.CompensateRequest, metadata: Mapping[str, str]
    ) -> bytes | grpc.Status:
        """Answer a CompensateRequest: b"" when done, or the non-OK status to answer with."""
        handler = self._compensations.get(request.action)
        if handler is None:
            return self._unimplemented("compensation", request.action, sorted(self._compensations))
        if self.barrier is not None and not request.execute_request_id:
            return _status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "execute_request_id is required to compensate through the barrier",
                "INVALID_ARGUMENT",
                self.name,
                violation=("execute_request_id", "must not be empty"),
            )

        async def call() -> bytes:
            raw = handler.raw
            output: bytes | None = (
                request.execute_output if request.HasField("execute_output") else None
            )
            context = CompensateContext(
                saga_id=request.saga.removeprefix("sagas/"),
                definition=request.definition,
                definition_version=request.definition_version,
                step=request.step,
                action=request.action,
                request_id=request.request_id,
                execute_request_id=request.execute_request_id,
                attempt=request.attempt,
                input=request.input if raw else _decode(request.input, "input"),
                execute_output=(
                    output if raw or output is None else _decode(output, "execute_output")
                ),
                metadata=metadata,
            )
            key = BarrierKey.for_compensate(request) if self.barrier is not None else None
            await self._invoke(handler, context, key)
            return b""

        return await self._answer("Compensate", request, call, metadata)

    def _unimplemented(self, kind: str, name: str, known: list[str]) -> grpc.Status:
        return _status(
            grpc.StatusCode.UNIMPLEMENTED,
            f"participant {self.name!r} has no {kind} {name!r} (it has: {', '.join(known)})",
            "UNKNOWN_ACTION",
            self.name,
            {kind: name},
        )


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if address.startswith("unix:") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Mapping[str, str]:
    return MappingProxyType(
        {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    )


class _Servicer(participant_service_pb2_grpc.ParticipantServiceServicer):
    """The gRPC face of a Participant."""

    def __init__(self, participant: Participant) -> None:
        self._participant = participant

    async def Execute(
        self,
        request: participant_service_pb2.ExecuteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.ExecuteResponse:
        answer = await self._participant.execute(request, _metadata(context))
        if isinstance(answer, bytes):
            return participant_service_pb2.ExecuteResponse(output=answer)
        await context.abort_with_status(answer)
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    async def Compensate(
        self,
        request: participant_service_pb2.CompensateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_service_pb2.CompensateResponse:
        answer = await self._participant.compensate(request, _metadata(context))
        if isinstance(answer, bytes):
            return participant_service_pb2.CompensateResponse()
        await context.abort_with_status(answer)
        raise AssertionError("abort_with_status returned")  # pragma: no cover
