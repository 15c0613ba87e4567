"""Typed, immutable views of the coordinator's resources, converted from their protos."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from saga.v1 import coordinator_service_pb2, saga_pb2

_E = TypeVar("_E", bound=StrEnum)


class SagaState(StrEnum):
    """Where a saga stands."""

    UNSPECIFIED = "UNSPECIFIED"
    """Not set, or a state this SDK does not know yet."""
    RUNNING = "RUNNING"
    """Steps are being executed forward."""
    COMPENSATING = "COMPENSATING"
    """Executed steps are being compensated, newest first."""
    SUCCEEDED = "SUCCEEDED"
    """Every step succeeded. Terminal."""
    COMPENSATED = "COMPENSATED"
    """Every step that had been sent was compensated. Terminal."""
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    """Parked until an operator acts; never reported as compensated."""

    @property
    def settled(self) -> bool:
        """True when the saga cannot move by itself any more (what `wait()` waits for)."""
        return self in SETTLED_STATES


SETTLED_STATES = frozenset({SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_ATTENTION})
"""The states at which WatchSaga ends and `wait()` returns."""


class StepState(StrEnum):
    """Where one step of a saga stands."""

    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    SKIPPED = "SKIPPED"


class StepKind(StrEnum):
    """The role of a step: the three kinds of saga theory."""

    COMPENSATABLE = "COMPENSATABLE"
    PIVOT = "PIVOT"
    RETRIABLE = "RETRIABLE"


class SagaEventType(StrEnum):
    """What happened to a saga."""

    UNSPECIFIED = "UNSPECIFIED"
    CREATED = "CREATED"
    STEP_SUCCEEDED = "STEP_SUCCEEDED"
    STEP_REJECTED = "STEP_REJECTED"
    STEP_ATTEMPT_FAILED = "STEP_ATTEMPT_FAILED"
    STEP_FAILED = "STEP_FAILED"
    COMPENSATION_SUCCEEDED = "COMPENSATION_SUCCEEDED"
    COMPENSATION_ATTEMPT_FAILED = "COMPENSATION_ATTEMPT_FAILED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"


@dataclass(frozen=True)
class Failure:
    """Why a call, a step or a saga did not go as planned."""

    step: str
    """Step concerned, or ""."""
    operation: str
    """"execute", "compensate" or "cancel"."""
    code: str
    """gRPC status code name of the participant's answer, e.g. "FAILED_PRECONDITION"."""
    reason: str
    """Stable UPPER_SNAKE reason from the participant's ErrorInfo, or ""."""
    message: str
    """Human readable message."""


@dataclass(frozen=True)
class StepRun:
    """The record of one step of one saga."""

    name: str
    participant: str
    kind: StepKind
    state: StepState
    execute_attempts: int
    compensate_attempts: int
    output: bytes | None
    """Output of Execute when it answered OK, else None."""
    failure: Failure | None
    start_time: datetime | None
    end_time: datetime | None
    next_attempt_time: datetime | None

    def output_json(self) -> Any:
        """The output decoded as UTF-8 JSON (None when there is no output)."""
        return _decode_json(self.output)


@dataclass(frozen=True)
class Saga:
    """One run of a saga definition."""

    saga_id: str
    definition: str
    definition_version: int
    state: SagaState
    input: bytes
    steps: tuple[StepRun, ...]
    failure: Failure | None
    """Why the saga compensated or needs attention, if it did."""
    cancel_reason: str
    create_time: datetime | None
    update_time: datetime | None
    end_time: datetime | None
    version: int
    """Number of events recorded for the saga."""

    def input_json(self) -> Any:
        """The input decoded as UTF-8 JSON (None when the input is empty)."""
        return _decode_json(self.input)

    def step(self, name: str) -> StepRun:
        """The step named `name`; KeyError when the saga has none."""
        for run in self.steps:
            if run.name == name:
                return run
        raise KeyError(name)


@dataclass(frozen=True)
class SagaEvent:
    """One entry of a saga's append-only event log."""

    sequence: int
    type: SagaEventType
    step: str
    attempt: int
    time: datetime | None
    failure: Failure | None


@dataclass(frozen=True)
class SagaUpdate:
    """One message of a watch: the saga after a change, and the change (None on the first)."""

    saga: Saga
    event: SagaEvent | None


@dataclass(frozen=True)
class CreateResult:
    """What `create()` returns: the saga, and False when it existed already (a replay)."""

    saga: Saga
    created: bool


def _decode_json(payload: bytes | None) -> Any:
    if not payload:
        return None
    return json.loads(payload.decode("utf-8"))


def _enum(cls: type[_E], prefix: str, number: int, names: Any) -> _E:
    # Protobuf enums are open: an unknown number (a newer coordinator) maps to UNSPECIFIED
    # rather than failing the whole conversion.
    try:
        return cls(names.Name(number).removeprefix(prefix))
    except ValueError:
        return cls("UNSPECIFIED")


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def failure_from_proto(message: Any, field: str = "failure") -> Failure | None:
    """Convert the `Failure` in `message.field`, None when unset."""
    if not message.HasField(field):
        return None
    f: saga_pb2.Failure = getattr(message, field)
    return Failure(f.step, f.operation, f.code, f.reason, f.message)


def step_from_proto(step: saga_pb2.StepRun) -> StepRun:
    """Convert a `saga.v1.StepRun`."""
    kind = step.kind or saga_pb2.STEP_KIND_COMPENSATABLE  # UNSPECIFIED reads as the default
    try:
        step_kind = StepKind(saga_pb2.StepKind.Name(kind).removeprefix("STEP_KIND_"))
    except ValueError:
        step_kind = StepKind.COMPENSATABLE
    return StepRun(
        name=step.name,
        participant=step.participant,
        kind=step_kind,
        state=_enum(StepState, "STEP_STATE_", step.state, saga_pb2.StepState),
        execute_attempts=step.execute_attempts,
        compensate_attempts=step.compensate_attempts,
        output=step.output if step.HasField("output") else None,
        failure=failure_from_proto(step),
        start_time=_time(step, "start_time"),
        end_time=_time(step, "end_time"),
        next_attempt_time=_time(step, "next_attempt_time"),
    )


def saga_from_proto(saga: saga_pb2.Saga) -> Saga:
    """Convert a `saga.v1.Saga`."""
    return Saga(
        saga_id=saga.saga_id or saga.name.removeprefix("sagas/"),
        definition=saga.definition,
        definition_version=saga.definition_version,
        state=_enum(SagaState, "SAGA_STATE_", saga.state, saga_pb2.SagaState),
        input=saga.input,
        steps=tuple(step_from_proto(s) for s in saga.steps),
        failure=failure_from_proto(saga),
        cancel_reason=saga.cancel_reason,
        create_time=_time(saga, "create_time"),
        update_time=_time(saga, "update_time"),
        end_time=_time(saga, "end_time"),
        version=saga.version,
    )


def event_from_proto(event: saga_pb2.SagaEvent) -> SagaEvent:
    """Convert a `saga.v1.SagaEvent`."""
    return SagaEvent(
        sequence=event.sequence,
        type=_enum(SagaEventType, "SAGA_EVENT_TYPE_", event.type, saga_pb2.SagaEventType),
        step=event.step,
        attempt=event.attempt,
        time=_time(event, "time"),
        failure=failure_from_proto(event),
    )


_SETTLED_PROTO_STATES = frozenset(
    saga_pb2.SagaState.Value(f"SAGA_STATE_{state.value}") for state in SETTLED_STATES
)


def settled_saga_from_response(
    response: coordinator_service_pb2.WatchSagaResponse,
) -> Saga | None:
    """The saga of one WatchSaga message when it has settled, else None.

    Only a settled saga is converted: the state is read from the proto first, so a message in
    between (from a coordinator that sends every change) costs no conversion.
    """
    if response.saga.state not in _SETTLED_PROTO_STATES:
        return None
    return saga_from_proto(response.saga)


def update_from_proto(response: coordinator_service_pb2.WatchSagaResponse) -> SagaUpdate:
    """Convert one message of a WatchSaga stream."""
    return SagaUpdate(
        saga=saga_from_proto(response.saga),
        event=event_from_proto(response.event) if response.HasField("event") else None,
    )
