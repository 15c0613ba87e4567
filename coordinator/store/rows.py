"""Sagas as rows of a SQL store, whichever the database: what a write stores, what a read rebuilds.

A saga is a row of ``sagas`` (what it is and the few fields that change), one row of
``saga_steps`` per step, a row of ``saga_labels`` per label, and its definition, stored once in
``definitions``. The SQLite and PostgreSQL stores keep the same columns with the same encoding
(``packing``: times as whole microseconds, bodies as MessagePack), so the parameters written and
the sagas read back are built here once; each adapter only says how its SQL reaches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from coordinator.core.events import RecordedEvent, SagaCreated
from coordinator.core.machine import waiting_step
from coordinator.core.model import Saga, SagaDefinition, SagaState, StepRun, StepState
from coordinator.ports import FeedChange
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import (
    event_type,
    from_micros,
    from_optional_micros,
    optional_micros,
    pack_audit,
    pack_event,
    pack_failure,
    pack_headers,
    pack_labels,
    pack_policy,
    to_micros,
    unpack_audit,
    unpack_definition,
    unpack_event,
    unpack_failure,
    unpack_headers,
    unpack_labels,
    unpack_policy,
)

SAGA_FIELDS = (
    "saga_id",
    "definition_id",
    "state",
    "created_at",
    "updated_at",
    "ended_at",
    "version",
    "input",
    "failure",
    "cancel_reason",
    "trace_context",
    "labels",
    "audit",
    "deadline_exceeded",
)
"""The columns a saga is read from, in the order ``saga_of`` expects them."""
SAGA_COLUMNS = ", ".join(SAGA_FIELDS)
STEP_COLUMNS = (
    "state, execute_attempts, compensate_attempts, output, failure, next_attempt_at, started_at, "
    "ended_at, by_operator, budget_start, retry_override"
)
"""The columns a step is read from and written to, in the order ``saga_of`` expects them."""
INSERTED_SAGA_COLUMNS = (
    f"{SAGA_COLUMNS}, definition_name, definition_version, fingerprint, waiting_step, "
    "waiting_participant"
)
"""The columns ``saga_row`` gives values for, in its order."""


class DefinitionCache:
    """Stored definitions and their ids, cached in both directions.

    Entries are only ever added, and an id is only cached once it is known to be committed
    (``remember`` after the write, ``learn`` from committed rows), so a rolled-back insert never
    leaves a dangling id behind. Stored definitions never change: an id means one content for
    good, whichever process stored it.
    """

    def __init__(self) -> None:
        self._ids: dict[int, tuple[SagaDefinition, int]] = {}
        self._definitions: dict[int, SagaDefinition] = {}

    def known_id(self, definition: SagaDefinition) -> int | None:
        """The id of this very definition object, when it is known to be stored."""
        found = self._ids.get(id(definition))
        return None if found is None else found[1]

    def remember(self, definition: SagaDefinition, definition_id: int) -> None:
        """Cache a committed definition's id."""
        # Keyed by identity, holding the object: the id cannot be reused by another object.
        self._ids[id(definition)] = (definition, definition_id)
        self._definitions.setdefault(definition_id, definition)

    def cached(self, definition_id: int) -> SagaDefinition | None:
        """The definition stored under this id, if it was read or written before."""
        return self._definitions.get(definition_id)

    def learn(self, definition_id: int, body: bytes) -> SagaDefinition:
        """The definition of a stored ``body`` read under this id, cached from now on."""
        found = self._definitions.setdefault(definition_id, unpack_definition(body))
        self._ids.setdefault(id(found), (found, definition_id))
        return found


# --- writing ---------------------------------------------------------------------------------


def saga_row(saga: Saga, definition_id: int, fingerprint: str) -> tuple[Any, ...]:
    """The values of ``INSERTED_SAGA_COLUMNS`` for a new saga."""
    return (
        saga.saga_id,
        definition_id,
        saga.state.value,
        to_micros(saga.created_at),
        to_micros(saga.updated_at),
        optional_micros(saga.ended_at),
        saga.version,
        saga.input,
        pack_failure(saga.failure),
        saga.cancel_reason,
        pack_headers(saga.trace_context),
        pack_labels(saga.labels),
        pack_audit(saga.audit),
        int(saga.deadline_exceeded),
        saga.definition.name,
        saga.definition.version,
        fingerprint,
        *waiting_on(saga),
    )


def step_rows(saga: Saga) -> list[tuple[Any, ...]]:
    """(saga id, step index, ``STEP_COLUMNS``...) for every step of a new saga."""
    return [(saga.saga_id, index, *_step_fields(step)) for index, step in enumerate(saga.steps)]


def label_rows(saga: Saga) -> list[tuple[str, str, str, int]]:
    """(saga id, key, value, created at) for a new saga's labels (none for most sagas)."""
    if not saga.labels:
        return []
    created_at = to_micros(saga.created_at)
    return [(saga.saga_id, key, value, created_at) for key, value in saga.labels.items()]


def saga_update(saga: Saga) -> tuple[Any, ...]:
    """The saga's changing columns (state, updated_at, ended_at, version, failure,
    cancel_reason, audit, deadline_exceeded, waiting_step, waiting_participant), then its id and
    the version it updates (``saga.version - 1``)."""
    return (
        saga.state.value,
        to_micros(saga.updated_at),
        optional_micros(saga.ended_at),
        saga.version,
        pack_failure(saga.failure),
        saga.cancel_reason,
        pack_audit(saga.audit),
        int(saga.deadline_exceeded),
        *waiting_on(saga),
        saga.saga_id,
        saga.version - 1,
    )


def waiting_on(saga: Saga) -> tuple[str | None, str | None]:
    """The step an unended saga waits on and its participant; (None, None) once it ended."""
    index = waiting_step(saga)
    if index is None:
        return None, None
    step = saga.definition.steps[index]
    return step.name, step.participant


def step_updates(saga: Saga, steps: Iterable[int]) -> list[tuple[Any, ...]]:
    """(``STEP_COLUMNS``..., saga id, step index) for the steps that changed."""
    return [(*_step_fields(saga.steps[index]), saga.saga_id, index) for index in steps]


def event_row(event: RecordedEvent) -> tuple[str, int, int, str, bytes]:
    """(saga id, sequence, recorded at, type, body) of an event."""
    return (
        event.saga_id,
        event.sequence,
        to_micros(event.recorded_at),
        event_type(event.event),
        pack_event(event.event),
    )


def _step_fields(step: StepRun) -> tuple[Any, ...]:
    return (
        step.state.value,
        step.execute_attempts,
        step.compensate_attempts,
        step.output,
        pack_failure(step.failure),
        optional_micros(step.next_attempt_at),
        optional_micros(step.started_at),
        optional_micros(step.ended_at),
        int(step.by_operator),
        step.budget_start,
        pack_policy(step.retry_override),
    )


# --- reading ---------------------------------------------------------------------------------


def saga_of(
    definition: SagaDefinition, row: Sequence[Any], step_rows: Sequence[Sequence[Any]]
) -> Saga:
    """The saga of a row of ``SAGA_FIELDS`` and its steps' rows of ``STEP_COLUMNS`` in order,
    run with ``definition`` (the one stored under the row's ``definition_id``)."""
    (
        saga_id,
        _definition_id,
        state,
        created_at,
        updated_at,
        ended_at,
        version,
        input_,
        failure,
        cancel_reason,
        trace_context,
        labels,
        audit,
        deadline_exceeded,
    ) = row
    if len(step_rows) != len(definition.steps):
        raise StoreCorrupt(
            f"saga {saga_id} has {len(step_rows)} stored steps; its definition has "
            f"{len(definition.steps)}"
        )
    try:
        steps = tuple(
            StepRun(
                name=step.name,
                state=StepState(fields[0]),
                execute_attempts=fields[1],
                compensate_attempts=fields[2],
                output=fields[3],
                failure=unpack_failure(fields[4]),
                next_attempt_at=from_optional_micros(fields[5]),
                started_at=from_optional_micros(fields[6]),
                ended_at=from_optional_micros(fields[7]),
                by_operator=_flag(fields[8]),
                budget_start=fields[9],
                retry_override=unpack_policy(fields[10]),
            )
            for step, fields in zip(definition.steps, step_rows, strict=True)
        )
        return Saga(
            saga_id=saga_id,
            definition=definition,
            input=input_,
            state=SagaState(state),
            steps=steps,
            created_at=from_micros(created_at),
            updated_at=from_micros(updated_at),
            version=version,
            ended_at=from_optional_micros(ended_at),
            failure=unpack_failure(failure),
            cancel_reason=cancel_reason,
            trace_context=unpack_headers(trace_context),
            labels=unpack_labels(labels),
            audit=unpack_audit(audit),
            deadline_exceeded=_flag(deadline_exceeded),
        )
    except ValueError as error:
        raise StoreCorrupt(f"saga {saga_id} cannot be read back: {error}") from error
    except StoreCorrupt as error:
        raise StoreCorrupt(f"saga {saga_id} cannot be read back: {error}") from error


BEYOND_EVERY_SEQUENCE = 2**63 - 1
"""Above every event's sequence: where a newest-first page starts when asked from the newest."""


def events_page_bound(after_sequence: int, newest_first: bool) -> int:
    """The sequence an events page's query compares with: above it oldest first, below it
    newest first (where 0 means from the newest)."""
    if newest_first and after_sequence <= 0:
        return BEYOND_EVERY_SEQUENCE
    return after_sequence


def events_of(saga: Saga, rows: Iterable[Sequence[Any]]) -> tuple[RecordedEvent, ...]:
    """Recorded events of ``saga`` from rows of (sequence, recorded_at, type, body)."""

    def created() -> SagaCreated:
        return SagaCreated(
            saga.saga_id, saga.definition, saga.input, saga.trace_context, saga.labels
        )

    return tuple(
        RecordedEvent(saga.saga_id, sequence, from_micros(at), unpack_event(kind, body, created))
        for sequence, at, kind, body in rows
    )


FEED_FIELDS = (
    "e.position",
    "e.saga_id",
    "e.sequence",
    "e.recorded_at",
    "e.type",
    "e.body",
    "e.state",
    "s.definition_id",
    "s.labels",
)
"""What a change of the feed is read from (``e``: the event, ``s``: its saga), in the order
``feed_change_of`` expects."""


def feed_change_of(definition: SagaDefinition, row: Sequence[Any]) -> FeedChange:
    """A change of the feed from a row of ``FEED_FIELDS``, of a saga run with ``definition``."""
    position, saga_id, sequence, at, kind, body, state, _definition_id, labels = row

    def created() -> SagaCreated:
        # The feed tells that the saga was created, not its input: read the saga for that.
        return SagaCreated(saga_id, definition, b"")

    return FeedChange(
        position=position,
        saga_id=saga_id,
        definition=definition,
        state=None if state is None else SagaState(state),
        labels=unpack_labels(labels),
        record=RecordedEvent(saga_id, sequence, from_micros(at), unpack_event(kind, body, created)),
    )


def _flag(value: int) -> bool:
    if value not in (0, 1):
        raise ValueError(f"stored flag {value!r} is neither 0 nor 1")
    return bool(value)
