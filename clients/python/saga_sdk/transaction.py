"""Bring your own transaction: the barrier on a connection or session that your code already uses.

`run_in(tx, key, effect)` applies the barrier's rules (see `saga_sdk.barrier`) on `tx`, which is
one of:

- a `sqlite3.Connection`;
- a `psycopg.Connection` (psycopg 3);
- a SQLAlchemy `Session` (SQLite through the standard driver, or PostgreSQL through psycopg 3:
  `postgresql+psycopg://`); the effect gets the session and may use the ORM on it.

Two ways, chosen by the state of `tx`:

- **joined**: `tx` is inside a transaction (`with conn.transaction():`, `with session.begin():`,
  a sqlite3 connection after its first write or an explicit BEGIN). The barrier works inside a
  savepoint of that transaction and never commits it: the barrier row and the effect's writes
  (and whatever else your transaction wrote) commit or roll back together, when you commit or
  roll back. If your transaction rolls back, nothing of the call is remembered and its retry
  runs the effect again: that is as safe as a crash before the commit. A `Rejected` or
  `PermanentFailure` is stored in your transaction and then raised: commit anyway to keep it
  (the effect's own writes are already undone), or roll back and it is not remembered.
- **owned**: `tx` is idle. The barrier opens a transaction on it, commits it when the call is
  answered, and rolls it back on an error, exactly as `SqliteBarrier` / `PostgresBarrier` do
  with their own connections.

The barrier table is created in the same database when it is missing. On SQLite, open your
transaction with `BEGIN IMMEDIATE` (or make the barrier call the first write of it): a deferred
transaction that has read and then writes fails at once with SQLITE_BUSY under contention.
On PostgreSQL, a concurrent duplicate waits on the barrier row's lock until the first call's
transaction ends: commit promptly.

Only blocking connections are supported here; for asyncio use `SqliteBarrier` or
`PostgresBarrier`'s `run_async`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from saga_sdk.barrier import (
    DEFAULT_TABLE,
    BarrierKey,
    BarrierSql,
    Outcome,
    SqlSavepoints,
    SyncEffect,
    run_guarded,
)
from saga_sdk.sqlite_barrier import check_identifier
from saga_sdk.sqlite_barrier import ensure_schema as ensure_sqlite_schema

_CALL_SAVEPOINT = "saga_barrier_call"


def run_in(tx: Any, key: BarrierKey, effect: SyncEffect, *, table: str = DEFAULT_TABLE) -> Outcome:
    """Apply `effect` once for `key` on `tx` (see the module docstring): joined to its open
    transaction, or in one of its own. The effect gets `tx` itself.

    Raises `TypeError` for a `tx` of another kind, and `ValueError` for a psycopg connection
    whose transaction has already failed.
    """
    check_identifier(table)
    if isinstance(tx, sqlite3.Connection):
        return run_guarded(_SqliteSession(tx, table), BarrierSql.build(table, "?"), key, effect)
    module = type(tx).__module__
    if module.startswith("psycopg"):
        import psycopg

        if isinstance(tx, psycopg.Connection):
            session = _PsycopgSession(tx, table)
            return run_guarded(session, BarrierSql.build(table, "%s"), key, effect)
    if module.startswith("sqlalchemy"):
        from saga_sdk.sqlalchemy_barrier import SqlAlchemySession

        alchemy = SqlAlchemySession.of(tx, table)
        return run_guarded(alchemy, BarrierSql.build(table, alchemy.placeholder), key, effect)
    raise TypeError(
        "run_in takes a sqlite3.Connection, a psycopg.Connection or a SQLAlchemy Session, "
        f"not {type(tx).__module__}.{type(tx).__name__}"
    )


class _SqliteSession(SqlSavepoints):
    """A caller's sqlite3 connection: joined to its transaction, or in one of the barrier's."""

    def __init__(self, connection: sqlite3.Connection, table: str) -> None:
        self._connection = connection
        self._table = table
        self._joined = False

    @property
    def connection(self) -> Any:
        return self._connection

    def begin(self) -> None:
        self._joined = self._connection.in_transaction
        if self._joined:
            self._connection.execute(f"SAVEPOINT {_CALL_SAVEPOINT}")
        else:
            # IMMEDIATE takes the write lock now (see SqliteBarrier): the claim must wait for a
            # concurrent duplicate's commit, not fail.
            self._connection.execute("BEGIN IMMEDIATE")
        ensure_sqlite_schema(self._connection, self._table)

    def execute(self, sql: str, params: Sequence[object]) -> int:
        return self._connection.execute(sql, params).rowcount

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._connection.execute(sql, params).fetchone()
        return row

    def commit(self) -> None:
        self._connection.execute(
            f"RELEASE SAVEPOINT {_CALL_SAVEPOINT}" if self._joined else "COMMIT"
        )

    def rollback(self) -> None:
        if not self._connection.in_transaction:
            return
        if self._joined:
            self._connection.execute(f"ROLLBACK TO SAVEPOINT {_CALL_SAVEPOINT}")
            self._connection.execute(f"RELEASE SAVEPOINT {_CALL_SAVEPOINT}")
        else:
            self._connection.execute("ROLLBACK")


class _PsycopgSession(SqlSavepoints):
    """A caller's psycopg connection: joined to its transaction, or in one of the barrier's."""

    def __init__(self, connection: Any, table: str) -> None:
        self._connection = connection
        self._table = table
        self._joined = False
        self._explicit = False

    @property
    def connection(self) -> Any:
        return self._connection

    def begin(self) -> None:
        from psycopg import pq

        from saga_sdk.postgres_barrier import ensure_schema

        status = self._connection.info.transaction_status
        if status == pq.TransactionStatus.INERROR:
            raise ValueError(
                "the connection's transaction has failed: roll it back before calling the barrier"
            )
        if status not in (pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS):
            raise ValueError(f"the connection is not ready for the barrier: {status.name}")
        self._joined = status == pq.TransactionStatus.INTRANS
        if self._joined:
            self._connection.execute(f"SAVEPOINT {_CALL_SAVEPOINT}")
        elif self._connection.autocommit:
            # In autocommit mode each statement would commit alone: open a block explicitly.
            self._explicit = True
            self._connection.execute("BEGIN")
        ensure_schema(self._connection, self._table)

    def execute(self, sql: str, params: Sequence[object]) -> int:
        rowcount: int = self._connection.execute(sql, params).rowcount
        return rowcount

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._connection.execute(sql, params).fetchone()
        return row

    def commit(self) -> None:
        if self._joined:
            self._connection.execute(f"RELEASE SAVEPOINT {_CALL_SAVEPOINT}")
        elif self._explicit:
            self._connection.execute("COMMIT")
        else:
            self._connection.commit()

    def rollback(self) -> None:
        if self._joined:
            self._connection.execute(f"ROLLBACK TO SAVEPOINT {_CALL_SAVEPOINT}")
            self._connection.execute(f"RELEASE SAVEPOINT {_CALL_SAVEPOINT}")
        elif self._explicit:
            self._connection.execute("ROLLBACK")
        else:
            self._connection.rollback()
