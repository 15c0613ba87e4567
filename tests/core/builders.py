"""Test builders for the core: step definitions, outcomes, a saga run answered call by call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coordinator.core.events import (
    CallAnswered,
    Decision,
    Dispatch,
    Event,
    Failed,
    Outcome,
    Rejected,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import decide, pending_call, start
from coordinator.core.model import (
    Operation,
    RetryPolicy,
    Saga,
    SagaDefinition,
    StepDefinition,
    StepKind,
    StepState,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SAGA_ID = "s-1"
INPUT = b'{"customer": "c-7"}'
PARTICIPANTS = frozenset({"identity", "accounts", "cards", "billing"})

STEP_RETRY = RetryPolicy(
    max_attempts=3,
    initial_backoff=timedelta(milliseconds=100),
    max_backoff=timedelta(seconds=1),
    multiplier=2.0,
    jitter=0.2,
)
COMPENSATION_RETRY = RetryPolicy(
    max_attempts=4,
    initial_backoff=timedelta(milliseconds=200),
    max_backoff=timedelta(seconds=2),
    multiplier=2.0,
    jitter=0.2,
)

EXECUTE = Operation.EXECUTE
COMPENSATE = Operation.COMPENSATE

OK = Succeeded()
NO = Rejected(reason="INSUFFICIENT_FUNDS", message="the account has no funds")
UNAVAILABLE = Transient(code="UNAVAILABLE", message="connection refused")
BROKEN = Failed(code="UNIMPLEMENTED", message="no such action")

Call = tuple[Operation, int, int]
"""A dispatch reduced to what the tables compare: (operation, step index, attempt)."""


def compensatable(
    name: str,
    participant: str = "accounts",
    *,
    retry: RetryPolicy = STEP_RETRY,
    compensation_retry: RetryPolicy = COMPENSATION_RETRY,
    timeout: timedelta = timedelta(seconds=5),
) -> StepDefinition:
    """A compensatable step ``name`` with actions ``name.do`` and ``name.undo``."""
    return StepDefinition(
        name=name,
        participant=participant,
        action=f"{name}.do",
        compensation=f"{name}.undo",
        kind=StepKind.COMPENSATABLE,
        timeout=timeout,
        retry=retry,
        compensation_retry=compensation_retry,
    )


def pivot(
    name: str, participant: str = "cards", *, retry: RetryPolicy = STEP_RETRY
) -> StepDefinition:
    """A pivot step: no compensation, the point of no return."""
    return StepDefinition(
        name=name, participant=participant, action=f"{name}.do", kind=StepKind.PIVOT, retry=retry
    )


def retriable(
    name: str, participant: str = "billing", *, retry: RetryPolicy = STEP_RETRY
) -> StepDefinition:
    """A retriable step: after the pivot, retried until it succeeds, never compensated."""
    return StepDefinition(
        name=name,
        participant=participant,
        action=f"{name}.do",
        kind=StepKind.RETRIABLE,
        retry=retry,
    )


def saga_definition(
    *steps: StepDefinition, name: str = "open-account", version: int = 1
) -> SagaDefinition:
    """A definition of these steps."""
    return SagaDefinition(name=name, version=version, steps=steps)


FOUR_STEPS = saga_definition(
    compensatable("identity", "identity"),
    compensatable("account", "accounts"),
    compensatable("card", "cards"),
    compensatable("invoice", "billing"),
)
PIVOTED = saga_definition(compensatable("c1"), pivot("pivot"), retriable("r1"))


def call_of(dispatch: Dispatch) -> Call:
    """The (operation, step, attempt) of a dispatch."""
    return (dispatch.operation, dispatch.step, dispatch.attempt)


def answer_to(dispatch: Dispatch, outcome: Outcome) -> CallAnswered:
    """The event of a participant answering ``dispatch`` with ``outcome``."""
    return CallAnswered(dispatch.operation, dispatch.step, dispatch.attempt, outcome)


class SagaRun:
    """One saga driven through the pure core, recording its log and every decision."""

    def __init__(
        self,
        definition: SagaDefinition,
        *,
        saga_id: str = SAGA_ID,
        input: bytes = INPUT,
        now: datetime = T0,
    ) -> None:
        created = SagaCreated(saga_id=saga_id, definition=definition, input=input)
        decision = start(created, now)
        self.now = now
        self.log: list[tuple[Event, datetime]] = [(created, now)]
        self.decisions: list[Decision] = [decision]
        self.saga: Saga = decision.saga

    @property
    def dispatches(self) -> list[Dispatch]:
        """Every dispatch decided so far, in order."""
        return [command for decision in self.decisions for command in decision.commands]

    @property
    def calls(self) -> list[Call]:
        """Every dispatch decided so far, as (operation, step, attempt)."""
        return [call_of(dispatch) for dispatch in self.dispatches]

    @property
    def step_states(self) -> list[StepState]:
        """The state of each step, in order."""
        return [step.state for step in self.saga.steps]

    @property
    def pending(self) -> Dispatch:
        """The call the saga waits on; fails the test when there is none."""
        pending = pending_call(self.saga)
        assert pending is not None, f"saga in {self.saga.state} waits on no call"
        return pending

    def send(self, event: Event, *, after: timedelta = timedelta(milliseconds=10)) -> Decision:
        """Decide ``event`` ``after`` the previous one; log it when it changed the saga."""
        self.now += after
        decision = decide(self.saga, event, self.now)
        if decision.changed:
            self.log.append((event, self.now))
        self.decisions.append(decision)
        self.saga = decision.saga
        return decision

    def answer(
        self, outcome: Outcome, *, after: timedelta = timedelta(milliseconds=10)
    ) -> Decision:
        """Answer the pending call with ``outcome``, no sooner than the call was due."""
        pending = self.pending
        if pending.not_before is not None and pending.not_before > self.now + after:
            after = pending.not_before - self.now
        return self.send(answer_to(pending, outcome), after=after)

    def answer_all(self, *outcomes: Outcome) -> None:
        """Answer the pending calls one after the other."""
        for outcome in outcomes:
            self.answer(outcome)
