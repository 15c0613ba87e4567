"""The SDK's exceptions, and the parsing of gRPC's rich error status into them.

The tree::

    SagaSdkError                      root of everything the SDK raises
    ├── SagaRpcError                  the coordinator answered a non-OK status
    │   ├── InvalidArgument           INVALID_ARGUMENT (see field_violations)
    │   ├── NotFound                  NOT_FOUND
    │   ├── AlreadyExists             ALREADY_EXISTS
    │   ├── FailedPrecondition        FAILED_PRECONDITION (e.g. ACTION_NOT_ALLOWED)
    │   ├── Aborted                   ABORTED (e.g. SAGA_VERSION_MISMATCH)
    │   ├── Unauthenticated           UNAUTHENTICATED: no valid bearer token
    │   ├── PermissionDenied          PERMISSION_DENIED: the token's roles do not allow it
    │   ├── Unavailable               UNAVAILABLE
    │   └── DeadlineExceeded          DEADLINE_EXCEEDED
    ├── WaitTimeout                   wait() gave up (also a builtin TimeoutError)
    └── Rejected                      raised by a participant's handler: a business "no"
        └── ExecuteAfterCompensate    the barrier refused an Execute that came after its
                                      Compensate

Every `SagaRpcError` carries the status code, the `ErrorInfo` reason and domain, and the
`BadRequest` field violations sent in the `google.rpc.Status`, when there were any.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# The trailing metadata key under which gRPC carries a serialized google.rpc.Status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# ErrorInfo.reason's documented shape.
_REASON = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")


class SagaSdkError(Exception):
    """Root of every exception the SDK raises."""


class FieldViolation(NamedTuple):
    """One invalid field of a request, from a `google.rpc.BadRequest`.

    A named tuple, so that `(field, description)` pairs compare and unpack as such.
    """

    field: str
    """Path of the field, e.g. "saga_id"."""
    description: str
    """Why it is invalid."""


class SagaRpcError(SagaSdkError):
    """A call answered with a non-OK gRPC status (the coordinator, or a participant).

    `reason` and `domain` come from the status' `ErrorInfo` ("" when it had none);
    `field_violations` from its `BadRequest`.
    """

    grpc_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = tuple(field_violations)


class InvalidArgument(SagaRpcError):
    """The request was invalid; `field_violations` says which fields and why."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SagaRpcError):
    """The saga (or definition) does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SagaRpcError):
    """A saga with this id exists, created by a different request."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SagaRpcError):
    """The saga is not in a state that allows this, e.g. cancelling a saga that has ended, or
    an operator action that does not fit (ACTION_NOT_ALLOWED; the message names what would)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SagaRpcError):
    """The call lost a race, e.g. an action's `expected_version` was stale; read and retry."""

    grpc_code = grpc.StatusCode.ABORTED


class Unauthenticated(SagaRpcError):
    """The coordinator needs a valid bearer token and the call had none (missing, unknown or
    expired); see `SagaClient`'s `token`."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SagaRpcError):
    """The caller is known, and its roles (or definitions, or client certificate) do not allow
    this call; the message says what it needs."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(SagaRpcError):
    """The coordinator could not be reached; the call may be retried."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SagaRpcError):
    """The call's deadline passed; its outcome is unknown."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class WaitTimeout(SagaSdkError, TimeoutError):
    """`wait()` gave up before the saga settled."""

    def __init__(self, saga_id: str, timeout: float | None) -> None:
        super().__init__(f"saga {saga_id!r} did not settle within {timeout} s")
        self.saga_id = saga_id
        self.timeout = timeout


class Rejected(SagaSdkError):
    """A business "no", raised by a participant's handler: nothing was applied.

    The participant answers FAILED_PRECONDITION with an `ErrorInfo` carrying `reason`, and the
    coordinator compensates the saga instead of retrying.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        if not _REASON.match(reason):
            raise ValueError(f"a rejection's reason is UPPER_SNAKE, e.g. NO_FUNDS: {reason!r}")
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


class ExecuteAfterCompensate(Rejected):
    """The barrier refused an Execute whose Compensate had already been answered."""

    REASON: ClassVar[str] = "EXECUTE_AFTER_COMPENSATE"

    def __init__(self, message: str = "") -> None:
        super().__init__(
            self.REASON,
            message or "this step was compensated before its Execute arrived; nothing applied",
        )


_BY_CODE: Mapping[grpc.StatusCode, type[SagaRpcError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
    )
    if cls.grpc_code is not None
}


def error_from_status(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None
) -> SagaRpcError:
    """Build the `SagaRpcError` subclass for a status code and its parsed rich status."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = _BY_CODE.get(code, SagaRpcError)
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
    )


def error_from_call(exc: grpc.RpcError) -> SagaRpcError:
    """Translate a failed synchronous call (a `grpc.RpcError` that is also a `grpc.Call`)."""
    call: Any = exc
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        # from_call refuses a status whose code or message disagrees with the call's; keep the
        # call's own code and message rather than failing while reporting a failure.
        status = None
    return error_from_status(call.code(), call.details() or "", status)


def error_from_aio(exc: grpc.aio.AioRpcError) -> SagaRpcError:
    """Translate a failed `grpc.aio` call from its code, details and trailing metadata."""
    status: status_pb2.Status | None = None
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    return error_from_status(exc.code(), exc.details() or "", status)
