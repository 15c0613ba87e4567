"""Typed, immutable views of the coordinator's resources, converted from their protos."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from saga.v1 import coordinator_service_pb2, saga_pb2

_E = TypeVar("_E", bound=StrEnum)


class SagaState(StrEnum):
    """Where a saga stands."""

    UNSPECIFIED = "UNSPECIFIED"
    """Not set, or a state this SDK does not know yet."""
    RUNNING = "RUNNING"
    """Steps are being executed forward."""
    COMPENSATING = "COMPENSATING"
    """Executed steps are being compensated, newest first."""
    SUCCEEDED = "SUCCEEDED"
    """Every step succeeded. Terminal."""
    COMPENSATED = "COMPENSATED"
    """Every step that had been sent was compensated. Terminal."""
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    """Parked until an operator acts; never reported as compensated."""

    @property
    def settled(self) -> bool:
        """True when the saga cannot move by itself any more (what `wait()` waits for)."""
        return self in SETTLED_STATES


SETTLED_STATES = frozenset({SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_ATTENTION})
"""The states at which WatchSaga ends and `wait()` returns."""


class StepState(StrEnum):
    """Where one step of a saga stands."""

    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    SKIPPED = "SKIPPED"


class StepKind(StrEnum):
    """The role of a step: the three kinds of saga theory."""

    COMPENSATABLE = "COMPENSATABLE"
    PIVOT = "PIVOT"
    RETRIABLE = "RETRIABLE"


class SagaEventType(StrEnum):
    """What happened to a saga."""

    UNSPECIFIED = "UNSPECIFIED"
    CREATED = "CREATED"
    STEP_SUCCEEDED = "STEP_SUCCEEDED"
    STEP_REJECTED = "STEP_REJECTED"
    STEP_ATTEMPT_FAILED = "STEP_ATTEMPT_FAILED"
    STEP_FAILED = "STEP_FAILED"
    COMPENSATION_SUCCEEDED = "COMPENSATION_SUCCEEDED"
    COMPENSATION_ATTEMPT_FAILED = "COMPENSATION_ATTEMPT_FAILED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    RETRY_REQUESTED = "RETRY_REQUESTED"
    """An operator had a step's pending call sent again at once."""
    RESUMED = "RESUMED"
    """An operator resumed a saga parked on a failed compensation."""
    STEP_MARKED_COMPENSATED = "STEP_MARKED_COMPENSATED"
    """An operator recorded a step as compensated by hand."""
    STEP_COMPLETED = "STEP_COMPLETED"
    """An operator recorded a step as completed by hand."""
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    """The saga's deadline passed."""

    @property
    def by_operator(self) -> bool:
        """True for the events an operator's action (or a client's cancel) recorded."""
        return self in OPERATOR_EVENTS


OPERATOR_EVENTS = frozenset(
    {
        SagaEventType.CANCEL_REQUESTED,
        SagaEventType.RETRY_REQUESTED,
        SagaEventType.RESUMED,
        SagaEventType.STEP_MARKED_COMPENSATED,
        SagaEventType.STEP_COMPLETED,
    }
)
"""The event types that carry an actor and a reason."""


class OperatorAction(StrEnum):
    """What an operator (or a client cancelling) did to a saga."""

    UNSPECIFIED = "UNSPECIFIED"
    CANCEL = "CANCEL"
    RETRY = "RETRY"
    RESUME = "RESUME"
    MARK_COMPENSATED = "MARK_COMPENSATED"
    COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class Failure:
    """Why a call, a step or a saga did not go as planned."""

    step: str
    """Step concerned, or ""."""
    operation: str
    """"execute", "compensate" or "cancel"."""
    code: str
    """gRPC status code name of the participant's answer, e.g. "FAILED_PRECONDITION"."""
    reason: str
    """Stable UPPER_SNAKE reason from the participant's ErrorInfo, or ""."""
    message: str
    """Human readable message."""


@dataclass(frozen=True)
class StepRun:
    """The record of one step of one saga."""

    name: str
    participant: str
    kind: StepKind
    state: StepState
    execute_attempts: int
    compensate_attempts: int
    output: bytes | None
    """Output of Execute when it answered OK, else None."""
    failure: Failure | None
    start_time: datetime | None
    end_time: datetime | None
    next_attempt_time: datetime | None
    by_operator: bool = False
    """True when the step's state was recorded by an operator (compensated or completed by
    hand) rather than answered by its participant."""

    def output_json(self) -> Any:
        """The output decoded as UTF-8 JSON (None when there is no output)."""
        return _decode_json(self.output)


@dataclass(frozen=True)
class AuditEntry:
    """One operator action on a saga, as recorded in its audit trail."""

    sequence: int
    """Position of the action's event in the saga's log."""
    time: datetime | None
    actor: str
    """Who took it."""
    action: OperatorAction
    step: str
    """The step concerned, or ""."""
    reason: str
    """Why, as the operator gave it."""


@dataclass(frozen=True)
class Saga:
    """One run of a saga definition."""

    saga_id: str
    definition: str
    definition_version: int
    state: SagaState
    input: bytes
    steps: tuple[StepRun, ...]
    failure: Failure | None
    """Why the saga compensated or needs attention, if it did."""
    cancel_reason: str
    create_time: datetime | None
    update_time: datetime | None
    end_time: datetime | None
    version: int
    """Number of events recorded for the saga."""
    # Left out of the hash, so that a saga stays hashable as it was before it had labels.
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Labels given at creation, e.g. {"customer": "c-42"}."""
    audit: tuple[AuditEntry, ...] = ()
    """Every operator action taken on the saga, oldest first."""
    deadline_time: datetime | None = None
    """When the saga's deadline passes, if its definition has one."""
    trace_id: str = ""
    """The id of the saga's trace (32 hex digits; for a link to it in Jaeger), empty when the
    coordinator traces nothing."""

    def input_json(self) -> Any:
        """The input decoded as UTF-8 JSON (None when the input is empty)."""
        return _decode_json(self.input)

    def step(self, name: str) -> StepRun:
        """The step named `name`; KeyError when the saga has none."""
        for run in self.steps:
            if run.name == name:
                return run
        raise KeyError(name)


@dataclass(frozen=True)
class SagaEvent:
    """One entry of a saga's append-only event log."""

    sequence: int
    type: SagaEventType
    step: str
    attempt: int
    time: datetime | None
    failure: Failure | None
    actor: str = ""
    """Who asked, for cancellations and operator actions."""
    reason: str = ""
    """The reason given, for cancellations and operator actions."""
    operation: str = ""
    """"execute" or "compensate" when the event concerns a call, else ""."""
    action: str = ""
    """The action or compensation the event concerns, e.g. "OpenAccount" or "CloseAccount"."""
    emits: str = ""
    """The named event the step's success stands for (the definition's `emits`), if any."""


@dataclass(frozen=True)
class SagaChange:
    """One change of one saga, from the change feed of all sagas (`SagaClient.changes`)."""

    position: int
    """The change's position in the feed: store it once processed, resume after it."""
    saga_id: str
    definition: str
    definition_version: int
    state: SagaState
    """The saga's state after the change (UNSPECIFIED for changes older than the feed)."""
    event: SagaEvent
    labels: Mapping[str, str]


@dataclass(frozen=True)
class SagaUpdate:
    """One message of a watch: the saga after a change, and the change (None on the first)."""

    saga: Saga
    event: SagaEvent | None


@dataclass(frozen=True)
class CreateResult:
    """What `create()` returns: the saga, and False when it existed already (a replay)."""

    saga: Saga
    created: bool


@dataclass(frozen=True)
class SagaCounts:
    """What `count()` returns: how many sagas are in each state, NEEDS_ATTENTION first."""

    counts: Mapping[SagaState, int]
    """One entry per state, zero counts included, in the coordinator's order."""
    total: int

    def __getitem__(self, state: SagaState | str) -> int:
        return self.counts.get(SagaState(state), 0)


@dataclass(frozen=True)
class PruneResult:
    """What `prune()` removed, or with `dry_run` would remove."""

    sagas: int
    events: int
    cutoff: datetime | None
    """Sagas that ended before this time were (or would be) pruned."""
    dry_run: bool


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried after transient errors: capped exponential backoff with jitter.

    Zero and None fields take the coordinator's (or the definition's) defaults.
    """

    max_attempts: int = 0
    """Attempts in all, the first included."""
    initial_backoff: timedelta | None = None
    """Delay before the second attempt."""
    max_backoff: timedelta | None = None
    """Upper bound of the delay between two attempts."""
    backoff_multiplier: float = 0.0
    """Growth of the delay from one attempt to the next."""
    jitter: float | None = None
    """Fraction of each delay that is randomised, from 0 to 1."""


@dataclass(frozen=True)
class StepDefinition:
    """One step of a saga definition."""

    name: str
    participant: str
    action: str
    compensation: str = ""
    """Action sent with Compensate; "" on pivot and retriable steps."""
    kind: StepKind = StepKind.COMPENSATABLE
    timeout: timedelta | None = None
    """Deadline of each call; None means the default."""
    retry: RetryPolicy | None = None
    """How Execute is retried; None takes the definition's default."""
    compensation_retry: RetryPolicy | None = None
    """How Compensate is retried; None takes the definition's default."""
    max_attempts: int = 0
    """Pivot and retriable steps: attempts after which the saga is parked (0: no limit)."""
    emits: str = ""
    """Name of the event the step's success stands for, e.g. "UserCreated"."""


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned list of steps."""

    name: str
    version: int
    steps: tuple[StepDefinition, ...]
    description: str = ""
    retry: RetryPolicy | None = None
    """Default Execute retry policy of the steps."""
    compensation_retry: RetryPolicy | None = None
    """Default Compensate retry policy of the steps."""
    deadline: timedelta | None = None
    """Time a saga has to end from its creation; None means no limit."""

    @property
    def pivot(self) -> StepDefinition | None:
        """The pivot step, if the definition has one."""
        return next((s for s in self.steps if s.kind is StepKind.PIVOT), None)


@dataclass(frozen=True)
class DefinitionVersion:
    """One registered version of a definition."""

    version: int
    register_time: datetime | None
    digest: str
    """SHA-256 of its canonical content, hexadecimal."""
    unfinished_sagas: int
    """Sagas of this version not yet ended: running, compensating or parked."""
    step_count: int


@dataclass(frozen=True)
class DefinitionSummary:
    """One definition and its registered versions, oldest first."""

    name: str
    versions: tuple[DefinitionVersion, ...]
    description: str
    """Description of the newest version."""

    @property
    def newest(self) -> DefinitionVersion | None:
        """The newest version, None when there is none."""
        return max(self.versions, key=lambda v: v.version, default=None)


@dataclass(frozen=True)
class RegisteredDefinition:
    """What `definition()` returns: one version of a definition and its registration."""

    definition: SagaDefinition
    """The definition, defaults filled in."""
    info: DefinitionVersion | None


@dataclass(frozen=True)
class RegisterResult:
    """What `register_definition()` returns; `created` is False when the same content was
    registered already under that version (a no-op)."""

    definition: SagaDefinition
    info: DefinitionVersion | None
    created: bool


def _decode_json(payload: bytes | None) -> Any:
    if not payload:
        return None
    return json.loads(payload.decode("utf-8"))


def _enum(cls: type[_E], prefix: str, number: int, names: Any) -> _E:
    # Protobuf enums are open: an unknown number (a newer coordinator) maps to UNSPECIFIED
    # rather than failing the whole conversion.
    try:
        return cls(names.Name(number).removeprefix(prefix))
    except ValueError:
        return cls("UNSPECIFIED")


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _duration(message: Any, field: str) -> timedelta | None:
    if not message.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(message, field)
    return value.ToTimedelta()


def _step_kind(kind: saga_pb2.StepKind.ValueType) -> StepKind:
    # UNSPECIFIED reads as the default; an unknown kind too, rather than failing the conversion.
    try:
        return StepKind(saga_pb2.StepKind.Name(kind).removeprefix("STEP_KIND_"))
    except ValueError:
        return StepKind.COMPENSATABLE


def failure_from_proto(message: Any, field: str = "failure") -> Failure | None:
    """Convert the `Failure` in `message.field`, None when unset."""
    if not message.HasField(field):
        return None
    f: saga_pb2.Failure = getattr(message, field)
    return Failure(f.step, f.operation, f.code, f.reason, f.message)


def step_from_proto(step: saga_pb2.StepRun) -> StepRun:
    """Convert a `saga.v1.StepRun`."""
    return StepRun(
        name=step.name,
        participant=step.participant,
        kind=_step_kind(step.kind),
        state=_enum(StepState, "STEP_STATE_", step.state, saga_pb2.StepState),
        execute_attempts=step.execute_attempts,
        compensate_attempts=step.compensate_attempts,
        output=step.output if step.HasField("output") else None,
        failure=failure_from_proto(step),
        start_time=_time(step, "start_time"),
        end_time=_time(step, "end_time"),
        next_attempt_time=_time(step, "next_attempt_time"),
        by_operator=step.by_operator,
    )


def audit_from_proto(entry: saga_pb2.AuditEntry) -> AuditEntry:
    """Convert a `saga.v1.AuditEntry`."""
    return AuditEntry(
        sequence=entry.sequence,
        time=_time(entry, "time"),
        actor=entry.actor,
        action=_enum(OperatorAction, "OPERATOR_ACTION_", entry.action, saga_pb2.OperatorAction),
        step=entry.step,
        reason=entry.reason,
    )


def saga_from_proto(saga: saga_pb2.Saga) -> Saga:
    """Convert a `saga.v1.Saga`."""
    return Saga(
        saga_id=saga.saga_id or saga.name.removeprefix("sagas/"),
        definition=saga.definition,
        definition_version=saga.definition_version,
        state=_enum(SagaState, "SAGA_STATE_", saga.state, saga_pb2.SagaState),
        input=saga.input,
        steps=tuple(step_from_proto(s) for s in saga.steps),
        failure=failure_from_proto(saga),
        cancel_reason=saga.cancel_reason,
        create_time=_time(saga, "create_time"),
        update_time=_time(saga, "update_time"),
        end_time=_time(saga, "end_time"),
        version=saga.version,
        labels=MappingProxyType(dict(sorted(saga.labels.items()))),
        audit=tuple(audit_from_proto(entry) for entry in saga.audit),
        deadline_time=_time(saga, "deadline_time"),
        trace_id=saga.trace_id,
    )


def event_from_proto(event: saga_pb2.SagaEvent) -> SagaEvent:
    """Convert a `saga.v1.SagaEvent`."""
    return SagaEvent(
        sequence=event.sequence,
        type=_enum(SagaEventType, "SAGA_EVENT_TYPE_", event.type, saga_pb2.SagaEventType),
        step=event.step,
        attempt=event.attempt,
        time=_time(event, "time"),
        failure=failure_from_proto(event),
        actor=event.actor,
        reason=event.reason,
        operation=event.operation,
        action=event.action,
        emits=event.emits,
    )


def change_from_proto(change: coordinator_service_pb2.SagaChange) -> SagaChange:
    """Convert a `saga.v1.SagaChange`."""
    return SagaChange(
        position=change.position,
        saga_id=change.saga_id,
        definition=change.definition,
        definition_version=change.definition_version,
        state=_enum(SagaState, "SAGA_STATE_", change.state, saga_pb2.SagaState),
        event=event_from_proto(change.event),
        labels=MappingProxyType(dict(change.labels)),
    )


def counts_from_proto(response: coordinator_service_pb2.CountSagasResponse) -> SagaCounts:
    """Convert a `CountSagasResponse`."""
    counts: dict[SagaState, int] = {}
    for entry in response.counts:
        state = _enum(SagaState, "SAGA_STATE_", entry.state, saga_pb2.SagaState)
        counts[state] = counts.get(state, 0) + entry.count
    return SagaCounts(MappingProxyType(counts), response.total)


def retry_policy_from_proto(policy: saga_pb2.RetryPolicy) -> RetryPolicy:
    """Convert a `saga.v1.RetryPolicy`."""
    return RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_backoff=_duration(policy, "initial_backoff"),
        max_backoff=_duration(policy, "max_backoff"),
        backoff_multiplier=policy.backoff_multiplier,
        jitter=policy.jitter if policy.HasField("jitter") else None,
    )


def _policy(message: Any, field: str) -> RetryPolicy | None:
    return retry_policy_from_proto(getattr(message, field)) if message.HasField(field) else None


def definition_from_proto(definition: saga_pb2.SagaDefinition) -> SagaDefinition:
    """Convert a `saga.v1.SagaDefinition`."""
    return SagaDefinition(
        name=definition.name,
        version=definition.version,
        description=definition.description,
        steps=tuple(
            StepDefinition(
                name=step.name,
                participant=step.participant,
                action=step.action,
                compensation=step.compensation,
                kind=_step_kind(step.kind),
                timeout=_duration(step, "timeout"),
                retry=_policy(step, "retry"),
                compensation_retry=_policy(step, "compensation_retry"),
                max_attempts=step.max_attempts,
                emits=step.emits,
            )
            for step in definition.steps
        ),
        retry=_policy(definition, "retry"),
        compensation_retry=_policy(definition, "compensation_retry"),
        deadline=_duration(definition, "deadline"),
    )


def _duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def retry_policy_to_proto(policy: RetryPolicy) -> saga_pb2.RetryPolicy:
    """Convert a `RetryPolicy` into its proto (for a request)."""
    message = saga_pb2.RetryPolicy(
        max_attempts=policy.max_attempts, backoff_multiplier=policy.backoff_multiplier
    )
    if policy.initial_backoff is not None:
        message.initial_backoff.CopyFrom(_duration_to_proto(policy.initial_backoff))
    if policy.max_backoff is not None:
        message.max_backoff.CopyFrom(_duration_to_proto(policy.max_backoff))
    if policy.jitter is not None:
        message.jitter = policy.jitter
    return message


def definition_to_proto(definition: SagaDefinition) -> saga_pb2.SagaDefinition:
    """Convert a `SagaDefinition` into its proto (for `register_definition()`)."""
    message = saga_pb2.SagaDefinition(
        name=definition.name, version=definition.version, description=definition.description
    )
    for step in definition.steps:
        entry = message.steps.add(
            name=step.name,
            participant=step.participant,
            action=step.action,
            compensation=step.compensation,
            kind=saga_pb2.StepKind.Value(f"STEP_KIND_{step.kind.value}"),
            max_attempts=step.max_attempts,
            emits=step.emits,
        )
        if step.timeout is not None:
            entry.timeout.CopyFrom(_duration_to_proto(step.timeout))
        if step.retry is not None:
            entry.retry.CopyFrom(retry_policy_to_proto(step.retry))
        if step.compensation_retry is not None:
            entry.compensation_retry.CopyFrom(retry_policy_to_proto(step.compensation_retry))
    if definition.retry is not None:
        message.retry.CopyFrom(retry_policy_to_proto(definition.retry))
    if definition.compensation_retry is not None:
        message.compensation_retry.CopyFrom(retry_policy_to_proto(definition.compensation_retry))
    if definition.deadline is not None:
        message.deadline.CopyFrom(_duration_to_proto(definition.deadline))
    return message


def definition_version_from_proto(
    info: coordinator_service_pb2.DefinitionVersion,
) -> DefinitionVersion:
    """Convert a `saga.v1.DefinitionVersion`."""
    return DefinitionVersion(
        version=info.version,
        register_time=_time(info, "register_time"),
        digest=info.digest,
        unfinished_sagas=info.unfinished_sagas,
        step_count=info.step_count,
    )


def _info(message: Any) -> DefinitionVersion | None:
    return definition_version_from_proto(message.info) if message.HasField("info") else None


def summary_from_proto(summary: coordinator_service_pb2.DefinitionSummary) -> DefinitionSummary:
    """Convert a `saga.v1.DefinitionSummary`."""
    return DefinitionSummary(
        name=summary.name,
        versions=tuple(definition_version_from_proto(v) for v in summary.versions),
        description=summary.description,
    )


def registered_from_proto(
    response: coordinator_service_pb2.GetDefinitionResponse,
) -> RegisteredDefinition:
    """Convert a `GetDefinitionResponse`."""
    return RegisteredDefinition(definition_from_proto(response.definition), _info(response))


def register_result_from_proto(
    response: coordinator_service_pb2.RegisterDefinitionResponse,
) -> RegisterResult:
    """Convert a `RegisterDefinitionResponse`."""
    return RegisterResult(
        definition_from_proto(response.definition), _info(response), response.created
    )


def prune_result_from_proto(
    response: coordinator_service_pb2.PruneSagasResponse, dry_run: bool
) -> PruneResult:
    """Convert a `PruneSagasResponse`."""
    return PruneResult(response.sagas, response.events, _time(response, "cutoff"), dry_run)


_SETTLED_PROTO_STATES = frozenset(
    saga_pb2.SagaState.Value(f"SAGA_STATE_{state.value}") for state in SETTLED_STATES
)


def settled_saga_from_response(
    response: coordinator_service_pb2.WatchSagaResponse,
) -> Saga | None:
    """The saga of one WatchSaga message when it has settled, else None.

    Only a settled saga is converted: the state is read from the proto first, so a message in
    between (from a coordinator that sends every change) costs no conversion.
    """
    if response.saga.state not in _SETTLED_PROTO_STATES:
        return None
    return saga_from_proto(response.saga)


def update_from_proto(response: coordinator_service_pb2.WatchSagaResponse) -> SagaUpdate:
    """Convert one message of a WatchSaga stream."""
    return SagaUpdate(
        saga=saga_from_proto(response.saga),
        event=event_from_proto(response.event) if response.HasField("event") else None,
    )
