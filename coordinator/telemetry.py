"""A saga's trace and metrics, through the OpenTelemetry API only; names and keys live here.

One trace per saga. Its root span covers the saga from creation to its ending; every Execute and
Compensate attempt is a child span; the saga's state changes are events of the root span. The
trace is built from the saga's event log when the saga settles, by whichever coordinator process
sees it settle, and exported then: so it is whole and exported once whatever crashed in between,
with the saga's true start and end times. Span ids are planned: the root's is drawn at creation
and stored with the saga, and an attempt's is derived from (saga, step, operation, attempt), so
the ``traceparent`` a participant received names a span that will be exported even if the
coordinator died while waiting for the answer (the attempt is then re-sent with the same number).

Planned ids reach the SDK through ``PLANNED_IDS``, which the id generator installed at start-up
(``coordinator.observability``) honours; without an SDK every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from coordinator.core.calls import ParticipantCall
from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    Failed,
    MarkCompensated,
    RecordedEvent,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import replay
from coordinator.core.model import Operation, Saga, SagaState

INSTRUMENTATION = "saga-coordinator"

# Attribute keys (DESIGN.md section 6).
SAGA_ID = "saga.id"
SAGA_DEFINITION = "saga.definition"
SAGA_DEFINITION_VERSION = "saga.definition_version"
SAGA_STEP = "saga.step"
SAGA_OPERATION = "saga.operation"
SAGA_ATTEMPT = "saga.attempt"
SAGA_OUTCOME = "saga.outcome"
SAGA_STATE = "saga.state"
SAGA_PARTICIPANT = "saga.participant"
SAGA_REASON = "saga.reason"
SAGA_REQUEST_ID = "saga.request_id"
SAGA_EVENT = "saga.event"
"""The named event a step's success stands for (the definition's ``emits``), e.g. UserCreated."""

TRACEPARENT = "traceparent"
CLIENT_TRACEPARENT = "client-traceparent"
"""The traceparent of the client span that created the saga, kept for the root span's link."""

PLANNED_IDS: ContextVar[tuple[int | None, int] | None] = ContextVar(
    "saga_planned_ids", default=None
)
"""(trace id or None, span id) that the next span started in this context must take."""

_PROPAGATOR = TraceContextTextMapPropagator()


@contextlib.contextmanager
def planned_ids(trace_id: int | None, span_id: int) -> Iterator[None]:
    """Within the block, the next span started takes these ids."""
    token = PLANNED_IDS.set((trace_id, span_id))
    try:
        yield
    finally:
        PLANNED_IDS.reset(token)


def attempt_span_id(saga_id: str, step: str, operation: str, attempt: int) -> int:
    """The span id of one attempt: the same in every process that sends that attempt."""
    digest = hashlib.blake2b(
        f"{saga_id}\x00{step}\x00{operation}\x00{attempt}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") or 1


def _traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


@functools.lru_cache(maxsize=4096)
def parse_traceparent(value: str | None) -> SpanContext | None:
    """The span context in a W3C traceparent header, or None if absent or malformed."""
    if not value:
        return None
    context = trace.get_current_span(_PROPAGATOR.extract({TRACEPARENT: value})).get_span_context()
    return context if context.is_valid else None


_TRACE_ID = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_NO_TRACE = "0" * 32


def trace_id_of(context: Mapping[str, str]) -> str:
    """The trace id (32 hex digits) in a saga's kept ``traceparent``; empty when there is none
    or it is not valid. Read at every conversion of a saga, so a pattern rather than the
    propagator ``parse_traceparent`` runs: the same answer, several times cheaper."""
    match = _TRACE_ID.match(context.get(TRACEPARENT, "").strip().lower())
    if match is None or match.group(1) == _NO_TRACE:
        return ""
    return match.group(1)


def headers_of(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The W3C trace headers among gRPC metadata."""
    return {
        key: value
        for key, value in metadata
        if key in (TRACEPARENT, "tracestate") and isinstance(value, str)
    }


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(value: datetime | None) -> int | None:
    """Nanoseconds since the epoch, exactly (a float timestamp would round them)."""
    return None if value is None else (value - _EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class SagaTrace:
    """The ids of a saga's trace, as stored with the saga."""

    root: SpanContext
    client: SpanContext | None

    @classmethod
    def of(cls, saga: Saga) -> SagaTrace | None:
        """The saga's trace, if it was created with tracing on."""
        root = parse_traceparent(saga.trace_context.get(TRACEPARENT))
        if root is None:
            return None
        return cls(root, parse_traceparent(saga.trace_context.get(CLIENT_TRACEPARENT)))

    def attempt(self, saga_id: str, step: str, operation: str, attempt: int) -> SpanContext:
        """The span context of one attempt, a child of the root."""
        return SpanContext(
            trace_id=self.root.trace_id,
            span_id=attempt_span_id(saga_id, step, operation, attempt),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )


class SagaTelemetry:
    """What the engine and the transport report; cheap no-ops while tracing is off."""

    def __init__(
        self,
        *,
        tracing: bool = False,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        collector_reachable: Callable[[], bool] = lambda: True,
        probe_interval: float = 2.0,
    ) -> None:
        self.tracing = tracing
        # While the collector is unreachable every span would be dropped: building them would
        # only slow sagas down. One saga's trace every probe_interval finds out when it is back.
        self._collector_reachable = collector_reachable
        self._probe_interval = probe_interval
        self._last_probe = 0.0
        self._tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION, meter_provider=meter_provider)
        self._started = meter.create_counter(
            "saga.started", unit="{saga}", description="Sagas created"
        )
        self._ended = meter.create_counter(
            "saga.ended",
            unit="{saga}",
            description="Sagas that settled: SUCCEEDED, COMPENSATED or NEEDS_ATTENTION",
        )
        self._step_duration = meter.create_histogram(
            "saga.step.duration",
            unit="s",
            description="Duration of Execute and Compensate calls, by participant and operation",
        )
        self._retries = meter.create_counter(
            "saga.retries", unit="{call}", description="Calls retried after a transient failure"
        )
        self._compensations = meter.create_counter(
            "saga.compensations", unit="{call}", description="Compensations that succeeded"
        )
        self._traces_dropped = meter.create_counter(
            "saga.traces_dropped",
            unit="{trace}",
            description="Saga traces not built because the collector was unreachable",
        )
        self._needs_attention = 0
        meter.create_observable_gauge(
            "saga.needs_attention",
            callbacks=[self._observe_needs_attention],
            unit="{saga}",
            description="Sagas parked in NEEDS_ATTENTION",
        )
        self._operator_actions = meter.create_counter(
            "saga.operator_actions",
            unit="{action}",
            description="Operator actions taken on sagas, by kind",
        )
        self._claimed = meter.create_counter(
            "saga.claimed",
            unit="{saga}",
            description="Sagas this replica claimed: at start, and from replicas that died",
        )
        self._stale_writes = meter.create_counter(
            "saga.stale_writes",
            unit="{write}",
            description="Writes refused because another replica had taken the saga over, or "
            "this replica's lease had run out",
        )
        self._lease_lapses = meter.create_counter(
            "saga.lease_lapses",
            unit="{lapse}",
            description="Times this replica's lease ran out before it was renewed",
        )
        self.stale_writes = 0
        """Writes refused so far (as the ``saga.stale_writes`` counter)."""
        self.lease_lapses = 0
        """Lapses of this replica's lease so far (as the ``saga.lease_lapses`` counter)."""
        self._parked: Mapping[tuple[str, str], int] = {}
        meter.create_observable_gauge(
            "saga.parked",
            callbacks=[self._observe_parked],
            unit="{saga}",
            description="Sagas parked in NEEDS_ATTENTION, by definition and the step they are "
            "stuck on (refreshed from the store)",
        )
        self._oldest_unfinished: datetime | None = None
        meter.create_observable_gauge(
            "saga.oldest_unfinished.age",
            callbacks=[self._observe_oldest_unfinished],
            unit="s",
            description="Age of the oldest saga that has not ended (running, compensating or "
            "parked); 0 when there is none",
        )

    # -- traces -----------------------------------------------------------------------------

    def new_trace(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """The trace context to store with a new saga (empty while tracing is off)."""
        if not self.tracing:
            return {}
        root = SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        context = {TRACEPARENT: _traceparent(root)}
        client = parse_traceparent(client_headers.get(TRACEPARENT))
        if client is not None:
            context[CLIENT_TRACEPARENT] = _traceparent(client)
        return context

    def call_headers(self, saga: Saga, call: ParticipantCall) -> dict[str, str]:
        """The traceparent a participant receives: its attempt's span, child of the root."""
        saga_trace = SagaTrace.of(saga) if self.tracing else None
        if saga_trace is None:
            return {}
        attempt = saga_trace.attempt(saga.saga_id, call.step, call.operation.value, call.attempt)
        return {TRACEPARENT: _traceparent(attempt)}

    def record_create(
        self, client_headers: Mapping[str, str], saga: Saga, created: bool, began_ns: int
    ) -> None:
        """A CreateSaga span in the client's trace, linked to the saga's own trace."""
        if not self.tracing or TRACEPARENT not in client_headers:
            return
        client = parse_traceparent(client_headers.get(TRACEPARENT))
        saga_trace = SagaTrace.of(saga)
        if client is None or saga_trace is None:
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(client))
        span = self._tracer.start_span(
            "saga.v1.CoordinatorService/CreateSaga",
            context=parent,
            kind=SpanKind.SERVER,
            links=[Link(saga_trace.root, {"saga.link": "saga"})],
            attributes={
                SAGA_ID: saga.saga_id,
                SAGA_DEFINITION: saga.definition.name,
                "saga.created": created,
                "rpc.system": "grpc",
            },
            start_time=began_ns,
        )
        span.end()

    def should_export(self) -> bool:
        """Whether a settled saga's trace is worth building now (see ``collector_reachable``)."""
        if not self.tracing:
            return False
        if self._collector_reachable():
            return True
        now = time.monotonic()
        if now - self._last_probe >= self._probe_interval:
            self._last_probe = now
            return True
        self._traces_dropped.add(1)
        return False

    def saga_settled(
        self,
        saga: Saga,
        log: Sequence[RecordedEvent],
        states: Sequence[SagaState] | None = None,
    ) -> None:
        """Export the saga's whole trace, built from its event log.

        ``states`` are the saga's states after each event of the log, when the caller knows
        them; otherwise the log is replayed to find them.
        """
        saga_trace = SagaTrace.of(saga) if self.tracing else None
        if saga_trace is None or not log:
            return
        root_context = trace.set_span_in_context(trace.NonRecordingSpan(saga_trace.root))
        names = [step.name for step in saga.steps]
        participants = [step.participant for step in saga.definition.steps]
        emits = [step.emits for step in saga.definition.steps]
        for record in log:
            event = record.event
            if not isinstance(event, CallAnswered):
                continue
            name, participant = names[event.step], participants[event.step]
            span_id = attempt_span_id(saga.saga_id, name, event.operation.value, event.attempt)
            with planned_ids(None, span_id):
                span = self._tracer.start_span(
                    f"{event.operation.value} {name}",
                    context=root_context,
                    kind=SpanKind.CLIENT,
                    attributes={
                        SAGA_ID: saga.saga_id,
                        SAGA_STEP: name,
                        SAGA_OPERATION: event.operation.value,
                        SAGA_ATTEMPT: event.attempt,
                        SAGA_PARTICIPANT: participant,
                        SAGA_OUTCOME: _outcome_name(event),
                        "rpc.system": "grpc",
                    },
                    start_time=_ns(event.sent_at or record.recorded_at),
                )
            outcome = event.outcome
            named = _named_event(event, emits)
            if named:
                span.set_attribute(SAGA_EVENT, named)
            if not isinstance(outcome, Succeeded):
                span.set_attribute(SAGA_REASON, outcome.reason)
                span.set_attribute("rpc.grpc.status_code_name", outcome.code)
                span.set_status(Status(StatusCode.ERROR, f"{outcome.code}: {outcome.message}"))
            span.end(end_time=_ns(record.recorded_at))

        links = [Link(saga_trace.client)] if saga_trace.client is not None else []
        with planned_ids(saga_trace.root.trace_id, saga_trace.root.span_id):
            root = self._tracer.start_span(
                f"saga {saga.definition.name}",
                context=trace.set_span_in_context(trace.INVALID_SPAN),
                kind=SpanKind.INTERNAL,
                links=links,
                attributes={
                    SAGA_ID: saga.saga_id,
                    SAGA_DEFINITION: saga.definition.name,
                    SAGA_DEFINITION_VERSION: saga.definition.version,
                    SAGA_OUTCOME: saga.state.value,
                },
                start_time=_ns(saga.created_at),
            )
        changes = (
            zip(log, states, strict=True)
            if states is not None and len(states) == len(log)
            else _state_changes(log)
        )
        for record, state in changes:
            root.add_event(
                _event_name(record),
                attributes=_event_attributes(record, names, emits, state),
                timestamp=_ns(record.recorded_at),
            )
        if saga.failure is not None:
            root.set_attribute(SAGA_REASON, saga.failure.reason)
        if saga.state is SagaState.NEEDS_ATTENTION:
            message = saga.failure.message if saga.failure is not None else "needs attention"
            root.set_status(Status(StatusCode.ERROR, message))
        elif saga.state is SagaState.SUCCEEDED:
            root.set_status(Status(StatusCode.OK))
        root.end(end_time=_ns(saga.ended_at or saga.updated_at))

    # -- metrics ----------------------------------------------------------------------------

    def saga_started(self, saga: Saga) -> None:
        """Count a created saga."""
        self._started.add(1, {SAGA_DEFINITION: saga.definition.name})

    def saga_ended(self, saga: Saga) -> None:
        """Count a settled saga by its outcome."""
        self._ended.add(1, {SAGA_DEFINITION: saga.definition.name, SAGA_OUTCOME: saga.state.value})
        if saga.state is SagaState.NEEDS_ATTENTION:
            self._needs_attention += 1

    def call_answered(
        self, saga: Saga, event: CallAnswered, answered_at: datetime, retried: bool
    ) -> None:
        """Record a call's duration and outcome, and whether it will be retried."""
        step = saga.definition.steps[event.step]
        attributes = {
            SAGA_PARTICIPANT: step.participant,
            SAGA_OPERATION: event.operation.value,
            SAGA_OUTCOME: _outcome_name(event),
        }
        if event.sent_at is not None:
            self._step_duration.record((answered_at - event.sent_at).total_seconds(), attributes)
        if retried:
            self._retries.add(
                1, {SAGA_PARTICIPANT: step.participant, SAGA_OPERATION: event.operation.value}
            )
        if event.operation is Operation.COMPENSATE and isinstance(event.outcome, Succeeded):
            self._compensations.add(1, {SAGA_PARTICIPANT: step.participant})

    def set_needs_attention(self, count: int) -> None:
        """The number of parked sagas, as read from the store at start."""
        self._needs_attention = count

    def left_attention(self) -> None:
        """An operator moved a parked saga on."""
        self._needs_attention = max(0, self._needs_attention - 1)

    def sagas_claimed(self, count: int) -> None:
        """Count sagas claimed by this replica."""
        self._claimed.add(count)

    def stale_write(self) -> None:
        """Count a write refused for a lost lease."""
        self.stale_writes += 1
        self._stale_writes.add(1)

    def lease_lost(self) -> None:
        """Count a lapse of this replica's lease."""
        self.lease_lapses += 1
        self._lease_lapses.add(1)

    def operator_action(self, saga: Saga, action: str) -> None:
        """Count an operator action that was applied."""
        self._operator_actions.add(
            1, {SAGA_DEFINITION: saga.definition.name, "saga.action": action}
        )

    def set_store_summary(
        self, oldest_unfinished: datetime | None, parked: Mapping[tuple[str, str], int]
    ) -> None:
        """What the store says about unfinished and parked sagas (read periodically)."""
        self._oldest_unfinished = oldest_unfinished
        self._parked = dict(parked)
        self._needs_attention = sum(parked.values())

    def _observe_parked(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for (definition, step), count in sorted(self._parked.items()):
            yield metrics.Observation(count, {SAGA_DEFINITION: definition, SAGA_STEP: step})

    def _observe_oldest_unfinished(
        self, options: metrics.CallbackOptions
    ) -> Iterable[metrics.Observation]:
        oldest = self._oldest_unfinished
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        yield metrics.Observation(max(age, 0.0))

    def _observe_needs_attention(
        self, options: metrics.CallbackOptions
    ) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self._needs_attention)


def now_ns() -> int:
    """The current time in nanoseconds, as spans take it."""
    return time.time_ns()


def _outcome_name(event: CallAnswered) -> str:
    match event.outcome:
        case Succeeded():
            return "ok"
        case Rejected():
            return "rejected"
        case Transient():
            return "transient"
        case Failed():
            return "failed"


def _state_changes(log: Sequence[RecordedEvent]) -> Iterator[tuple[RecordedEvent, SagaState]]:
    """Each event with the saga's state after it, replayed with the core."""
    for record, saga in zip(log, replay((r.event, r.recorded_at) for r in log), strict=False):
        yield record, saga.state


def _event_name(record: RecordedEvent) -> str:
    event = record.event
    match event:
        case SagaCreated():
            return "saga created"
        case CancelRequested():
            return "cancel requested"
        case CallAnswered(operation=operation):
            return f"{operation.value} {_outcome_name(event)}"
        case RetryRequested():
            return "operator retry"
        case ResumeRequested():
            return "operator resume"
        case MarkCompensated():
            return "operator marked compensated"
        case CompleteRequested():
            return "operator completed step"
        case DeadlineExceeded():
            return "deadline exceeded"


def _named_event(event: CallAnswered | CompleteRequested, emits: Sequence[str]) -> str:
    """The event a step's success stands for, on that success (or an operator's completing the
    step) only; else ""."""
    if isinstance(event, CompleteRequested) or (
        event.operation is Operation.EXECUTE and isinstance(event.outcome, Succeeded)
    ):
        return emits[event.step]
    return ""


def _event_attributes(
    record: RecordedEvent, names: Sequence[str], emits: Sequence[str], state: SagaState
) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {SAGA_STATE: state.value, "saga.sequence": record.sequence}
    event = record.event
    if isinstance(event, CallAnswered):
        attributes[SAGA_STEP] = names[event.step]
        attributes[SAGA_ATTEMPT] = event.attempt
        named = _named_event(event, emits)
        if named:
            attributes[SAGA_EVENT] = named
        if not isinstance(event.outcome, Succeeded):
            attributes[SAGA_REASON] = event.outcome.reason or event.outcome.code
    elif isinstance(event, CancelRequested | ResumeRequested):
        attributes[SAGA_REASON] = event.reason
    elif isinstance(event, RetryRequested | MarkCompensated | CompleteRequested):
        attributes[SAGA_STEP] = names[event.step]
        attributes[SAGA_REASON] = event.reason
        if isinstance(event, CompleteRequested) and emits[event.step]:
            attributes[SAGA_EVENT] = emits[event.step]
    return attributes
