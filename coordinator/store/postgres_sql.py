"""The PostgreSQL store's statements, and its listings and counts built from a filter.

Commit order of the change feed
-------------------------------
Every event takes its feed position from the one-row ``feed_head`` table, with ``UPDATE
feed_head SET position = position + 1 ... RETURNING position``, as the *last* statement of its
write transaction. The row lock that update takes is held until the transaction ends, so the
next writer's update waits for this transaction to commit (or roll back) and then reads the
position it left. Positions are thus handed out in commit order, and a transaction becomes
visible before its locks are released, so any snapshot that sees position N + 1 also sees N: a
reader never finds a gap that fills later. A rolled-back write gives its position back with the
update, so committed positions have no holes, and ``feed_head`` never goes down (pruning does not
touch it), so a position is never given twice.

A sequence would not do: ``nextval`` is handed out when a statement runs, not when its
transaction commits, so with concurrent writers position N + 1 may commit, and be read and
passed by a consumer, before N commits. Taking the position last keeps the lock for as short a
time as possible: the rest of each write runs concurrently with the others', and only the
statement that takes the position and the commit are serialised.

Lock order
----------
Writes lock rows in one order, so that they never deadlock: saga rows first (one saga per
write; pruning locks its batch, skipping rows another prune holds), then ``saga_counts`` rows,
sorted by key within one statement, then ``feed_head`` (writes) or ``feed_horizon`` (pruning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from coordinator.core.model import SagaState
from coordinator.ports import ListCursor, SagaFilter
from coordinator.store.packing import to_micros
from coordinator.store.rows import (
    FEED_FIELDS,
    INSERTED_SAGA_COLUMNS,
    SAGA_FIELDS,
    STEP_COLUMNS,
)
from coordinator.store.rules import NOT_ENDED, PRUNABLE

Query = tuple[str, list[Any]]
"""A statement and its parameters."""


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def _states(states: frozenset[SagaState]) -> str:
    return ", ".join(f"'{state.value}'" for state in sorted(states))


_SAGA_COLUMNS = ", ".join(f"s.{name}" for name in SAGA_FIELDS)

# --- definitions -----------------------------------------------------------------------------

INSERT_DEFINITION = """
INSERT INTO definitions (name, version, digest, body) VALUES (%s, %s, %s, %s)
ON CONFLICT (digest) DO NOTHING RETURNING definition_id
"""
SELECT_DEFINITION_ID = "SELECT definition_id FROM definitions WHERE digest = %s"
SELECT_DEFINITIONS = "SELECT definition_id, body FROM definitions WHERE definition_id = ANY(%s)"
REGISTER = """
INSERT INTO definition_versions (name, version, definition_id, registered_at)
VALUES (%s, %s, %s, %s)
ON CONFLICT (name, version) DO NOTHING RETURNING 1
"""
_REGISTRY = """
SELECT v.definition_id, v.registered_at, d.digest
FROM definition_versions AS v JOIN definitions AS d ON d.definition_id = v.definition_id
"""
SELECT_REGISTERED = f"{_REGISTRY} WHERE v.name = %s AND v.version = %s"
SELECT_REGISTRY = f"{_REGISTRY} ORDER BY v.name, v.version"
SELECT_REGISTRY_OF = f"{_REGISTRY} WHERE v.name = %s ORDER BY v.version"
_UNENDED_COUNTS = f"""
SELECT definition_name, definition_version, sum(total) FROM saga_counts
WHERE state IN ({_states(NOT_ENDED)})
"""
SELECT_UNENDED_COUNTS = f"{_UNENDED_COUNTS} GROUP BY definition_name, definition_version"
SELECT_UNENDED_COUNTS_OF = f"""
{_UNENDED_COUNTS} AND definition_name = %s GROUP BY definition_name, definition_version
"""
SELECT_UNENDED_COUNT = f"""
{_UNENDED_COUNTS} AND definition_name = %s AND definition_version = %s
GROUP BY definition_name, definition_version
"""

# --- writes ----------------------------------------------------------------------------------

SELECT_FINGERPRINT = "SELECT fingerprint FROM sagas WHERE saga_id = %s"
# DO NOTHING waits for a concurrent insert of the same id to end: of two racing creations,
# exactly one inserts, and the other then reads the winner's committed row.
INSERT_SAGA = f"""
INSERT INTO sagas ({INSERTED_SAGA_COLUMNS}) VALUES ({_placeholders(19)})
ON CONFLICT (saga_id) DO NOTHING RETURNING 1
"""
INSERT_STEP = f"INSERT INTO saga_steps (saga_id, step, {STEP_COLUMNS}) VALUES ({_placeholders(13)})"
INSERT_LABEL = "INSERT INTO saga_labels (saga_id, key, value, created_at) VALUES (%s, %s, %s, %s)"
LOCK_SAGA = "SELECT version, state FROM sagas WHERE saga_id = %s FOR UPDATE"
UPDATE_SAGA = """
UPDATE sagas SET state = %s, updated_at = %s, ended_at = %s, version = %s, failure = %s,
                 cancel_reason = %s, audit = %s, deadline_exceeded = %s, waiting_step = %s,
                 waiting_participant = %s
WHERE saga_id = %s AND version = %s
"""
UPDATE_STEP = """
UPDATE saga_steps SET state = %s, execute_attempts = %s, compensate_attempts = %s, output = %s,
                      failure = %s, next_attempt_at = %s, started_at = %s, ended_at = %s,
                      by_operator = %s, budget_start = %s, retry_override = %s
WHERE saga_id = %s AND step = %s
"""
# The counts' rows are locked in key order (see the module docstring): the rows come out of the
# ORDER BY in that order and are upserted one by one.
MOVE_COUNTS = """
INSERT INTO saga_counts AS c (definition_name, definition_version, state, total)
SELECT d.name, d.version, d.state, d.delta
FROM unnest(%s::text[], %s::integer[], %s::text[], %s::bigint[]) AS d(name, version, state, delta)
ORDER BY d.name COLLATE "C", d.version, d.state COLLATE "C"
ON CONFLICT (definition_name, definition_version, state)
DO UPDATE SET total = c.total + EXCLUDED.total
"""
# The last statement of every write that records an event: see the module docstring.
APPEND_EVENT = """
WITH head AS (UPDATE feed_head SET position = position + 1 WHERE id = 1 RETURNING position)
INSERT INTO saga_events (saga_id, sequence, recorded_at, type, body, state, position)
VALUES (%s, %s, %s, %s, %s, %s, (SELECT position FROM head))
"""


# --- reads -----------------------------------------------------------------------------------

SELECT_SAGA = f"SELECT {_SAGA_COLUMNS} FROM sagas AS s WHERE s.saga_id = %s"
SELECT_SAGA_FOR_SHARE = f"{SELECT_SAGA} FOR SHARE"
SELECT_STEPS = f"""
SELECT saga_id, {STEP_COLUMNS} FROM saga_steps WHERE saga_id = ANY(%s) ORDER BY saga_id, step
"""
SELECT_SAGAS_BY_ID = f"""
SELECT {_SAGA_COLUMNS} FROM sagas AS s WHERE s.saga_id = ANY(%s) ORDER BY s.created_at, s.saga_id
"""
SELECT_EVENTS = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = %s ORDER BY sequence
"""
SELECT_EVENTS_PAGE = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = %s AND sequence > %s
ORDER BY sequence LIMIT %s
"""
SELECT_EVENTS_PAGE_BACKWARDS = """
SELECT sequence, recorded_at, type, body FROM saga_events WHERE saga_id = %s AND sequence < %s
ORDER BY sequence DESC LIMIT %s
"""
# Each state's oldest saga is the first entry of its range of sagas_by_state.
SELECT_OLDEST_UNENDED = "SELECT least({})".format(
    ", ".join(
        f"(SELECT min(created_at) FROM sagas WHERE state = '{state.value}')"
        for state in sorted(NOT_ENDED)
    )
)
SELECT_PARKED = """
SELECT definition_name, waiting_step, count(*) FROM sagas WHERE state = 'NEEDS_ATTENTION'
GROUP BY definition_name, waiting_step
"""
SELECT_COUNTS = (
    "SELECT definition_name, definition_version, state, total FROM saga_counts WHERE total > 0"
)
SELECT_VERSIONS = (
    "SELECT DISTINCT definition_version FROM saga_counts WHERE definition_name = %s AND total > 0"
)
SELECT_FEED = f"""
SELECT {", ".join(FEED_FIELDS)}
FROM saga_events AS e JOIN sagas AS s ON s.saga_id = e.saga_id
WHERE e.position > %s ORDER BY e.position LIMIT %s
"""
SELECT_PRUNED_THROUGH = "SELECT pruned_through FROM feed_horizon"
SELECT_FEED_BOUNDS = """
SELECT (SELECT pruned_through FROM feed_horizon), (SELECT position FROM feed_head)
"""

# --- retention -------------------------------------------------------------------------------

_PRUNABLE = f"state IN ({_states(PRUNABLE)}) AND ended_at < %s"
COUNT_PRUNABLE = f"SELECT count(*), coalesce(sum(version), 0) FROM sagas WHERE {_PRUNABLE}"
# SKIP LOCKED: two prunes at once take different sagas rather than wait for each other.
SELECT_PRUNABLE = f"""
SELECT saga_id FROM sagas WHERE {_PRUNABLE} ORDER BY ended_at, saga_id LIMIT %s
FOR UPDATE SKIP LOCKED
"""
PRUNE_EVENTS = """
WITH gone AS (DELETE FROM saga_events WHERE saga_id = ANY(%s) RETURNING position)
SELECT count(*), coalesce(max(position), 0) FROM gone
"""
PRUNE_STEPS = "DELETE FROM saga_steps WHERE saga_id = ANY(%s)"
PRUNE_LABELS = "DELETE FROM saga_labels WHERE saga_id = ANY(%s)"
PRUNE_SAGAS = """
WITH gone AS (
    DELETE FROM sagas WHERE saga_id = ANY(%s)
    RETURNING definition_name, definition_version, state
)
SELECT definition_name, definition_version, state, count(*) FROM gone
GROUP BY definition_name, definition_version, state
"""
# The feed never gives a pruned position again (feed_head only goes up); this records how far
# consumers may have missed changes.
RAISE_HORIZON = "UPDATE feed_horizon SET pruned_through = greatest(pruned_through, %s)"


# --- listings and counts ---------------------------------------------------------------------


def conditions(where: SagaFilter) -> tuple[list[str], list[Any]]:
    """The filter as conditions on ``sagas AS s`` (``where.states`` left out), and their
    parameters in order."""
    clauses: list[str] = []
    params: list[Any] = []
    if where.definition is not None:
        clauses.append("s.definition_name = %s")
        params.append(where.definition)
    if where.definition_version is not None:
        clauses.append("s.definition_version = %s")
        params.append(where.definition_version)
    for key, value in where.labels:
        clauses.append(
            "EXISTS (SELECT 1 FROM saga_labels AS l"
            " WHERE l.saga_id = s.saga_id AND l.key = %s AND l.value = %s)"
        )
        params.extend((key, value))
    if where.created_after is not None:
        clauses.append("s.created_at >= %s")
        params.append(to_micros(where.created_after))
    if where.created_before is not None:
        clauses.append("s.created_at < %s")
        params.append(to_micros(where.created_before))
    if where.stuck_on_step is not None:
        clauses.append("s.waiting_step = %s")
        params.append(where.stuck_on_step)
    if where.stuck_on_participant is not None:
        clauses.append("s.waiting_participant = %s")
        params.append(where.stuck_on_participant)
    return clauses, params


def list_query(
    where: SagaFilter, limit: int, after: ListCursor | None, versions: Sequence[int] = ()
) -> Query:
    """The query of one page: ``limit`` + 1 rows of ``SAGA_FIELDS`` in listing order.

    Sagas of several states, or of several ``versions`` of the filter's definition (those that
    have sagas, given when the filter names no version), are read as one range per state or
    version of their index, each already in listing order and stopping once the page is full;
    the ranges merge in order.
    """
    clauses, params = conditions(where)
    if after is not None:
        # Keyset pagination: resume strictly after the last row seen, however rows were added
        # meanwhile; (created_at, saga_id) is unique, so nothing is seen twice.
        clauses.append("(s.created_at, s.saga_id) > (%s, %s)")
        params.extend((to_micros(after.created_at), after.saga_id))
    branches: list[tuple[str, Any]] = []
    if where.states:
        branches = [("s.state = %s", state.value) for state in sorted(where.states)]
    elif where.definition is not None and where.definition_version is None:
        branches = [("s.definition_version = %s", version) for version in sorted(versions)]
    order = "ORDER BY s.created_at, s.saga_id LIMIT %s"
    if len(branches) <= 1:
        for clause, value in branches:
            clauses.append(clause)
            params.append(value)
        sql = f"SELECT {_SAGA_COLUMNS} FROM sagas AS s {_where(clauses)} {order}"
        return sql, [*params, limit + 1]
    parts: list[str] = []
    merged_params: list[Any] = []
    for clause, value in branches:
        branch_where = _where([clause, *clauses])
        parts.append(f"(SELECT {_SAGA_COLUMNS} FROM sagas AS s {branch_where} {order})")
        merged_params.extend((value, *params, limit + 1))
    merged = " UNION ALL ".join(parts)
    sql = f"SELECT * FROM ({merged}) AS s ORDER BY s.created_at, s.saga_id LIMIT %s"
    return sql, [*merged_params, limit + 1]


def count_query(where: SagaFilter) -> Query:
    """The query counting the sagas of ``where`` (one row, one column)."""
    clauses, params = conditions(where)
    if where.states:
        clauses.append("s.state = ANY(%s)")
        params.append(sorted(state.value for state in where.states))
    return f"SELECT count(*) FROM sagas AS s {_where(clauses)}", params


def count_by_state_query(where: SagaFilter) -> Query:
    """The query counting the sagas of ``where`` per state (``where.states`` ignored), as rows
    of (state, count)."""
    clauses, params = conditions(dataclasses.replace(where, states=frozenset()))
    return f"SELECT s.state, count(*) FROM sagas AS s {_where(clauses)} GROUP BY s.state", params


def _where(clauses: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""
