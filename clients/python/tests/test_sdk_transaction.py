"""The barrier joining the caller's own connection or session (`run_in`), and SqlAlchemyBarrier:
sqlite3, psycopg and SQLAlchemy sessions, on SQLite files and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from saga_sdk import PermanentFailure, Rejected
from saga_sdk.barrier import BarrierKey, Operation, OutcomeKind
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.sqlalchemy_barrier import SqlAlchemyBarrier
from saga_sdk.testing import HandlerKit
from saga_sdk.transaction import run_in


class Base(DeclarativeBase):
    pass


class Effect(Base):
    """One business effect, written through the ORM."""

    __tablename__ = "effects"
    id: Mapped[int] = mapped_column(primary_key=True)
    what: Mapped[str] = mapped_column(String(100))


def execute_key() -> BarrierKey:
    return BarrierKey(uuid.uuid4().hex, "debit", Operation.EXECUTE, uuid.uuid4().hex)


class Database(ABC):
    """One kind of connection the caller brings, on one database."""

    @abstractmethod
    def open(self) -> Any:
        """A new, idle connection or session."""

    @abstractmethod
    def transaction(self, tx: Any) -> AbstractContextManager[None]:
        """The caller's own transaction on `tx`: committed on exit, rolled back on an error."""

    @abstractmethod
    def write(self, tx: Any, what: str) -> None:
        """Write one business effect on `tx`."""

    @abstractmethod
    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run `sql` on a connection of its own."""

    def close(self, tx: Any) -> None:
        tx.close()

    def effects(self) -> list[str]:
        return [r[0] for r in self.query("SELECT what FROM effects ORDER BY id")]

    def barrier_rows(self) -> int:
        """Committed barrier rows (0 while the table itself is not committed yet)."""
        try:
            return int(self.query("SELECT count(*) FROM saga_barrier")[0][0])
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            return 0
        except Exception as error:  # SQLAlchemy wraps the driver's error
            if "saga_barrier" in str(error):
                return 0
            raise


class Sqlite3Database(Database):
    def __init__(self, path: Path) -> None:
        self.path = path
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("CREATE TABLE effects (id INTEGER PRIMARY KEY, what TEXT)")

    def open(self) -> Any:
        return sqlite3.connect(self.path, timeout=30, check_same_thread=False)

    @contextmanager
    def transaction(self, tx: Any) -> Iterator[None]:
        tx.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            tx.rollback()
            raise
        tx.commit()

    def write(self, tx: Any, what: str) -> None:
        tx.execute("INSERT INTO effects (what) VALUES (?)", (what,))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as db:
            return db.execute(sql).fetchall()


class PsycopgDatabase(Database):
    def __init__(self, url: str) -> None:
        self.url = url
        with psycopg.connect(url) as db:
            db.execute("CREATE TABLE effects (id SERIAL PRIMARY KEY, what TEXT)")

    def open(self) -> Any:
        return psycopg.connect(self.url)

    @contextmanager
    def transaction(self, tx: Any) -> Iterator[None]:
        with tx.transaction():
            yield

    def write(self, tx: Any, what: str) -> None:
        tx.execute("INSERT INTO effects (what) VALUES (%s)", (what,))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as db:
            return db.execute(sql).fetchall()


class AlchemyDatabase(Database):
    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine)

    def open(self) -> Any:
        return self.sessions()

    @contextmanager
    def transaction(self, tx: Any) -> Iterator[None]:
        with tx.begin():
            yield

    def write(self, tx: Any, what: str) -> None:
        tx.add(Effect(what=what))  # flushed by the barrier, committed with its row

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with self.engine.connect() as db:
            return [tuple(r) for r in db.exec_driver_sql(sql).fetchall()]

    def effects(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(Effect.what).order_by(Effect.id)))


KINDS = ["sqlite3", "psycopg", "sqlalchemy-sqlite", "sqlalchemy-postgresql"]


@pytest.fixture(params=KINDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    kind: str = request.param
    if kind == "sqlite3":
        yield Sqlite3Database(tmp_path / "service.db")
    elif kind == "sqlalchemy-sqlite":
        alchemy = AlchemyDatabase(f"sqlite:///{tmp_path / 'service.db'}")
        yield alchemy
        alchemy.engine.dispose()
    else:
        url = request.getfixturevalue("postgres_url")
        if kind == "psycopg":
            yield PsycopgDatabase(url)
        else:
            alchemy = AlchemyDatabase(url.replace("postgresql://", "postgresql+psycopg://", 1))
            yield alchemy
            alchemy.engine.dispose()


def write_effect(database: Database, what: str, output: bytes = b"") -> Any:
    def effect(tx: Any) -> bytes:
        database.write(tx, what)
        return output or what.encode()

    return effect


def never(tx: Any) -> bytes:
    raise AssertionError("the barrier ran an effect it must not run")


def test_joined_the_effect_and_the_barrier_row_commit_with_the_callers_writes(
    database: Database,
) -> None:
    key = execute_key()
    tx = database.open()
    try:
        with database.transaction(tx):
            database.write(tx, "before")
            first = run_in(tx, key, write_effect(database, "debit"))
            database.write(tx, "after")
            assert database.barrier_rows() == 0  # nothing is visible before the caller commits
    finally:
        database.close(tx)
    other = database.open()
    try:
        again = run_in(other, key, never)  # idle: the barrier owns this transaction
    finally:
        database.close(other)

    assert first.kind is OutcomeKind.APPLIED
    assert (again.kind, again.output) == (OutcomeKind.REPLAYED, b"debit")
    assert database.effects() == ["before", "debit", "after"]
    assert database.barrier_rows() == 1


def test_joined_a_rolled_back_caller_takes_the_barrier_row_along_and_the_retry_applies(
    database: Database,
) -> None:
    key = execute_key()
    tx = database.open()
    try:

        def fail_after_the_call() -> None:
            with database.transaction(tx):
                run_in(tx, key, write_effect(database, "lost"))
                raise RuntimeError("the caller fails later")

        with pytest.raises(RuntimeError, match="the caller fails later"):
            fail_after_the_call()
        assert database.barrier_rows() == 0
        retried = run_in(tx, key, write_effect(database, "debit"))
    finally:
        database.close(tx)

    assert retried.kind is OutcomeKind.APPLIED
    assert database.effects() == ["debit"]


def test_joined_a_refusal_undoes_only_the_effect_and_is_kept_when_the_caller_commits(
    database: Database,
) -> None:
    rejected, failed = execute_key(), execute_key()

    def refuse(tx: Any) -> bytes:
        database.write(tx, "half-done")
        raise Rejected("NO_FUNDS", "balance too low")

    def give_up(tx: Any) -> bytes:
        database.write(tx, "half-done")
        raise PermanentFailure("unknown currency", reason="CURRENCY_UNSUPPORTED")

    tx = database.open()
    try:
        with database.transaction(tx):
            database.write(tx, "before")
            with pytest.raises(Rejected):
                run_in(tx, rejected, refuse)
            with pytest.raises(PermanentFailure):
                run_in(tx, failed, give_up)
        with pytest.raises(Rejected) as replayed:
            run_in(tx, rejected, never)
        with pytest.raises(PermanentFailure):
            run_in(tx, failed, never)
    finally:
        database.close(tx)

    assert replayed.value.reason == "NO_FUNDS"
    assert database.effects() == ["before"]


def test_owned_an_idle_connection_gets_a_committed_call_and_is_left_idle(
    database: Database,
) -> None:
    key = execute_key()
    tx = database.open()
    try:
        outcome = run_in(tx, key, write_effect(database, "debit"))
        seen_elsewhere = database.effects()
        with database.transaction(tx):  # idle again: a transaction of the caller's can begin
            database.write(tx, "next")
    finally:
        database.close(tx)

    assert outcome.kind is OutcomeKind.APPLIED
    assert seen_elsewhere == ["debit"]
    assert database.effects() == ["debit", "next"]


def test_joined_concurrent_duplicates_apply_once(database: Database) -> None:
    key = execute_key()
    copies = 6
    start = threading.Barrier(copies)
    outcomes: list[tuple[OutcomeKind, bytes]] = []
    errors: list[BaseException] = []

    def slow(tx: Any) -> bytes:
        database.write(tx, "debit")
        time.sleep(0.2)  # hold the transaction while the duplicates arrive
        return uuid.uuid4().bytes

    def call() -> None:
        tx = database.open()
        try:
            start.wait()
            with database.transaction(tx):
                outcome = run_in(tx, key, slow)
            outcomes.append((outcome.kind, outcome.output))
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            database.close(tx)

    threads = [threading.Thread(target=call) for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert sorted(kind for kind, _ in outcomes) == [OutcomeKind.APPLIED] + [
        OutcomeKind.REPLAYED
    ] * (copies - 1)
    assert len({output for _, output in outcomes}) == 1
    assert database.effects() == ["debit"]


def test_a_connection_of_another_kind_is_refused() -> None:
    with pytest.raises(
        TypeError, match=r"sqlite3\.Connection, a psycopg\.Connection or a SQLAlchemy"
    ):
        run_in(object(), execute_key(), never)


def test_a_psycopg_connection_whose_transaction_failed_is_refused(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as tx:
        with pytest.raises(psycopg.errors.UndefinedTable):
            tx.execute("SELECT * FROM nowhere")
        with pytest.raises(ValueError, match="roll it back"):
            run_in(tx, execute_key(), never)


def test_sqlalchemy_barrier_runs_orm_effects_and_refuses_coroutines(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'orm.db'}")
    Base.metadata.create_all(engine)
    barrier = SqlAlchemyBarrier(sessionmaker(engine))
    key = execute_key()

    def open_account(session: Any) -> bytes:
        assert isinstance(session, Session)
        session.add(Effect(what="debit"))
        return b"ok"

    first = barrier.run(key, open_account)
    again = barrier.run(key, never)

    async def coroutine(tx: Any) -> bytes:
        return b""

    with pytest.raises(TypeError, match="declare the handler with def"):
        asyncio.run(barrier.run_async(execute_key(), coroutine))
    with Session(engine) as session:
        count = session.scalar(select(func.count()).select_from(Effect))
    engine.dispose()

    assert (first.kind, again.kind) == (OutcomeKind.APPLIED, OutcomeKind.REPLAYED)
    assert count == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_orm_participant_on_sqlalchemy_barrier_is_safe_to_retry(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'orm.db'}"
    else:
        url = request.getfixturevalue("postgres_url").replace(
            "postgresql://", "postgresql+psycopg://"
        )
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    participant = Participant("accounts", barrier=SqlAlchemyBarrier(sessionmaker(engine)))

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        ctx.tx.add(Effect(what=f"{ctx.saga_id}:open"))
        return {"account": f"acc-{ctx.saga_id}"}

    @participant.compensation("CloseAccount")
    def close_account(ctx: CompensateContext) -> None:
        ctx.tx.add(Effect(what=f"{ctx.saga_id}:close"))

    def state(saga_id: str) -> list[str]:
        with Session(engine) as session:
            query = select(Effect.what).where(Effect.what.startswith(f"{saga_id}:"))
            return list(session.scalars(query.order_by(Effect.id)))

    try:
        with HandlerKit(participant) as kit:
            findings = kit.check("OpenAccount", "CloseAccount", {}, state=state)
    finally:
        engine.dispose()

    assert all(f.passed for f in findings), findings


def test_owned_on_a_psycopg_connection_in_autocommit_mode_is_one_transaction(
    postgres_url: str,
) -> None:
    database = PsycopgDatabase(postgres_url)
    key = execute_key()

    def write_then_crash(tx: Any) -> bytes:
        database.write(tx, "half-done")
        raise RuntimeError("boom")

    with psycopg.connect(postgres_url, autocommit=True) as tx:
        with pytest.raises(RuntimeError, match="boom"):
            run_in(tx, key, write_then_crash)
        applied = run_in(tx, key, write_effect(database, "debit"))
        replayed = run_in(tx, key, never)

    assert (applied.kind, replayed.kind) == (OutcomeKind.APPLIED, OutcomeKind.REPLAYED)
    assert database.effects() == ["debit"]
