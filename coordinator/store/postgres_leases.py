"""Leases in the PostgreSQL database: which replica moves which saga, judged by its clock.

"Now" is always the server's ``clock_timestamp()``, never a replica's: a replica whose clock is
wrong, or that was paused, cannot stretch its lease. Claims lock the rows they take with
``FOR UPDATE SKIP LOCKED``: replicas claiming at once skip each other's rows, and a row another
claim changed meanwhile is checked again, so each saga goes to exactly one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from coordinator.ports import Claimed, Fence
from coordinator.store.postgres_rows import (
    Connection,
    Definitions,
    fetch_one,
    read_saga,
    read_sagas,
)
from coordinator.store.postgres_sql import SELECT_SAGAS_BY_ID
from coordinator.store.rules import UNFINISHED

NOW = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
"""The database's clock, in microseconds since 1970."""
_UNFINISHED = ", ".join(f"'{state}'" for state in sorted(UNFINISHED))
ALIVE = f"EXISTS (SELECT 1 FROM replicas WHERE replica_id = %s AND lease_until > {NOW})"

_JOIN = f"""
INSERT INTO replicas (replica_id, lease_until) VALUES (%s, {NOW} + %s)
ON CONFLICT (replica_id) DO UPDATE SET lease_until = EXCLUDED.lease_until
"""
_RENEW = f"""
UPDATE replicas SET lease_until = {NOW} + %s WHERE replica_id = %s AND lease_until > {NOW}
RETURNING 1
"""
_LEAVE = "DELETE FROM replicas WHERE replica_id = %s"
_LET_GO = "UPDATE sagas SET owner = NULL WHERE owner = %s RETURNING 1"
SETTLED = "UPDATE sagas SET owner = NULL WHERE saga_id = %s"
"""Once a saga ends or parks nobody holds it (an operator's action takes it up again)."""
_CLAIM = f"""
WITH free AS (
    SELECT s.saga_id FROM sagas AS s
    WHERE s.state IN ({_UNFINISHED})
      AND (s.owner IS NULL OR NOT EXISTS (
          SELECT 1 FROM replicas AS r WHERE r.replica_id = s.owner AND r.lease_until > {NOW}))
      AND {ALIVE}
    ORDER BY s.created_at, s.saga_id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE sagas AS s SET owner = %s, epoch = s.epoch + 1 FROM free WHERE s.saga_id = free.saga_id
RETURNING s.saga_id, s.epoch
"""
_TAKE = f"""
UPDATE sagas SET owner = %s, epoch = epoch + 1 WHERE saga_id = %s AND {ALIVE} RETURNING epoch
"""
HOLD_NEW = "UPDATE sagas SET owner = %s, epoch = 1 WHERE saga_id = %s"
LOCK_FENCED = (
    f"SELECT version, state, owner, epoch, {ALIVE} FROM sagas WHERE saga_id = %s FOR UPDATE"
)
"""The saga's row, locked for a commit, with who holds it and whether a replica's lease runs."""


def _micros(lease: timedelta) -> int:
    return int(lease.total_seconds() * 1_000_000)


async def join(connection: Connection, replica: str, lease: timedelta) -> None:
    """Start the replica's lease; an earlier life under its name lets go of its sagas."""
    await connection.execute(_LET_GO, (replica,))
    await connection.execute(_JOIN, (replica, _micros(lease)))


async def renew(connection: Connection, replica: str, lease: timedelta) -> bool:
    """Extend the lease unless it ran out."""
    # Rows are counted by what they return: in pipeline mode a cursor's rowcount is not known.
    return await fetch_one(connection, _RENEW, (_micros(lease), replica)) is not None


async def leave(connection: Connection, replica: str) -> int:
    """End the lease and let go of the replica's sagas; how many were let go."""
    await connection.execute(_LEAVE, (replica,))
    cursor = await connection.execute(_LET_GO, (replica,))
    return len(await cursor.fetchall())


async def claim(
    connection: Connection, definitions: Definitions, replica: str, limit: int
) -> Sequence[Claimed]:
    """Take up to ``limit`` unfinished sagas no live replica holds, oldest first."""
    cursor = await connection.execute(_CLAIM, (replica, limit, replica))
    epochs: dict[str, int] = {saga_id: int(epoch) for saga_id, epoch in await cursor.fetchall()}
    if not epochs:
        return ()
    sagas = await read_sagas(connection, definitions, SELECT_SAGAS_BY_ID, (list(epochs),))
    return tuple(Claimed(saga, Fence(replica, epochs[saga.saga_id])) for saga in sagas)


async def take(
    connection: Connection, definitions: Definitions, replica: str, saga_id: str
) -> Claimed | None:
    """Take one saga whoever holds it."""
    found = await fetch_one(connection, _TAKE, (replica, saga_id, replica))
    if found is None:
        return None
    saga = await read_saga(connection, definitions, saga_id)
    return None if saga is None else Claimed(saga, Fence(replica, int(found[0])))
