"""Hypothesis strategies and builders for sagas and events: arbitrary ones, and real histories.

``sagas`` / ``events`` draw any value the types allow (for the packing); ``schema_1_sagas`` /
``schema_1_events`` only what schema 1 could hold (for its JSON codec); ``saga_histories()``
and ``run_history()`` drive the real core (``start``/``decide``), so every saga and event they
give is one the engine would write, operator actions included.
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
    CompleteRequested,
    DeadlineExceeded,
    Event,
    Failed,
    MarkCompensated,
    OperatorEvent,
    Outcome,
    RecordedEvent,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import changed_steps, decide, pending_call, start
from coordinator.core.model import (
    AuditEntry,
    Failure,
    Operation,
    OperatorAction,
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
plain_texts = st.text(st.characters(exclude_characters="\x00"), max_size=12)
"""What lands in a text column (labels, a cancellation's reason, the saga's id): the API refuses
the NUL character there, which PostgreSQL cannot store in a text."""
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
# The compact form stores integers in 64 bits: any value the coordinator could hold fits.
int64s = st.integers(-(2**63), 2**63 - 1)
stored_timedeltas = st.timedeltas(timedelta(days=-100_000), timedelta(days=100_000))
stored_retry_policies = st.builds(
    RetryPolicy,
    max_attempts=int64s,
    initial_backoff=stored_timedeltas,
    max_backoff=stored_timedeltas,
    multiplier=numbers,
    jitter=numbers,
)
schema_1_step_definitions = st.builds(
    StepDefinition,
    name=texts,
    participant=texts,
    action=texts,
    compensation=texts,
    kind=st.sampled_from(StepKind),
    timeout=stored_timedeltas,
    retry=stored_retry_policies,
    compensation_retry=stored_retry_policies,
)
step_definitions = st.builds(
    StepDefinition,
    name=texts,
    participant=texts,
    action=texts,
    compensation=texts,
    kind=st.sampled_from(StepKind),
    timeout=stored_timedeltas,
    retry=stored_retry_policies,
    compensation_retry=stored_retry_policies,
    max_attempts=int64s,
    emits=texts,
)
schema_1_definitions = st.builds(
    SagaDefinition,
    name=texts,
    version=st.integers(),
    steps=st.lists(schema_1_step_definitions, max_size=3).map(tuple),
    description=texts,
)
definitions = st.builds(
    SagaDefinition,
    name=texts,
    version=int64s,
    steps=st.lists(step_definitions, max_size=3).map(tuple),
    description=texts,
    deadline=st.none() | stored_timedeltas,
)
failures = st.builds(Failure, step=texts, operation=texts, code=texts, reason=texts, message=texts)
schema_1_step_runs = st.builds(
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
step_runs = st.builds(
    StepRun,
    name=texts,
    state=st.sampled_from(StepState),
    execute_attempts=int64s,
    compensate_attempts=int64s,
    output=st.none() | blobs,
    failure=st.none() | failures,
    next_attempt_at=optional_datetimes,
    started_at=optional_datetimes,
    ended_at=optional_datetimes,
    by_operator=st.booleans(),
    budget_start=int64s,
    retry_override=st.none() | stored_retry_policies,
)
audit_entries = st.builds(
    AuditEntry,
    sequence=int64s,
    at=utc_datetimes,
    actor=texts,
    action=st.sampled_from(OperatorAction),
    step=texts,
    reason=texts,
)
schema_1_sagas = st.builds(
    Saga,
    saga_id=texts,
    definition=schema_1_definitions,
    input=blobs,
    state=st.sampled_from(SagaState),
    steps=st.lists(schema_1_step_runs, max_size=3).map(tuple),
    created_at=utc_datetimes,
    updated_at=utc_datetimes,
    version=st.integers(),
    ended_at=optional_datetimes,
    failure=st.none() | failures,
    cancel_reason=st.none() | texts,
    trace_context=headers,
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
    version=int64s,
    ended_at=optional_datetimes,
    failure=st.none() | failures,
    cancel_reason=st.none() | texts,
    trace_context=headers,
    labels=headers,
    audit=st.lists(audit_entries, max_size=3).map(tuple),
    deadline_exceeded=st.booleans(),
)
outcomes: st.SearchStrategy[Outcome] = st.one_of(
    st.builds(Succeeded, output=blobs),
    st.builds(Rejected, reason=texts, message=texts, code=texts),
    st.builds(
        Transient,
        code=texts,
        message=texts,
        reason=texts,
        retry_after=st.none() | stored_timedeltas,
    ),
    st.builds(Failed, code=texts, message=texts, reason=texts),
)
call_answers = st.builds(
    CallAnswered,
    operation=st.sampled_from(Operation),
    step=int64s,
    attempt=int64s,
    outcome=outcomes,
    sent_at=optional_datetimes,
)
schema_1_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        SagaCreated,
        saga_id=texts,
        definition=schema_1_definitions,
        input=blobs,
        trace_context=headers,
    ),
    call_answers,
    st.builds(CancelRequested, reason=texts, call_in_flight=st.booleans()),
)
events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        SagaCreated,
        saga_id=texts,
        definition=definitions,
        input=blobs,
        trace_context=headers,
        labels=headers,
    ),
    call_answers,
    st.builds(CancelRequested, reason=texts, call_in_flight=st.booleans(), actor=texts),
    st.builds(RetryRequested, step=int64s, actor=texts, reason=texts, call_in_flight=st.booleans()),
    st.builds(
        ResumeRequested,
        actor=texts,
        reason=texts,
        compensation_retry=st.none() | stored_retry_policies,
    ),
    st.builds(
        MarkCompensated, step=int64s, actor=texts, reason=texts, call_in_flight=st.booleans()
    ),
    st.builds(
        CompleteRequested,
        step=int64s,
        output=blobs,
        actor=texts,
        reason=texts,
        call_in_flight=st.booleans(),
    ),
    st.builds(DeadlineExceeded, call_in_flight=st.booleans()),
)
schema_1_recorded_events = st.builds(
    RecordedEvent,
    saga_id=texts,
    sequence=st.integers(),
    recorded_at=utc_datetimes,
    event=schema_1_events,
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


def transfer(name: str = "transfer", version: int = 1) -> SagaDefinition:
    """A compensatable step, a pivot and a retriable step with attempt limits, and a deadline:
    a definition every operator action applies to."""
    return SagaDefinition(
        name=name,
        version=version,
        steps=(
            compensatable("reserve", "accounts"),
            StepDefinition(
                name="charge",
                participant="cards",
                action="charge.do",
                kind=StepKind.PIVOT,
                retry=quick_retry(),
                max_attempts=2,
            ),
            StepDefinition(
                name="notify",
                participant="billing",
                action="notify.do",
                kind=StepKind.RETRIABLE,
                retry=quick_retry(),
                max_attempts=2,
                emits="CustomerNotified",
            ),
        ),
        deadline=timedelta(hours=1),
    )


OK = Succeeded(b'{"ok": true}')
NO = Rejected(reason="INSUFFICIENT_FUNDS", message="the account has no funds")
UNAVAILABLE = Transient(code="UNAVAILABLE", message="connection refused")
BROKEN = Failed(code="UNIMPLEMENTED", message="no such action")

Answer = Outcome | OperatorEvent | DeadlineExceeded
"""What happens next to a saga: its pending call answered, an operator's action, or its
deadline."""

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
    labels: dict[str, str] | None = None,
) -> SagaHistory:
    """Create a saga at ``at`` and feed it ``answers``, one every ``step``.

    An answer that does not apply (the saga settled, or an action that does not fit) is
    skipped, as the engine would not store it.
    """
    created = SagaCreated(
        saga_id=saga_id,
        definition=definition or open_account(),
        input=input,
        trace_context=MappingProxyType(dict(trace_context or {})),
        labels=MappingProxyType(dict(labels or {})),
    )
    saga = start(created, at).saga
    log = [RecordedEvent(saga_id, 1, at, created)]
    states = [saga]
    now = at
    for answer in answers:
        now = max(now + step, _due(saga) or now)
        event: Event
        if not isinstance(answer, Succeeded | Rejected | Transient | Failed):
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
def valid_definitions(draw: st.DrawFn, schema_1: bool = False) -> SagaDefinition:
    """Definitions the coordinator accepts: compensatable steps, then maybe a pivot and more,
    with or without attempt limits and a deadline (never with ``schema_1``: it had neither)."""

    def limit() -> int:
        return 0 if schema_1 else draw(st.integers(0, 3))

    steps = [compensatable(f"c{index}") for index in range(draw(st.integers(0, 3)))]
    if not steps or draw(st.booleans()):
        steps.append(
            StepDefinition(
                name="pivot",
                participant="cards",
                action="pivot.do",
                kind=StepKind.PIVOT,
                retry=quick_retry(),
                max_attempts=limit(),
            )
        )
        steps.extend(
            StepDefinition(
                name=f"r{index}",
                participant="billing",
                action=f"r{index}.do",
                kind=StepKind.RETRIABLE,
                retry=quick_retry(),
                max_attempts=limit(),
                emits="" if schema_1 else draw(st.sampled_from(["", f"R{index}Done"])),
            )
            for index in range(draw(st.integers(0, 2)))
        )
    deadlines = st.none() | st.sampled_from([timedelta(minutes=1), timedelta(hours=1)])
    return SagaDefinition(
        name=draw(st.sampled_from(["open-account", "close-account"])),
        version=draw(st.integers(1, 3)),
        steps=tuple(steps),
        deadline=None if schema_1 else draw(deadlines),
    )


_CALL_ANSWERS: st.SearchStrategy[Answer] = st.one_of(
    st.sampled_from([OK, NO, UNAVAILABLE, BROKEN]),
    st.builds(Succeeded, output=blobs),
    st.builds(
        Transient,
        code=st.just("UNAVAILABLE"),
        message=texts,
        retry_after=st.none() | st.timedeltas(timedelta(0), timedelta(seconds=5)),
    ),
)


def answers(steps: int, schema_1: bool = False) -> st.SearchStrategy[Answer]:
    """What may happen to a saga of ``steps`` steps: answers, operator actions, its deadline
    (with ``schema_1``, only what schema 1 knew: answers and anonymous cancellations)."""
    if schema_1:
        return _CALL_ANSWERS | st.builds(
            CancelRequested, reason=plain_texts, call_in_flight=st.booleans()
        )
    step = st.integers(0, steps - 1)
    return st.one_of(
        _CALL_ANSWERS,
        st.builds(CancelRequested, reason=plain_texts, call_in_flight=st.booleans(), actor=texts),
        st.builds(RetryRequested, step=step, actor=texts, reason=texts),
        st.builds(
            ResumeRequested,
            actor=texts,
            reason=texts,
            compensation_retry=st.none() | st.just(quick_retry(3)),
        ),
        st.builds(MarkCompensated, step=step, actor=texts, reason=texts),
        st.builds(CompleteRequested, step=step, output=blobs, actor=texts, reason=texts),
        st.builds(DeadlineExceeded, call_in_flight=st.booleans()),
    )


@st.composite
def saga_histories(
    draw: st.DrawFn, saga_id: str | None = None, schema_1: bool = False
) -> SagaHistory:
    """A real history: a valid definition driven by the core through up to 12 answers and
    operator actions (``schema_1``: only what a schema-1 store could hold)."""
    definition = draw(valid_definitions(schema_1))
    labels = st.dictionaries(st.sampled_from(["tenant", "order"]), plain_texts, max_size=2)
    return run_history(
        saga_id if saga_id is not None else draw(plain_texts.filter(bool)),
        draw(st.lists(answers(len(definition.steps), schema_1), max_size=12)),
        definition=definition,
        at=draw(st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))),
        step=draw(st.timedeltas(timedelta(0), timedelta(minutes=5))),
        input=draw(blobs),
        trace_context=draw(st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), texts)),
        labels={} if schema_1 else draw(labels),
    )
