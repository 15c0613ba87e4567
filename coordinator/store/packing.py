"""The compact stored form of definitions, failures, headers and events: MessagePack, times as
integers.

The format is written out field by field rather than derived from the dataclasses, so that
renaming a Python field never silently changes stored data:

- times are whole microseconds since the Unix epoch, UTC; durations are whole microseconds;
- bytes stay bytes; enums are their values; ``None`` stays nil;
- an outcome is an array whose first element is its kind (``succeeded``, ``rejected``...);
- a definition is stored in full, defaults included, once per distinct content: a saga keeps
  the definition it started with even when the code's defaults change later. Fields added
  since schema 2 (a step's ``max_attempts`` and ``emits``, the saga's ``deadline``) are written
  only when they say something (a limit, a name): a definition without them packs to the very
  bytes schema 2 wrote, so its digest, and the row it is stored under, stay the same. Reading
  a body without them gives the values that mean "none" (0, "", no deadline), spelled out
  here rather than taken from the dataclasses' defaults;
- labels, audit trails and retry overrides are nil when there are none.

Decoding anything this module did not write raises ``StoreCorrupt``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar, assert_never

import msgpack

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Event,
    Failed,
    MarkCompensated,
    Outcome,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.model import (
    AuditEntry,
    Failure,
    Operation,
    OperatorAction,
    RetryPolicy,
    SagaDefinition,
    StepDefinition,
    StepKind,
)
from coordinator.store.errors import StoreCorrupt

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# The stored event types and outcome kinds. They are part of the stored format: never change one.
SAGA_CREATED = "saga_created"
CALL_ANSWERED = "call_answered"
CANCEL_REQUESTED = "cancel_requested"
RETRY_REQUESTED = "retry_requested"
RESUME_REQUESTED = "resume_requested"
MARK_COMPENSATED = "mark_compensated"
COMPLETE_REQUESTED = "complete_requested"
DEADLINE_EXCEEDED = "deadline_exceeded"
_SUCCEEDED = "succeeded"
_REJECTED = "rejected"
_TRANSIENT = "transient"
_FAILED = "failed"

_T = TypeVar("_T")
_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


def pack(value: Any) -> bytes:
    """MessagePack bytes of plain values."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes, what: str) -> Any:
    """The plain values of ``pack``; ``StoreCorrupt`` for anything else."""
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise StoreCorrupt(f"stored {what} cannot be decoded: {error}") from error


def decoding(what: str, data: bytes, build: Callable[[Any], _T]) -> _T:
    """Unpack ``data`` and build a value of it; any mismatch is ``StoreCorrupt``."""
    value = unpack(data, what)
    try:
        return build(value)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise StoreCorrupt(f"stored {what} is not in the expected form: {error!r}") from error


# --- times -----------------------------------------------------------------------------------


def to_micros(value: datetime) -> int:
    """A timezone-aware datetime as whole microseconds since the Unix epoch."""
    if value.tzinfo is None:
        raise ValueError(f"cannot store naive datetime {value!r}: the store keeps UTC instants")
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    """The UTC datetime of ``to_micros``."""
    if type(value) is not int:
        raise StoreCorrupt(f"stored time {value!r} is not an integer")
    return _EPOCH + timedelta(microseconds=value)


def optional_micros(value: datetime | None) -> int | None:
    """``to_micros``, keeping None."""
    return None if value is None else to_micros(value)


def from_optional_micros(value: int | None) -> datetime | None:
    """``from_micros``, keeping None."""
    return None if value is None else from_micros(value)


def _duration(value: timedelta) -> int:
    return value // _MICROSECOND


def _from_duration(value: int) -> timedelta:
    return timedelta(microseconds=_int(value))


# --- definitions -----------------------------------------------------------------------------


def pack_definition(definition: SagaDefinition) -> bytes:
    """A saga definition, every field written out (see the module docstring for the newer
    fields, written only when set)."""
    body: dict[str, Any] = {
        "name": definition.name,
        "version": definition.version,
        "description": definition.description,
        "steps": [_step_definition(step) for step in definition.steps],
    }
    if definition.deadline is not None:
        body["deadline"] = _duration(definition.deadline)
    return pack(body)


def _step_definition(step: StepDefinition) -> list[Any]:
    fields = [
        step.name,
        step.participant,
        step.action,
        step.compensation,
        step.kind.value,
        _duration(step.timeout),
        _policy(step.retry),
        _policy(step.compensation_retry),
    ]
    if step.max_attempts != _NO_MAX_ATTEMPTS or step.emits != _NO_EMITS:
        fields += [step.max_attempts, step.emits]
    return fields


# What a definition packed before schema 3 means by the fields it lacks.
_NO_MAX_ATTEMPTS = 0
_NO_EMITS = ""
_SCHEMA_2_STEP_FIELDS = 8


def digest(packed_definition: bytes) -> bytes:
    """What identifies a definition's content: equal contents are stored once."""
    return hashlib.sha256(packed_definition).digest()


def unpack_definition(data: bytes) -> SagaDefinition:
    """The saga definition of ``pack_definition`` (or of schema 2, which lacked newer fields)."""
    return decoding("definition", data, _definition)


def _definition(value: Any) -> SagaDefinition:
    deadline = value.get("deadline")
    return SagaDefinition(
        name=_str(value["name"]),
        version=_int(value["version"]),
        description=_str(value["description"]),
        steps=tuple(_from_step_definition(step) for step in value["steps"]),
        deadline=None if deadline is None else _from_duration(deadline),
    )


def _from_step_definition(value: Any) -> StepDefinition:
    if len(value) == _SCHEMA_2_STEP_FIELDS:
        value = [*value, _NO_MAX_ATTEMPTS, _NO_EMITS]
    (
        name,
        participant,
        action,
        compensation,
        kind,
        timeout,
        retry,
        compensation_retry,
        max_attempts,
        emits,
    ) = value
    return StepDefinition(
        name=_str(name),
        participant=_str(participant),
        action=_str(action),
        compensation=_str(compensation),
        kind=StepKind(kind),
        timeout=_from_duration(timeout),
        retry=_from_policy(retry),
        compensation_retry=_from_policy(compensation_retry),
        max_attempts=_int(max_attempts),
        emits=_str(emits),
    )


def _policy(policy: RetryPolicy) -> list[Any]:
    return [
        policy.max_attempts,
        _duration(policy.initial_backoff),
        _duration(policy.max_backoff),
        float(policy.multiplier),
        float(policy.jitter),
    ]


def _from_policy(value: Any) -> RetryPolicy:
    max_attempts, initial, maximum, multiplier, jitter = value
    return RetryPolicy(
        max_attempts=_int(max_attempts),
        initial_backoff=_from_duration(initial),
        max_backoff=_from_duration(maximum),
        multiplier=float(multiplier),
        jitter=float(jitter),
    )


def pack_policy(policy: RetryPolicy | None) -> bytes | None:
    """A retry policy on its own (an operator's override); None stays None."""
    return None if policy is None else pack(_policy(policy))


def unpack_policy(data: bytes | None) -> RetryPolicy | None:
    """The retry policy of ``pack_policy``."""
    return None if data is None else decoding("retry policy", data, _from_policy)


# --- failures, headers, labels and audit trails ----------------------------------------------


def pack_failure(failure: Failure | None) -> bytes | None:
    """Why something did not go as planned; None stays None."""
    if failure is None:
        return None
    return pack([failure.step, failure.operation, failure.code, failure.reason, failure.message])


def unpack_failure(data: bytes | None) -> Failure | None:
    """The failure of ``pack_failure``."""
    if data is None:
        return None
    return decoding("failure", data, lambda value: Failure(*map(_str, value)))


def pack_headers(headers: Mapping[str, str]) -> bytes:
    """Propagation headers (the saga's trace context)."""
    return pack(dict(headers))


def unpack_headers(data: bytes) -> Mapping[str, str]:
    """The headers of ``pack_headers``, read-only."""
    return decoding("trace context", data, _headers)


def pack_labels(labels: Mapping[str, str]) -> bytes | None:
    """A saga's labels; None when it has none."""
    return pack(dict(labels)) if labels else None


def unpack_labels(data: bytes | None) -> Mapping[str, str]:
    """The labels of ``pack_labels``, read-only."""
    return _EMPTY_HEADERS if data is None else decoding("labels", data, _headers)


def _headers(value: Any) -> Mapping[str, str]:
    if not value:
        return _EMPTY_HEADERS
    return MappingProxyType({_str(key): _str(item) for key, item in value.items()})


def pack_audit(audit: Sequence[AuditEntry]) -> bytes | None:
    """A saga's audit trail, oldest first; None when it is empty."""
    if not audit:
        return None
    return pack(
        [
            [
                entry.sequence,
                to_micros(entry.at),
                entry.actor,
                entry.action.value,
                entry.step,
                entry.reason,
            ]
            for entry in audit
        ]
    )


def unpack_audit(data: bytes | None) -> tuple[AuditEntry, ...]:
    """The audit trail of ``pack_audit``."""
    if data is None:
        return ()

    def build(value: Any) -> tuple[AuditEntry, ...]:
        return tuple(
            AuditEntry(
                sequence=_int(sequence),
                at=from_micros(at),
                actor=_str(actor),
                action=OperatorAction(action),
                step=_str(step),
                reason=_str(reason),
            )
            for sequence, at, actor, action, step, reason in value
        )

    return decoding("audit trail", data, build)


# --- events ----------------------------------------------------------------------------------


def event_type(event: Event) -> str:
    """The stored type of an event (``saga_created``, ``call_answered``...)."""
    match event:
        case SagaCreated():
            return SAGA_CREATED
        case CallAnswered():
            return CALL_ANSWERED
        case CancelRequested():
            return CANCEL_REQUESTED
        case RetryRequested():
            return RETRY_REQUESTED
        case ResumeRequested():
            return RESUME_REQUESTED
        case MarkCompensated():
            return MARK_COMPENSATED
        case CompleteRequested():
            return COMPLETE_REQUESTED
        case DeadlineExceeded():
            return DEADLINE_EXCEEDED
        case _:
            assert_never(event)


def pack_event(event: Event) -> bytes:
    """An event's body. A creation's body is empty: the saga's row holds its definition, input,
    trace context and labels, which never change, so they are not stored twice."""
    match event:
        case SagaCreated():
            return pack({})
        case CallAnswered():
            return pack(
                {
                    "operation": event.operation.value,
                    "step": event.step,
                    "attempt": event.attempt,
                    "outcome": _outcome(event.outcome),
                    "sent_at": optional_micros(event.sent_at),
                }
            )
        case CancelRequested():
            return pack(
                {"reason": event.reason, "in_flight": event.call_in_flight, "actor": event.actor}
            )
        case RetryRequested() | MarkCompensated():
            return pack(
                {
                    "step": event.step,
                    "actor": event.actor,
                    "reason": event.reason,
                    "in_flight": event.call_in_flight,
                }
            )
        case ResumeRequested():
            policy = event.compensation_retry
            return pack(
                {
                    "actor": event.actor,
                    "reason": event.reason,
                    "compensation_retry": None if policy is None else _policy(policy),
                }
            )
        case CompleteRequested():
            return pack(
                {
                    "step": event.step,
                    "output": event.output,
                    "actor": event.actor,
                    "reason": event.reason,
                    "in_flight": event.call_in_flight,
                }
            )
        case DeadlineExceeded():
            return pack({"in_flight": event.call_in_flight})
        case _:
            assert_never(event)


def unpack_event(kind: str, data: bytes, created: Callable[[], SagaCreated]) -> Event:
    """The event of ``pack_event``; ``created`` rebuilds a creation from the saga's row."""

    def build(value: Any) -> Event:
        if kind == SAGA_CREATED:
            return created()
        if kind == CALL_ANSWERED:
            return CallAnswered(
                operation=Operation(value["operation"]),
                step=_int(value["step"]),
                attempt=_int(value["attempt"]),
                outcome=_from_outcome(value["outcome"]),
                sent_at=from_optional_micros(value["sent_at"]),
            )
        if kind == CANCEL_REQUESTED:
            # Schema 2 recorded no actor.
            return CancelRequested(
                _str(value["reason"]), _bool(value["in_flight"]), _str(value.get("actor", ""))
            )
        if kind == RETRY_REQUESTED:
            return RetryRequested(
                step=_int(value["step"]),
                actor=_str(value["actor"]),
                reason=_str(value["reason"]),
                call_in_flight=_bool(value["in_flight"]),
            )
        if kind == RESUME_REQUESTED:
            policy = value["compensation_retry"]
            return ResumeRequested(
                actor=_str(value["actor"]),
                reason=_str(value["reason"]),
                compensation_retry=None if policy is None else _from_policy(policy),
            )
        if kind == MARK_COMPENSATED:
            return MarkCompensated(
                step=_int(value["step"]),
                actor=_str(value["actor"]),
                reason=_str(value["reason"]),
                call_in_flight=_bool(value["in_flight"]),
            )
        if kind == COMPLETE_REQUESTED:
            return CompleteRequested(
                step=_int(value["step"]),
                output=_bytes(value["output"]),
                actor=_str(value["actor"]),
                reason=_str(value["reason"]),
                call_in_flight=_bool(value["in_flight"]),
            )
        if kind == DEADLINE_EXCEEDED:
            return DeadlineExceeded(call_in_flight=_bool(value["in_flight"]))
        raise ValueError(f"unknown event type {kind!r}")

    return decoding("event", data, build)


def _outcome(outcome: Outcome) -> list[Any]:
    match outcome:
        case Succeeded(output=output):
            return [_SUCCEEDED, output]
        case Rejected(reason=reason, message=message, code=code):
            return [_REJECTED, reason, message, code]
        case Transient(code=code, message=message, reason=reason, retry_after=retry_after):
            after = None if retry_after is None else _duration(retry_after)
            return [_TRANSIENT, code, message, reason, after]
        case Failed(code=code, message=message, reason=reason):
            return [_FAILED, code, message, reason]
        case _:
            assert_never(outcome)


def _from_outcome(value: Any) -> Outcome:
    kind, *fields = value
    if kind == _SUCCEEDED:
        (output,) = fields
        return Succeeded(_bytes(output))
    if kind == _REJECTED:
        reason, message, code = map(_str, fields)
        return Rejected(reason, message, code)
    if kind == _TRANSIENT:
        code, message, reason, after = fields
        retry_after = None if after is None else _from_duration(after)
        return Transient(_str(code), _str(message), _str(reason), retry_after)
    if kind == _FAILED:
        code, message, reason = map(_str, fields)
        return Failed(code, message, reason)
    raise ValueError(f"unknown outcome {kind!r}")


# --- checked scalars -------------------------------------------------------------------------


def _str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected text, found {value!r}"[:200])
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, found {value!r}"[:200])
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected a boolean, found {value!r}"[:200])
    return value


def _bytes(value: Any) -> bytes:
    if type(value) is not bytes:
        raise TypeError(f"expected bytes, found {value!r}"[:200])
    return value
