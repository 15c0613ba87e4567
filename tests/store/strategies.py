"""Hypothesis strategies and builders for sagas and events: arbitrary ones, and real histories.

``sagas()`` / ``events()`` draw any value the types allow (for codecs); ``saga_histories()``
and ``run_history()`` drive the real core (``start``/``decide``), so every saga and event they
give is one the engine would write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from hypothesis import strategies as st

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Event,
    Failed,
    Outcome,
    RecordedEvent,
    Rejected,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import changed_steps, decide, pending_call, start
from coordinator.core.model import (
    Failure,
    Operation,
    RetryPolicy,
    Saga,
    SagaDefinition,
    SagaState,
    StepDefinition,
    StepKind,
    StepRun,
    StepState,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# --- arbitrary values ------------------------------------------------------------------------

texts = st.text(max_size=12)
blobs = st.binary(max_size=48)
utc_datetimes = st.datetimes(timezones=st.just(UTC))
optional_datetimes = st.none() | utc_datetimes
timedeltas = st.timedeltas()
numbers = st.floats(allow_nan=False)
headers = st.dictionaries(texts, texts, max_size=3).map(MappingProxyType)

retry_policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(),
    initial_backoff=timedeltas,
    max_backoff=timedeltas,
    multiplier=numbers,
    jitter=numbers,
)
step_definitions = st.builds(
    StepDefinition,
    name=texts,
    participant=texts,
    action=texts,
    compensation=texts,
    kind=st.sampled_from(StepKind),
    timeout=timedeltas,
    retry=retry_policies,
    compensation_retry=retry_policies,
)
definitions = st.builds(
    SagaDefinition,
    name=texts,
    version=st.integers(),
    steps=st.lists(step_definitions, max_size=3).map(tuple),
    description=texts,
)
failures = st.builds(Failure, step=texts, operation=texts, code=texts, reason=texts, message=texts)
step_runs = st.builds(
    StepRun,
    name=texts,
    state=st.sampled_from(StepState),
    execute_attempts=st.integers(),
    compensate_attempts=st.integers(),
    output=st.none() | blobs,
    failure=st.none() | failures,
    next_attempt_at=optional_datetimes,
    started_at=optional_datetimes,
    ended_at=optional_datetimes,
)
sagas = st.builds(
    Saga,
    saga_id=texts,
    definition=definitions,
    input=blobs,
    state=st.sampled_from(SagaState),
    steps=st.lists(step_runs, max_size=3).map(tuple),
    created_at=utc_datetimes,
    updated_at=utc_datetimes,
    version=st.integers(),
    ended_at=optional_datetimes,
    failure=st.none() | failures,
    cancel_reason=st.none() | texts,
    trace_context=headers,
)
outcomes: st.SearchStrategy[Outcome] = st.one_of(
    st.builds(Succeeded, output=blobs),
    st.builds(Rejected, reason=texts, message=texts, code=texts),
    st.builds(
        Transient, code=texts, message=texts, reason=texts, retry_after=st.none() | timedeltas
    ),
    st.builds(Failed, code=texts, message=texts, reason=texts),
)
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        SagaCreated, saga_id=texts, definition=definitions, input=blobs, trace_context=headers
    ),
    st.builds(
        CallAnswered,
        operation=st.sampled_from(Operation),
        step=st.integers(),
        attempt=st.integers(),
        outcome=outcomes,
        sent_at=optional_datetimes,
    ),
    st.builds(CancelRequested, reason=texts, call_in_flight=st.booleans()),
)
recorded_events = st.builds(
    RecordedEvent, saga_id=texts, sequence=st.integers(), recorded_at=utc_datetimes, event=events
)


# --- real histories --------------------------------------------------------------------------


@dataclass(frozen=True)
class SagaHistory:
    """A saga's log and the saga after each of its events, as the core decided them."""

    log: tuple[RecordedEvent, ...]
    sagas: tuple[Saga, ...]
    """``sagas[i]`` is the saga after ``log[i]``; ``sagas[i].version == i + 1``."""

    @property
    def saga_id(self) -> str:
        """The saga's id."""
        return self.sagas[0].saga_id

    @property
    def first(self) -> Saga:
        """The saga as created."""
        return self.sagas[0]

    @property
    def last(self) -> Saga:
        """The saga after its last event."""
        return self.sagas[-1]

    def commits(self) -> list[tuple[Saga, RecordedEvent, tuple[int, ...]]]:
        """What the engine commits after the creation: each saga with the event that made it
        and the steps that event changed."""
        return [
            (saga, event, changed_steps(before, saga))
            for before, saga, event in zip(self.sagas, self.sagas[1:], self.log[1:], strict=False)
        ]


def quick_retry(max_attempts: int = 2) -> RetryPolicy:
    """A retry policy short enough for histories to reach their end in a few answers."""
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=timedelta(milliseconds=100),
        max_backoff=timedelta(seconds=1),
    )


def compensatable(name: str, participant: str = "accounts") -> StepDefinition:
    """A compensatable step with actions ``name.do`` and ``name.undo``."""
    return StepDefinition(
        name=name,
        participant=participant,
        action=f"{name}.do",
        compensation=f"{name}.undo",
        retry=quick_retry(),
        compensation_retry=quick_retry(),
    )


def open_account(name: str = "open-account", version: int = 1) -> SagaDefinition:
    """Three compensatable steps: identity, account, card."""
    return SagaDefinition(
        name=name,
        version=version,
        steps=(
            compensatable("identity", "identity"),
            compensatable("account", "accounts"),
            compensatable("card", "cards"),
        ),
    )


OK = Succeeded(b'{"ok": true}')
NO = Rejected(reason="INSUFFICIENT_FUNDS", message="the account has no funds")
UNAVAILABLE = Transient(code="UNAVAILABLE", message="connection refused")
BROKEN = Failed(code="UNIMPLEMENTED", message="no such action")

Answer = Outcome | CancelRequested
"""What happens next to a saga: its pending call answered, or a cancellation."""

# Answers that bring ``open_account()`` to each state. A rejected step is compensated too.
ANSWERS_BY_STATE: dict[SagaState, tuple[Answer, ...]] = {
    SagaState.RUNNING: (OK,),
    SagaState.COMPENSATING: (OK, NO),
    SagaState.SUCCEEDED: (OK, OK, OK),
    SagaState.COMPENSATED: (OK, NO, OK, OK),
    SagaState.NEEDS_ATTENTION: (OK, NO, BROKEN),
}


def run_history(
    saga_id: str,
    answers: Sequence[Answer] = (),
    *,
    definition: SagaDefinition | None = None,
    at: datetime = T0,
    step: timedelta = timedelta(milliseconds=10),
    input: bytes = b'{"customer": "c-7"}',
    trace_context: dict[str, str] | None = None,
) -> SagaHistory:
    """Create a saga at ``at`` and feed it ``answers``, one every ``step``.

    An answer that does not apply (the saga settled, or a cancellation it refuses) is skipped,
    as the engine would not store it.
    """
    created = SagaCreated(
        saga_id=saga_id,
        definition=definition or open_account(),
        input=input,
        trace_context=MappingProxyType(dict(trace_context or {})),
    )
    saga = start(created, at).saga
    log = [RecordedEvent(saga_id, 1, at, created)]
    states = [saga]
    now = at
    for answer in answers:
        now = max(now + step, _due(saga) or now)
        event: Event
        if isinstance(answer, CancelRequested):
            event = answer
        else:
            pending = pending_call(saga)
            if pending is None:
                continue
            event = CallAnswered(
                pending.operation, pending.step, pending.attempt, answer, sent_at=now - step / 2
            )
        decision = decide(saga, event, now)
        if not decision.changed:
            continue
        saga = decision.saga
        log.append(RecordedEvent(saga_id, saga.version, now, event))
        states.append(saga)
    return SagaHistory(tuple(log), tuple(states))


def _due(saga: Saga) -> datetime | None:
    pending = pending_call(saga)
    return None if pending is None else pending.not_before


@st.composite
def valid_definitions(draw: st.DrawFn) -> SagaDefinition:
    """Definitions the coordinator accepts: compensatable steps, then maybe a pivot and more."""
    steps = [compensatable(f"c{index}") for index in range(draw(st.integers(0, 3)))]
    if not steps or draw(st.booleans()):
        steps.append(
            StepDefinition(
                name="pivot",
                participant="cards",
                action="pivot.do",
                kind=StepKind.PIVOT,
                retry=quick_retry(),
            )
        )
        steps.extend(
            StepDefinition(
                name=f"r{index}",
                participant="billing",
                action=f"r{index}.do",
                kind=StepKind.RETRIABLE,
                retry=quick_retry(),
            )
            for index in range(draw(st.integers(0, 2)))
        )
    return SagaDefinition(
        name=draw(st.sampled_from(["open-account", "close-account"])),
        version=draw(st.integers(1, 3)),
        steps=tuple(steps),
    )


answers: st.SearchStrategy[Answer] = st.one_of(
    st.sampled_from([OK, NO, UNAVAILABLE, BROKEN]),
    st.builds(Succeeded, output=blobs),
    st.builds(
        Transient,
        code=st.just("UNAVAILABLE"),
        message=texts,
        retry_after=st.none() | st.timedeltas(timedelta(0), timedelta(seconds=5)),
    ),
    st.builds(CancelRequested, reason=texts, call_in_flight=st.booleans()),
)


@st.composite
def saga_histories(draw: st.DrawFn, saga_id: str | None = None) -> SagaHistory:
    """A real history: a valid definition driven by the core through up to 12 answers."""
    return run_history(
        saga_id if saga_id is not None else draw(st.text(min_size=1, max_size=16)),
        draw(st.lists(answers, max_size=12)),
        definition=draw(valid_definitions()),
        at=draw(st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))),
        step=draw(st.timedeltas(timedelta(0), timedelta(minutes=5))),
        input=draw(blobs),
        trace_context=draw(st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), texts)),
    )
