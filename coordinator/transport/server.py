"""The coordinator's gRPC server: CoordinatorService, health checking and reflection."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from saga.v1 import coordinator_service_pb2

from coordinator.config import Settings
from coordinator.core.errors import SagaError
from coordinator.engine import Engine
from coordinator.telemetry import SagaTelemetry
from coordinator.transport.access import (
    STREAMS,
    AnyOf,
    Gate,
    JwtTokens,
    Limits,
    StaticTokens,
    TokenVerifier,
    set_caller,
)
from coordinator.transport.coordinator_servicer import CoordinatorServicer
from coordinator.transport.errors import rich_status, status_of
from coordinator.transport.tls import server_credentials

log = logging.getLogger("coordinator.transport")

COORDINATOR_SERVICE = coordinator_service_pb2.DESCRIPTOR.services_by_name[
    "CoordinatorService"
].full_name


@dataclass
class CoordinatorServer:
    """A started server and the port it is bound to."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING, or NOT_SERVING (the store is unreachable: requests would fail)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", COORDINATOR_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, stop taking RPCs, and let running ones finish within ``grace``."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not the message they should be."""

    error: str


def _tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(str(error))

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], request: Undecodable) -> None:
    await context.abort_with_status(
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid protobuf message: {request.error}"[:500],
            "UNDECODABLE_REQUEST",
        )
    )


async def _answer_error(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    """End the call with the rich status of ``error`` (one of ours, or a bug: INTERNAL)."""
    if isinstance(error, SagaError):
        await context.abort_with_status(status_of(error))
    # A bug, not the client's fault: say so plainly instead of gRPC's bare UNKNOWN.
    log.error("unexpected error in a CoordinatorService call", exc_info=error)
    await context.abort_with_status(
        rich_status(grpc.StatusCode.INTERNAL, "internal error; see the logs", "INTERNAL")
    )


def add_coordinator_service(
    servicer: CoordinatorServicer, server: grpc.aio.Server, gate: Gate | None = None
) -> None:
    """Register the service; every method is admitted by ``gate`` and answers errors the same
    way.

    The gate refuses a caller (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) before
    the handler runs. Undecodable bytes get INVALID_ARGUMENT (the generated registration lets a
    DecodeError escape as UNKNOWN, which tells clients to retry the same garbage); the
    coordinator's errors get their rich status from the error table; anything else is INTERNAL.
    """
    gate = gate or Gate()
    descriptor = coordinator_service_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_class = getattr(coordinator_service_pb2, method.input_type.name)
        response_class = getattr(coordinator_service_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            # A stream is an async generator, or a coroutine that writes it (to time writes).
            guard = _guard_stream if inspect.isasyncgenfunction(behaviour) else _guard_unary
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                guard(method.name, behaviour, gate),
                request_deserializer=_tolerant(request_class.FromString),
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(method.name, behaviour, gate),
                request_deserializer=_tolerant(request_class.FromString),
                response_serializer=response_class.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def _guard_unary(
    method: str, behaviour: Callable[[Any, Any], Awaitable[Any]], gate: Gate
) -> Callable[..., Any]:
    stream = method in STREAMS  # a stream written by a coroutine (see add_coordinator_service)

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            caller = gate.admit(method, request, context)
        except SagaError as error:
            await _answer_error(context, error)
            raise
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        set_caller(caller)
        who = gate.who(caller, context)
        try:
            if stream:
                gate.limits.open_stream(who)
            try:
                return await behaviour(request, context)
            finally:
                if stream:
                    gate.limits.close_stream(who)
        except Exception as error:
            await _answer_error(context, error)
            raise

    return handle


def _guard_stream(
    method: str, behaviour: Callable[[Any, Any], AsyncIterator[Any]], gate: Gate
) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            caller = gate.admit(method, request, context)
        except SagaError as error:
            await _answer_error(context, error)
            raise
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        set_caller(caller)
        who = gate.who(caller, context)
        try:
            gate.limits.open_stream(who)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                gate.limits.close_stream(who)
        except Exception as error:
            await _answer_error(context, error)
            raise

    return handle


def gate_of(settings: Settings) -> Gate:
    """The gate the settings ask for: token verifiers, the client allowlist, the limits.
    ValueError naming the file for anything that does not load."""
    verifiers: list[TokenVerifier] = []
    if settings.auth is not None:
        if settings.auth.tokens is not None:
            verifiers.append(StaticTokens.load(settings.auth.tokens))
        if settings.auth.jwt is not None:
            jwt = settings.auth.jwt
            verifiers.append(JwtTokens.load(jwt.key, jwt.algorithms, jwt.issuer, jwt.audience))
    allowed = frozenset(settings.tls.allowed_clients) if settings.tls is not None else frozenset()
    limits = Limits(
        settings.max_streams_per_caller,
        settings.create_rate_per_caller,
        settings.create_burst_per_caller,
    )
    verifier: TokenVerifier | None = None
    if verifiers:
        verifier = verifiers[0] if len(verifiers) == 1 else AnyOf(verifiers)
    return Gate(verifier, allowed, limits)


async def start_server(
    engine: Engine,
    settings: Settings,
    *,
    telemetry: SagaTelemetry | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> CoordinatorServer:
    """Serve the engine on ``settings.listen``, with TLS and the callers' checks the settings
    ask for; raises if the address cannot be bound or a TLS or token file does not load."""
    gate = gate_of(settings)
    credentials = None if settings.tls is None else server_credentials(settings.tls)
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_coordinator_service(
        CoordinatorServicer(
            engine,
            max_payload_bytes=settings.max_payload_bytes,
            telemetry=telemetry,
            feed_stall_timeout=settings.feed_stall_timeout,
        ),
        server,
        gate,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        # The services served here, and nothing else.
        reflection.enable_server_reflection(
            (COORDINATOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    started = CoordinatorServer(server, health_servicer, port)
    await started.set_serving(True)
    return started
