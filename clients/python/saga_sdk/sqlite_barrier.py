"""The idempotency barrier on a SQLite file, with the standard library's sqlite3."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

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

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    saga_id    TEXT NOT NULL,
    step       TEXT NOT NULL,
    operation  TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ({states})),
    output     BLOB,
    reason     TEXT NOT NULL DEFAULT '',
    message    TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, operation, request_id)
) STRICT
"""


_COLUMNS = "saga_id, step, operation, request_id, state, output, reason, message, created_at"


def schema(table: str) -> str:
    """The barrier table's CREATE statement (IF NOT EXISTS) for `table`."""
    return _SCHEMA.format(table=table, states=", ".join(f"'{state}'" for state in STATES))


def ensure_schema(connection: sqlite3.Connection, table: str) -> None:
    """Create the barrier table when missing, and upgrade one that predates a row state.

    Runs in the connection's open transaction when it has one (the caller commits), else in a
    transaction of its own.
    """
    row = connection.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if row is not None and all(f"'{state}'" in row[0] for state in STATES):
        return
    own = not connection.in_transaction
    if own:
        connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(schema(table))
        row = connection.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        if not all(f"'{state}'" in row[0] for state in STATES):
            # SQLite cannot alter a CHECK constraint: copy the rows into a table built anew.
            connection.execute(f"ALTER TABLE {table} RENAME TO {table}_upgrading")
            connection.execute(schema(table))
            connection.execute(
                f"INSERT INTO {table} ({_COLUMNS}) SELECT {_COLUMNS} FROM {table}_upgrading"
            )
            connection.execute(f"DROP TABLE {table}_upgrading")
        if own:
            connection.execute("COMMIT")
    except BaseException:
        if own and connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def prune_rows(
    connection: sqlite3.Connection,
    table: str,
    older_than: timedelta,
    *,
    dry_run: bool,
    ended: EndedSagas | None = None,
) -> int:
    """Delete (or with `dry_run` count) the rows first seen more than `older_than` ago; with
    `ended`, only those of the sagas it says have ended (asked before anything is deleted)."""
    check_window(older_than)
    old, age = _old(older_than)
    verb = "SELECT count(*)" if dry_run else "DELETE"
    if ended is None:
        return _counted(connection.execute(f"{verb} FROM {table} WHERE {old}", age), dry_run)
    count = 0
    for chunk in chunks(ended_among(old_saga_ids(connection, table, older_than), ended)):
        marks = ", ".join("?" for _ in chunk)
        cursor = connection.execute(
            f"{verb} FROM {table} WHERE {old} AND saga_id IN ({marks})", (*age, *chunk)
        )
        count += _counted(cursor, dry_run)
    return count


def old_saga_ids(connection: sqlite3.Connection, table: str, older_than: timedelta) -> list[str]:
    """The sagas with rows first seen more than `older_than` ago."""
    old, age = _old(older_than)
    rows = connection.execute(f"SELECT DISTINCT saga_id FROM {table} WHERE {old}", age)
    return [str(row[0]) for row in rows.fetchall()]


def _old(older_than: timedelta) -> tuple[str, tuple[str]]:
    old = "created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)"
    return old, (f"-{older_than.total_seconds():.3f} seconds",)


def _counted(cursor: sqlite3.Cursor, dry_run: bool) -> int:
    return int(cursor.fetchone()[0]) if dry_run else cursor.rowcount


def check_identifier(table: str) -> str:
    """Return `table` when it is a plain SQL identifier; the name is put into SQL text."""
    if not _IDENTIFIER.match(table):
        raise ValueError(f"not a plain SQL identifier: {table!r}")
    return table


class SqliteBarrier(Barrier):
    """The barrier in a SQLite database file, next to the participant's business tables.

    Effects receive a `sqlite3.Connection` inside an open transaction: write the business rows
    on it and never commit it. Each call takes SQLite's write lock first (`BEGIN IMMEDIATE`),
    so calls on one file run one at a time and concurrent duplicates simply queue; `timeout`
    bounds the wait for that lock, in seconds.

    Async effects get the same kind of connection: there is no asyncio driver in the standard
    library, so the barrier waits for the lock in a worker thread (one at a time per barrier;
    other coroutines queue on an asyncio lock), and the effect's own short, local statements
    and the commit run on the event loop.

    The database is put in WAL mode, and `synchronous` (FULL by default) is set on every
    connection, so that an answered call is on disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = DEFAULT_TABLE,
        timeout: float = 30.0,
        synchronous: str = "FULL",
    ) -> None:
        self.path = os.fspath(path)
        self.table = check_identifier(table)
        self._timeout = timeout
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"unknown synchronous mode: {synchronous!r}")
        self._synchronous = synchronous.upper()
        self._sql = BarrierSql.build(self.table, "?")
        self._migrated = False
        self._migrate_lock = threading.Lock()
        self._loop_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def connect(self) -> sqlite3.Connection:
        """Open a connection configured as the barrier's own (autocommit, WAL, busy timeout).

        Use it to create the business tables or to read them; the barrier's table exists once
        this returns.
        """
        connection = self._open()
        self.migrate(connection)
        return connection

    def migrate(self, connection: sqlite3.Connection | None = None) -> None:
        """Create the barrier's table when it is missing (done by the first call anyway)."""
        with self._migrate_lock:
            if self._migrated:
                return
            own = connection is None
            conn = self._open() if connection is None else connection
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                ensure_schema(conn, self.table)
            finally:
                if own:
                    conn.close()
            self._migrated = True

    def run(self, key: BarrierKey, effect: SyncEffect) -> Outcome:
        """Apply `effect` once for `key`; see `Barrier.run`."""
        connection = self.connect()
        try:
            return run_guarded(_Session(connection), self._sql, key, effect)
        finally:
            connection.close()

    def prune(
        self, older_than: timedelta, *, dry_run: bool = False, ended: EndedSagas | None = None
    ) -> int:
        """Delete the rows of calls first seen more than `older_than` ago; see `Barrier.prune`."""
        check_window(older_than)
        connection = self.connect()
        try:
            return prune_rows(connection, self.table, older_than, dry_run=dry_run, ended=ended)
        finally:
            connection.close()

    async def run_async(self, key: BarrierKey, effect: AsyncEffect) -> Outcome:
        """Apply the coroutine `effect` once for `key`; see `Barrier.run_async`."""
        async with self._async_lock():
            connection = await asyncio.to_thread(self.connect)
            try:
                return await run_guarded_async(_AsyncSession(connection), self._sql, key, effect)
            finally:
                connection.close()

    def _async_lock(self) -> asyncio.Lock:
        # Calls of one process on one file run one at a time anyway; queueing coroutines here
        # rather than in BEGIN IMMEDIATE keeps them from filling the worker threads.
        loop = asyncio.get_running_loop()
        if self._loop_lock is None or self._loop_lock[0] is not loop:
            self._loop_lock = (loop, asyncio.Lock())
        return self._loop_lock[1]

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: the barrier issues BEGIN IMMEDIATE / COMMIT itself, and
        # check_same_thread=False: an async call begins and commits in worker threads.
        connection = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        return connection


class _Session(SqlSavepoints):
    """A sqlite3 connection as the barrier's rules drive it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    @property
    def connection(self) -> Any:
        return self._connection

    def begin(self) -> None:
        # IMMEDIATE takes the write lock now, waiting up to the busy timeout: a deferred
        # transaction that reads and then writes would fail at once with SQLITE_BUSY.
        self._connection.execute("BEGIN IMMEDIATE")

    def execute(self, sql: str, params: Sequence[object]) -> int:
        return self._connection.execute(sql, params).rowcount

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._connection.execute(sql, params).fetchone()
        return row

    def commit(self) -> None:
        self._connection.execute("COMMIT")

    def rollback(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


class _AsyncSession:
    """A sqlite3 connection driven from asyncio: the wait for the lock runs in a thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._sync = _Session(connection)

    @property
    def connection(self) -> Any:
        return self._sync.connection

    async def begin(self) -> None:
        await asyncio.to_thread(self._sync.begin)

    async def execute(self, sql: str, params: Sequence[object]) -> int:
        # The write lock is held: local statements are short and need no thread.
        return self._sync.execute(sql, params)

    async def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        return self._sync.fetch(sql, params)

    async def commit(self) -> None:
        # On the loop, not in a worker thread: while this call holds the write lock, every
        # worker thread may be busy waiting for that very lock.
        self._sync.commit()

    async def rollback(self) -> None:
        # Synchronous on purpose: it runs while a cancellation unwinds, and it is quick.
        self._sync.rollback()
