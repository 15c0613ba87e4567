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
    ├── Rejected                      raised by a participant's handler: a business "no"
    │   └── ExecuteAfterCompensate    the barrier refused an Execute that came after its
    │                                 Compensate
    ├── RetryLater                    raised by a handler: transient, try again after a delay
    └── PermanentFailure              raised by a handler: this request can never succeed

Every `SagaRpcError` carries the status code, the `ErrorInfo` reason and domain, the
`BadRequest` field violations and the `RetryInfo` delay sent in the `google.rpc.Status`, when
there were any.

A participant's handler steers the coordinator with the exception it raises; the participant
answers as the contract's table "How a participant's answer is read" says:

- the handler returns                    -> OK with the output: the saga goes on;
- ``Rejected(reason, message)``          -> FAILED_PRECONDITION + ErrorInfo(reason): a business
  "no", not retried, the saga compensates;
- ``RetryLater(message, retry_after=timedelta(...), reason=...)`` -> UNAVAILABLE +
  RetryInfo(retry_delay) + ErrorInfo(reason): transient, the coordinator retries the same
  request_id no sooner than retry_after (up to its own cap);
- ``PermanentFailure(message, reason=...)`` -> INVALID_ARGUMENT + ErrorInfo(reason): the
  participant can never do this request; the step fails at once, no retry, the saga
  compensates;
- any other exception                    -> INTERNAL + ErrorInfo(HANDLER_FAILED), logged:
  transient, retried with the step's backoff.

With a barrier, the answer of an Execute that raised `Rejected` or `PermanentFailure` is
stored with the (rolled back) call, so that a duplicate gets the same answer without running
the handler; `RetryLater` and any other exception store nothing, so that the retry runs the
handler again. A Compensate's `Rejected` or `PermanentFailure` is not stored either: nothing
was undone, and the same compensation sent again (an operator resuming the saga) runs afresh.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# The trailing metadata key under which gRPC carries a serialized google.rpc.Status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# ErrorInfo.reason's documented shape.
REASON_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")


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
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = tuple(field_violations)
        self.retry_after = retry_after
        """The status' `RetryInfo` delay: do not call again sooner. None when it had none."""


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
        if not REASON_PATTERN.match(reason):
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


class RetryLater(SagaSdkError):
    """Raised by a participant's handler: not now, try again in `retry_after`.

    The participant answers UNAVAILABLE with a `RetryInfo(retry_delay=retry_after)` and an
    `ErrorInfo(reason)`; the coordinator retries the same request_id, no sooner than
    `retry_after` (it caps how long one answer can make it wait). Nothing is stored by the
    barrier: the retry runs the handler again. For a dependency that is down, a rate limit,
    a resource that is still being prepared.
    """

    DEFAULT_REASON: ClassVar[str] = "RETRY_LATER"

    def __init__(
        self, message: str, *, retry_after: timedelta, reason: str = DEFAULT_REASON
    ) -> None:
        if not isinstance(retry_after, timedelta):
            raise TypeError(
                f"retry_after is a datetime.timedelta, not {type(retry_after).__name__}"
            )
        if retry_after <= timedelta(0):
            raise ValueError(f"retry_after must be positive, not {retry_after}")
        _check_reason(reason, "RetryLater")
        super().__init__(f"{reason}: {message} (retry after {retry_after})")
        self.message = message
        self.retry_after = retry_after
        self.reason = reason


class PermanentFailure(SagaSdkError):
    """Raised by a participant's handler: this request can never be done here, do not retry.

    The participant answers INVALID_ARGUMENT with an `ErrorInfo(reason)`; the coordinator
    records the step as failed without retrying it and compensates the saga. Unlike
    `Rejected` (a business "no" about the current state, e.g. no funds), it says the request
    itself is unusable (e.g. a currency this service does not handle). With a barrier, an
    Execute's permanent failure is stored and answered again to its duplicates.
    """

    DEFAULT_REASON: ClassVar[str] = "PERMANENT_FAILURE"

    def __init__(self, message: str, *, reason: str = DEFAULT_REASON) -> None:
        _check_reason(reason, "PermanentFailure")
        super().__init__(f"{reason}: {message}" if message else reason)
        self.message = message
        self.reason = reason


def _check_reason(reason: str, what: str) -> None:
    if not REASON_PATTERN.match(reason):
        raise ValueError(f"a {what}'s reason is UPPER_SNAKE, e.g. LEDGER_DOWN: {reason!r}")


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
    retry_after: timedelta | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta()
    cls = _BY_CODE.get(code, SagaRpcError)
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
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
