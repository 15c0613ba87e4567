"""Barrier retention (prune, and the saga-barrier command) and the upgrade of older tables,
on SQLite files and a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from saga_sdk import ExecuteAfterCompensate, PermanentFailure, retention
from saga_sdk.barrier import Barrier, BarrierKey, Operation, OutcomeKind
from saga_sdk.postgres_barrier import PostgresBarrier
from saga_sdk.retention import MINIMUM_RETENTION, parse_window
from saga_sdk.sqlalchemy_barrier import SqlAlchemyBarrier
from saga_sdk.sqlite_barrier import SqliteBarrier

WINDOW = timedelta(days=30)
WEEKS = ("--older-than", "30d")

# The table as the first release of the SDK created it: no 'failed' state.
OLD_SQLITE_TABLE = """
CREATE TABLE saga_barrier (
    saga_id TEXT NOT NULL, step TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'blocked')),
    output BLOB, reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (saga_id, step, operation, request_id)
) STRICT
"""
OLD_POSTGRES_TABLE = """
CREATE TABLE saga_barrier (
    saga_id TEXT NOT NULL, step TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('execute', 'compensate')),
    request_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected', 'blocked')),
    output BYTEA, reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, operation, request_id)
)
"""


def execute_key() -> BarrierKey:
    return BarrierKey(uuid.uuid4().hex, "debit", Operation.EXECUTE, uuid.uuid4().hex)


def compensate_key(execute: BarrierKey) -> BarrierKey:
    return BarrierKey(
        execute.saga_id, execute.step, Operation.COMPENSATE, uuid.uuid4().hex, execute.request_id
    )


class RetentionContract(ABC):
    """Pruning on every backend. A subclass builds the barrier and ages rows by hand."""

    @abstractmethod
    def age(self, saga_id: str, by: timedelta) -> None:
        """Make the barrier rows of `saga_id` look `by` older than they are."""

    @abstractmethod
    def rows(self) -> int:
        """How many barrier rows there are."""

    @abstractmethod
    def database_url(self) -> str:
        """The URL that the saga-barrier command takes."""

    def assert_writable(self) -> None:  # noqa: B027 - PostgreSQL has no such lock to check
        """Fail when another writer would have to wait for the database now."""

    def effect(self, applied: list[str], what: str) -> Any:
        def apply(tx: Any) -> bytes:
            applied.append(what)
            return what.encode()

        return apply

    def test_a_window_below_the_minimum_is_refused(self, barrier: Barrier) -> None:
        with pytest.raises(ValueError, match="shorter than the minimum of 7 days"):
            barrier.prune(MINIMUM_RETENTION - timedelta(seconds=1))
        with pytest.raises(TypeError, match="timedelta"):
            barrier.prune(30)  # type: ignore[arg-type]

    def test_prune_deletes_old_rows_and_a_late_duplicate_within_the_window_is_absorbed(
        self, barrier: Barrier
    ) -> None:
        applied: list[str] = []
        old, recent, hanging = execute_key(), execute_key(), execute_key()
        barrier.run(old, self.effect(applied, "old"))
        barrier.run(recent, self.effect(applied, "recent"))
        barrier.run(compensate_key(hanging), self.effect(applied, "never"))  # a null compensation
        self.age(old.saga_id, WINDOW + timedelta(days=1))
        self.age(recent.saga_id, WINDOW - timedelta(days=1))
        self.age(hanging.saga_id, WINDOW - timedelta(days=1))

        counted = barrier.prune(WINDOW, dry_run=True)
        rows_before = self.rows()
        deleted = barrier.prune(WINDOW)
        duplicate = barrier.run(recent, self.effect(applied, "recent again"))
        with pytest.raises(ExecuteAfterCompensate):
            barrier.run(hanging, self.effect(applied, "hanging"))

        assert (counted, deleted) == (1, 1)
        assert rows_before == 4  # the old and recent Executes, the Compensate and its marker
        assert duplicate.kind is OutcomeKind.REPLAYED
        assert duplicate.output == b"recent"
        assert applied == ["old", "recent"]
        assert self.rows() == 3

    def test_with_ended_only_the_old_rows_of_ended_sagas_go(
        self, barrier: Barrier, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(retention, "LOOKUP_CHUNK", 2)  # several chunks, asked and deleted
        finished = [execute_key() for _ in range(3)]
        parked, recent = execute_key(), execute_key()
        for key in [*finished, parked, recent]:
            barrier.run(key, lambda tx: b"x")
            if key is not recent:
                self.age(key.saga_id, WINDOW + timedelta(days=1))
        asked: list[list[str]] = []

        def ended(saga_ids: list[str]) -> list[str]:
            self.assert_writable()  # asking the coordinator holds up no participant's call
            asked.append(saga_ids)
            # Every saga but the parked one has ended; and one it was not asked about.
            return [s for s in saga_ids if s != parked.saga_id] + [recent.saga_id]

        counted = barrier.prune(WINDOW, dry_run=True, ended=ended)
        asked_first = sorted(s for chunk in asked for s in chunk)
        deleted = barrier.prune(WINDOW, ended=ended)

        assert (counted, deleted) == (3, 3)
        assert all(len(chunk) <= 2 for chunk in asked)
        # Only the old rows' sagas are asked about; the recent one is kept though "ended".
        assert asked_first == sorted([k.saga_id for k in finished] + [parked.saga_id])
        assert self.rows() == 2
        assert barrier.run(parked, lambda tx: b"again").kind is OutcomeKind.REPLAYED

    def test_an_ended_lookup_that_fails_deletes_nothing(self, barrier: Barrier) -> None:
        key = execute_key()
        barrier.run(key, lambda tx: b"x")
        self.age(key.saga_id, WINDOW + timedelta(days=1))

        def unreachable(saga_ids: list[str]) -> list[str]:
            raise ConnectionError("the coordinator is down")

        with pytest.raises(ConnectionError):
            barrier.prune(WINDOW, ended=unreachable)
        assert self.rows() == 1

    def test_the_command_prunes_and_refuses_a_short_window(self, barrier: Barrier) -> None:
        key = execute_key()
        barrier.run(key, lambda tx: b"x")
        self.age(key.saga_id, timedelta(days=40))
        command = [sys.executable, "-m", "saga_sdk.retention", "prune"]
        database = ["--database", self.database_url()]

        dry = subprocess.run(
            [*command, *database, "--older-than", "30d", "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        pruned = subprocess.run(
            [*command, *database, "--older-than", "30d"], capture_output=True, text=True, timeout=60
        )
        short = subprocess.run(
            [*command, *database, "--older-than", "36h"], capture_output=True, text=True, timeout=60
        )

        assert (dry.returncode, dry.stdout.strip()) == (
            0,
            "would delete 1 barrier row(s) older than 30d",
        )
        assert (pruned.returncode, pruned.stdout.strip()) == (
            0,
            "deleted 1 barrier row(s) older than 30d",
        )
        assert short.returncode == 2
        assert "shorter than the minimum of 7 days" in short.stderr
        assert self.rows() == 0


class TestSqliteRetention(RetentionContract):
    @pytest.fixture
    def barrier(self, tmp_path: Path) -> Iterator[Barrier]:
        self.path = tmp_path / "participant.db"
        barrier = SqliteBarrier(self.path)
        yield barrier
        barrier.close()

    def age(self, saga_id: str, by: timedelta) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute(
                "UPDATE saga_barrier SET created_at = "
                "strftime('%Y-%m-%dT%H:%M:%fZ', created_at, ?) WHERE saga_id = ?",
                (f"-{by.total_seconds()} seconds", saga_id),
            )

    def rows(self) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT count(*) FROM saga_barrier").fetchone()[0])

    def database_url(self) -> str:
        return f"sqlite:///{self.path}"

    def assert_writable(self) -> None:
        with sqlite3.connect(self.path, timeout=0.5, isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")  # "database is locked" while a prune holds the lock
            db.execute("ROLLBACK")


class TestSqlAlchemySqliteRetention(TestSqliteRetention):
    @pytest.fixture
    def barrier(self, tmp_path: Path) -> Iterator[Barrier]:
        self.path = tmp_path / "participant.db"
        engine = create_engine(f"sqlite:///{self.path}")
        yield SqlAlchemyBarrier(sessionmaker(engine))
        engine.dispose()


class TestPostgresRetention(RetentionContract):
    @pytest.fixture
    async def barrier(self, postgres_url: str) -> AsyncIterator[Barrier]:
        self.url = postgres_url
        barrier = PostgresBarrier(postgres_url, max_size=4)
        yield barrier
        await barrier.aclose()

    def age(self, saga_id: str, by: timedelta) -> None:
        with psycopg.connect(self.url) as db:
            db.execute(
                "UPDATE saga_barrier SET created_at = created_at - %s WHERE saga_id = %s",
                (by, saga_id),
            )

    def rows(self) -> int:
        with psycopg.connect(self.url) as db:
            row = db.execute("SELECT count(*) FROM saga_barrier").fetchone()
            assert row is not None
            return int(row[0])

    def database_url(self) -> str:
        return self.url


def test_windows_are_read_with_their_unit() -> None:
    assert parse_window("30d") == timedelta(days=30)
    assert parse_window("8w") == timedelta(weeks=8)
    assert parse_window("240h") == timedelta(hours=240)
    with pytest.raises(ValueError, match="30d"):
        parse_window("30")


def test_the_command_refuses_a_sqlite_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    done = subprocess.run(
        [sys.executable, "-m", "saga_sdk.retention", "prune", "--database", str(missing), *WEEKS],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert "no SQLite database" in done.stderr
    assert not missing.exists()


def test_the_command_creates_no_table_in_a_database_without_one(
    tmp_path: Path, postgres_url: str
) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE accounts (id TEXT)")
    command = [sys.executable, "-m", "saga_sdk.retention", "prune", *WEEKS, "--dry-run"]

    for database in (f"sqlite:///{other}", postgres_url):
        done = subprocess.run(
            [*command, "--database", database], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, database
        assert "no barrier table 'saga_barrier'" in done.stderr, database

    with sqlite3.connect(other) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["accounts"]
    with psycopg.connect(postgres_url) as db:
        found = db.execute("SELECT to_regclass('saga_barrier')").fetchone()
        assert found is not None
        assert found[0] is None


def test_a_sqlite_table_of_the_first_release_is_upgraded_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    kept = execute_key()
    with sqlite3.connect(path) as db:
        db.execute(OLD_SQLITE_TABLE)
        db.execute(
            "INSERT INTO saga_barrier (saga_id, step, operation, request_id, state, output) "
            "VALUES (?, ?, 'execute', ?, 'done', ?)",
            (kept.saga_id, kept.step, kept.request_id, b"first"),
        )
    barrier = SqliteBarrier(path)
    failed = execute_key()

    def give_up(tx: Any) -> bytes:
        raise PermanentFailure("never", reason="NEVER")

    with pytest.raises(PermanentFailure):
        barrier.run(failed, give_up)
    with pytest.raises(PermanentFailure):
        SqliteBarrier(path).run(failed, lambda tx: b"must not run")

    assert barrier.run(kept, lambda tx: b"must not run").output == b"first"


async def test_a_postgres_table_of_the_first_release_is_upgraded_and_keeps_its_rows(
    postgres_url: str,
) -> None:
    kept = execute_key()
    with psycopg.connect(postgres_url) as db:
        db.execute(OLD_POSTGRES_TABLE)
        db.execute(
            "INSERT INTO saga_barrier (saga_id, step, operation, request_id, state, output) "
            "VALUES (%s, %s, 'execute', %s, 'done', %s)",
            (kept.saga_id, kept.step, kept.request_id, b"first"),
        )
    barrier = PostgresBarrier(postgres_url, max_size=2)
    failed = execute_key()

    def give_up(tx: Any) -> bytes:
        raise PermanentFailure("never", reason="NEVER")

    try:
        with pytest.raises(PermanentFailure):
            barrier.run(failed, give_up)
        with pytest.raises(PermanentFailure):
            barrier.run(failed, lambda tx: b"must not run")
        replayed = barrier.run(kept, lambda tx: b"must not run")
    finally:
        await barrier.aclose()

    assert replayed.output == b"first"
