"""Conversion between the domain and the saga.v1 protobuf messages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from saga.v1 import saga_pb2

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Failed,
    MarkCompensated,
    RecordedEvent,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.model import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    AuditEntry,
    Failure,
    Operation,
    OperatorAction,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaState,
    StepDefinition,
    StepKind,
    StepRun,
    StepState,
)
from coordinator.telemetry import trace_id_of

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_Value = TypeVar("_Value")
_Message = TypeVar("_Message")
_MICROSECOND = timedelta(microseconds=1)
_SAGA_STATES = {state: saga_pb2.SagaState.Value(f"SAGA_STATE_{state.value}") for state in SagaState}
_STEP_STATES = {state: saga_pb2.StepState.Value(f"STEP_STATE_{state.value}") for state in StepState}
_STEP_KINDS = {kind: saga_pb2.StepKind.Value(f"STEP_KIND_{kind.value}") for kind in StepKind}
_ACTIONS = {
    action: saga_pb2.OperatorAction.Value(f"OPERATOR_ACTION_{action.value}")
    for action in OperatorAction
}


def saga_state_to_proto(state: SagaState) -> saga_pb2.SagaState.ValueType:
    """The proto enum value of a saga state."""
    return _SAGA_STATES[state]


def saga_state_from_proto(value: int) -> SagaState:
    """The saga state of a proto enum value; ValueError for UNSPECIFIED or unknown."""
    try:
        name = saga_pb2.SagaState.Name(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"unknown saga state {value}") from None
    if name == "SAGA_STATE_UNSPECIFIED":
        raise ValueError("saga state is unspecified")
    return SagaState(name.removeprefix("SAGA_STATE_"))


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Integer arithmetic: exact, and several times cheaper than Timestamp.FromDatetime.
    seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def _failure(failure: Failure | None) -> saga_pb2.Failure | None:
    if failure is None:
        return None
    return saga_pb2.Failure(
        step=failure.step,
        operation=failure.operation,
        code=failure.code,
        reason=failure.reason,
        message=failure.message,
    )


def step_to_proto(step: StepRun, definition: StepDefinition) -> saga_pb2.StepRun:
    """The proto record of one step of a saga."""
    message = saga_pb2.StepRun(
        name=step.name,
        participant=definition.participant,
        kind=_STEP_KINDS[definition.kind],
        state=_STEP_STATES[step.state],
        execute_attempts=step.execute_attempts,
        compensate_attempts=step.compensate_attempts,
        failure=_failure(step.failure),
        start_time=_timestamp(step.started_at),
        end_time=_timestamp(step.ended_at),
        next_attempt_time=_timestamp(step.next_attempt_at),
        by_operator=step.by_operator,
    )
    if step.output is not None:
        message.output = step.output
    return message


def saga_to_proto(saga: Saga) -> saga_pb2.Saga:
    """The proto resource of a saga."""
    return saga_pb2.Saga(
        name=saga.name,
        saga_id=saga.saga_id,
        definition=saga.definition.name,
        definition_version=saga.definition.version,
        state=saga_state_to_proto(saga.state),
        input=saga.input,
        steps=[
            step_to_proto(step, definition)
            for step, definition in zip(saga.steps, saga.definition.steps, strict=True)
        ],
        failure=_failure(saga.failure),
        cancel_reason=saga.cancel_reason or "",
        create_time=_timestamp(saga.created_at),
        update_time=_timestamp(saga.updated_at),
        end_time=_timestamp(saga.ended_at),
        version=saga.version,
        labels=saga.labels,
        audit=[audit_to_proto(entry) for entry in saga.audit],
        deadline_time=_timestamp(saga.deadline_at),
        trace_id=trace_id_of(saga.trace_context),
    )


def audit_to_proto(entry: AuditEntry) -> saga_pb2.AuditEntry:
    """The proto form of one operator action on a saga."""
    return saga_pb2.AuditEntry(
        sequence=entry.sequence,
        time=_timestamp(entry.at),
        actor=entry.actor,
        action=_ACTIONS[entry.action],
        step=entry.step,
        reason=entry.reason,
    )


class Renderings(Generic[_Value, _Message]):
    """Renders each immutable value (a committed saga state, a change) once, however many
    callers ask for it; the most recent ``size`` values keep their rendering.

    Keyed by identity: the engine hands the same object to every watcher and to the caller that
    made the change, and hashing a saga would cost more than rendering it.
    """

    def __init__(self, render: Callable[[_Value], _Message], size: int = 4096) -> None:
        self._render = render
        self._size = size
        self._cache: OrderedDict[int, tuple[_Value, _Message]] = OrderedDict()

    def __call__(self, value: _Value) -> _Message:
        """The rendering of ``value`` (shared: callers must not change it)."""
        key = id(value)
        found = self._cache.get(key)
        if found is not None and found[0] is value:
            return found[1]
        message = self._render(value)
        # Holding the value keeps its id from being reused by another object while cached.
        self._cache[key] = (value, message)
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return message


_ANSWER_TYPES = {
    (Operation.EXECUTE, Succeeded): saga_pb2.SAGA_EVENT_TYPE_STEP_SUCCEEDED,
    (Operation.EXECUTE, Rejected): saga_pb2.SAGA_EVENT_TYPE_STEP_REJECTED,
    (Operation.EXECUTE, Transient): saga_pb2.SAGA_EVENT_TYPE_STEP_ATTEMPT_FAILED,
    (Operation.EXECUTE, Failed): saga_pb2.SAGA_EVENT_TYPE_STEP_FAILED,
    (Operation.COMPENSATE, Succeeded): saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_SUCCEEDED,
    (Operation.COMPENSATE, Rejected): saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_FAILED,
    (Operation.COMPENSATE, Transient): saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_ATTEMPT_FAILED,
    (Operation.COMPENSATE, Failed): saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_FAILED,
}


def event_to_proto(record: RecordedEvent, saga: Saga) -> saga_pb2.SagaEvent:
    """The proto form of one entry of ``saga``'s event log; see ``event_proto``."""
    return event_proto(record, saga.definition, saga.audit)


def event_proto(
    record: RecordedEvent, definition: SagaDefinition, audit: Sequence[AuditEntry] = ()
) -> saga_pb2.SagaEvent:
    """The proto form of one entry of a saga's event log.

    Steps are named by the definition's step names, and a call's event names the action or
    compensation that was sent (``OpenAccount``, ``CloseAccount``) and the named event a
    step's success stands for.
    """
    message = saga_pb2.SagaEvent(sequence=record.sequence, time=_timestamp(record.recorded_at))
    event = record.event

    def about(index: int, operation: Operation | None = None) -> None:
        step = definition.steps[index]
        message.step = step.name
        if operation is not None:
            message.operation = operation.value
            execute = operation is Operation.EXECUTE
            message.action = step.action if execute else step.compensation

    match event:
        case SagaCreated():
            message.type = saga_pb2.SAGA_EVENT_TYPE_CREATED
        case CancelRequested(reason=reason, actor=actor):
            message.type = saga_pb2.SAGA_EVENT_TYPE_CANCEL_REQUESTED
            message.actor = actor
            message.reason = reason
            message.failure.CopyFrom(
                saga_pb2.Failure(operation="cancel", reason="SAGA_CANCELLED", message=reason)
            )
        case CallAnswered(operation=operation, step=index, attempt=attempt, outcome=outcome):
            about(index, operation)
            message.type = _ANSWER_TYPES[(operation, type(outcome))]
            message.attempt = attempt
            if isinstance(outcome, Succeeded):
                if operation is Operation.EXECUTE:
                    message.emits = definition.steps[index].emits
            else:
                message.failure.CopyFrom(
                    saga_pb2.Failure(
                        step=message.step,
                        operation=operation.value,
                        code=outcome.code,
                        reason=outcome.reason,
                        message=outcome.message,
                    )
                )
        case RetryRequested(step=index, actor=actor, reason=reason):
            message.type = saga_pb2.SAGA_EVENT_TYPE_RETRY_REQUESTED
            message.actor, message.reason = actor, reason
            about(index)
        case ResumeRequested(actor=actor, reason=reason):
            message.type = saga_pb2.SAGA_EVENT_TYPE_RESUMED
            message.actor, message.reason = actor, reason
            for entry in audit:
                if entry.sequence == record.sequence:
                    message.step = entry.step
        case MarkCompensated(step=index, actor=actor, reason=reason):
            message.type = saga_pb2.SAGA_EVENT_TYPE_STEP_MARKED_COMPENSATED
            message.actor, message.reason = actor, reason
            about(index, Operation.COMPENSATE)
        case CompleteRequested(step=index, actor=actor, reason=reason):
            message.type = saga_pb2.SAGA_EVENT_TYPE_STEP_COMPLETED
            message.actor, message.reason = actor, reason
            about(index, Operation.EXECUTE)
            message.emits = definition.steps[index].emits
        case DeadlineExceeded():
            message.type = saga_pb2.SAGA_EVENT_TYPE_DEADLINE_EXCEEDED
            deadline = definition.deadline
            message.failure.CopyFrom(
                saga_pb2.Failure(
                    operation="deadline",
                    code="DEADLINE_EXCEEDED",
                    reason="SAGA_DEADLINE_EXCEEDED",
                    message=f"the saga's deadline of {deadline} passed",
                )
            )
    return message


def _duration(value: duration_pb2.Duration, default: timedelta) -> timedelta:
    delta = value.ToTimedelta()
    return delta if delta else default


def _retry(message: saga_pb2.RetryPolicy, has: bool, fallback: RetryPolicy) -> RetryPolicy:
    if not has:
        return fallback
    return RetryPolicy(
        max_attempts=message.max_attempts or fallback.max_attempts,
        initial_backoff=_duration(message.initial_backoff, fallback.initial_backoff),
        max_backoff=_duration(message.max_backoff, fallback.max_backoff),
        multiplier=message.backoff_multiplier or fallback.multiplier,
        jitter=message.jitter if message.HasField("jitter") else fallback.jitter,
    )


def definition_from_proto(message: saga_pb2.SagaDefinition) -> SagaDefinition:
    """The domain definition of a proto one; unset fields take the defaults."""
    retry = _retry(message.retry, message.HasField("retry"), DEFAULT_RETRY)
    compensation_retry = _retry(
        message.compensation_retry,
        message.HasField("compensation_retry"),
        DEFAULT_COMPENSATION_RETRY,
    )
    steps = []
    for step in message.steps:
        kind_name = saga_pb2.StepKind.Name(step.kind).removeprefix("STEP_KIND_")
        steps.append(
            StepDefinition(
                name=step.name,
                participant=step.participant,
                action=step.action,
                compensation=step.compensation,
                kind=StepKind.COMPENSATABLE if kind_name == "UNSPECIFIED" else StepKind(kind_name),
                timeout=_duration(step.timeout, DEFAULT_TIMEOUT),
                retry=_retry(step.retry, step.HasField("retry"), retry),
                compensation_retry=_retry(
                    step.compensation_retry,
                    step.HasField("compensation_retry"),
                    compensation_retry,
                ),
                max_attempts=step.max_attempts,
                emits=step.emits,
            )
        )
    return SagaDefinition(
        name=message.name,
        version=message.version,
        steps=tuple(steps),
        description=message.description,
        deadline=message.deadline.ToTimedelta() if message.HasField("deadline") else None,
    )


def retry_policy_from_proto(message: saga_pb2.RetryPolicy) -> RetryPolicy:
    """A retry policy from its proto form; unset fields take the compensation defaults."""
    return _retry(message, True, DEFAULT_COMPENSATION_RETRY)


def _duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def _retry_to_proto(policy: RetryPolicy) -> saga_pb2.RetryPolicy:
    return saga_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_backoff=_duration_to_proto(policy.initial_backoff),
        max_backoff=_duration_to_proto(policy.max_backoff),
        backoff_multiplier=policy.multiplier,
        jitter=policy.jitter,
    )


def definition_to_proto(definition: SagaDefinition) -> saga_pb2.SagaDefinition:
    """The proto form of a definition, every default written out per step."""
    message = saga_pb2.SagaDefinition(
        name=definition.name,
        version=definition.version,
        description=definition.description,
        steps=[
            saga_pb2.StepDefinition(
                name=step.name,
                participant=step.participant,
                action=step.action,
                compensation=step.compensation,
                kind=_STEP_KINDS[step.kind],
                timeout=_duration_to_proto(step.timeout),
                retry=_retry_to_proto(step.retry),
                compensation_retry=_retry_to_proto(step.compensation_retry),
                max_attempts=step.max_attempts,
                emits=step.emits,
            )
            for step in definition.steps
        ],
    )
    if definition.deadline is not None:
        message.deadline.CopyFrom(_duration_to_proto(definition.deadline))
    return message
