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


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned list of steps."""

    name: str
    version: int
    steps: tuple[StepDefinition, ...]
    description: str = ""


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

    @property
    def name(self) -> str:
        """The saga's resource name."""
        return f"sagas/{self.saga_id}"

    def step_definition(self, index: int) -> StepDefinition:
        """The definition of step ``index``."""
        return self.definition.steps[index]


def request_id(saga_id: str, step: str, operation: Operation) -> str:
    """The deterministic id of a call: the same on every retry and after a restart."""
    return f"sagas/{saga_id}/steps/{step}:{operation.value}"
