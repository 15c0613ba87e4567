"""Cancel: compensate what was sent, wait for what may be in flight, refuse past the pivot."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.core.calls import build_call
from coordinator.core.errors import SagaNotCancellable
from coordinator.core.events import CancelRequested, Dispatch, Outcome, Succeeded
from coordinator.core.machine import check_cancellable, pending_call
from coordinator.core.model import Saga, SagaState, StepState, request_id

from .builders import (
    BROKEN,
    COMPENSATE,
    EXECUTE,
    FOUR_STEPS,
    NO,
    OK,
    PIVOTED,
    SAGA_ID,
    UNAVAILABLE,
    SagaRun,
)

CANCEL = CancelRequested("customer changed their mind")
"""A cancel that comes while the pending Execute is on its way."""
IDLE_CANCEL = CancelRequested("customer changed their mind", call_in_flight=False)
"""A cancel that comes while nothing is on its way (a backoff, or not sent yet)."""


def test_cancel_during_a_backoff_compensates_at_once_starting_with_the_waiting_step() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK)
    retry = run.answer(UNAVAILABLE).commands[0]
    assert retry.not_before is not None

    decision = run.send(IDLE_CANCEL, after=timedelta(milliseconds=1))
    assert run.now < retry.not_before
    decided_before_cancel = len(run.dispatches) - len(decision.commands)

    assert decision.changed
    assert run.saga.state is SagaState.COMPENSATING
    assert run.saga.cancel_reason == CANCEL.reason
    assert run.saga.steps[2].state is StepState.COMPENSATING
    assert decision.commands == (
        Dispatch(COMPENSATE, 2, 1, request_id(SAGA_ID, "card", COMPENSATE)),
    )
    assert run.answer(OK).commands[0].step == 1
    assert run.answer(OK).commands[0].step == 0
    assert run.answer(OK).saga.state is SagaState.COMPENSATED
    assert run.step_states == [StepState.COMPENSATED] * 3 + [StepState.PENDING]
    # The retry that was waiting is no longer wanted: nothing goes forward after the cancel.
    assert all(call[0] is COMPENSATE for call in run.calls[decided_before_cancel:])


def test_cancel_during_a_backoff_records_why_the_waiting_step_stopped() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, UNAVAILABLE)
    cancelled = run.send(IDLE_CANCEL, after=timedelta(0)).saga

    # Failed by the cancel and compensated in the same decision: no retry is left waiting.
    step = cancelled.steps[1]
    assert step.state is StepState.COMPENSATING
    assert step.next_attempt_at is None
    assert step.ended_at == run.now
    assert step.failure is not None
    assert step.failure.step == "account"


def test_cancel_while_a_call_may_be_in_flight_waits_for_its_answer() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    in_flight = run.pending

    decision = run.send(CANCEL)

    assert decision.changed
    assert decision.commands == ()
    assert run.saga.state is SagaState.COMPENSATING
    assert run.saga.steps[1].state is StepState.RUNNING
    assert pending_call(run.saga) == in_flight


def test_cancel_once_a_retry_is_due_but_not_sent_never_sends_it() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    retry = run.answer(UNAVAILABLE).commands[0]
    assert retry.not_before is not None

    decision = run.send(IDLE_CANCEL, after=retry.not_before - run.now + timedelta(seconds=5))

    # Whatever the clock says, the engine knows the retry was not sent: it is never sent now.
    assert decision.commands == (
        Dispatch(COMPENSATE, 1, 1, request_id(SAGA_ID, "account", COMPENSATE)),
    )
    assert run.saga.steps[1].state is StepState.COMPENSATING


def test_cancel_with_the_retry_in_flight_waits_for_it_even_before_it_was_due() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    retry = run.answer(UNAVAILABLE).commands[0]

    # A wall clock stepped back makes "now" earlier than the retry's due time; in flight wins.
    decision = run.send(CANCEL, after=timedelta(0))

    assert decision.commands == ()
    assert run.saga.state is SagaState.COMPENSATING
    assert run.saga.steps[1].state is StepState.RUNNING
    assert pending_call(run.saga) == retry


def test_answer_in_flight_at_cancel_is_kept_and_its_compensation_gets_the_output() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(Succeeded(b"person-1"))
    run.send(CANCEL)

    decision = run.answer(Succeeded(b"account-42"))

    assert run.saga.steps[1].output == b"account-42"
    compensate = Dispatch(COMPENSATE, 1, 1, request_id(SAGA_ID, "account", COMPENSATE))
    assert decision.commands == (compensate,)
    call = build_call(run.saga, compensate)
    assert call.execute_output == b"account-42"
    assert call.action == "account.undo"
    assert call.execute_request_id == request_id(SAGA_ID, "account", EXECUTE)
    run.answer_all(OK, OK)
    assert run.saga.state is SagaState.COMPENSATED
    assert run.step_states == [StepState.COMPENSATED] * 2 + [StepState.PENDING] * 2


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(UNAVAILABLE, id="transient"),
        pytest.param(NO, id="rejected"),
        pytest.param(BROKEN, id="failed"),
    ],
)
def test_answer_in_flight_at_cancel_that_is_not_ok_is_not_retried_and_is_compensated(
    outcome: Outcome,
) -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    run.send(CANCEL)

    decision = run.answer(outcome)

    assert decision.commands == (
        Dispatch(COMPENSATE, 1, 1, request_id(SAGA_ID, "account", COMPENSATE)),
    )
    assert run.saga.steps[1].execute_attempts == 1
    run.answer_all(OK, OK)
    assert run.saga.state is SagaState.COMPENSATED
    assert [call for call in run.calls if call[0] is EXECUTE] == [(EXECUTE, 0, 1), (EXECUTE, 1, 1)]


def test_cancel_of_the_last_step_in_flight_compensates_even_when_it_succeeds() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK, OK)
    run.send(CANCEL)
    run.answer_all(OK, OK, OK, OK, OK)

    assert run.saga.state is SagaState.COMPENSATED
    assert [c for c in run.calls if c[0] is COMPENSATE] == [
        (COMPENSATE, 3, 1),
        (COMPENSATE, 2, 1),
        (COMPENSATE, 1, 1),
        (COMPENSATE, 0, 1),
    ]


def test_cancel_on_a_compensating_saga_changes_nothing() -> None:
    rejected = SagaRun(FOUR_STEPS)
    rejected.answer_all(OK, NO)
    cancelled = SagaRun(FOUR_STEPS)
    cancelled.answer(OK)
    cancelled.send(CANCEL)

    for run in (rejected, cancelled):
        before = run.saga
        decision = run.send(CancelRequested("again"))
        assert not decision.changed
        assert decision.saga == before


def _ended(*outcomes: Outcome) -> Saga:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(*outcomes)
    return run.saga


@pytest.mark.parametrize(
    ("saga", "reason"),
    [
        pytest.param(_ended(OK, OK, OK, OK), "SAGA_ENDED", id="succeeded"),
        pytest.param(_ended(OK, NO, OK, OK), "SAGA_ENDED", id="compensated"),
        pytest.param(_ended(OK, NO, BROKEN), "SAGA_NEEDS_ATTENTION", id="needs attention"),
    ],
)
def test_saga_that_has_settled_cannot_be_cancelled(saga: Saga, reason: str) -> None:
    with pytest.raises(SagaNotCancellable) as raised:
        check_cancellable(saga)

    assert raised.value.reason == reason
    assert SAGA_ID in raised.value.message


@pytest.mark.parametrize(
    "outcomes",
    [
        pytest.param((OK,), id="pivot in flight"),
        pytest.param((OK, UNAVAILABLE), id="pivot waiting for a retry"),
        pytest.param((OK, OK), id="pivot succeeded"),
    ],
)
def test_saga_whose_pivot_was_sent_cannot_be_cancelled(outcomes: tuple[Outcome, ...]) -> None:
    run = SagaRun(PIVOTED)
    run.answer_all(*outcomes)
    before = run.saga

    with pytest.raises(SagaNotCancellable) as raised:
        check_cancellable(before)
    assert raised.value.reason == "SAGA_PAST_PIVOT"

    decision = run.send(CANCEL, after=timedelta(0))
    assert not decision.changed
    assert decision.saga == before


def test_saga_before_its_pivot_can_be_cancelled() -> None:
    run = SagaRun(PIVOTED)
    check_cancellable(run.saga)

    run.send(CANCEL)
    run.answer_all(OK, OK)
    assert run.saga.state is SagaState.COMPENSATED
    assert [c for c in run.calls if c[1] == 1] == []  # the pivot was never sent
