"""The saga domain: definitions, sagas, steps and their states, as immutable values."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType


class SagaState(enum.StrEnum):
    """Where a saga stands."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    SUCCEEDED = "SUCCEEDED"
    COMPENSATED = "COMPENSATED"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"

    @property
    def is_terminal(self) -> bool:
        """A terminal saga never changes again."""
        return self in (SagaState.SUCCEEDED, SagaState.COMPENSATED)

    @property
    def is_settled(self) -> bool:
        """A settled saga no longer moves by itself (terminal, or parked for an operator)."""
        return self.is_terminal or self is SagaState.NEEDS_ATTENTION


class StepState(enum.StrEnum):
    """Where one step of a saga stands."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    SKIPPED = "SKIPPED"


class StepKind(enum.StrEnum):
    """The three kinds of saga step."""

    COMPENSATABLE = "COMPENSATABLE"
    PIVOT = "PIVOT"
    RETRIABLE = "RETRIABLE"


class Operation(enum.StrEnum):
    """The two calls a participant answers."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter for one kind of call."""

    max_attempts: int = 5
    """Attempts in all, the first included."""
    initial_backoff: timedelta = timedelta(milliseconds=100)
    """Delay before the second attempt."""
    max_backoff: timedelta = timedelta(seconds=10)
    """Upper bound of any delay."""
    multiplier: float = 2.0
    """Growth of the delay from one attempt to the next."""
    jitter: float = 0.2
    """Fraction of each delay that is randomised (0 to 1)."""


DEFAULT_RETRY = RetryPolicy()
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=20, max_backoff=timedelta(seconds=30))
DEFAULT_TIMEOUT = timedelta(seconds=10)


@dataclass(frozen=True)
class StepDefinition:
    """One step: which participant to call, with which actions, and how to retry."""

    name: str
    participant: str
    action: str
    compensation: str = ""
    kind: StepKind = StepKind.COMPENSATABLE
    timeout: timedelta = DEFAULT_TIMEOUT
    retry: RetryPolicy = DEFAULT_RETRY
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    max_attempts: int = 0
    """Pivot and retriable steps: Execute attempts after which the saga is parked for an
    operator (0: no limit, the step is retried until it answers definitely)."""
    emits: str = ""
    """The named event the step's success stands for (e.g. ``UserCreated``), if any."""


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned list of steps."""

    name: str
    version: int
    steps: tuple[StepDefinition, ...]
    description: str = ""
    deadline: timedelta | None = None
    """Time a saga has to end from its creation (None: no limit)."""


@dataclass(frozen=True)
class Failure:
    """Why a call, a step or a saga did not go as planned."""

    step: str
    operation: str
    code: str
    reason: str
    message: str


@dataclass(frozen=True)
class StepRun:
    """The record of one step of one saga."""

    name: str
    state: StepState = StepState.PENDING
    execute_attempts: int = 0
    compensate_attempts: int = 0
    output: bytes | None = None
    failure: Failure | None = None
    next_attempt_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    by_operator: bool = False
    """The step's state was recorded by an operator (compensated or completed by hand)."""
    budget_start: int = 0
    """Attempts of the step's current operation made before its current retry budget began
    (an operator's retry or resume gives a fresh budget; attempt numbers keep growing)."""
    retry_override: RetryPolicy | None = None
    """The retry policy an operator gave the step's compensation when resuming it."""


class OperatorAction(enum.StrEnum):
    """What an operator (or a client cancelling) did to a saga."""

    CANCEL = "CANCEL"
    RETRY = "RETRY"
    RESUME = "RESUME"
    MARK_COMPENSATED = "MARK_COMPENSATED"
    COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class AuditEntry:
    """One operator action on a saga, as recorded in its log."""

    sequence: int
    """Position of the action's event in the saga's log."""
    at: datetime
    actor: str
    action: OperatorAction
    step: str
    reason: str


def _frozen_mapping() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Saga:
    """One run of a saga definition; it keeps the definition it started with."""

    saga_id: str
    definition: SagaDefinition
    input: bytes
    state: SagaState
    steps: tuple[StepRun, ...]
    created_at: datetime
    updated_at: datetime
    version: int
    ended_at: datetime | None = None
    failure: Failure | None = None
    cancel_reason: str | None = None
    trace_context: Mapping[str, str] = field(default_factory=_frozen_mapping)
    """Propagation headers (W3C traceparent) of the saga's trace, kept across restarts."""
    labels: Mapping[str, str] = field(default_factory=_frozen_mapping)
    """Labels given at creation, to find the saga by (a business key, a tenant)."""
    audit: tuple[AuditEntry, ...] = ()
    """Every operator action taken on the saga, oldest first."""
    deadline_exceeded: bool = False
    """The definition's deadline passed and was acted on (it is acted on once)."""

    @property
    def name(self) -> str:
        """The saga's resource name."""
        return f"sagas/{self.saga_id}"

    @property
    def deadline_at(self) -> datetime | None:
        """When the saga's deadline passes, if its definition gives one."""
        deadline = self.definition.deadline
        return None if deadline is None else self.created_at + deadline

    def step_definition(self, index: int) -> StepDefinition:
        """The definition of step ``index``."""
        return self.definition.steps[index]


def request_id(saga_id: str, step: str, operation: Operation) -> str:
    """The deterministic id of a call: the same on every retry and after a restart."""
    return f"sagas/{saga_id}/steps/{step}:{operation.value}"
