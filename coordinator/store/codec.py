"""Lossless JSON for sagas and events: how schema 1 stored them, read when migrating.

The format is explicit rather than derived from the dataclasses, so that renaming a Python field
never silently changes stored data:

- bytes are base64 strings; ``None`` stays ``null``;
- datetimes are ISO-8601 in UTC with microseconds and a ``Z``
  (``2025-03-01T12:00:00.000000Z``): fixed width, so text order is time order;
- timedeltas are whole microseconds (an exact integer, whatever the magnitude);
- enums are their values; unions carry a ``"type"`` tag;
- a definition is stored in full, defaults included: a saga keeps the definition it started
  with even when the code's defaults change later.

Schema 1 knew nothing of labels, audit trails, deadlines, budgets or operator actions: sagas
are written without them and read back with none, and operator events are refused.

Decoding anything this module did not write raises ``StoreCorrupt``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar, assert_never

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Event,
    Failed,
    Outcome,
    RecordedEvent,
    Rejected,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.model import (
    Failure,
    Operation,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaState,
    StepDefinition,
    StepKind,
    StepRun,
    StepState,
)
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import CALL_ANSWERED, CANCEL_REQUESTED, SAGA_CREATED

_MICROSECOND = timedelta(microseconds=1)

# The "type" tags of the unions. They are part of the stored format: never change one. The
# events' tags are those of the current format (``packing``), which kept them.
_SUCCEEDED = "succeeded"
_REJECTED = "rejected"
_TRANSIENT = "transient"
_FAILED = "failed"

JSONObject = dict[str, Any]
_T = TypeVar("_T")


# --- public API: text ------------------------------------------------------------------------


def encode_saga(saga: Saga) -> str:
    """The saga, with its definition, as JSON text."""
    return _with_definition(saga.definition, _saga_fields(saga))


def decode_saga(text: str) -> Saga:
    """The saga that ``encode_saga`` wrote; raise ``StoreCorrupt`` for anything else."""
    return _decoding("saga", text, saga_from_json)


def encode_event(event: Event) -> str:
    """The event, tagged with its type, as JSON text."""
    if isinstance(event, SagaCreated):
        return _with_definition(event.definition, _created_fields(event))
    return _dumps(event_to_json(event))


def decode_event(text: str) -> Event:
    """The event that ``encode_event`` wrote; raise ``StoreCorrupt`` for anything else."""
    return _decoding("event", text, event_from_json)


def encode_recorded_event(recorded: RecordedEvent) -> str:
    """A logged event with its saga, sequence and time, as JSON text."""
    return _dumps(recorded_event_to_json(recorded))


def decode_recorded_event(text: str) -> RecordedEvent:
    """The logged event that ``encode_recorded_event`` wrote; raise ``StoreCorrupt`` otherwise."""
    return _decoding("recorded event", text, recorded_event_from_json)


def encode_datetime(value: datetime) -> str:
    """A timezone-aware datetime as fixed-width ISO-8601 UTC text with microseconds."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"cannot store naive datetime {value!r}: the store keeps UTC instants")
    # isoformat pads the year to four digits, unlike strftime('%Y'): the width stays fixed.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def decode_datetime(text: str) -> datetime:
    """The UTC datetime that ``encode_datetime`` wrote."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"stored datetime {text!r} has no timezone")
    return value.astimezone(UTC)


# --- public API: JSON values -----------------------------------------------------------------


def saga_to_json(saga: Saga) -> JSONObject:
    """The saga as a JSON object."""
    return {"definition": definition_to_json(saga.definition), **_saga_fields(saga)}


def _saga_fields(saga: Saga) -> JSONObject:
    return {
        "saga_id": saga.saga_id,
        "input": _bytes(saga.input),
        "state": saga.state.value,
        "steps": [_step_run_to_json(step) for step in saga.steps],
        "created_at": encode_datetime(saga.created_at),
        "updated_at": encode_datetime(saga.updated_at),
        "version": saga.version,
        "ended_at": _optional_datetime(saga.ended_at),
        "failure": _optional_failure(saga.failure),
        "cancel_reason": saga.cancel_reason,
        "trace_context": dict(saga.trace_context),
    }


def saga_from_json(data: JSONObject) -> Saga:
    """The saga of ``saga_to_json``."""
    return Saga(
        saga_id=_str(data["saga_id"]),
        definition=definition_from_json(data["definition"]),
        input=_from_bytes(data["input"]),
        state=SagaState(data["state"]),
        steps=tuple(_step_run_from_json(step) for step in data["steps"]),
        created_at=decode_datetime(data["created_at"]),
        updated_at=decode_datetime(data["updated_at"]),
        version=_int(data["version"]),
        ended_at=_from_optional_datetime(data["ended_at"]),
        failure=_from_optional_failure(data["failure"]),
        cancel_reason=_optional_str(data["cancel_reason"]),
        trace_context=_headers(data["trace_context"]),
    )


def definition_to_json(definition: SagaDefinition) -> JSONObject:
    """A saga definition as a JSON object, every field written out."""
    return {
        "name": definition.name,
        "version": definition.version,
        "description": definition.description,
        "steps": [_step_definition_to_json(step) for step in definition.steps],
    }


def definition_from_json(data: JSONObject) -> SagaDefinition:
    """The saga definition of ``definition_to_json``."""
    return SagaDefinition(
        name=_str(data["name"]),
        version=_int(data["version"]),
        description=_str(data["description"]),
        steps=tuple(_step_definition_from_json(step) for step in data["steps"]),
    )


def event_to_json(event: Event) -> JSONObject:
    """An event as a JSON object with a ``"type"`` tag; ValueError for an event type schema 1
    never had (operator actions, deadlines)."""
    match event:
        case SagaCreated():
            return {"definition": definition_to_json(event.definition), **_created_fields(event)}
        case CallAnswered():
            return {
                "type": CALL_ANSWERED,
                "operation": event.operation.value,
                "step": event.step,
                "attempt": event.attempt,
                "outcome": _outcome_to_json(event.outcome),
                "sent_at": _optional_datetime(event.sent_at),
            }
        case CancelRequested():
            return {
                "type": CANCEL_REQUESTED,
                "reason": event.reason,
                "call_in_flight": event.call_in_flight,
            }
        case _:
            # Operator actions and deadlines came after schema 1: no schema-1 store holds one.
            raise ValueError(
                f"schema 1 has no {type(event).__name__} events: the JSON codec only reads "
                "and writes what schema-1 stores held"
            )


def _created_fields(event: SagaCreated) -> JSONObject:
    return {
        "type": SAGA_CREATED,
        "saga_id": event.saga_id,
        "input": _bytes(event.input),
        "trace_context": dict(event.trace_context),
    }


def event_from_json(data: JSONObject) -> Event:
    """The event of ``event_to_json``."""
    tag = data["type"]
    if tag == SAGA_CREATED:
        return SagaCreated(
            saga_id=_str(data["saga_id"]),
            definition=definition_from_json(data["definition"]),
            input=_from_bytes(data["input"]),
            trace_context=_headers(data["trace_context"]),
        )
    if tag == CALL_ANSWERED:
        return CallAnswered(
            operation=Operation(data["operation"]),
            step=_int(data["step"]),
            attempt=_int(data["attempt"]),
            outcome=_outcome_from_json(data["outcome"]),
            sent_at=_from_optional_datetime(data.get("sent_at")),
        )
    if tag == CANCEL_REQUESTED:
        in_flight = data.get("call_in_flight", True)
        if not isinstance(in_flight, bool):
            raise ValueError(f"call_in_flight is not a boolean: {in_flight!r}")
        return CancelRequested(reason=_str(data["reason"]), call_in_flight=in_flight)
    raise ValueError(f"unknown event type {tag!r}")


def recorded_event_to_json(recorded: RecordedEvent) -> JSONObject:
    """A logged event as a JSON object."""
    return {
        "saga_id": recorded.saga_id,
        "sequence": recorded.sequence,
        "recorded_at": encode_datetime(recorded.recorded_at),
        "event": event_to_json(recorded.event),
    }


def recorded_event_from_json(data: JSONObject) -> RecordedEvent:
    """The logged event of ``recorded_event_to_json``."""
    return RecordedEvent(
        saga_id=_str(data["saga_id"]),
        sequence=_int(data["sequence"]),
        recorded_at=decode_datetime(data["recorded_at"]),
        event=event_from_json(data["event"]),
    )


# --- the parts -------------------------------------------------------------------------------


def _step_definition_to_json(step: StepDefinition) -> JSONObject:
    return {
        "name": step.name,
        "participant": step.participant,
        "action": step.action,
        "compensation": step.compensation,
        "kind": step.kind.value,
        "timeout_us": _microseconds(step.timeout),
        "retry": _retry_to_json(step.retry),
        "compensation_retry": _retry_to_json(step.compensation_retry),
    }


def _step_definition_from_json(data: JSONObject) -> StepDefinition:
    return StepDefinition(
        name=_str(data["name"]),
        participant=_str(data["participant"]),
        action=_str(data["action"]),
        compensation=_str(data["compensation"]),
        kind=StepKind(data["kind"]),
        timeout=_from_microseconds(data["timeout_us"]),
        retry=_retry_from_json(data["retry"]),
        compensation_retry=_retry_from_json(data["compensation_retry"]),
    )


def _retry_to_json(policy: RetryPolicy) -> JSONObject:
    return {
        "max_attempts": policy.max_attempts,
        "initial_backoff_us": _microseconds(policy.initial_backoff),
        "max_backoff_us": _microseconds(policy.max_backoff),
        "multiplier": policy.multiplier,
        "jitter": policy.jitter,
    }


def _retry_from_json(data: JSONObject) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=_int(data["max_attempts"]),
        initial_backoff=_from_microseconds(data["initial_backoff_us"]),
        max_backoff=_from_microseconds(data["max_backoff_us"]),
        multiplier=_float(data["multiplier"]),
        jitter=_float(data["jitter"]),
    )


def _step_run_to_json(step: StepRun) -> JSONObject:
    return {
        "name": step.name,
        "state": step.state.value,
        "execute_attempts": step.execute_attempts,
        "compensate_attempts": step.compensate_attempts,
        "output": None if step.output is None else _bytes(step.output),
        "failure": _optional_failure(step.failure),
        "next_attempt_at": _optional_datetime(step.next_attempt_at),
        "started_at": _optional_datetime(step.started_at),
        "ended_at": _optional_datetime(step.ended_at),
    }


def _step_run_from_json(data: JSONObject) -> StepRun:
    output = data["output"]
    return StepRun(
        name=_str(data["name"]),
        state=StepState(data["state"]),
        execute_attempts=_int(data["execute_attempts"]),
        compensate_attempts=_int(data["compensate_attempts"]),
        output=None if output is None else _from_bytes(output),
        failure=_from_optional_failure(data["failure"]),
        next_attempt_at=_from_optional_datetime(data["next_attempt_at"]),
        started_at=_from_optional_datetime(data["started_at"]),
        ended_at=_from_optional_datetime(data["ended_at"]),
    )


def _optional_failure(failure: Failure | None) -> JSONObject | None:
    if failure is None:
        return None
    return {
        "step": failure.step,
        "operation": failure.operation,
        "code": failure.code,
        "reason": failure.reason,
        "message": failure.message,
    }


def _from_optional_failure(data: JSONObject | None) -> Failure | None:
    if data is None:
        return None
    return Failure(
        step=_str(data["step"]),
        operation=_str(data["operation"]),
        code=_str(data["code"]),
        reason=_str(data["reason"]),
        message=_str(data["message"]),
    )


def _outcome_to_json(outcome: Outcome) -> JSONObject:
    match outcome:
        case Succeeded():
            return {"type": _SUCCEEDED, "output": _bytes(outcome.output)}
        case Rejected():
            return {
                "type": _REJECTED,
                "reason": outcome.reason,
                "message": outcome.message,
                "code": outcome.code,
            }
        case Transient():
            retry_after = outcome.retry_after
            return {
                "type": _TRANSIENT,
                "code": outcome.code,
                "message": outcome.message,
                "reason": outcome.reason,
                "retry_after_us": None if retry_after is None else _microseconds(retry_after),
            }
        case Failed():
            return {
                "type": _FAILED,
                "code": outcome.code,
                "message": outcome.message,
                "reason": outcome.reason,
            }
        case _:
            assert_never(outcome)


def _outcome_from_json(data: JSONObject) -> Outcome:
    tag = data["type"]
    if tag == _SUCCEEDED:
        return Succeeded(output=_from_bytes(data["output"]))
    if tag == _REJECTED:
        return Rejected(
            reason=_str(data["reason"]), message=_str(data["message"]), code=_str(data["code"])
        )
    if tag == _TRANSIENT:
        retry_after = data["retry_after_us"]
        return Transient(
            code=_str(data["code"]),
            message=_str(data["message"]),
            reason=_str(data["reason"]),
            retry_after=None if retry_after is None else _from_microseconds(retry_after),
        )
    if tag == _FAILED:
        return Failed(
            code=_str(data["code"]), message=_str(data["message"]), reason=_str(data["reason"])
        )
    raise ValueError(f"unknown outcome type {tag!r}")


# --- scalars ---------------------------------------------------------------------------------


def _with_definition(definition: SagaDefinition, fields: JSONObject) -> str:
    # A definition is most of a saga's JSON, and the same for every saga started from it (and
    # for every commit of each): encode it once, then splice its text into each (never empty)
    # object.
    rest = _dumps(fields)
    return '{"definition":' + _definition_text(definition) + "," + rest[1:]


@functools.lru_cache(maxsize=256)
def _definition_text(definition: SagaDefinition) -> str:
    return _dumps(definition_to_json(definition))


def _dumps(data: JSONObject) -> str:
    # ASCII-only output: any Python str (even a lone surrogate) stays storable as UTF-8 text.
    return json.dumps(data, separators=(",", ":"))


def _decoding(what: str, text: str, build: Callable[[JSONObject], _T]) -> _T:
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return build(data)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
        raise StoreCorrupt(f"stored {what} cannot be decoded: {error!r}") from error


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _from_bytes(value: object) -> bytes:
    return base64.b64decode(_str(value), validate=True)


def _microseconds(value: timedelta) -> int:
    return value // _MICROSECOND


def _from_microseconds(value: object) -> timedelta:
    return timedelta(microseconds=_int(value))


def _optional_datetime(value: datetime | None) -> str | None:
    return None if value is None else encode_datetime(value)


def _from_optional_datetime(value: object) -> datetime | None:
    return None if value is None else decode_datetime(_str(value))


def _headers(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object of headers, got {value!r}")
    return MappingProxyType({_str(k): _str(v) for k, v in value.items()})


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
