"""The data steps of schema migrations that SQL alone cannot do.

Schema 2 replaced schema 1's JSON bodies by compact rows: its conversion step reads every saga
and event of the renamed schema-1 tables with the JSON codec that wrote them, writes them again
as schema-2 rows, then drops the old tables, all inside the migration's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping

from coordinator.core.events import RecordedEvent
from coordinator.store.codec import decode_datetime, decode_event, decode_saga
from coordinator.store.sqlite_rows import (
    INSERT_EVENT,
    INSERT_SAGA,
    INSERT_STEP,
    Definitions,
    event_row,
    saga_row,
    step_rows,
)


def convert_schema_1(connection: sqlite3.Connection) -> None:
    """Move the rows of schema 1 into the tables of schema 2, then drop schema 1's tables."""
    definitions = Definitions()
    sagas = connection.execute(
        "SELECT saga_id, fingerprint, body FROM sagas_v1 ORDER BY created_at, saga_id"
    ).fetchall()
    for saga_id, fingerprint, body in sagas:
        saga = decode_saga(body)
        definition_id = definitions.store(connection, saga.definition)
        connection.execute(INSERT_SAGA, saga_row(saga, definition_id, fingerprint))
        connection.executemany(INSERT_STEP, step_rows(saga))
        events = connection.execute(
            "SELECT sequence, recorded_at, body FROM saga_events_v1 WHERE saga_id = ? "
            "ORDER BY sequence",
            (saga_id,),
        ).fetchall()
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


DATA_STEPS: Mapping[int, Callable[[sqlite3.Connection], None]] = {2: convert_schema_1}
"""Per migration number, the step that runs after its SQL, in the same transaction."""
