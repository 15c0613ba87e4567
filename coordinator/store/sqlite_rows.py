"""Sagas as SQLite rows: what a creation and a commit write, and sagas and events read back.

A saga is a row of ``sagas`` (what it is and the few fields that change), one row of
``saga_steps`` per step, a row of ``saga_labels`` per label, and its definition, stored once in
``definitions``. A commit writes the saga's changing columns, the steps that changed, and one
event. The saga's row also holds its labels packed, so reading a saga never needs its label
rows (they are the index that label lookups use).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from coordinator.core.events import RecordedEvent, SagaCreated
from coordinator.core.machine import waiting_step
from coordinator.core.model import Saga, SagaDefinition, SagaState, StepRun, StepState
from coordinator.ports import FeedChange
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import (
    digest,
    event_type,
    from_micros,
    from_optional_micros,
    optional_micros,
    pack_audit,
    pack_definition,
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
"""The columns a saga is read from, in the order ``read_sagas`` expects them."""
SAGA_COLUMNS = ", ".join(SAGA_FIELDS)
_STEP_COLUMNS = (
    "state, execute_attempts, compensate_attempts, output, failure, next_attempt_at, started_at, "
    "ended_at, by_operator, budget_start, retry_override"
)
_INSERT_DEFINITION = """
INSERT INTO definitions (name, version, digest, body) VALUES (?, ?, ?, ?)
ON CONFLICT (digest) DO NOTHING
"""
_SELECT_DEFINITION_ID = "SELECT definition_id FROM definitions WHERE digest = ?"
_SELECT_DEFINITION = "SELECT body FROM definitions WHERE definition_id = ?"
_REGISTER_FIRST = """
INSERT INTO definition_versions (name, version, definition_id, registered_at) VALUES (?, ?, ?, ?)
ON CONFLICT (name, version) DO NOTHING
"""
_SELECT_REGISTERED = """
SELECT definition_versions.definition_id, registered_at, digest
FROM definition_versions JOIN definitions USING (definition_id)
WHERE definition_versions.name = ? AND definition_versions.version = ?
"""
_SELECT_REGISTRY = """
SELECT definition_versions.definition_id, registered_at, digest
FROM definition_versions JOIN definitions USING (definition_id)
{where} ORDER BY definition_versions.name, definition_versions.version
"""
_SELECT_UNENDED_COUNTS = """
SELECT definition_name, definition_version, sum(total) FROM saga_counts
WHERE state IN ('RUNNING', 'COMPENSATING', 'NEEDS_ATTENTION') {where}
GROUP BY definition_name, definition_version
"""
INSERT_SAGA = f"""
INSERT INTO sagas ({SAGA_COLUMNS}, definition_name, definition_version, fingerprint,
                   waiting_step, waiting_participant)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_STEP = (
    f"INSERT INTO saga_steps (saga_id, step, {_STEP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_LABEL = "INSERT INTO saga_labels (saga_id, key, value, created_at) VALUES (?, ?, ?, ?)"
UPDATE_SAGA = """
UPDATE sagas SET state = ?, updated_at = ?, ended_at = ?, version = ?, failure = ?,
                 cancel_reason = ?, audit = ?, deadline_exceeded = ?, waiting_step = ?,
                 waiting_participant = ?
WHERE saga_id = ? AND version = ?
"""
UPDATE_STEP = """
UPDATE saga_steps SET state = ?, execute_attempts = ?, compensate_attempts = ?, output = ?,
                      failure = ?, next_attempt_at = ?, started_at = ?, ended_at = ?,
                      by_operator = ?, budget_start = ?, retry_override = ?
WHERE saga_id = ? AND step = ?
"""
INSERT_EVENT = """
INSERT INTO saga_events (saga_id, sequence, recorded_at, type, body) VALUES (?, ?, ?, ?, ?)
"""
# The writer's form (schema 4): the event takes the next position of the change feed, above
# every position ever given (pruned ones included), and records the saga's state after it.
INSERT_FEED_EVENT = """
INSERT INTO saga_events (saga_id, sequence, recorded_at, type, body, state, position)
VALUES (?, ?, ?, ?, ?, ?, max(
    coalesce((SELECT max(position) FROM saga_events), 0),
    (SELECT pruned_through FROM feed_horizon)
) + 1)
"""
SELECT_FEED = """
SELECT e.position, e.saga_id, e.sequence, e.recorded_at, e.type, e.body, e.state,
       s.definition_id, s.labels
FROM saga_events AS e INDEXED BY saga_events_by_position
JOIN sagas AS s ON s.saga_id = e.saga_id
WHERE e.position > ? ORDER BY e.position LIMIT ?
"""
SELECT_FEED_BOUNDS = """
SELECT (SELECT pruned_through FROM feed_horizon),
       max(coalesce((SELECT max(position) FROM saga_events), 0),
           (SELECT pruned_through FROM feed_horizon))
"""
_SELECT_STEPS = f"SELECT {_STEP_COLUMNS} FROM saga_steps WHERE saga_id = ? ORDER BY step"
_SELECT_STEPS_OF_SAGAS = f"""
SELECT saga_id, {_STEP_COLUMNS} FROM saga_steps WHERE saga_id IN (SELECT value FROM json_each(?))
ORDER BY saga_id, step
"""
_SELECT_EVENTS = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = ? ORDER BY sequence
"""
_SELECT_EVENTS_PAGE = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = ? AND sequence > ?
ORDER BY sequence LIMIT ?
"""


class Definitions:
    """The stored definitions and their ids, cached in both directions.

    Shared by the writer and the reader thread: entries are only ever added, and an id is only
    cached once it is known to be committed (``remember`` after the write, ``definition`` read
    from committed rows), so a rolled-back insert never leaves a dangling id behind.
    """

    def __init__(self) -> None:
        self._ids: dict[int, tuple[SagaDefinition, int]] = {}
        self._definitions: dict[int, SagaDefinition] = {}

    def known_id(self, definition: SagaDefinition) -> int | None:
        """The id of this very definition object, when it is known to be stored."""
        found = self._ids.get(id(definition))
        return None if found is None else found[1]

    def store(self, connection: sqlite3.Connection, definition: SagaDefinition) -> int:
        """Inside a write transaction: the id of ``definition``, stored if it is new."""
        body = pack_definition(definition)
        key = digest(body)
        connection.execute(_INSERT_DEFINITION, (definition.name, definition.version, key, body))
        (definition_id,) = connection.execute(_SELECT_DEFINITION_ID, (key,)).fetchone()
        return int(definition_id)

    def register_first(
        self,
        connection: sqlite3.Connection,
        definition: SagaDefinition,
        definition_id: int,
        at: int,
    ) -> None:
        """Inside a write transaction: register ``definition`` (stored as ``definition_id``)
        at ``at`` (microseconds) unless its name and version are registered already."""
        connection.execute(
            _REGISTER_FIRST, (definition.name, definition.version, definition_id, at)
        )

    def registered(
        self, connection: sqlite3.Connection, name: str, version: int
    ) -> tuple[int, int, bytes] | None:
        """The registered definition id, registration time and digest of a name and version."""
        row = connection.execute(_SELECT_REGISTERED, (name, version)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))

    def unfinished(self, connection: sqlite3.Connection, name: str, version: int) -> int:
        """How many sagas of this definition version have not ended."""
        where = "AND definition_name = ? AND definition_version = ?"
        row = connection.execute(
            _SELECT_UNENDED_COUNTS.format(where=where), (name, version)
        ).fetchone()
        return 0 if row is None else int(row[2])

    def registry(
        self, connection: sqlite3.Connection, name: str | None
    ) -> list[tuple[SagaDefinition, int, bytes, int]]:
        """Registered definitions (of ``name``, or all) by name then version: each with its
        registration time, digest, and how many of its sagas have not ended."""
        where, params = (
            ("", ()) if name is None else ("WHERE definition_versions.name = ?", (name,))
        )
        rows = connection.execute(_SELECT_REGISTRY.format(where=where), params).fetchall()
        unended_where = "" if name is None else "AND definition_name = ?"
        unended = {
            (found_name, found_version): int(total)
            for found_name, found_version, total in connection.execute(
                _SELECT_UNENDED_COUNTS.format(where=unended_where), params
            )
        }
        found = []
        for definition_id, registered_at, key in rows:
            definition = self.definition(connection, definition_id)
            count = unended.get((definition.name, definition.version), 0)
            found.append((definition, int(registered_at), bytes(key), count))
        return found

    def remember(self, definition: SagaDefinition, definition_id: int) -> None:
        """Cache a committed definition's id."""
        # Keyed by identity, holding the object: the id cannot be reused by another object.
        self._ids[id(definition)] = (definition, definition_id)
        self._definitions.setdefault(definition_id, definition)

    def definition(self, connection: sqlite3.Connection, definition_id: int) -> SagaDefinition:
        """The stored definition with this id."""
        found = self._definitions.get(definition_id)
        if found is None:
            row = connection.execute(_SELECT_DEFINITION, (definition_id,)).fetchone()
            if row is None:
                raise StoreCorrupt(f"a saga refers to definition {definition_id}, which is missing")
            found = unpack_definition(row[0])
            found = self._definitions.setdefault(definition_id, found)
            self._ids.setdefault(id(found), (found, definition_id))
        return found


# --- writing ---------------------------------------------------------------------------------


def saga_row(saga: Saga, definition_id: int, fingerprint: str) -> tuple[Any, ...]:
    """The parameters of ``INSERT_SAGA``."""
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
    """The parameters of ``INSERT_STEP`` for every step of a new saga."""
    return [(saga.saga_id, index, *_step_fields(step)) for index, step in enumerate(saga.steps)]


def label_rows(saga: Saga) -> list[tuple[str, str, str, int]]:
    """The parameters of ``INSERT_LABEL`` for a new saga's labels (none for most sagas)."""
    if not saga.labels:
        return []
    created_at = to_micros(saga.created_at)
    return [(saga.saga_id, key, value, created_at) for key, value in saga.labels.items()]


def saga_update(saga: Saga) -> tuple[Any, ...]:
    """The parameters of ``UPDATE_SAGA``: the saga's changing columns, from version - 1."""
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
    """The parameters of ``UPDATE_STEP`` for the steps that changed."""
    return [(*_step_fields(saga.steps[index]), saga.saga_id, index) for index in steps]


def event_row(event: RecordedEvent) -> tuple[str, int, int, str, bytes]:
    """The parameters of ``INSERT_EVENT``."""
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


def read_saga(
    connection: sqlite3.Connection, definitions: Definitions, saga_id: str
) -> Saga | None:
    """The saga with this id, or None."""
    row = connection.execute(
        f"SELECT {SAGA_COLUMNS} FROM sagas WHERE saga_id = ?", (saga_id,)
    ).fetchone()
    if row is None:
        return None
    steps = connection.execute(_SELECT_STEPS, (saga_id,)).fetchall()
    return _saga(connection, definitions, row, steps)


def read_sagas(
    connection: sqlite3.Connection, definitions: Definitions, sql: str, params: Sequence[Any]
) -> list[Saga]:
    """The sagas of a query that selects ``SAGA_COLUMNS``, in its order, with their steps."""
    rows = connection.execute(sql, params).fetchall()
    if not rows:
        return []
    ids = [row[0] for row in rows]
    steps: dict[str, list[tuple[Any, ...]]] = {saga_id: [] for saga_id in ids}
    # The ids travel as one JSON array: any number of them, in one statement.
    for saga_id, *fields in connection.execute(_SELECT_STEPS_OF_SAGAS, (json.dumps(ids),)):
        steps[saga_id].append(tuple(fields))
    return [_saga(connection, definitions, row, steps[row[0]]) for row in rows]


def read_events(
    connection: sqlite3.Connection, definitions: Definitions, saga: Saga
) -> tuple[RecordedEvent, ...]:
    """The saga's event log, in order."""
    rows = connection.execute(_SELECT_EVENTS, (saga.saga_id,)).fetchall()
    return events_of(saga, rows)


def read_events_page(
    connection: sqlite3.Connection,
    definitions: Definitions,
    saga_id: str,
    after_sequence: int,
    limit: int,
) -> tuple[RecordedEvent, ...]:
    """Up to ``limit`` events of the saga's log after ``after_sequence``, in order (none if the
    saga does not exist)."""
    rows = connection.execute(_SELECT_EVENTS_PAGE, (saga_id, after_sequence, limit)).fetchall()
    if not rows:
        return ()
    saga = read_saga(connection, definitions, saga_id)
    return () if saga is None else events_of(saga, rows)


def feed_change(
    connection: sqlite3.Connection, definitions: Definitions, row: Sequence[Any]
) -> FeedChange:
    """A change of the feed from a row of ``SELECT_FEED``."""
    position, saga_id, sequence, at, kind, body, state, definition_id, labels = row
    definition = definitions.definition(connection, definition_id)

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


def events_of(saga: Saga, rows: Iterable[tuple[int, int, str, bytes]]) -> tuple[RecordedEvent, ...]:
    """Recorded events of ``saga`` from rows of (sequence, recorded_at, type, body)."""

    def created() -> SagaCreated:
        return SagaCreated(
            saga.saga_id, saga.definition, saga.input, saga.trace_context, saga.labels
        )

    return tuple(
        RecordedEvent(saga.saga_id, sequence, from_micros(at), unpack_event(kind, body, created))
        for sequence, at, kind, body in rows
    )


def _saga(
    connection: sqlite3.Connection,
    definitions: Definitions,
    row: Sequence[Any],
    step_rows: Sequence[Sequence[Any]],
) -> Saga:
    (
        saga_id,
        definition_id,
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
    definition = definitions.definition(connection, definition_id)
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


def _flag(value: int) -> bool:
    if value not in (0, 1):
        raise ValueError(f"stored flag {value!r} is neither 0 nor 1")
    return bool(value)
