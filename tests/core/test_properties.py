"""Properties of every saga run: generated definitions answered by generated participants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from hypothesis import event, given, settings
from hypothesis import strategies as st

from coordinator.core.definitions import definition_violations
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
from coordinator.core.machine import decide, fold, pending_call
from coordinator.core.model import (
    Operation,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaState,
    StepKind,
    StepState,
)

from .builders import (
    COMPENSATE,
    EXECUTE,
    PARTICIPANTS,
    SagaRun,
    answer_to,
    compensatable,
    pivot,
    retriable,
    saga_definition,
)

BUSY = (StepState.RUNNING, StepState.COMPENSATING)


@st.composite
def retry_policies(draw: st.DrawFn) -> RetryPolicy:
    """Small budgets and short delays, so that runs give up often."""
    initial = timedelta(milliseconds=draw(st.integers(0, 500)))
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 3)),
        initial_backoff=initial,
        max_backoff=initial + timedelta(milliseconds=draw(st.integers(0, 2_000))),
        multiplier=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        jitter=draw(st.sampled_from([0.0, 0.2, 1.0])),
    )


@st.composite
def definitions(draw: st.DrawFn) -> SagaDefinition:
    """Valid definitions: compensatable steps, optionally a pivot and retriable steps after it."""
    has_pivot = draw(st.booleans())
    before = draw(st.integers(0 if has_pivot else 1, 4))
    after = draw(st.integers(0, 3)) if has_pivot else 0
    steps = [
        compensatable(
            f"c{i}", retry=draw(retry_policies()), compensation_retry=draw(retry_policies())
        )
        for i in range(before)
    ]
    if has_pivot:
        steps.append(pivot("pivot", retry=draw(retry_policies())))
        steps.extend(retriable(f"r{i}", retry=draw(retry_policies())) for i in range(after))
    return saga_definition(*steps)


succeeded = st.builds(Succeeded, output=st.binary(max_size=4))
transient = st.builds(
    Transient,
    code=st.sampled_from(["UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"]),
    message=st.just("try again"),
    retry_after=st.none() | st.integers(0, 3_000).map(lambda ms: timedelta(milliseconds=ms)),
)
# Succeeded and Transient weigh double, so that runs get far enough to cancel and retry.
outcomes = st.one_of(
    succeeded,
    succeeded,
    transient,
    transient,
    st.just(Rejected(reason="NO_FUNDS", message="no")),
    st.just(Failed(code="INVALID_ARGUMENT", message="cannot")),
)
delays = st.integers(0, 3_000).map(lambda ms: timedelta(milliseconds=ms))


@dataclass
class Trace:
    """A finished run and how its cancel request was taken."""

    run: SagaRun
    cancel: str
    dispatched_before_cancel: int


def _stale_variants(pending: CallAnswered) -> list[Event]:
    other = COMPENSATE if pending.operation is EXECUTE else EXECUTE
    return [
        CallAnswered(pending.operation, pending.step, pending.attempt + 1, pending.outcome),
        CallAnswered(pending.operation, pending.step, pending.attempt - 1, pending.outcome),
        CallAnswered(other, pending.step, pending.attempt, pending.outcome),
        CallAnswered(pending.operation, pending.step + 1, pending.attempt, pending.outcome),
    ]


def _check_decision(before: Saga, decision: Decision) -> None:
    """What holds for every single decision."""
    saga = decision.saga
    assert len(decision.commands) <= 1
    due, was_due = pending_call(saga), pending_call(before)
    if decision.dispatches:
        # A dispatch is a new attempt: recovery would send it, and it was not due before.
        assert due is not None
        assert was_due is None or (due.operation, due.step, due.attempt) != (
            was_due.operation,
            was_due.step,
            was_due.attempt,
        )
    elif due is not None and was_due is not None:
        # No dispatch: whatever is due was already due (a call in flight stays the same call).
        assert (due.operation, due.step, due.attempt) == (
            was_due.operation,
            was_due.step,
            was_due.attempt,
        )
    if not decision.changed:
        assert saga == before
        assert decision.commands == ()
    else:
        assert saga.version == before.version + 1
    assert sum(step.state in BUSY for step in saga.steps) <= 1
    if not saga.state.is_settled:
        assert pending_call(saga) is not None
    else:
        assert pending_call(saga) is None


def drive(
    definition: SagaDefinition,
    script: list[Outcome],
    waits: list[timedelta],
    cancel_at: int | None,
    cancel_wait: timedelta,
    cancel_in_flight: bool = True,
) -> Trace:
    """Answer the pending call with the next outcome (then Succeeded) until the saga settles."""
    run = SagaRun(definition)
    bound = len(script) + 2 * len(definition.steps) + 2
    answers = 0
    cancel = "not requested"
    dispatched_before_cancel = 0
    while not run.saga.state.is_settled:
        assert answers <= bound, f"saga still {run.saga.state} after {answers} answers"
        if answers == cancel_at:
            before = run.saga
            dispatched_before_cancel = len(run.dispatches)
            decision = run.send(
                CancelRequested("generated", call_in_flight=cancel_in_flight), after=cancel_wait
            )
            _check_decision(before, decision)
            cancel = (
                "refused"
                if not decision.changed
                else "during a backoff"
                if decision.commands
                else "with a call in flight"
            )
            if decision.changed and not decision.commands:
                in_flight = pending_call(decision.saga)
                assert decision.saga.state is SagaState.COMPENSATING
                assert in_flight is not None
                assert in_flight.operation is EXECUTE
                assert decision.saga.steps[in_flight.step].state is StepState.RUNNING
            cancel_at = None
            continue  # the cancel may have settled the saga
        outcome = script[answers] if answers < len(script) else Succeeded(b"done")
        wait = waits[answers % len(waits)] if waits else timedelta(0)
        pending = run.pending
        answer = answer_to(pending, outcome)
        for stale in _stale_variants(answer):
            ignored = decide(run.saga, stale, run.now)
            assert not ignored.changed
            assert ignored.saga == run.saga
        before = run.saga
        _check_decision(before, run.answer(outcome, after=wait))
        answers += 1
    return Trace(run, cancel, dispatched_before_cancel)


def _check_compensations(run: SagaRun) -> None:
    definition = run.saga.definition
    executed = sorted({d.step for d in run.dispatches if d.operation is EXECUTE})
    undoable = [i for i in reversed(executed) if definition.steps[i].compensation]
    first_attempts = [
        d.step for d in run.dispatches if d.operation is COMPENSATE and d.attempt == 1
    ]
    compensate_steps = [d.step for d in run.dispatches if d.operation is COMPENSATE]

    # Newest first, each step compensated once, retries of one step kept together.
    assert first_attempts == sorted(set(first_attempts), reverse=True)
    assert compensate_steps == sorted(compensate_steps, reverse=True)
    assert first_attempts == undoable[: len(first_attempts)]

    compensated = [
        i for i, step in enumerate(run.saga.steps) if step.state is StepState.COMPENSATED
    ]
    if run.saga.state is SagaState.COMPENSATED:
        assert first_attempts == undoable
        assert compensated == sorted(undoable)
    else:
        assert set(compensated) <= set(undoable)
    if run.saga.state is SagaState.NEEDS_ATTENTION and first_attempts:
        failure = run.saga.failure
        assert failure is not None
        assert failure.operation == Operation.COMPENSATE.value
        assert failure.step == definition.steps[first_attempts[-1]].name


def _check_forward_only_after_pivot(run: SagaRun) -> None:
    definition = run.saga.definition
    kinds = [step.kind for step in definition.steps]
    if StepKind.PIVOT not in kinds:
        return
    at = kinds.index(StepKind.PIVOT)
    pivot_succeeded = any(d.saga.steps[at].state is StepState.SUCCEEDED for d in run.decisions)
    if pivot_succeeded:
        assert all(d.operation is EXECUTE for d in run.dispatches)
        assert run.saga.state in (SagaState.SUCCEEDED, SagaState.NEEDS_ATTENTION)
    assert all(d.step < at for d in run.dispatches if d.operation is COMPENSATE), (
        "only steps before the pivot are ever compensated"
    )


def _check_absorbs(run: SagaRun) -> None:
    settled = run.saga
    later = run.now + timedelta(hours=1)
    events: list[Event] = [
        CancelRequested("too late"),
        SagaCreated(settled.saga_id, settled.definition, settled.input),
    ]
    for dispatch in run.dispatches[-3:]:
        events += [
            answer_to(dispatch, outcome)
            for outcome in (Succeeded(b"x"), Rejected("R", "r"), Transient("UNAVAILABLE", "u"))
        ]
    for index in range(len(settled.steps)):
        for operation in (EXECUTE, COMPENSATE):
            events.append(CallAnswered(operation, index, 1, Failed("INTERNAL", "late")))
    for late in events:
        decision = decide(settled, late, later)
        assert not decision.changed
        assert decision.saga == settled
        assert decision.commands == ()


def _check_run(trace: Trace) -> None:
    """What holds at the end of every run."""
    run = trace.run
    event(f"ended {run.saga.state}")
    if run.saga.failure is not None:
        event(f"failure in {run.saga.failure.operation}")

    # (1) it settles, within the bound drive() enforces.
    assert run.saga.state in (
        SagaState.SUCCEEDED,
        SagaState.COMPENSATED,
        SagaState.NEEDS_ATTENTION,
    )
    assert run.saga.ended_at is not None
    # (2) compensations: exactly the sent steps with a compensation, newest first, once each.
    _check_compensations(run)
    # (3) a settled saga absorbs everything.
    _check_absorbs(run)
    # (4) the log replays into the same saga.
    assert fold(run.log) == run.saga
    assert run.saga.version == len(run.log)
    # (5) is checked on every decision by drive().
    # (6) success means every step succeeded and nothing was undone.
    if run.saga.state is SagaState.SUCCEEDED:
        assert all(step.state is StepState.SUCCEEDED for step in run.saga.steps)
        assert all(d.operation is EXECUTE for d in run.dispatches)
        assert run.saga.failure is None
    _check_forward_only_after_pivot(run)


@settings(max_examples=300, deadline=None)
@given(
    definition=definitions(),
    script=st.lists(outcomes, max_size=30),
    waits=st.lists(delays, max_size=10),
)
def test_every_saga_run_settles_compensates_newest_first_and_replays(
    definition: SagaDefinition, script: list[Outcome], waits: list[timedelta]
) -> None:
    assert definition_violations(definition, PARTICIPANTS) == []

    _check_run(drive(definition, script, waits, None, timedelta(0)))


@st.composite
def cancelled_scripts(draw: st.DrawFn) -> tuple[list[Outcome], int]:
    """Outcomes to answer with, and before which answer the cancel comes."""
    script = draw(st.lists(outcomes, max_size=20))
    cancel_at = draw(st.integers(0, len(script)))
    if cancel_at and draw(st.booleans()):
        # Right after a transient answer, so that the cancel often meets a backoff.
        script[cancel_at - 1] = draw(transient)
    return script, cancel_at


@settings(max_examples=300, deadline=None)
@given(
    definition=definitions(),
    scenario=cancelled_scripts(),
    waits=st.lists(delays, max_size=10),
    cancel_wait=st.one_of(st.just(timedelta(0)), delays),
    cancel_in_flight=st.booleans(),
)
def test_every_cancelled_saga_run_compensates_what_was_sent_and_never_goes_forward(
    definition: SagaDefinition,
    scenario: tuple[list[Outcome], int],
    waits: list[timedelta],
    cancel_wait: timedelta,
    cancel_in_flight: bool,
) -> None:
    script, cancel_at = scenario

    trace = drive(definition, script, waits, cancel_at, cancel_wait, cancel_in_flight)

    event(f"cancel {trace.cancel}")
    _check_run(trace)
    run = trace.run
    if trace.cancel in ("during a backoff", "with a call in flight"):
        assert run.saga.state in (SagaState.COMPENSATED, SagaState.NEEDS_ATTENTION)
        assert run.saga.cancel_reason == "generated"
        after_cancel = run.dispatches[trace.dispatched_before_cancel :]
        assert all(d.operation is COMPENSATE for d in after_cancel)
