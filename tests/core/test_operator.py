"""Operator actions, deadlines and attempt budgets, decided by the core like any other event."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from coordinator.core.errors import ActionNotAllowed
from coordinator.core.events import (
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    MarkCompensated,
    ResumeRequested,
    RetryRequested,
)
from coordinator.core.machine import (
    available_actions,
    check_action,
    fold,
    parked_compensation_step,
    parked_forward_step,
    waiting_step,
)
from coordinator.core.model import (
    OperatorAction,
    RetryPolicy,
    SagaDefinition,
    SagaState,
    StepKind,
    StepState,
)

from .builders import (
    COMPENSATE,
    COMPENSATION_RETRY,
    EXECUTE,
    NO,
    OK,
    PIVOTED,
    UNAVAILABLE,
    SagaRun,
    call_of,
    compensatable,
    saga_definition,
)

ACTOR = "ops@example"


def state(run: SagaRun) -> SagaState:
    """The saga's state now (a call, so that type narrowing does not outlive a transition)."""
    return run.saga.state


def _bounded(max_attempts: int) -> SagaDefinition:
    """PIVOTED with max_attempts on its pivot and retriable steps."""
    steps = tuple(
        step
        if step.kind is StepKind.COMPENSATABLE
        else dataclasses.replace(step, max_attempts=max_attempts)
        for step in PIVOTED.steps
    )
    return dataclasses.replace(PIVOTED, steps=steps)


def _parked_on_compensation() -> SagaRun:
    """c1 said no; its compensation (a "no" is undone too) keeps failing until the saga parks."""
    run = SagaRun(saga_definition(compensatable("c1"), compensatable("c2")))
    run.answer(NO)
    for _ in range(COMPENSATION_RETRY.max_attempts):
        run.answer(UNAVAILABLE)
    assert state(run) is SagaState.NEEDS_ATTENTION
    return run


def _assert_replays(run: SagaRun) -> None:
    """The log, operator events included, folds back into the saga the decisions built."""
    assert fold(run.log) == run.saga


def test_retry_now_sends_a_waiting_call_at_once_with_the_same_attempt() -> None:
    run = SagaRun(PIVOTED)
    run.answer(UNAVAILABLE)
    waiting = run.pending
    assert waiting.not_before is not None

    decision = run.send(RetryRequested(0, ACTOR, "participant is back"))

    assert decision.changed
    assert decision.dispatches
    assert run.pending == dataclasses.replace(waiting, not_before=None)
    assert run.saga.audit[-1].action is OperatorAction.RETRY
    assert run.saga.audit[-1].sequence == run.saga.version
    assert (run.saga.audit[-1].actor, run.saga.audit[-1].step) == (ACTOR, "c1")
    run.answer_all(OK, OK, OK)
    assert state(run) is SagaState.SUCCEEDED
    _assert_replays(run)


def test_retry_now_is_refused_while_the_call_is_in_flight() -> None:
    run = SagaRun(PIVOTED)
    run.answer(UNAVAILABLE)
    event = RetryRequested(0, ACTOR, "again", call_in_flight=True)
    with pytest.raises(ActionNotAllowed, match="on its way"):
        check_action(run.saga, event)
    assert not run.send(event).changed


def test_pivot_past_max_attempts_parks_then_retry_gives_a_fresh_budget() -> None:
    run = SagaRun(_bounded(3))
    run.answer(OK)
    run.answer_all(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)

    assert state(run) is SagaState.NEEDS_ATTENTION
    assert parked_forward_step(run.saga) == 1
    pivot_run = run.saga.steps[1]
    assert pivot_run.state is StepState.FAILED
    assert pivot_run.failure is not None
    assert "max_attempts 3" in pivot_run.failure.message
    assert run.saga.failure == pivot_run.failure
    fits = set(available_actions(run.saga))
    assert fits == {(OperatorAction.RETRY, 1), (OperatorAction.COMPLETE, 1)}

    run.send(RetryRequested(1, ACTOR, "card service fixed"))
    assert state(run) is SagaState.RUNNING
    after = run.saga
    assert (after.ended_at, after.failure) == (None, None)
    assert call_of(run.pending) == (EXECUTE, 1, 4)
    assert run.pending.not_before is None
    # A fresh budget of three attempts: two more failures do not park it again.
    run.answer_all(UNAVAILABLE, UNAVAILABLE)
    assert state(run) is SagaState.RUNNING
    run.answer(UNAVAILABLE)
    assert state(run) is SagaState.NEEDS_ATTENTION
    run.send(RetryRequested(1, ACTOR, "really fixed now"))
    run.answer_all(OK, OK)
    assert state(run) is SagaState.SUCCEEDED
    assert [entry.action for entry in run.saga.audit] == [OperatorAction.RETRY] * 2
    _assert_replays(run)


def test_without_max_attempts_a_pivot_still_retries_for_ever() -> None:
    run = SagaRun(PIVOTED)
    run.answer(OK)
    for _ in range(30):
        run.answer(UNAVAILABLE)
    assert state(run) is SagaState.RUNNING


def test_complete_by_hand_records_the_output_and_goes_on() -> None:
    run = SagaRun(_bounded(2))
    run.answer_all(OK, OK, UNAVAILABLE, UNAVAILABLE)
    assert parked_forward_step(run.saga) == 2

    run.send(CompleteRequested(2, b'{"invoice": "by-hand"}', ACTOR, "billed by hand"))

    step = run.saga.steps[2]
    assert (step.state, step.output, step.by_operator) == (
        StepState.SUCCEEDED,
        b'{"invoice": "by-hand"}',
        True,
    )
    assert state(run) is SagaState.SUCCEEDED
    assert run.saga.audit[-1].action is OperatorAction.COMPLETE
    _assert_replays(run)


def test_complete_of_a_retriable_step_that_said_no_and_of_a_waiting_pivot() -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, OK, NO)
    assert state(run) is SagaState.NEEDS_ATTENTION
    run.send(CompleteRequested(2, b"", ACTOR, "done by hand"))
    assert state(run) is SagaState.SUCCEEDED

    waiting = SagaRun(PIVOTED)
    waiting.answer_all(OK, UNAVAILABLE)
    waiting.send(CompleteRequested(1, b"{}", ACTOR, "card issued by hand"))
    assert call_of(waiting.pending) == (EXECUTE, 2, 1)
    _assert_replays(waiting)


def test_complete_is_refused_on_a_compensatable_step() -> None:
    run = SagaRun(PIVOTED)
    run.answer(UNAVAILABLE)
    with pytest.raises(ActionNotAllowed) as refused:
        check_action(run.saga, CompleteRequested(0, b"", ACTOR, "no"))
    assert "RUNNING" in refused.value.message
    assert "what fits now: cancel step 'c1', retry step 'c1'" in refused.value.message


def test_resume_tries_the_compensation_again_with_a_fresh_budget_and_policy() -> None:
    run = _parked_on_compensation()
    assert parked_compensation_step(run.saga) == 0
    attempts = run.saga.steps[0].compensate_attempts
    policy = RetryPolicy(max_attempts=2, initial_backoff=timedelta(seconds=1))

    run.send(ResumeRequested(ACTOR, "ledger fixed", policy))

    assert state(run) is SagaState.COMPENSATING
    assert run.saga.ended_at is None
    assert call_of(run.pending) == (COMPENSATE, 0, attempts + 1)
    assert run.saga.steps[0].retry_override == policy
    run.answer(UNAVAILABLE)
    backoff = run.pending.not_before
    assert backoff is not None
    assert backoff - run.now >= timedelta(seconds=0.8)
    run.answer(UNAVAILABLE)
    assert state(run) is SagaState.NEEDS_ATTENTION  # the new budget of two is spent
    run.send(ResumeRequested(ACTOR, "fixed for real"))
    run.answer(OK)
    assert state(run) is SagaState.COMPENSATED
    assert [e.action for e in run.saga.audit] == [OperatorAction.RESUME] * 2
    _assert_replays(run)


def test_mark_compensated_goes_on_with_the_backward_walk() -> None:
    run = SagaRun(saga_definition(compensatable("c1"), compensatable("c2"), compensatable("c3")))
    run.answer_all(OK, OK, NO, OK)  # c3 said no and was undone; c2's undo keeps failing
    for _ in range(COMPENSATION_RETRY.max_attempts):
        run.answer(UNAVAILABLE)
    assert parked_compensation_step(run.saga) == 1

    run.send(MarkCompensated(1, ACTOR, "closed the account in the admin tool"))

    assert run.saga.steps[1].state is StepState.COMPENSATED
    assert run.saga.steps[1].by_operator
    assert state(run) is SagaState.COMPENSATING
    assert call_of(run.pending) == (COMPENSATE, 0, 1)
    run.answer(OK)
    assert state(run) is SagaState.COMPENSATED
    assert [step.by_operator for step in run.saga.steps] == [False, True, False]
    _assert_replays(run)


def test_mark_compensated_of_the_last_step_ends_the_saga_compensated() -> None:
    run = _parked_on_compensation()
    run.send(MarkCompensated(0, ACTOR, "undone by hand"))
    assert state(run) is SagaState.COMPENSATED
    assert run.saga.ended_at == run.now


@pytest.mark.parametrize(
    ("event", "fits"),
    [
        (RetryRequested(0, ACTOR, "x"), "resume step 'c1', mark-compensated step 'c1'"),
        (CompleteRequested(0, b"", ACTOR, "x"), "resume step 'c1'"),
        (MarkCompensated(1, ACTOR, "x"), "mark-compensated step 'c1'"),
    ],
)
def test_actions_that_do_not_fit_a_parked_compensation_name_what_would(
    event: RetryRequested | CompleteRequested | MarkCompensated, fits: str
) -> None:
    run = _parked_on_compensation()
    with pytest.raises(ActionNotAllowed) as refused:
        check_action(run.saga, event)
    assert "NEEDS_ATTENTION, stuck on step 'c1'" in refused.value.message
    assert fits in refused.value.message
    assert not run.send(event).changed


def test_no_action_fits_an_ended_saga() -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, OK, OK)
    assert available_actions(run.saga) == ()
    assert waiting_step(run.saga) is None
    with pytest.raises(ActionNotAllowed, match="what fits now: none"):
        check_action(run.saga, ResumeRequested(ACTOR, "x"))


def test_resume_is_refused_on_a_saga_parked_forward() -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, OK, NO)
    with pytest.raises(ActionNotAllowed, match="retry step 'r1', complete step 'r1'"):
        check_action(run.saga, ResumeRequested(ACTOR, "x"))


def test_cancel_of_a_saga_waiting_to_retry_before_its_pivot_is_audited() -> None:
    run = SagaRun(PIVOTED)
    run.answer(UNAVAILABLE)
    run.send(CancelRequested("customer withdrew", call_in_flight=False, actor=ACTOR))
    # c1's outcome is unknown (it may have applied): it is undone, never sent again.
    assert state(run) is SagaState.COMPENSATING
    assert call_of(run.pending) == (COMPENSATE, 0, 1)
    run.answer(OK)
    assert state(run) is SagaState.COMPENSATED
    entry = run.saga.audit[-1]
    assert (entry.action, entry.actor, entry.reason) == (
        OperatorAction.CANCEL,
        ACTOR,
        "customer withdrew",
    )
    _assert_replays(run)


def _with_deadline(seconds: float) -> SagaDefinition:
    return dataclasses.replace(PIVOTED, deadline=timedelta(seconds=seconds))


def test_deadline_before_the_pivot_compensates() -> None:
    fresh = SagaRun(_with_deadline(30))
    fresh.answer(UNAVAILABLE)  # c1 waits out its backoff
    fresh.send(DeadlineExceeded(call_in_flight=False), after=timedelta(seconds=31))
    assert state(fresh) is SagaState.COMPENSATING
    assert call_of(fresh.pending) == (COMPENSATE, 0, 1)
    fresh.answer(OK)
    assert state(fresh) is SagaState.COMPENSATED
    assert fresh.saga.deadline_exceeded
    assert fresh.saga.failure is not None
    assert fresh.saga.failure.reason == "SAGA_DEADLINE_EXCEEDED"
    _assert_replays(fresh)


def test_deadline_with_a_call_in_flight_waits_for_its_answer_then_compensates() -> None:
    two = saga_definition(compensatable("c1"), compensatable("c2"))
    run = SagaRun(dataclasses.replace(two, deadline=timedelta(seconds=5)))
    run.answer(OK)
    run.send(DeadlineExceeded(call_in_flight=True), after=timedelta(seconds=6))
    assert state(run) is SagaState.COMPENSATING
    assert call_of(run.pending) == (EXECUTE, 1, 1)  # the answer comes first
    run.answer(OK)
    assert [call_of(d) for d in run.dispatches][-1] == (COMPENSATE, 1, 1)
    run.answer_all(OK, OK)
    assert state(run) is SagaState.COMPENSATED
    _assert_replays(run)


def test_deadline_after_the_pivot_parks_and_is_acted_on_once() -> None:
    run = SagaRun(_with_deadline(30))
    run.answer_all(OK, OK, UNAVAILABLE)
    run.send(DeadlineExceeded(), after=timedelta(seconds=31))
    assert state(run) is SagaState.NEEDS_ATTENTION
    assert parked_forward_step(run.saga) == 2
    assert run.saga.steps[2].failure is not None
    assert run.saga.steps[2].failure.code == "DEADLINE_EXCEEDED"
    run.send(RetryRequested(2, ACTOR, "go on past the deadline"))
    assert not run.send(DeadlineExceeded()).changed
    run.answer(OK)
    assert state(run) is SagaState.SUCCEEDED
    _assert_replays(run)


def test_deadline_does_not_touch_a_compensating_saga() -> None:
    run = SagaRun(_with_deadline(30))
    run.answer_all(OK, NO)
    assert state(run) is SagaState.COMPENSATING
    assert not run.send(DeadlineExceeded(), after=timedelta(seconds=60)).changed
