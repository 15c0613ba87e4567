"""Pivot and retriable steps: the point of no return, and the only-forward walk after it."""

from __future__ import annotations

import pytest

from coordinator.core.events import Dispatch, Failed, Outcome, Rejected, Succeeded
from coordinator.core.machine import pending_call
from coordinator.core.model import SagaState, StepState, request_id

from .builders import (
    BROKEN,
    COMPENSATE,
    EXECUTE,
    NO,
    OK,
    PIVOTED,
    SAGA_ID,
    STEP_RETRY,
    UNAVAILABLE,
    SagaRun,
    pivot,
    saga_definition,
)


def test_transient_pivot_is_retried_past_its_budget_until_it_answers_definitely() -> None:
    run = SagaRun(PIVOTED)
    run.answer(OK)
    for attempt in range(1, 51):
        decision = run.answer(UNAVAILABLE)
        assert decision.commands == (
            Dispatch(
                EXECUTE,
                1,
                attempt + 1,
                request_id(SAGA_ID, "pivot", EXECUTE),
                not_before=decision.commands[0].not_before,
            ),
        )
        not_before = decision.commands[0].not_before
        assert not_before is not None
        assert run.now < not_before <= run.now + STEP_RETRY.max_backoff
    assert run.saga.state is SagaState.RUNNING
    assert run.saga.steps[1].execute_attempts == 51 > STEP_RETRY.max_attempts

    run.answer(OK)
    assert run.pending == Dispatch(EXECUTE, 2, 1, request_id(SAGA_ID, "r1", EXECUTE))
    assert run.answer(OK).saga.state is SagaState.SUCCEEDED


@pytest.mark.parametrize(
    "outcome",
    [pytest.param(NO, id="rejected"), pytest.param(BROKEN, id="failed")],
)
def test_pivot_that_says_no_compensates_only_the_steps_before_it(outcome: Outcome) -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, UNAVAILABLE, UNAVAILABLE)
    decision = run.answer(outcome)

    assert decision.commands == (Dispatch(COMPENSATE, 0, 1, request_id(SAGA_ID, "c1", COMPENSATE)),)
    run.answer(OK)
    assert run.saga.state is SagaState.COMPENSATED
    assert run.step_states == [
        StepState.COMPENSATED,
        decision.saga.steps[1].state,
        StepState.PENDING,
    ]
    assert run.saga.steps[1].state in (StepState.REJECTED, StepState.FAILED)
    assert run.saga.steps[1].compensate_attempts == 0
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation) == ("pivot", "execute")


def test_pivot_alone_that_is_rejected_ends_compensated_with_nothing_to_undo() -> None:
    run = SagaRun(saga_definition(pivot("charge")))
    decision = run.answer(NO)

    assert decision.commands == ()
    assert run.saga.state is SagaState.COMPENSATED


def test_transient_retriable_step_is_retried_forever() -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, OK)
    for attempt in range(1, 51):
        assert run.answer(UNAVAILABLE).commands[0].attempt == attempt + 1
    assert run.saga.state is SagaState.RUNNING

    assert run.answer(Succeeded(b"invoiced")).saga.state is SagaState.SUCCEEDED
    assert run.saga.steps[2].execute_attempts == 51
    assert all(call[0] is EXECUTE for call in run.calls)


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(Rejected("ACCOUNT_CLOSED", "the account is closed"), id="rejected"),
        pytest.param(Failed("PERMISSION_DENIED", "not allowed"), id="failed"),
    ],
)
def test_retriable_step_that_says_no_parks_the_saga_without_compensating(
    outcome: Rejected | Failed,
) -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(OK, OK, UNAVAILABLE)
    decision = run.answer(outcome)

    assert decision.commands == ()
    assert run.saga.state is SagaState.NEEDS_ATTENTION
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation, failure.code) == ("r1", "execute", outcome.code)
    assert run.step_states[:2] == [StepState.SUCCEEDED, StepState.SUCCEEDED]
    assert all(call[0] is EXECUTE for call in run.calls)
    assert pending_call(run.saga) is None
