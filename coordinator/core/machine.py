"""The saga state machine: (saga, event, now) -> (saga', commands). Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never

from coordinator.core.errors import ActionNotAllowed, SagaNotCancellable
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Decision,
    Dispatch,
    Event,
    Failed,
    MarkCompensated,
    OperatorEvent,
    Outcome,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.events import (
    pending_call as pending_call,  # re-exported: where the state machine's readers look
)
from coordinator.core.model import (
    AuditEntry,
    Failure,
    Operation,
    OperatorAction,
    RetryPolicy,
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
        labels=event.labels,
    )
    return _begin_execute(saga, 0, now)


def decide(saga: Saga, event: Event, now: datetime) -> Decision:
    """Return the saga's next state and the commands that move it there.

    Events that do not apply (an answer to an attempt that is no longer pending, anything
    after the saga settled, an operator action that does not fit) leave the saga unchanged:
    ``Decision.changed`` is False. Operator actions are the only events a parked saga takes.
    """
    match event:
        case SagaCreated():
            return Decision(saga, changed=False)
        case RetryRequested() | ResumeRequested() | MarkCompensated() | CompleteRequested():
            try:
                check_action(saga, event)
            except ActionNotAllowed:
                return Decision(saga, changed=False)
            return _operator_action(saga, event, now)
        case _ if saga.state.is_settled:
            return Decision(saga, changed=False)
        case CancelRequested(reason=reason, call_in_flight=in_flight, actor=actor):
            return _cancel(saga, reason, in_flight, actor, now)
        case DeadlineExceeded(call_in_flight=in_flight):
            return _deadline(saga, in_flight, now)
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


def action_of(event: OperatorEvent) -> OperatorAction:
    """The kind of operator action an event records."""
    match event:
        case CancelRequested():
            return OperatorAction.CANCEL
        case RetryRequested():
            return OperatorAction.RETRY
        case ResumeRequested():
            return OperatorAction.RESUME
        case MarkCompensated():
            return OperatorAction.MARK_COMPENSATED
        case CompleteRequested():
            return OperatorAction.COMPLETE
        case _:
            assert_never(event)


def available_actions(
    saga: Saga, call_in_flight: bool = False
) -> tuple[tuple[OperatorAction, int], ...]:
    """The operator actions that fit the saga now, each with the step it would apply to.

    ``call_in_flight`` says whether the saga's pending call is on its way to the participant:
    a call in flight is never retried, completed or marked compensated under its feet.
    """
    fits: list[tuple[OperatorAction, int]] = []
    pending = pending_call(saga)
    if pending is not None:
        if saga.state is SagaState.RUNNING:
            try:
                check_cancellable(saga)
                fits.append((OperatorAction.CANCEL, pending.step))
            except SagaNotCancellable:
                pass
        if not call_in_flight and pending.not_before is not None:
            fits.append((OperatorAction.RETRY, pending.step))
            if pending.operation is Operation.COMPENSATE:
                fits.append((OperatorAction.MARK_COMPENSATED, pending.step))
            elif saga.step_definition(pending.step).kind is not StepKind.COMPENSATABLE:
                fits.append((OperatorAction.COMPLETE, pending.step))
    forward = parked_forward_step(saga)
    if forward is not None:
        fits.append((OperatorAction.RETRY, forward))
        fits.append((OperatorAction.COMPLETE, forward))
    backward = parked_compensation_step(saga)
    if backward is not None:
        fits.append((OperatorAction.RESUME, backward))
        fits.append((OperatorAction.MARK_COMPENSATED, backward))
    return tuple(fits)


def waiting_step(saga: Saga) -> int | None:
    """The step a saga that has not ended waits on: its pending call's, or the one it is
    parked on. None for an ended saga."""
    pending = pending_call(saga)
    if pending is not None:
        return pending.step
    parked = parked_forward_step(saga)
    return parked if parked is not None else parked_compensation_step(saga)


def parked_forward_step(saga: Saga) -> int | None:
    """The pivot or retriable step a NEEDS_ATTENTION saga is stuck on, if it is stuck forward."""
    if saga.state is not SagaState.NEEDS_ATTENTION:
        return None
    for index, step in enumerate(saga.steps):
        kind = saga.step_definition(index).kind
        if kind is not StepKind.COMPENSATABLE and step.state in (
            StepState.REJECTED,
            StepState.FAILED,
        ):
            return index
    return None


def parked_compensation_step(saga: Saga) -> int | None:
    """The step whose compensation a NEEDS_ATTENTION saga is stuck on, if it is stuck backward."""
    if saga.state is not SagaState.NEEDS_ATTENTION:
        return None
    for index, step in enumerate(saga.steps):
        if step.state is StepState.COMPENSATING:
            return index
    return None


def _step_of(event: OperatorEvent, saga: Saga) -> int | None:
    match event:
        case RetryRequested(step=step) | MarkCompensated(step=step) | CompleteRequested(step=step):
            return step
        case ResumeRequested():
            return parked_compensation_step(saga)
        case _:
            return None


_VERBS = {
    OperatorAction.CANCEL: "cancel",
    OperatorAction.RETRY: "retry",
    OperatorAction.RESUME: "resume",
    OperatorAction.MARK_COMPENSATED: "mark-compensated",
    OperatorAction.COMPLETE: "complete",
}


def describe_actions(saga: Saga, fits: Iterable[tuple[OperatorAction, int]]) -> str:
    """The actions that fit, for people: ``retry step 'issue-card', complete step 'issue-card'``."""
    named = [f"{_VERBS[action]} step {saga.steps[step].name!r}" for action, step in fits]
    return ", ".join(named) or "none"


def _where(saga: Saga, call_in_flight: bool) -> str:
    """Where the saga stands, for people."""
    pending = pending_call(saga)
    if pending is not None:
        step = saga.steps[pending.step].name
        op = pending.operation.value
        if call_in_flight:
            return f"{saga.state}, its {op} call to step {step!r} on its way"
        if pending.not_before is not None:
            due = pending.not_before.isoformat(timespec="milliseconds")
            return f"{saga.state}, step {step!r} waiting to {op} again at {due}"
        return f"{saga.state}, step {step!r} about to {op}"
    parked = parked_forward_step(saga)
    if parked is None:
        parked = parked_compensation_step(saga)
    if parked is not None:
        return f"{saga.state}, stuck on step {saga.steps[parked].name!r}"
    return str(saga.state)


def check_action(saga: Saga, event: OperatorEvent) -> None:
    """Raise ActionNotAllowed unless the operator action fits the saga's state.

    The message names the saga's state and the actions that would fit it.
    """
    in_flight = getattr(event, "call_in_flight", False)
    action = action_of(event)
    fits = available_actions(saga, in_flight)
    step = _step_of(event, saga)
    if step is not None and (action, step) in fits:
        return
    if step is None and any(fit == action for fit, _ in fits):
        return
    subject = f"{_VERBS[action]}"
    if step is not None and action is not OperatorAction.RESUME:
        subject += f" step {saga.steps[step].name!r}"
    hint = ""
    if in_flight and not fits:
        hint = " (wait for the call on its way to be answered)"
    raise ActionNotAllowed(
        f"{subject} does not fit saga {saga.saga_id}: it is {_where(saga, in_flight)}; "
        f"what fits now: {describe_actions(saga, fits)}{hint}"
    )


def _audited(saga: Saga, event: OperatorEvent, step: int | None, now: datetime) -> Saga:
    entry = AuditEntry(
        sequence=saga.version + 1,
        at=now,
        actor=event.actor,
        action=action_of(event),
        step="" if step is None else saga.steps[step].name,
        reason=event.reason,
    )
    return dataclasses.replace(saga, audit=(*saga.audit, entry))


def _operator_action(
    saga: Saga,
    event: RetryRequested | ResumeRequested | MarkCompensated | CompleteRequested,
    now: datetime,
) -> Decision:
    step = _step_of(event, saga)
    assert step is not None, "check_action found the step"
    saga = _audited(saga, event, step, now)
    parked = saga.state is SagaState.NEEDS_ATTENTION
    match event:
        case RetryRequested():
            if not parked:
                saga = _set_step(saga, step, next_attempt_at=None)
                return _changed(saga, now, dispatches=True)
            run = saga.steps[step]
            saga = _set_step(
                saga,
                step,
                state=StepState.RUNNING,
                execute_attempts=run.execute_attempts + 1,
                budget_start=run.execute_attempts,
                next_attempt_at=None,
                ended_at=None,
            )
            saga = dataclasses.replace(saga, state=SagaState.RUNNING, ended_at=None, failure=None)
            return _changed(saga, now, dispatches=True)
        case ResumeRequested(compensation_retry=policy):
            run = saga.steps[step]
            saga = _set_step(
                saga,
                step,
                compensate_attempts=run.compensate_attempts + 1,
                budget_start=run.compensate_attempts,
                retry_override=policy or run.retry_override,
                next_attempt_at=None,
            )
            saga = dataclasses.replace(saga, state=SagaState.COMPENSATING, ended_at=None)
            return _changed(saga, now, dispatches=True)
        case MarkCompensated():
            saga = _set_step(
                saga,
                step,
                state=StepState.COMPENSATED,
                by_operator=True,
                next_attempt_at=None,
                ended_at=now,
            )
            return _next_compensation(dataclasses.replace(saga, ended_at=None), now)
        case CompleteRequested(output=output):
            saga = _set_step(
                saga,
                step,
                state=StepState.SUCCEEDED,
                output=output,
                by_operator=True,
                next_attempt_at=None,
                ended_at=now,
            )
            saga = dataclasses.replace(saga, state=SagaState.RUNNING, ended_at=None, failure=None)
            return _after_success(saga, step, now)
        case _:
            assert_never(event)


def pivot_sent(saga: Saga) -> bool:
    """Whether the saga's pivot step has been decided (and so may have been sent)."""
    return any(
        definition.kind is StepKind.PIVOT and step.execute_attempts > 0
        for step, definition in zip(saga.steps, saga.definition.steps, strict=True)
    )


def _deadline(saga: Saga, in_flight: bool, now: datetime) -> Decision:
    """Before the pivot the saga compensates; after it, it is parked for an operator."""
    if saga.state is not SagaState.RUNNING or saga.deadline_exceeded:
        return Decision(saga, changed=False)
    pending = pending_call(saga)
    assert pending is not None, "a running saga always waits on a call"
    step = saga.steps[pending.step]
    failure = Failure(
        step.name,
        "deadline",
        "DEADLINE_EXCEEDED",
        "SAGA_DEADLINE_EXCEEDED",
        f"the saga's deadline of {saga.definition.deadline} passed at step {step.name!r}",
    )
    saga = dataclasses.replace(saga, deadline_exceeded=True)
    if pivot_sent(saga):
        saga = _set_step(
            saga,
            pending.step,
            state=StepState.FAILED,
            failure=failure,
            next_attempt_at=None,
            ended_at=now,
        )
        return _needs_attention(saga, failure, now)
    return _stop_forward(saga, pending, failure, in_flight, now)


@dataclass(frozen=True)
class _Failure:
    code: str
    reason: str
    message: str


def _failure_of(outcome: Rejected | Transient | Failed) -> _Failure:
    return _Failure(outcome.code, outcome.reason, outcome.message)


def _cancel(saga: Saga, reason: str, in_flight: bool, actor: str, now: datetime) -> Decision:
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
    event = CancelRequested(reason, in_flight, actor)
    saga = dataclasses.replace(_audited(saga, event, pending.step, now), cancel_reason=reason)
    return _stop_forward(saga, pending, failure, in_flight, now)


def _stop_forward(
    saga: Saga, pending: Dispatch, failure: Failure, in_flight: bool, now: datetime
) -> Decision:
    """Turn a running saga back (a cancellation, a deadline): it compensates what was sent."""
    saga = dataclasses.replace(saga, state=SagaState.COMPENSATING, failure=failure)
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
            return _after_success(saga, index, now)
        case Rejected():
            saga = _fail_step(saga, index, StepState.REJECTED, _failure_of(outcome), now)
            if definition.kind is StepKind.RETRIABLE and not cancelled:
                return _needs_attention(saga, _failure_at(saga, index), now)
            return _next_compensation(saga, now)
        case Transient():
            failure = _failure_of(outcome)
            forward_only = definition.kind is not StepKind.COMPENSATABLE
            limit = definition.max_attempts if forward_only else definition.retry.max_attempts
            used = step.execute_attempts - step.budget_start
            if not cancelled and ((forward_only and limit == 0) or used < limit):
                return _retry(saga, index, Operation.EXECUTE, outcome, now)
            if not cancelled:
                budget = "max_attempts " if forward_only else "retry budget "
                failure = dataclasses.replace(
                    failure,
                    message=f"gave up after {used} attempts ({budget}{limit}): {failure.message}",
                )
            saga = _fail_step(saga, index, StepState.FAILED, failure, now)
            if forward_only and not cancelled:
                return _needs_attention(saga, _failure_at(saga, index), now)
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
            policy = step.retry_override or definition.compensation_retry
            used = step.compensate_attempts - step.budget_start
            if used < policy.max_attempts:
                return _retry(saga, index, Operation.COMPENSATE, outcome, now)
            failure = _failure_of(outcome)
            message = f"compensation gave up after {used} attempts: {failure.message}"
            return _compensation_failed(
                saga, index, dataclasses.replace(failure, message=message), now
            )
        case Rejected() | Failed():
            return _compensation_failed(saga, index, _failure_of(outcome), now)
        case _:
            assert_never(outcome)


def _after_success(saga: Saga, index: int, now: datetime) -> Decision:
    """Step ``index`` succeeded going forward: begin the next step, or end SUCCEEDED."""
    if index + 1 < len(saga.steps):
        return _begin_execute(saga, index + 1, now)
    return _changed(dataclasses.replace(saga, state=SagaState.SUCCEEDED, ended_at=now), now)


def _begin_execute(saga: Saga, index: int, now: datetime) -> Decision:
    saga = _set_step(saga, index, state=StepState.RUNNING, execute_attempts=1, started_at=now)
    return _changed(saga, now, dispatches=True)


def _retry(
    saga: Saga, index: int, operation: Operation, outcome: Transient, now: datetime
) -> Decision:
    step = saga.steps[index]
    definition = saga.step_definition(index)
    rid = request_id(saga.saga_id, step.name, operation)
    policy: RetryPolicy
    if operation is Operation.EXECUTE:
        attempt, policy = step.execute_attempts, definition.retry
    else:
        attempt = step.compensate_attempts
        policy = step.retry_override or definition.compensation_retry
    # Backoff grows within the current budget: an operator's fresh budget starts it over.
    due = now + backoff(policy, attempt - step.budget_start, rid, outcome.retry_after)
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
            budget_start=0,
            retry_override=None,
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
