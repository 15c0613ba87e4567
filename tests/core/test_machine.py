"""The saga state machine going forward and backward: table tests over whole runs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Dispatch,
    Event,
    Outcome,
    Rejected,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import decide, fold, pending_call
from coordinator.core.model import SagaState, StepState, request_id
from coordinator.core.retry import backoff

from .builders import (
    BROKEN,
    COMPENSATE,
    COMPENSATION_RETRY,
    EXECUTE,
    FOUR_STEPS,
    INPUT,
    NO,
    OK,
    SAGA_ID,
    STEP_RETRY,
    T0,
    UNAVAILABLE,
    Call,
    SagaRun,
)

E, C = EXECUTE, COMPENSATE
T = UNAVAILABLE
NAMES = [step.name for step in FOUR_STEPS.steps]


@pytest.mark.parametrize(
    ("outcomes", "end", "calls"),
    [
        pytest.param(
            [OK, OK, OK, OK],
            SagaState.SUCCEEDED,
            [(E, 0, 1), (E, 1, 1), (E, 2, 1), (E, 3, 1)],
            id="every step succeeds",
        ),
        pytest.param(
            [OK, OK, NO, OK, OK, OK],
            SagaState.COMPENSATED,
            [(E, 0, 1), (E, 1, 1), (E, 2, 1), (C, 2, 1), (C, 1, 1), (C, 0, 1)],
            id="step 2 rejected",
        ),
        pytest.param(
            [NO, OK],
            SagaState.COMPENSATED,
            [(E, 0, 1), (C, 0, 1)],
            id="first step rejected",
        ),
        pytest.param(
            [OK, OK, OK, NO, OK, OK, OK, OK],
            SagaState.COMPENSATED,
            [
                (E, 0, 1),
                (E, 1, 1),
                (E, 2, 1),
                (E, 3, 1),
                (C, 3, 1),
                (C, 2, 1),
                (C, 1, 1),
                (C, 0, 1),
            ],
            id="last step rejected",
        ),
        pytest.param(
            [OK, T, T, OK, OK, OK],
            SagaState.SUCCEEDED,
            [(E, 0, 1), (E, 1, 1), (E, 1, 2), (E, 1, 3), (E, 2, 1), (E, 3, 1)],
            id="transient twice then succeeded",
        ),
        pytest.param(
            [OK, T, T, T, OK, OK],
            SagaState.COMPENSATED,
            [(E, 0, 1), (E, 1, 1), (E, 1, 2), (E, 1, 3), (C, 1, 1), (C, 0, 1)],
            id="transient past the budget",
        ),
        pytest.param(
            [OK, BROKEN, OK, OK],
            SagaState.COMPENSATED,
            [(E, 0, 1), (E, 1, 1), (C, 1, 1), (C, 0, 1)],
            id="failed",
        ),
        pytest.param(
            [OK, NO, T, OK, OK],
            SagaState.COMPENSATED,
            [(E, 0, 1), (E, 1, 1), (C, 1, 1), (C, 1, 2), (C, 0, 1)],
            id="compensation transient once",
        ),
        pytest.param(
            [OK, OK, NO, T, T, T, T],
            SagaState.NEEDS_ATTENTION,
            [(E, 0, 1), (E, 1, 1), (E, 2, 1), (C, 2, 1), (C, 2, 2), (C, 2, 3), (C, 2, 4)],
            id="compensation transient past its budget",
        ),
        pytest.param(
            [OK, NO, NO],
            SagaState.NEEDS_ATTENTION,
            [(E, 0, 1), (E, 1, 1), (C, 1, 1)],
            id="compensation rejected",
        ),
        pytest.param(
            [OK, NO, OK, BROKEN],
            SagaState.NEEDS_ATTENTION,
            [(E, 0, 1), (E, 1, 1), (C, 1, 1), (C, 0, 1)],
            id="compensation failed",
        ),
    ],
)
def test_four_step_saga_table(outcomes: list[Outcome], end: SagaState, calls: list[Call]) -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(*outcomes)

    assert run.saga.state is end
    assert run.calls == calls
    assert all(len(decision.commands) <= 1 for decision in run.decisions)
    assert pending_call(run.saga) is None
    assert fold(run.log) == run.saga


def test_saga_starts_running_with_the_first_execute_dispatched() -> None:
    run = SagaRun(FOUR_STEPS)

    assert run.saga.state is SagaState.RUNNING
    assert run.saga.version == 1
    assert run.saga.created_at == T0
    assert run.saga.input == INPUT
    assert run.step_states == [StepState.RUNNING, *[StepState.PENDING] * 3]
    assert run.dispatches == [Dispatch(E, 0, 1, request_id(SAGA_ID, "identity", E))]
    assert pending_call(run.saga) == run.dispatches[0]


def test_saga_whose_steps_all_succeed_executes_each_step_once_in_order() -> None:
    run = SagaRun(FOUR_STEPS)
    for index in range(4):
        run.answer(Succeeded(f"out-{index}".encode()))

    assert run.saga.state is SagaState.SUCCEEDED
    assert run.dispatches == [
        Dispatch(E, index, 1, request_id(SAGA_ID, name, E)) for index, name in enumerate(NAMES)
    ]
    assert run.step_states == [StepState.SUCCEEDED] * 4
    assert [step.output for step in run.saga.steps] == [b"out-0", b"out-1", b"out-2", b"out-3"]
    assert all(step.execute_attempts == 1 for step in run.saga.steps)
    assert all(step.compensate_attempts == 0 for step in run.saga.steps)
    assert run.saga.failure is None
    assert run.saga.ended_at == run.now


def test_version_grows_by_one_per_changing_event() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, UNAVAILABLE, OK)
    run.send(CallAnswered(E, 0, 1, OK))  # stale: step 0 answered long ago
    run.answer_all(NO, OK, OK, OK)

    versions = [decision.saga.version for decision in run.decisions]
    assert versions == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert run.saga.version == len(run.log)


def test_request_ids_are_the_same_for_the_same_saga_step_and_operation() -> None:
    first, second = SagaRun(FOUR_STEPS), SagaRun(FOUR_STEPS)
    for run in (first, second):
        run.answer_all(OK, UNAVAILABLE, NO, OK, OK)

    assert first.dispatches == second.dispatches
    execute = request_id(SAGA_ID, "account", E)
    compensate = request_id(SAGA_ID, "account", C)
    assert execute != compensate
    assert {d.request_id for d in first.dispatches if d.step == 1 and d.operation is E} == {execute}
    assert {d.request_id for d in first.dispatches if d.step == 1 and d.operation is C} == {
        compensate
    }
    assert request_id("s-2", "account", E) != execute


def test_rejected_step_compensates_earlier_steps_newest_first() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(Succeeded(b"a"), Succeeded(b"b"))
    rejected = run.answer(NO)

    assert run.saga.state is SagaState.COMPENSATING
    assert rejected.commands == (Dispatch(C, 2, 1, request_id(SAGA_ID, "card", C)),)
    assert run.step_states == [
        StepState.SUCCEEDED,
        StepState.SUCCEEDED,
        StepState.COMPENSATING,
        StepState.PENDING,
    ]
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation, failure.code, failure.reason) == (
        "card",
        "execute",
        "FAILED_PRECONDITION",
        "INSUFFICIENT_FUNDS",
    )

    assert run.answer(OK).commands == (Dispatch(C, 1, 1, request_id(SAGA_ID, "account", C)),)
    assert run.step_states[1:3] == [StepState.COMPENSATING, StepState.COMPENSATED]
    assert run.answer(OK).commands == (Dispatch(C, 0, 1, request_id(SAGA_ID, "identity", C)),)
    assert run.saga.state is SagaState.COMPENSATING
    compensated = run.answer(OK)

    assert compensated.commands == ()
    assert compensated.saga.state is SagaState.COMPENSATED
    assert run.step_states == [
        StepState.COMPENSATED,
        StepState.COMPENSATED,
        StepState.COMPENSATED,
        StepState.PENDING,
    ]
    assert run.saga.failure == failure
    assert run.saga.ended_at == run.now


def test_compensations_run_one_at_a_time() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK, OK, NO)
    while not run.saga.state.is_settled:
        busy = [s for s in run.saga.steps if s.state is StepState.COMPENSATING]
        assert len(busy) == 1
        assert len(run.answer(OK).commands) <= 1


def test_transient_answers_are_retried_with_the_same_request_id_after_a_backoff() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    rid = request_id(SAGA_ID, "account", E)

    for attempt in (1, 2):
        decision = run.answer(UNAVAILABLE)
        due = run.now + backoff(STEP_RETRY, attempt, rid)
        assert decision.commands == (Dispatch(E, 1, attempt + 1, rid, not_before=due),)
        assert due > run.now
        assert run.saga.steps[1].state is StepState.RUNNING
        assert run.saga.steps[1].next_attempt_at == due
        assert pending_call(run.saga) == decision.commands[0]

    run.answer_all(OK, OK, OK)
    assert run.saga.state is SagaState.SUCCEEDED
    assert run.saga.steps[1].execute_attempts == 3
    assert run.saga.steps[1].next_attempt_at is None
    assert run.saga.failure is None


def test_transient_retry_waits_at_least_the_participants_retry_after() -> None:
    run = SagaRun(FOUR_STEPS)
    decision = run.answer(
        Transient("RESOURCE_EXHAUSTED", "slow down", retry_after=timedelta(minutes=1))
    )

    assert decision.commands[0].not_before == run.now + timedelta(minutes=1)


def test_transient_past_the_retry_budget_fails_the_step_and_compensates_it_too() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK)
    for _ in range(STEP_RETRY.max_attempts - 1):
        assert run.answer(UNAVAILABLE).commands[0].operation is E
    gave_up = run.answer(UNAVAILABLE)

    assert run.saga.steps[2].state is StepState.COMPENSATING
    assert run.saga.steps[2].execute_attempts == STEP_RETRY.max_attempts
    assert gave_up.commands == (Dispatch(C, 2, 1, request_id(SAGA_ID, "card", C)),)
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation, failure.code) == ("card", "execute", "UNAVAILABLE")

    run.answer_all(OK, OK, OK)
    assert run.saga.state is SagaState.COMPENSATED
    assert [call for call in run.calls if call[0] is C] == [(C, 2, 1), (C, 1, 1), (C, 0, 1)]


def test_failed_answer_is_not_retried_and_compensates_from_that_step() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer(OK)
    decision = run.answer(BROKEN)

    assert decision.commands == (Dispatch(C, 1, 1, request_id(SAGA_ID, "account", C)),)
    assert run.saga.steps[1].execute_attempts == 1
    failure = run.saga.steps[1].failure
    assert failure is not None
    assert (failure.step, failure.operation, failure.code) == (
        "account",
        "execute",
        "UNIMPLEMENTED",
    )
    assert run.saga.failure == failure

    run.answer_all(OK, OK)
    assert run.saga.state is SagaState.COMPENSATED


def test_compensation_transient_past_its_budget_parks_the_saga_in_needs_attention() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK, NO, OK)  # card compensated; account compensating now
    for _ in range(COMPENSATION_RETRY.max_attempts - 1):
        assert run.answer(UNAVAILABLE).commands[0].operation is C
    parked = run.answer(UNAVAILABLE)

    assert run.saga.state is SagaState.NEEDS_ATTENTION
    assert parked.commands == ()
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation, failure.code) == (
        "account",
        "compensate",
        "UNAVAILABLE",
    )
    assert pending_call(run.saga) is None
    assert run.saga.steps[0].state is StepState.SUCCEEDED  # never compensated, never reported so
    assert run.saga.ended_at == run.now


def test_needs_attention_saga_never_moves_again() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, NO)
    last = run.pending
    run.answer(BROKEN)
    parked = run.saga
    assert parked.state is SagaState.NEEDS_ATTENTION

    for event in (
        CallAnswered(C, last.step, last.attempt, OK),
        CallAnswered(C, last.step, last.attempt + 1, OK),
        CallAnswered(C, 0, 1, OK),
        CallAnswered(E, 1, 1, OK),
        CancelRequested("give up"),
    ):
        decision = decide(parked, event, run.now + timedelta(hours=1))
        assert not decision.changed
        assert decision.saga == parked
        assert decision.commands == ()


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(Rejected("CARD_ACTIVE", "the card is in use"), id="rejected"),
        pytest.param(BROKEN, id="failed"),
    ],
)
def test_compensation_that_is_refused_parks_the_saga_at_once(outcome: Outcome) -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK, NO)
    run.answer(outcome)

    assert run.saga.state is SagaState.NEEDS_ATTENTION
    assert run.saga.steps[2].compensate_attempts == 1
    failure = run.saga.failure
    assert failure is not None
    assert (failure.step, failure.operation) == ("card", "compensate")
    assert pending_call(run.saga) is None
    assert [call for call in run.calls if call[0] is C] == [(C, 2, 1)]


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(CallAnswered(E, 1, 1, OK), id="earlier attempt"),
        pytest.param(CallAnswered(E, 1, 3, OK), id="attempt not sent yet"),
        pytest.param(CallAnswered(E, 0, 1, OK), id="earlier step"),
        pytest.param(CallAnswered(E, 2, 1, OK), id="later step"),
        pytest.param(CallAnswered(C, 1, 2, OK), id="other operation"),
        pytest.param(CallAnswered(E, 7, 2, OK), id="no such step"),
        pytest.param(SagaCreated(SAGA_ID, FOUR_STEPS, INPUT), id="created again"),
    ],
)
def test_answer_that_is_not_the_pending_call_changes_nothing(stale: Event) -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, UNAVAILABLE)  # waiting on Execute of step 1, attempt 2
    before = run.saga

    decision = run.send(stale)

    assert not decision.changed
    assert decision.saga == before
    assert decision.commands == ()


@pytest.mark.parametrize("outcome", [OK, NO, UNAVAILABLE, BROKEN])
def test_ended_saga_absorbs_every_event(outcome: Outcome) -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, OK, OK, OK)
    ended = run.saga

    for event in (
        CallAnswered(E, 3, 1, outcome),
        CallAnswered(C, 3, 1, outcome),
        CancelRequested("too late"),
        SagaCreated(SAGA_ID, FOUR_STEPS, INPUT),
    ):
        decision = decide(ended, event, run.now + timedelta(seconds=1))
        assert not decision.changed
        assert decision.saga == ended


def test_fold_replays_the_log_into_the_same_saga() -> None:
    run = SagaRun(FOUR_STEPS)
    run.answer_all(OK, UNAVAILABLE, OK, NO, UNAVAILABLE, OK, OK, OK)

    assert run.saga.state is SagaState.COMPENSATED
    assert fold(run.log) == run.saga
    for length in range(1, len(run.log)):
        assert fold(run.log[:length]).version == length


def test_fold_refuses_a_log_that_does_not_start_with_the_creation() -> None:
    with pytest.raises(ValueError, match="starts with its creation"):
        fold([(CancelRequested("x"), T0)])
    with pytest.raises(ValueError, match="empty log"):
        fold([])
