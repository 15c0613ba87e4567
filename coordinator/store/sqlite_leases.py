"""Leases in the SQLite file: which replica moves which saga, judged by the database's clock.

Every statement here runs in the writer's transaction. "Now" is read by SQLite itself
(``NOW``), never passed in by a replica: a replica whose clock is wrong, or that was paused,
cannot stretch its lease.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import timedelta

from coordinator.ports import Claimed, Fence
from coordinator.store.rules import UNFINISHED, check_lease
from coordinator.store.sqlite_rows import Definitions, read_saga

NOW = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"
"""The database's clock, in microseconds since 1970."""
_UNFINISHED = ", ".join(f"'{state}'" for state in sorted(UNFINISHED))
_ALIVE = f"SELECT 1 FROM replicas WHERE replica_id = ? AND lease_until > {NOW}"

_JOIN = f"INSERT OR REPLACE INTO replicas (replica_id, lease_until) VALUES (?, {NOW} + ?)"
_RENEW = f"UPDATE replicas SET lease_until = {NOW} + ? WHERE replica_id = ? AND lease_until > {NOW}"
_LEAVE = "DELETE FROM replicas WHERE replica_id = ?"
_LET_GO = "UPDATE sagas SET owner = NULL WHERE owner = ?"
SETTLED = "UPDATE sagas SET owner = NULL WHERE saga_id = ?"
"""Once a saga ends or parks nobody holds it (an operator's action takes it up again)."""
_CLAIM = f"""
UPDATE sagas SET owner = ?, epoch = epoch + 1
WHERE saga_id IN (
    SELECT saga_id FROM sagas
    WHERE state IN ({_UNFINISHED})
      AND (owner IS NULL
           OR owner NOT IN (SELECT replica_id FROM replicas WHERE lease_until > {NOW}))
    ORDER BY created_at, saga_id
    LIMIT ?
)
RETURNING saga_id, epoch
"""
_TAKE = "UPDATE sagas SET owner = ?, epoch = epoch + 1 WHERE saga_id = ? RETURNING epoch"
_HOLDER = "SELECT owner, epoch, version FROM sagas WHERE saga_id = ?"
FENCED = f" AND owner = ? AND epoch = ? AND EXISTS ({_ALIVE})"
"""Appended to a saga's UPDATE: it applies only under the writer's fence, lease running."""


def _micros(lease: timedelta) -> int:
    return int(lease.total_seconds() * 1_000_000)


def alive(connection: sqlite3.Connection, replica: str) -> bool:
    """Whether the replica's lease runs."""
    return connection.execute(_ALIVE, (replica,)).fetchone() is not None


_PROBE = f"SELECT count(*) FROM sagas INDEXED BY sagas_by_state WHERE state IN ({_UNFINISHED})"


def join(connection: sqlite3.Connection, replica: str, lease: timedelta) -> None:
    """Start the replica's lease; an earlier life under its name lets go of its sagas.

    Before anything is written, what recovery will claim is read once through the index it
    claims by: a damaged file fails here, its transaction rolls back, and the file is left as
    it was found.
    """
    connection.execute(_PROBE).fetchone()
    _let_go(connection, replica)
    connection.execute(_JOIN, (replica, _micros(lease)))


def renew(connection: sqlite3.Connection, replica: str, lease: timedelta) -> bool:
    """Extend the lease unless it ran out."""
    return connection.execute(_RENEW, (_micros(lease), replica)).rowcount == 1


def leave(connection: sqlite3.Connection, replica: str) -> int:
    """End the lease; let go of the replica's sagas. How many unfinished ones were let go."""
    connection.execute(_LEAVE, (replica,))
    return _let_go(connection, replica)


def _let_go(connection: sqlite3.Connection, replica: str) -> int:
    return int(connection.execute(_LET_GO, (replica,)).rowcount)


def claim(
    connection: sqlite3.Connection, definitions: Definitions, replica: str, limit: int
) -> Sequence[Claimed]:
    """Take up to ``limit`` unfinished sagas no live replica holds, oldest first."""
    if not alive(connection, replica):
        return ()
    rows = connection.execute(_CLAIM, (replica, limit)).fetchall()
    claimed = []
    for saga_id, epoch in rows:
        saga = read_saga(connection, definitions, saga_id)
        assert saga is not None  # updated in this very transaction
        claimed.append(Claimed(saga, Fence(replica, epoch)))
    claimed.sort(key=lambda c: (c.saga.created_at, c.saga.saga_id))
    return tuple(claimed)


def take(
    connection: sqlite3.Connection, definitions: Definitions, replica: str, saga_id: str
) -> Claimed | None:
    """Take one saga whoever holds it."""
    if not alive(connection, replica):
        return None
    row = connection.execute(_TAKE, (replica, saga_id)).fetchone()
    if row is None:
        return None
    saga = read_saga(connection, definitions, saga_id)
    assert saga is not None
    return Claimed(saga, Fence(replica, row[0]))


def refused(connection: sqlite3.Connection, saga_id: str, fence: Fence) -> int | None:
    """Why a fenced update changed nothing: raises ``LeaseLost`` when the fence no longer
    holds; otherwise returns the stored version (None: no such saga) for a ``stale`` error."""
    found = connection.execute(_HOLDER, (saga_id,)).fetchone()
    if found is None:
        return None
    owner, epoch, version = found
    check_lease(saga_id, fence, owner, epoch, alive(connection, fence.replica))
    return int(version)
