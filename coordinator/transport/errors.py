"""The one table from the coordinator's errors to gRPC status codes, with rich details."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from coordinator.core.errors import (
    ActionNotAllowed,
    ConcurrentUpdate,
    DefinitionConflict,
    DefinitionNotFound,
    FeedConsumerTooSlow,
    FeedPositionPruned,
    FieldViolation,
    InvalidArgument,
    SagaAlreadyExists,
    SagaError,
    SagaNotCancellable,
    SagaNotFound,
    ShuttingDown,
    StorageFailure,
    StorageUnavailable,
    WatcherTooSlow,
)
from coordinator.transport.access import PermissionDenied, TooManyRequests, Unauthenticated

ERROR_DOMAIN = "saga.coordinator"

# Checked in order: the first class that matches wins (subclasses before their parents).
STATUS_OF: tuple[tuple[type[SagaError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (TooManyRequests, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (SagaNotFound, grpc.StatusCode.NOT_FOUND),
    (DefinitionNotFound, grpc.StatusCode.NOT_FOUND),
    (SagaAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (SagaNotCancellable, grpc.StatusCode.FAILED_PRECONDITION),
    (ActionNotAllowed, grpc.StatusCode.FAILED_PRECONDITION),
    (DefinitionConflict, grpc.StatusCode.ALREADY_EXISTS),
    (ConcurrentUpdate, grpc.StatusCode.ABORTED),
    (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StorageFailure, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (WatcherTooSlow, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FeedPositionPruned, grpc.StatusCode.OUT_OF_RANGE),
    (FeedConsumerTooSlow, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_code_of(error: SagaError) -> grpc.StatusCode:
    """The gRPC code a client sees for this error."""
    for cls, code in STATUS_OF:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    violations: tuple[FieldViolation, ...] = (),
    retry_after: timedelta | None = None,
) -> grpc.Status:
    """A status carrying an ErrorInfo and, for invalid input, a BadRequest; with
    ``retry_after``, a RetryInfo saying when to try again."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    details.append(info)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(retry_after)
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    if violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in violations
                ]
            )
        )
        details.append(bad_request)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def status_of(error: SagaError) -> grpc.Status:
    """The rich status for one of the coordinator's errors."""
    violations = error.violations if isinstance(error, InvalidArgument) else ()
    retry_after = error.retry_after if isinstance(error, TooManyRequests) else None
    return rich_status(status_code_of(error), error.message, error.reason, violations, retry_after)
