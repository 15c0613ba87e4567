"""The saga state machine: (saga, event, now) -> (saga', commands). Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never

from coordinator.core.errors import SagaNotCancellable
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Decision,
    Event,
    Failed,
    Outcome,
    Rejected,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.events import (
    pending_call as pending_call,  # re-exported: where the state machine's readers look
)
from coordinator.core.model import (
    Failure,
    Operation,
    Saga,
    SagaState,
    StepKind,
    StepRun,
    StepState,
    request_id,
)
from coordinator.core.retry import backoff

# Steps whose Execute was sent and that may still need undoing.
_UNDOABLE = (StepState.SUCCEEDED, StepState.REJECTED, StepState.FAILED)


def start(event: SagaCreated, now: datetime) -> Decision:
    """The new saga for a creation event, with its first step decided."""
    saga = Saga(
        saga_id=event.saga_id,
        definition=event.definition,
        input=event.input,
        state=SagaState.RUNNING,
        steps=tuple(StepRun(name=step.name) for step in event.definition.steps),
        created_at=now,
        updated_at=now,
        version=0,
        trace_context=event.trace_context,
    )
    return _begin_execute(saga, 0, now)


def decide(saga: Saga, event: Event, now: datetime) -> Decision:
    """Return the saga's next state and the commands that move it there.

    Events that do not apply (an answer to an attempt that is no longer pending, anything
    after the saga settled) leave the saga unchanged: ``Decision.changed`` is False.
    """
    if saga.state.is_settled:
        return Decision(saga, changed=False)
    match event:
        case SagaCreated():
            return Decision(saga, changed=False)
        case CancelRequested(reason=reason, call_in_flight=in_flight):
            return _cancel(saga, reason, in_flight, now)
        case CallAnswered():
            pending = pending_call(saga)
            if pending is None or (pending.operation, pending.step, pending.attempt) != (
                event.operation,
                event.step,
                event.attempt,
            ):
                return Decision(saga, changed=False)
            if event.operation is Operation.EXECUTE:
                return _on_execute_answer(saga, event.step, event.outcome, now)
            return _on_compensate_answer(saga, event.step, event.outcome, now)
        case _:
            assert_never(event)


def replay(events: Iterable[tuple[Event, datetime]]) -> Iterator[Saga]:
    """The saga after each event of its log (each event with the time it was recorded)."""
    saga: Saga | None = None
    for event, at in events:
        if saga is None:
            if not isinstance(event, SagaCreated):
                raise ValueError("a saga's log starts with its creation")
            saga = start(event, at).saga
        else:
            saga = decide(saga, event, at).saga
        yield saga


def fold(events: Iterable[tuple[Event, datetime]]) -> Saga:
    """Replay a saga's event log into the saga it describes."""
    saga: Saga | None = None
    for saga in replay(events):  # noqa: B007 - the last one is the answer
        pass
    if saga is None:
        raise ValueError("an empty log holds no saga")
    return saga


def check_cancellable(saga: Saga) -> None:
    """Raise SagaNotCancellable unless a cancellation would compensate the saga.

    A saga that is already compensating accepts a cancellation as a no-op.
    """
    if saga.state is SagaState.COMPENSATING:
        return
    if saga.state.is_terminal:
        raise SagaNotCancellable(f"saga {saga.saga_id} has ended {saga.state}", "SAGA_ENDED")
    if saga.state is SagaState.NEEDS_ATTENTION:
        raise SagaNotCancellable(
            f"saga {saga.saga_id} needs attention; it cannot be cancelled", "SAGA_NEEDS_ATTENTION"
        )
    for step, definition in zip(saga.steps, saga.definition.steps, strict=True):
        if definition.kind is StepKind.PIVOT and step.execute_attempts > 0:
            raise SagaNotCancellable(
                f"saga {saga.saga_id} has sent its pivot step {step.name!r}; "
                "it can only go forward",
                "SAGA_PAST_PIVOT",
            )


@dataclass(frozen=True)
class _Failure:
    code: str
    reason: str
    message: str


def _failure_of(outcome: Rejected | Transient | Failed) -> _Failure:
    return _Failure(outcome.code, outcome.reason, outcome.message)


def _cancel(saga: Saga, reason: str, in_flight: bool, now: datetime) -> Decision:
    if saga.state is SagaState.COMPENSATING:
        return Decision(saga, changed=False)
    try:
        check_cancellable(saga)
    except SagaNotCancellable:
        return Decision(saga, changed=False)
    pending = pending_call(saga)
    assert pending is not None, "a running saga always waits on a call"
    step = saga.steps[pending.step]
    failure = Failure(step.name, "cancel", "CANCELLED", "SAGA_CANCELLED", reason or "cancelled")
    saga = dataclasses.replace(
        saga, state=SagaState.COMPENSATING, cancel_reason=reason, failure=failure
    )
    if not in_flight:
        # Nothing is on its way (a backoff, or not sent yet): compensation can begin at once,
        # and the step is never sent again.
        saga = _set_step(
            saga,
            pending.step,
            state=StepState.FAILED,
            failure=failure,
            next_attempt_at=None,
            ended_at=now,
        )
        return _next_compensation(saga, now)
    # The attempt is in flight: its answer comes first (and its output goes to the
    # compensation); after a restart it is re-sent with the same request_id and then undone.
    return _changed(saga, now)


def _on_execute_answer(saga: Saga, index: int, outcome: Outcome, now: datetime) -> Decision:
    step = saga.steps[index]
    definition = saga.step_definition(index)
    cancelled = saga.state is SagaState.COMPENSATING
    match outcome:
        case Succeeded(output=output):
            saga = _set_step(
                saga,
                index,
                state=StepState.SUCCEEDED,
                output=output,
                next_attempt_at=None,
                ended_at=now,
            )
            if cancelled:
                return _next_compensation(saga, now)
            if index + 1 < len(saga.steps):
                return _begin_execute(saga, index + 1, now)
            return _changed(dataclasses.replace(saga, state=SagaState.SUCCEEDED, ended_at=now), now)
        case Rejected():
            saga = _fail_step(saga, index, StepState.REJECTED, _failure_of(outcome), now)
            if definition.kind is StepKind.RETRIABLE and not cancelled:
                return _needs_attention(saga, _failure_at(saga, index), now)
            return _next_compensation(saga, now)
        case Transient():
            failure = _failure_of(outcome)
            forever = definition.kind is not StepKind.COMPENSATABLE
            if not cancelled and (forever or step.execute_attempts < definition.retry.max_attempts):
                return _retry(saga, index, Operation.EXECUTE, outcome, now)
            if not cancelled:
                failure = dataclasses.replace(
                    failure,
                    message=f"gave up after {step.execute_attempts} attempts: {failure.message}",
                )
            saga = _fail_step(saga, index, StepState.FAILED, failure, now)
            return _next_compensation(saga, now)
        case Failed():
            saga = _fail_step(saga, index, StepState.FAILED, _failure_of(outcome), now)
            if definition.kind is StepKind.RETRIABLE and not cancelled:
                return _needs_attention(saga, _failure_at(saga, index), now)
            return _next_compensation(saga, now)
        case _:
            assert_never(outcome)


def _on_compensate_answer(saga: Saga, index: int, outcome: Outcome, now: datetime) -> Decision:
    step = saga.steps[index]
    definition = saga.step_definition(index)
    match outcome:
        case Succeeded():
            saga = _set_step(
                saga, index, state=StepState.COMPENSATED, next_attempt_at=None, ended_at=now
            )
            return _next_compensation(saga, now)
        case Transient():
            if step.compensate_attempts < definition.compensation_retry.max_attempts:
                return _retry(saga, index, Operation.COMPENSATE, outcome, now)
            failure = _failure_of(outcome)
            message = (
                f"compensation gave up after {step.compensate_attempts} attempts: {failure.message}"
            )
            return _compensation_failed(
                saga, index, dataclasses.replace(failure, message=message), now
            )
        case Rejected() | Failed():
            return _compensation_failed(saga, index, _failure_of(outcome), now)
        case _:
            assert_never(outcome)


def _begin_execute(saga: Saga, index: int, now: datetime) -> Decision:
    saga = _set_step(saga, index, state=StepState.RUNNING, execute_attempts=1, started_at=now)
    return _changed(saga, now, dispatches=True)


def _retry(
    saga: Saga, index: int, operation: Operation, outcome: Transient, now: datetime
) -> Decision:
    step = saga.steps[index]
    definition = saga.step_definition(index)
    rid = request_id(saga.saga_id, step.name, operation)
    if operation is Operation.EXECUTE:
        attempt, policy = step.execute_attempts, definition.retry
    else:
        attempt, policy = step.compensate_attempts, definition.compensation_retry
    due = now + backoff(policy, attempt, rid, outcome.retry_after)
    failure = _as_failure(step.name, operation, _failure_of(outcome))
    changes: dict[str, Any] = {"next_attempt_at": due, "failure": failure}
    changes["execute_attempts" if operation is Operation.EXECUTE else "compensate_attempts"] = (
        attempt + 1
    )
    saga = _set_step(saga, index, **changes)
    return _changed(saga, now, dispatches=True)


def _next_compensation(saga: Saga, now: datetime) -> Decision:
    """Compensate the newest step that was sent and is not undone yet, or end COMPENSATED."""
    if saga.state is not SagaState.COMPENSATING:
        saga = dataclasses.replace(saga, state=SagaState.COMPENSATING)
    for index in range(len(saga.steps) - 1, -1, -1):
        step = saga.steps[index]
        definition = saga.step_definition(index)
        if step.execute_attempts == 0 or step.state not in _UNDOABLE:
            continue
        if not definition.compensation:
            continue  # pivot and retriable steps are never compensated
        saga = _set_step(
            saga,
            index,
            state=StepState.COMPENSATING,
            compensate_attempts=1,
            next_attempt_at=None,
        )
        return _changed(saga, now, dispatches=True)
    return _changed(dataclasses.replace(saga, state=SagaState.COMPENSATED, ended_at=now), now)


def _fail_step(saga: Saga, index: int, state: StepState, failure: _Failure, now: datetime) -> Saga:
    step = saga.steps[index]
    recorded = _as_failure(step.name, Operation.EXECUTE, failure)
    saga = _set_step(saga, index, state=state, failure=recorded, next_attempt_at=None, ended_at=now)
    if saga.failure is None:
        saga = dataclasses.replace(saga, failure=recorded)
    return saga


def _compensation_failed(saga: Saga, index: int, failure: _Failure, now: datetime) -> Decision:
    step = saga.steps[index]
    recorded = _as_failure(step.name, Operation.COMPENSATE, failure)
    saga = _set_step(saga, index, failure=recorded, next_attempt_at=None)
    return _needs_attention(saga, recorded, now)


def _needs_attention(saga: Saga, failure: Failure, now: datetime) -> Decision:
    saga = dataclasses.replace(saga, state=SagaState.NEEDS_ATTENTION, ended_at=now, failure=failure)
    return _changed(saga, now)


def _failure_at(saga: Saga, index: int) -> Failure:
    failure = saga.steps[index].failure
    assert failure is not None
    return failure


def _as_failure(step: str, operation: Operation, failure: _Failure) -> Failure:
    return Failure(step, operation.value, failure.code, failure.reason, failure.message)


def _set_step(saga: Saga, index: int, **changes: Any) -> Saga:
    steps = list(saga.steps)
    steps[index] = dataclasses.replace(steps[index], **changes)
    return dataclasses.replace(saga, steps=tuple(steps))


def _changed(saga: Saga, now: datetime, *, dispatches: bool = False) -> Decision:
    saga = dataclasses.replace(saga, version=saga.version + 1, updated_at=now)
    return Decision(saga, dispatches=dispatches)


def changed_steps(before: Saga, after: Saga) -> tuple[int, ...]:
    """The steps that ``after`` changed: the core replaces only the steps it moves, so identity
    tells them apart without comparing their contents."""
    pairs = zip(before.steps, after.steps, strict=True)
    return tuple(index for index, (old, new) in enumerate(pairs) if old is not new)
