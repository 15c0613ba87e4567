"""Sagas as PostgreSQL rows, through a connection: sagas with their steps and definitions read
back, definitions stored once, and sagas counted in and out of their state.

The values themselves are built in ``rows``, as for SQLite; the statements are in
``postgres_sql``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection

from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.store import postgres_sql as sql
from coordinator.store.errors import StoreCorrupt
from coordinator.store.packing import digest, pack_definition
from coordinator.store.rows import DefinitionCache, saga_of
from coordinator.store.rules import CountRow

Connection = AsyncConnection[Any]
"""A connection of the store's pool (rows as tuples)."""
CountMove = tuple[str, int, str, int]
"""Sagas counted into (a positive change) or out of (negative) a definition, version and
state."""


class Definitions(DefinitionCache):
    """The stored definitions and their ids, cached in both directions (``DefinitionCache``):
    one store's, shared by all its connections."""

    async def store(self, connection: Connection, definition: SagaDefinition) -> int:
        """Inside a write transaction: the id of ``definition``, stored if it is new."""
        body = pack_definition(definition)
        key = digest(body)
        found = await fetch_one(
            connection, sql.INSERT_DEFINITION, (definition.name, definition.version, key, body)
        )
        if found is None:  # stored before, or by a concurrent write that has committed since
            found = await fetch_one(connection, sql.SELECT_DEFINITION_ID, (key,))
            if found is None:
                raise StoreCorrupt(f"definition {definition.name!r} vanished while stored")
        return int(found[0])

    async def of(self, connection: Connection, ids: Iterable[int]) -> dict[int, SagaDefinition]:
        """The stored definitions with these ids (those not cached yet read in one query)."""
        found: dict[int, SagaDefinition] = {}
        missing = []
        for definition_id in ids:
            cached = self.cached(definition_id)
            if cached is None:
                missing.append(definition_id)
            else:
                found[definition_id] = cached
        if missing:
            cursor = await connection.execute(sql.SELECT_DEFINITIONS, (missing,))
            for definition_id, body in await cursor.fetchall():
                found[definition_id] = self.learn(definition_id, body)
            for definition_id in missing:
                if definition_id not in found:
                    raise StoreCorrupt(
                        f"a saga refers to definition {definition_id}, which is missing"
                    )
        return found


async def fetch_one(
    connection: Connection, query: str, params: Sequence[Any] = ()
) -> tuple[Any, ...] | None:
    """The first row of a statement, or None."""
    cursor = await connection.execute(query, params)
    return await cursor.fetchone()


async def read_sagas(
    connection: Connection, definitions: Definitions, query: str, params: Sequence[Any]
) -> list[Saga]:
    """The sagas of a query that selects ``SAGA_FIELDS``, in its order, with their steps."""
    cursor = await connection.execute(query, params)
    rows = await cursor.fetchall()
    if not rows:
        return []
    ids = [row[0] for row in rows]
    steps: dict[str, list[tuple[Any, ...]]] = {saga_id: [] for saga_id in ids}
    cursor = await connection.execute(sql.SELECT_STEPS, (ids,))
    for saga_id, *fields in await cursor.fetchall():
        steps[saga_id].append(tuple(fields))
    found = await definitions.of(connection, {row[1] for row in rows})
    return [saga_of(found[row[1]], row, steps[row[0]]) for row in rows]


async def read_saga(
    connection: Connection, definitions: Definitions, saga_id: str, query: str = sql.SELECT_SAGA
) -> Saga | None:
    """The saga with this id, or None (``query``: ``SELECT_SAGA`` or one of its forms)."""
    sagas = await read_sagas(connection, definitions, query, (saga_id,))
    return sagas[0] if sagas else None


async def read_counts(connection: Connection) -> list[CountRow]:
    """Every non-empty (definition, version, state) and its number of sagas."""
    cursor = await connection.execute(sql.SELECT_COUNTS)
    rows = await cursor.fetchall()
    return [(name, int(version), state, int(n)) for name, version, state, n in rows]


def count_move(saga: Saga, state: SagaState, change: int) -> CountMove:
    """``saga``, counted into (``change`` 1) or out of (-1) ``state``."""
    return saga.definition.name, saga.definition.version, state.value, change


async def move_counts(connection: Connection, moves: Sequence[CountMove]) -> None:
    """Inside a write transaction: apply ``moves`` to ``saga_counts``, locking its rows in key
    order (see ``postgres_sql``)."""
    columns = [[move[i] for move in moves] for i in range(4)]
    await connection.execute(sql.MOVE_COUNTS, columns)
