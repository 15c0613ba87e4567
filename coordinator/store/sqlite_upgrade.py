"""The data steps of schema migrations that SQL alone cannot do.

Each step writes the rows of its own schema, whatever the current one is: its statements are
spelled out here, frozen, rather than taken from ``sqlite_rows`` (which writes the newest
schema's rows).

- Schema 2 replaced schema 1's JSON bodies by compact rows: its conversion step reads every
  saga and event of the renamed schema-1 tables with the JSON codec that wrote them, writes
  them again as schema-2 rows, then drops the old tables.
- Schema 3 added, among others, the step each unended saga waits on and the audit trail: its
  step fills the first for every saga that has not ended, and rebuilds the second by replaying
  the log of every cancelled saga (the one operator action schemas 1 and 2 knew).

Both run inside their migration's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.core.events import RecordedEvent
from coordinator.core.machine import fold
from coordinator.core.model import Saga, StepRun
from coordinator.store.codec import decode_datetime, decode_event, decode_saga
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import (
    optional_micros,
    pack_audit,
    pack_failure,
    pack_headers,
    to_micros,
)
from coordinator.store.rows import SAGA_COLUMNS, event_row, waiting_on
from coordinator.store.sqlite_rows import INSERT_EVENT, Definitions, read_events, read_sagas

# --- schema 1 to 2 ---------------------------------------------------------------------------

_V2_INSERT_SAGA = """
INSERT INTO sagas (saga_id, definition_id, state, created_at, updated_at, ended_at, version,
                   input, failure, cancel_reason, trace_context, definition_name,
                   definition_version, fingerprint)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_V2_INSERT_STEP = """
INSERT INTO saga_steps (saga_id, step, state, execute_attempts, compensate_attempts, output,
                        failure, next_attempt_at, started_at, ended_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


def convert_schema_1(connection: sqlite3.Connection) -> None:
    """Move the rows of schema 1 into the tables of schema 2, then drop schema 1's tables."""
    definitions = Definitions()
    sagas = connection.execute(
        "SELECT saga_id, fingerprint, body FROM sagas_v1 ORDER BY created_at, saga_id"
    ).fetchall()
    for saga_id, fingerprint, body in sagas:
        saga = decode_saga(body)
        definition_id = definitions.store(connection, saga.definition)
        connection.execute(_V2_INSERT_SAGA, _v2_saga_row(saga, definition_id, fingerprint))
        connection.executemany(
            _V2_INSERT_STEP,
            [
                (saga.saga_id, index, *_v2_step_fields(step))
                for index, step in enumerate(saga.steps)
            ],
        )
        events = connection.execute(
            "SELECT sequence, recorded_at, body FROM saga_events_v1 WHERE saga_id = ? "
            "ORDER BY sequence",
            (saga_id,),
        ).fetchall()
        # The log's columns are the same in schemas 2 and 3.
        connection.executemany(
            INSERT_EVENT,
            (
                event_row(
                    RecordedEvent(saga_id, sequence, decode_datetime(at), decode_event(event))
                )
                for sequence, at, event in events
            ),
        )
    # Dropping a table drops its triggers first: the append-only guard does not fire.
    connection.execute("DROP TABLE saga_events_v1")
    connection.execute("DROP TABLE sagas_v1")


def _v2_saga_row(saga: Saga, definition_id: int, fingerprint: str) -> tuple[Any, ...]:
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
        saga.definition.name,
        saga.definition.version,
        fingerprint,
    )


def _v2_step_fields(step: StepRun) -> tuple[Any, ...]:
    return (
        step.state.value,
        step.execute_attempts,
        step.compensate_attempts,
        step.output,
        pack_failure(step.failure),
        optional_micros(step.next_attempt_at),
        optional_micros(step.started_at),
        optional_micros(step.ended_at),
    )


# --- schema 2 to 3 ---------------------------------------------------------------------------

_SELECT_UNENDED = f"""
SELECT {SAGA_COLUMNS} FROM sagas INDEXED BY sagas_by_state WHERE state = ?
"""
_SET_WAITING = "UPDATE sagas SET waiting_step = ?, waiting_participant = ? WHERE saga_id = ?"
_SELECT_CANCELLED = f"SELECT {SAGA_COLUMNS} FROM sagas WHERE cancel_reason IS NOT NULL"
_SET_AUDIT = "UPDATE sagas SET audit = ? WHERE saga_id = ?"


def fill_schema_3(connection: sqlite3.Connection) -> None:
    """Fill the columns schema 3 added that SQL cannot derive (see the module docstring)."""
    definitions = Definitions()
    for state in ("RUNNING", "COMPENSATING", "NEEDS_ATTENTION"):
        for saga in read_sagas(connection, definitions, _SELECT_UNENDED, (state,)):
            connection.execute(_SET_WAITING, (*waiting_on(saga), saga.saga_id))
    # Cancelling recorded no audit entry before schema 3; replaying the log with today's
    # rules gives the entry it records now (the actor, unknown then, stays empty).
    for saga in read_sagas(connection, definitions, _SELECT_CANCELLED, ()):
        log = read_events(connection, definitions, saga)
        try:
            replayed = fold((recorded.event, recorded.recorded_at) for recorded in log)
        except (ValueError, AssertionError) as error:
            raise StoreCorrupt(
                f"saga {saga.saga_id}: its log cannot be replayed to rebuild its audit trail "
                f"({error!r})"
            ) from error
        connection.execute(_SET_AUDIT, (pack_audit(replayed.audit), saga.saga_id))


DATA_STEPS: Mapping[int, Callable[[sqlite3.Connection], None]] = {
    2: convert_schema_1,
    3: fill_schema_3,
}
"""Per migration number, the step that runs after its SQL, in the same transaction."""
