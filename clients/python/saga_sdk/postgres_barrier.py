"""The idempotency barrier on PostgreSQL, with psycopg 3 and its connection pools.

Needs the `postgresql` extra: `pip install 'saga-sdk[postgresql]'`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
from psycopg import sql as psql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from saga_sdk.barrier import (
    DEFAULT_TABLE,
    STATES,
    AsyncEffect,
    Barrier,
    BarrierKey,
    BarrierSql,
    Outcome,
    SqlSavepoints,
    SyncEffect,
    run_guarded,
    run_guarded_async,
)
from saga_sdk.retention import EndedSagas, check_window, chunks, ended_among
from saga_sdk.sqlite_barrier import check_identifier

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state      TEXT NOT NULL CONSTRAINT {table}_state_check CHECK (state IN ({states})),
    output     BYTEA,
    reason     TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, operation, request_id)
)
"""


def schema(table: str) -> str:
    """The barrier table's CREATE statement (IF NOT EXISTS) for `table`."""
    return _SCHEMA.format(table=table, states=", ".join(f"'{state}'" for state in STATES))


_STATE_CHECKS = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = to_regclass(%s) AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%%state%%'
"""


def ensure_schema(connection: psycopg.Connection[Any], table: str) -> None:
    """Create the barrier table when missing, and upgrade one that predates a row state, in
    the connection's current transaction (the caller commits).

    The first check is one cheap query; only a missing or outdated table takes the advisory
    lock that serialises participants starting together (concurrent CREATE TABLE IF NOT
    EXISTS can otherwise fail on PostgreSQL's catalog unique index).
    """
    if _schema_is_current(connection.execute(_STATE_CHECKS, (table,)).fetchall()):
        return
    connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
    connection.execute(_query(schema(table)))
    checks = connection.execute(_STATE_CHECKS, (table,)).fetchall()
    if not _schema_is_current(checks):
        states = psql.SQL(", ").join(psql.Literal(state) for state in STATES)
        for name, _ in checks:
            connection.execute(
                psql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    psql.Identifier(table), psql.Identifier(name)
                )
            )
        connection.execute(
            psql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (state IN ({}))").format(
                psql.Identifier(table), psql.Identifier(f"{table}_state_check"), states
            )
        )


def _schema_is_current(checks: list[tuple[Any, ...]]) -> bool:
    return len(checks) == 1 and all(f"'{state}'" in checks[0][1] for state in STATES)


def prune_rows(
    connection: psycopg.Connection[Any],
    table: str,
    older_than: timedelta,
    *,
    dry_run: bool,
    ended: EndedSagas | None = None,
) -> int:
    """Delete (or with `dry_run` count) the rows first seen more than `older_than` ago; with
    `ended`, only those of the sagas it says have ended (asked before anything is deleted)."""
    check_window(older_than)
    old = "created_at < now() - %s"
    if ended is None:
        return _pruned(connection, f"FROM {table} WHERE {old}", (older_than,), dry_run)
    count = 0
    for chunk in chunks(ended_among(old_saga_ids(connection, table, older_than), ended)):
        where = f"FROM {table} WHERE {old} AND saga_id = ANY(%s)"
        count += _pruned(connection, where, (older_than, chunk), dry_run)
    return count


def old_saga_ids(
    connection: psycopg.Connection[Any], table: str, older_than: timedelta
) -> list[str]:
    """The sagas with rows first seen more than `older_than` ago."""
    rows = connection.execute(
        _query(f"SELECT DISTINCT saga_id FROM {table} WHERE created_at < now() - %s"),
        (older_than,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def _pruned(
    connection: psycopg.Connection[Any], where: str, params: tuple[Any, ...], dry_run: bool
) -> int:
    if dry_run:
        row = connection.execute(_query(f"SELECT count(*) {where}"), params).fetchone()
        return 0 if row is None else int(row[0])
    return connection.execute(_query(f"DELETE {where}"), params).rowcount


def _query(sql: str) -> LiteralString:
    # The only text interpolated into the barrier's SQL is its table name, checked to be a
    # plain identifier; every value travels as a bound parameter.
    return sql


class PostgresBarrier(Barrier):
    """The barrier in a PostgreSQL database, next to the participant's business tables.

    `conninfo` is a libpq connection string or URL. Blocking effects (`run`) receive a
    `psycopg.Connection` and coroutine effects (`run_async`) a `psycopg.AsyncConnection`, each
    inside an open transaction: write the business rows on it and never commit it.

    A call first inserts its barrier row (`INSERT ... ON CONFLICT DO NOTHING`): a concurrent
    duplicate blocks on that row's lock until the first call commits, then reads its answer.
    Connections come from a pool of at most `max_size` per flavour (sync and async), opened on
    first use; `close()` / `aclose()` release them.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = DEFAULT_TABLE,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        self.conninfo = conninfo
        self.table = check_identifier(table)
        self._min_size = min_size
        self._max_size = max_size
        self._sql = BarrierSql.build(self.table, "%s")
        self._pool: ConnectionPool | None = None
        self._async_pool: AsyncConnectionPool | None = None
        self._lock = threading.Lock()
        self._async_lock: asyncio.Lock | None = None

    def migrate(self) -> None:
        """Create the barrier's table when it is missing (done by the first call anyway)."""
        with psycopg.connect(self.conninfo) as connection:
            _migrate(connection, self.table)

    def prune(
        self, older_than: timedelta, *, dry_run: bool = False, ended: EndedSagas | None = None
    ) -> int:
        """Delete the rows of calls first seen more than `older_than` ago; see `Barrier.prune`.

        Each statement commits on its own: no transaction stays open while `ended` asks."""
        check_window(older_than)
        with psycopg.connect(self.conninfo, autocommit=True) as connection:
            _migrate(connection, self.table)
            return prune_rows(connection, self.table, older_than, dry_run=dry_run, ended=ended)

    def run(self, key: BarrierKey, effect: SyncEffect) -> Outcome:
        """Apply `effect` once for `key`; see `Barrier.run`."""
        with self._sync_pool().connection() as connection:
            return run_guarded(_Session(connection), self._sql, key, effect)

    async def run_async(self, key: BarrierKey, effect: AsyncEffect) -> Outcome:
        """Apply the coroutine `effect` once for `key`; see `Barrier.run_async`."""
        pool = await self._aio_pool()
        async with pool.connection() as connection:
            return await run_guarded_async(_AsyncSession(connection), self._sql, key, effect)

    def close(self) -> None:
        """Close the blocking pool (the async one needs `aclose()`)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        """Close both pools."""
        pool, self._async_pool = self._async_pool, None
        if pool is not None:
            await pool.close()
        await asyncio.to_thread(self.close)

    def _sync_pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                self.migrate()
                pool: ConnectionPool = ConnectionPool(
                    self.conninfo, min_size=self._min_size, max_size=self._max_size, open=False
                )
                pool.open(wait=True)
                self._pool = pool
            return self._pool

    async def _aio_pool(self) -> AsyncConnectionPool:
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            if self._async_pool is None:
                # Schema work is rare and short: a blocking connection, off the event loop.
                await asyncio.to_thread(self.migrate)
                pool: AsyncConnectionPool = AsyncConnectionPool(
                    self.conninfo, min_size=self._min_size, max_size=self._max_size, open=False
                )
                await pool.open(wait=True)
                self._async_pool = pool
            return self._async_pool


def _migrate(connection: psycopg.Connection[Any], table: str) -> None:
    with connection.transaction():
        ensure_schema(connection, table)


class _Session(SqlSavepoints):
    """A psycopg connection as the barrier's rules drive it."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    @property
    def connection(self) -> Any:
        return self._connection

    def begin(self) -> None:
        # psycopg opens the transaction with the first statement; the barrier row's insert
        # is that statement, and its row lock is what orders concurrent duplicates.
        self._connection.autocommit = False

    def execute(self, sql: str, params: Sequence[object]) -> int:
        return self._connection.execute(_query(sql), params).rowcount

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        return self._connection.execute(_query(sql), params).fetchone()

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()


class _AsyncSession:
    """A psycopg async connection as the barrier's rules drive it."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    @property
    def connection(self) -> Any:
        return self._connection

    async def begin(self) -> None:
        await self._connection.set_autocommit(False)

    async def execute(self, sql: str, params: Sequence[object]) -> int:
        return (await self._connection.execute(_query(sql), params)).rowcount

    async def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        return await (await self._connection.execute(_query(sql), params)).fetchone()

    async def commit(self) -> None:
        await self._connection.commit()

    async def rollback(self) -> None:
        await self._connection.rollback()
