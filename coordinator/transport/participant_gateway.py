"""Calls participants over grpc.aio and reads their answers as outcomes (DESIGN.md section 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import timedelta

import grpc
from google.rpc import error_details_pb2, status_pb2
from saga.v1 import participant_service_pb2 as pb
from saga.v1 import participant_service_pb2_grpc as pb_grpc

from coordinator.config import ParticipantEndpoint
from coordinator.core.calls import ParticipantCall
from coordinator.core.events import Failed, Outcome, Rejected, Succeeded, Transient
from coordinator.core.model import Operation

# Outcome unknown: the same request is sent again.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def outcome_of(
    code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str | bytes]] | None
) -> Outcome:
    """Read a participant's non-OK answer as the outcome table says."""
    reason, retry_after = "", None
    for key, value in trailing or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    reason = info.reason
                elif detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToTimedelta()
        except Exception:  # a participant's garbage details must not break the coordinator
            continue
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return Rejected(reason=reason or "REJECTED", message=message)
    if code in TRANSIENT_CODES:
        return Transient(code=code.name, message=message, reason=reason, retry_after=retry_after)
    return Failed(code=code.name, message=message, reason=reason)


class GrpcParticipantGateway:
    """One reused channel per participant, a bound on calls in flight to each, and per-call
    deadlines from the step definition."""

    def __init__(
        self,
        endpoints: Mapping[str, ParticipantEndpoint],
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_output_bytes: int = 1024 * 1024,
        max_calls_per_participant: int = 64,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self._endpoints = dict(endpoints)
        self._max_calls = max_calls_per_participant
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._max_message_bytes = max_message_bytes
        self._max_output_bytes = max_output_bytes
        self._interceptors = list(interceptors)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.ParticipantServiceAsyncStub] = {}

    def _stub(self, participant: str) -> pb_grpc.ParticipantServiceAsyncStub | None:
        stub = self._stubs.get(participant)
        if stub is not None:
            return stub
        endpoint = self._endpoints.get(participant)
        if endpoint is None:
            return None
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if endpoint.tls:
            # A failed handshake (unknown CA, expired, another name, no client certificate
            # accepted) answers UNAVAILABLE: transient, and the participant was never called.
            credentials = grpc.ssl_channel_credentials(
                root_certificates=endpoint.root_certificates,
                private_key=endpoint.client_key,
                certificate_chain=endpoint.client_certificate,
            )
            if endpoint.server_name is not None:
                options.append(("grpc.ssl_target_name_override", endpoint.server_name))
            channel = grpc.aio.secure_channel(
                endpoint.address, credentials, options=options, interceptors=self._interceptors
            )
        else:
            channel = grpc.aio.insecure_channel(
                endpoint.address, options=options, interceptors=self._interceptors
            )
        self._channels[participant] = channel
        stub = pb_grpc.ParticipantServiceStub(channel)
        self._stubs[participant] = stub
        return stub

    async def send(self, call: ParticipantCall) -> Outcome:
        """Send one attempt; every answer, and every failure to get one, becomes an outcome."""
        stub = self._stub(call.participant)
        if stub is None:
            return Failed(
                code="NOT_FOUND",
                reason="PARTICIPANT_NOT_CONFIGURED",
                message=f"participant {call.participant!r} is not in the configuration",
            )
        timeout = max(call.timeout, timedelta(milliseconds=1)).total_seconds()
        slots = self._slots.get(call.participant)
        if slots is None:
            slots = self._slots[call.participant] = asyncio.Semaphore(self._max_calls)
        # Backpressure: a slow participant holds its sagas here rather than being flooded.
        async with slots:
            return await self._send(stub, call, timeout)

    async def _send(
        self, stub: pb_grpc.ParticipantServiceAsyncStub, call: ParticipantCall, timeout: float
    ) -> Outcome:
        request = (
            execute_request(call)
            if call.operation is Operation.EXECUTE
            else compensate_request(call)
        )
        if request.ByteSize() > self._max_message_bytes:
            # Sending it again would fail the same way: the step fails rather than retrying.
            return Failed(
                code="RESOURCE_EXHAUSTED",
                reason="REQUEST_TOO_LARGE",
                message=f"the {call.operation.value} request is {request.ByteSize()} bytes, "
                f"above max_message_bytes {self._max_message_bytes}: the saga's input and "
                "earlier outputs are too large",
            )
        try:
            metadata = tuple(call.headers.items())
            if isinstance(request, pb.ExecuteRequest):
                response = await stub.Execute(request, timeout=timeout, metadata=metadata)
                if len(response.output) > self._max_output_bytes:
                    return Failed(
                        code="RESOURCE_EXHAUSTED",
                        reason="OUTPUT_TOO_LARGE",
                        message=f"the output is {len(response.output)} bytes, above "
                        f"max_payload_bytes {self._max_output_bytes}",
                    )
                return Succeeded(output=response.output)
            await stub.Compensate(request, timeout=timeout, metadata=metadata)
            return Succeeded()
        except grpc.aio.AioRpcError as error:
            trailing = error.trailing_metadata()
            return outcome_of(error.code(), error.details() or "", list(trailing or ()))

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close()


def execute_request(call: ParticipantCall) -> pb.ExecuteRequest:
    """The Execute request of a call."""
    return pb.ExecuteRequest(
        saga=call.saga_name,
        definition=call.definition,
        definition_version=call.definition_version,
        step=call.step,
        action=call.action,
        request_id=call.request_id,
        attempt=call.attempt,
        input=call.input,
        previous_outputs=dict(call.previous_outputs),
    )


def compensate_request(call: ParticipantCall) -> pb.CompensateRequest:
    """The Compensate request of a call."""
    request = pb.CompensateRequest(
        saga=call.saga_name,
        definition=call.definition,
        definition_version=call.definition_version,
        step=call.step,
        action=call.action,
        request_id=call.request_id,
        attempt=call.attempt,
        input=call.input,
        execute_request_id=call.execute_request_id,
    )
    if call.execute_output is not None:
        request.execute_output = call.execute_output
    return request
