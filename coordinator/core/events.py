"""What can happen to a saga (events) and what the coordinator must do about it (commands)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from coordinator.core.model import (
    Operation,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaState,
    StepState,
    request_id,
)


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SagaCreated:
    """A client asked for a saga to run; always the first event of a saga."""

    saga_id: str
    definition: SagaDefinition
    input: bytes
    trace_context: Mapping[str, str] = field(default_factory=_no_headers)
    labels: Mapping[str, str] = field(default_factory=_no_headers)


@dataclass(frozen=True)
class Succeeded:
    """The participant answered OK."""

    output: bytes = b""


@dataclass(frozen=True)
class Rejected:
    """The participant said a business "no" (FAILED_PRECONDITION): nothing was applied."""

    reason: str
    message: str
    code: str = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Transient:
    """The call failed in a way that may pass: the outcome is unknown, retry the same request."""

    code: str
    message: str
    reason: str = ""
    retry_after: timedelta | None = None
    """The participant's RetryInfo: wait at least this long before retrying."""


@dataclass(frozen=True)
class Failed:
    """The participant cannot do this (a code that is never retried)."""

    code: str
    message: str
    reason: str = ""


Outcome = Succeeded | Rejected | Transient | Failed


@dataclass(frozen=True)
class CallAnswered:
    """A participant answered (or a call failed) for one attempt of one step's operation."""

    operation: Operation
    step: int
    attempt: int
    outcome: Outcome
    sent_at: datetime | None = None
    """When the attempt was sent (None if unknown): with the time the answer was recorded, it
    gives the attempt's span in the saga's trace."""


@dataclass(frozen=True)
class CancelRequested:
    """A client asked for the saga to be cancelled."""

    reason: str
    call_in_flight: bool = True
    """Whether the saga's pending Execute was on its way to the participant when the cancel
    came. If so its answer comes first (and its output goes to the compensation); if not, the
    step is compensated at once and never sent again."""
    actor: str = ""
    """Who asked, for the audit trail."""


@dataclass(frozen=True)
class RetryRequested:
    """An operator asked for a step's pending call to be sent now: one waiting out its backoff,
    or the forward step a saga is parked on (with a fresh attempt budget)."""

    step: int
    actor: str
    reason: str
    call_in_flight: bool = False
    """Whether the step's call was on its way when the action came (then it does not fit)."""


@dataclass(frozen=True)
class ResumeRequested:
    """An operator asked a saga parked on a failed compensation to compensate again."""

    actor: str
    reason: str
    compensation_retry: RetryPolicy | None = None
    """The compensation's retry policy from now on (None: the definition's)."""


@dataclass(frozen=True)
class MarkCompensated:
    """An operator undid the step by hand, outside the system."""

    step: int
    actor: str
    reason: str
    call_in_flight: bool = False


@dataclass(frozen=True)
class CompleteRequested:
    """An operator records a stuck pivot or retriable step as succeeded with this output."""

    step: int
    output: bytes
    actor: str
    reason: str
    call_in_flight: bool = False


@dataclass(frozen=True)
class DeadlineExceeded:
    """The definition's deadline for the saga passed."""

    call_in_flight: bool = False


OperatorEvent = (
    CancelRequested | RetryRequested | ResumeRequested | MarkCompensated | CompleteRequested
)
Event = SagaCreated | CallAnswered | OperatorEvent | DeadlineExceeded


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored in a saga's append-only log."""

    saga_id: str
    sequence: int
    """Position in the saga's log, from 1; equals the saga's version after the event."""
    recorded_at: datetime
    event: Event


@dataclass(frozen=True)
class Dispatch:
    """Send one attempt of one step's operation, not before ``not_before``."""

    operation: Operation
    step: int
    attempt: int
    request_id: str
    not_before: datetime | None = None
    """When the attempt is due; None means at once."""


@dataclass(frozen=True)
class Decision:
    """The saga after an event, and whether it now waits on a call it has not sent yet.

    The saga is the one source of truth for what to send (``pending_call``): a decision only
    says that a new attempt became due, so that nothing else has to be kept equal to the saga.
    """

    saga: Saga
    dispatches: bool = False
    """True when the event made a new attempt due (a first call, a retry, a compensation)."""
    changed: bool = True
    """False when the event did not apply (stale answer, settled saga): nothing to store."""

    @property
    def commands(self) -> tuple[Dispatch, ...]:
        """The new attempt the decision made due, read from the saga itself."""
        pending = pending_call(self.saga) if self.dispatches else None
        return () if pending is None else (pending,)


def pending_call(saga: Saga) -> Dispatch | None:
    """The one call the saga is waiting on, if any: what recovery re-sends after a crash."""
    if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
        return None
    for index, step in enumerate(saga.steps):
        if step.state is StepState.RUNNING:
            op, attempt = Operation.EXECUTE, step.execute_attempts
        elif step.state is StepState.COMPENSATING:
            op, attempt = Operation.COMPENSATE, step.compensate_attempts
        else:
            continue
        return Dispatch(
            op, index, attempt, request_id(saga.saga_id, step.name, op), step.next_attempt_at
        )
    return None
