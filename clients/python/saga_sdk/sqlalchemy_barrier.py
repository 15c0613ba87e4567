"""The idempotency barrier on a SQLAlchemy session, so that an ORM-based service can adopt it.

Needs the `sqlalchemy` extra: `pip install 'saga-sdk[sqlalchemy]'`. Works with SQLite (the
standard driver) and PostgreSQL through psycopg 3 (`postgresql+psycopg://...`).

    engine = create_engine("postgresql+psycopg://app@db/accounts")
    participant = Participant("accounts", barrier=SqlAlchemyBarrier(sessionmaker(engine)))

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        ctx.tx.add(Account(id=f"acc-{ctx.saga_id}", owner=ctx.input["owner"]))  # a Session
        return {"account_id": f"acc-{ctx.saga_id}"}

Each call gets a new session from the factory, in a transaction that holds the barrier row
and the handler's ORM writes: they are flushed and committed together, or not at all. To join
a session that your code already has open, use `saga_sdk.transaction.run_in(session, ...)`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from sqlalchemy.orm import Session, SessionTransaction

from saga_sdk import sqlite_barrier
from saga_sdk.barrier import DEFAULT_TABLE, AsyncEffect, Barrier, BarrierKey, Outcome, SyncEffect
from saga_sdk.retention import EndedSagas, check_window, ended_among
from saga_sdk.sqlite_barrier import check_identifier
from saga_sdk.sqlite_barrier import ensure_schema as ensure_sqlite_schema


class SqlAlchemyBarrier(Barrier):
    """The barrier over sessions from `session_factory` (a `sessionmaker`, or any callable
    returning a new `Session`). Handlers get the call's `Session` as `ctx.tx`: add, change and
    delete objects on it, and never commit it.

    Handlers must be blocking functions (`def`): `run_async` refuses coroutine effects, since a
    blocking session cannot serve them.
    """

    def __init__(
        self, session_factory: Callable[[], Session], *, table: str = DEFAULT_TABLE
    ) -> None:
        self._factory = session_factory
        self.table = check_identifier(table)

    def run(self, key: BarrierKey, effect: SyncEffect) -> Outcome:
        """Apply `effect` once for `key`, in a new session's transaction; see `Barrier.run`."""
        from saga_sdk.transaction import run_in

        with self._factory() as session:
            return run_in(session, key, effect, table=self.table)

    async def run_async(self, key: BarrierKey, effect: AsyncEffect) -> Outcome:
        """Refused: declare the handler with `def`; it then runs in a worker thread."""
        raise TypeError(
            "SqlAlchemyBarrier runs blocking handlers only: declare the handler with def, "
            "not async def (it then runs in a worker thread)"
        )

    def prune(
        self, older_than: timedelta, *, dry_run: bool = False, ended: EndedSagas | None = None
    ) -> int:
        """Delete the rows of calls first seen more than `older_than` ago; see `Barrier.prune`.

        With `ended`, the sagas are asked about first, with no transaction open (on SQLite the
        barrier's transactions take the write lock, which every call would then wait for)."""
        check_window(older_than)
        if ended is not None:
            known = frozenset(ended_among(self._old_saga_ids(older_than), ended))
            ended = lambda saga_ids: known  # noqa: E731 - asked already, answered from memory
        with self._factory() as session:
            alchemy = SqlAlchemySession.of(session, self.table)
            alchemy.begin()
            try:
                driver = alchemy.driver_connection()
                count = _backend(driver).prune_rows(
                    driver, self.table, older_than, dry_run=dry_run, ended=ended
                )
                alchemy.commit()
                return count
            except BaseException:
                alchemy.rollback()
                raise

    def _old_saga_ids(self, older_than: timedelta) -> list[str]:
        """The sagas with old rows, read in a transaction that ends before they are asked about
        (a read: on SQLite it takes no write lock)."""
        with self._factory() as session:
            SqlAlchemySession.of(session, self.table)  # a supported driver, or TypeError
            driver: Any = session.connection().connection.driver_connection
            try:
                return _backend(driver).old_saga_ids(driver, self.table, older_than)
            finally:
                session.rollback()


class _Rows(NamedTuple):
    """A backend's statements on the barrier table, for a connection of its driver."""

    prune_rows: Callable[..., int]
    old_saga_ids: Callable[..., list[str]]


def _backend(driver: Any) -> _Rows:
    """The barrier-table statements that work on this driver's connection."""
    if isinstance(driver, sqlite3.Connection):
        return _Rows(sqlite_barrier.prune_rows, sqlite_barrier.old_saga_ids)
    from saga_sdk import postgres_barrier  # psycopg: only with the postgresql extra

    return _Rows(postgres_barrier.prune_rows, postgres_barrier.old_saga_ids)


class SqlAlchemySession:
    """A SQLAlchemy session as the barrier's rules drive it: joined to its open transaction
    through a nested one (a savepoint), or in a transaction of its own."""

    def __init__(self, session: Session, table: str, placeholder: str) -> None:
        self._session = session
        self._table = table
        self.placeholder = placeholder
        """The driver's positional parameter marker: "?" or "%s"."""
        self._call: SessionTransaction | None = None
        self._effect: SessionTransaction | None = None
        self._joined = False

    @classmethod
    def of(cls, session: Any, table: str) -> SqlAlchemySession:
        """Wrap `session`, checking that it is a Session on a supported driver."""
        if not isinstance(session, Session):
            raise TypeError(f"expected a sqlalchemy.orm.Session, not {type(session).__name__}")
        dialect = session.get_bind().dialect
        if dialect.name == "sqlite" and dialect.driver == "pysqlite":
            return cls(session, table, "?")
        if dialect.name == "postgresql" and dialect.driver == "psycopg":
            return cls(session, table, "%s")
        raise TypeError(
            "the barrier supports SQLAlchemy on SQLite (sqlite://) and on PostgreSQL through "
            f"psycopg 3 (postgresql+psycopg://), not {dialect.name}+{dialect.driver}"
        )

    @property
    def connection(self) -> Any:
        return self._session

    def driver_connection(self) -> Any:
        """The DB-API connection under the session's current transaction."""
        return self._session.connection().connection.driver_connection

    def begin(self) -> None:
        self._joined = self._session.in_transaction()
        if not self._joined:
            self._call = self._session.begin()
        driver = self.driver_connection()
        if isinstance(driver, sqlite3.Connection) and not driver.in_transaction:
            # The write lock first (see SqliteBarrier), and a transaction that a savepoint's
            # release cannot end: the driver would otherwise start one lazily.
            self._session.connection().exec_driver_sql("BEGIN IMMEDIATE")
        if self._joined:
            self._call = self._session.begin_nested()
        if isinstance(driver, sqlite3.Connection):
            ensure_sqlite_schema(driver, self._table)
        else:
            from saga_sdk.postgres_barrier import ensure_schema

            ensure_schema(driver, self._table)

    def execute(self, sql: str, params: Sequence[object]) -> int:
        result = self._session.connection().exec_driver_sql(sql, tuple(params))
        rowcount: int = result.rowcount
        return rowcount

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        row = self._session.connection().exec_driver_sql(sql, tuple(params)).fetchone()
        return None if row is None else tuple(row)

    def commit(self) -> None:
        assert self._call is not None
        self._call.commit()

    def rollback(self) -> None:
        if self._effect is not None and self._effect.is_active:
            self._effect.rollback()
        if self._call is not None and self._call.is_active:
            self._call.rollback()

    def savepoint(self) -> None:
        self._effect = self._session.begin_nested()

    def rollback_to_savepoint(self) -> None:
        assert self._effect is not None
        self._effect.rollback()

    def release_savepoint(self) -> None:
        # Committing the nested transaction flushes the objects the effect added or changed.
        assert self._effect is not None
        self._effect.commit()
