"""Sagas as SQLite rows: what a creation and a commit write, and sagas and events read back.

A saga is a row of ``sagas`` (what it is and the few fields that change), one row of
``saga_steps`` per step, a row of ``saga_labels`` per label, and its definition, stored once in
``definitions``. A commit writes the saga's changing columns, the steps that changed, and one
event. The saga's row also holds its labels packed, so reading a saga never needs its label
rows (they are the index that label lookups use). The values written and the sagas read back
are built in ``rows``, shared with the PostgreSQL store; this module holds SQLite's statements.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga, SagaDefinition
from coordinator.ports import FeedChange
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import digest, pack_definition

# Built once for both SQL stores (``rows``); named here too for the scripts that write SQLite
# rows by hand, which import them from this module.
from coordinator.store.rows import (
    INSERTED_SAGA_COLUMNS,
    SAGA_COLUMNS,
    STEP_COLUMNS,
    DefinitionCache,
    events_of,
    events_page_bound,
    feed_change_of,
    saga_of,
)
from coordinator.store.rows import SAGA_FIELDS as SAGA_FIELDS
from coordinator.store.rows import event_row as event_row
from coordinator.store.rows import saga_row as saga_row
from coordinator.store.rows import step_rows as step_rows

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
INSERT INTO sagas ({INSERTED_SAGA_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
INSERT_STEP = (
    f"INSERT INTO saga_steps (saga_id, step, {STEP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
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
_SELECT_STEPS = f"SELECT {STEP_COLUMNS} FROM saga_steps WHERE saga_id = ? ORDER BY step"
_SELECT_STEPS_OF_SAGAS = f"""
SELECT saga_id, {STEP_COLUMNS} FROM saga_steps WHERE saga_id IN (SELECT value FROM json_each(?))
ORDER BY saga_id, step
"""
_SELECT_EVENTS = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = ? ORDER BY sequence
"""
_SELECT_EVENTS_PAGE = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = ? AND sequence > ?
ORDER BY sequence LIMIT ?
"""
_SELECT_EVENTS_PAGE_BACKWARDS = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = ? AND sequence < ?
ORDER BY sequence DESC LIMIT ?
"""


class Definitions(DefinitionCache):
    """The stored definitions and their ids, cached in both directions (``DefinitionCache``).

    Shared by the writer and the reader threads: entries are only ever added, and an id is only
    cached once it is known to be committed.
    """

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

    def definition(self, connection: sqlite3.Connection, definition_id: int) -> SagaDefinition:
        """The stored definition with this id."""
        found = self.cached(definition_id)
        if found is None:
            row = connection.execute(_SELECT_DEFINITION, (definition_id,)).fetchone()
            if row is None:
                raise StoreCorrupt(f"a saga refers to definition {definition_id}, which is missing")
            found = self.learn(definition_id, row[0])
        return found


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
    newest_first: bool = False,
) -> tuple[RecordedEvent, ...]:
    """Up to ``limit`` events of the saga's log after ``after_sequence`` in the reading order
    (none if the saga does not exist); see ``SagaStore.events_page``."""
    query = _SELECT_EVENTS_PAGE_BACKWARDS if newest_first else _SELECT_EVENTS_PAGE
    bound = events_page_bound(after_sequence, newest_first)
    rows = connection.execute(query, (saga_id, bound, limit)).fetchall()
    if not rows:
        return ()
    saga = read_saga(connection, definitions, saga_id)
    return () if saga is None else events_of(saga, rows)


def feed_change(
    connection: sqlite3.Connection, definitions: Definitions, row: Sequence[Any]
) -> FeedChange:
    """A change of the feed from a row of ``SELECT_FEED``."""
    return feed_change_of(definitions.definition(connection, row[7]), row)


def _saga(
    connection: sqlite3.Connection,
    definitions: Definitions,
    row: Sequence[Any],
    step_rows: Sequence[Sequence[Any]],
) -> Saga:
    return saga_of(definitions.definition(connection, row[1]), row, step_rows)
