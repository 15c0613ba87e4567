"""Opening a SQLite store file: refuse what is not ours, set the pragmas, run the migrations.

A file that is not a saga store (random bytes, a database whose schema cannot be read, another
application's database, a schema from a newer coordinator) is refused before anything is written
to it. Opening reads the header and the schema only, never the whole file, so it takes the same
time on a store of any size; ``check_integrity`` scans the whole file on demand.
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coordinator.store.errors import SchemaTooNew, StorageFailure, StoreCorrupt
from coordinator.store.migration_files import read_migrations
from coordinator.store.sqlite_errors import translate
from coordinator.store.sqlite_upgrade import DATA_STEPS

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
"""The accepted ``synchronous`` settings: FULL survives a power cut, NORMAL may lose commits."""

_HEADER = b"SQLite format 3\x00"
_HEADER_SIZE = 100
_UNTOUCHED = "refusing to open it; the file was left untouched"
_PARTIAL_INDEX = re.compile(r"\)\s+WHERE\s+(.+)$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Migration:
    """One numbered, forward-only schema change."""

    version: int
    name: str
    sql: str

    def statements(self) -> Iterator[str]:
        """The migration's SQL statements, one by one (triggers kept whole)."""
        pending = ""
        for line in self.sql.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                yield pending
                pending = ""
        if not _only_comments(pending):
            raise ValueError(f"migration {self.version:04d}_{self.name}: unterminated statement")


def load_migrations() -> tuple[Migration, ...]:
    """The migrations shipped in ``coordinator/store/migrations``, numbered 1, 2, 3... in order."""
    return tuple(Migration(found.version, found.name, found.sql) for found in read_migrations())


def open_writer(
    path: Path,
    migrations: Sequence[Migration],
    *,
    synchronous: str,
    busy_timeout_ms: int,
) -> sqlite3.Connection:
    """The connection that writes: the file checked, in WAL mode, migrated to ``migrations``.

    A new file is created readable and writable by its owner only (SQLite gives its -wal and
    -shm files the same permissions): sagas carry business payloads.
    """
    _check_header(path)
    _create_private(path)
    connection = _connect(path, busy_timeout_ms, "opening the saga store")
    try:
        applied = _applied_migrations(connection, path, migrations)
        _check_roots(connection, path)
        _configure(connection, path, synchronous)
        _migrate(connection, path, migrations, applied)
    except sqlite3.Error as error:
        connection.close()
        raise translate(error, f"opening the saga store {path}") from error
    except BaseException:
        connection.close()
        raise
    return connection


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (an existing file is kept as
    it is: its owner chose its permissions)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists, or cannot be made: opening it says which, as it always did
        return
    os.close(descriptor)


def open_reader(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection for reads only; in WAL mode it never blocks the writer, nor waits for it."""
    connection = _connect(path, busy_timeout_ms, "opening the saga store for reading")
    try:
        # A guard: a bug that wrote through this connection would bypass the group commit.
        connection.execute("PRAGMA query_only = ON")
    except sqlite3.Error as error:
        connection.close()
        raise translate(error, f"opening the saga store {path} for reading") from error
    return connection


def _connect(path: Path, busy_timeout_ms: int, doing: str) -> sqlite3.Connection:
    try:
        # isolation_level=None: no implicit BEGIN; the store says where transactions go.
        # check_same_thread=False: each connection is confined to one thread by design
        # (the writer thread, the reader executor), which is not always the one that opens it.
        return sqlite3.connect(
            path,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as error:
        raise translate(error, f"{doing} {path}") from error


def _check_header(path: Path) -> None:
    # Read the header ourselves: SQLite would report a foreign file only on first use, and
    # setting WAL mode on it would already have written to it.
    try:
        with path.open("rb") as file:
            header = file.read(_HEADER_SIZE)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StorageFailure(f"cannot read the saga store {path}: {error}") from error
    if header and (len(header) < _HEADER_SIZE or not header.startswith(_HEADER)):
        raise StoreCorrupt(f"{path} is not a SQLite database (no SQLite header); {_UNTOUCHED}")


def _check_roots(connection: sqlite3.Connection, path: Path) -> None:
    """Read the first row of every table and index: a damaged root page is found at once, at
    a cost that does not grow with the file (deeper damage is found where it is read, and by
    ``check_integrity``)."""
    objects = connection.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type IN ('table', 'index')"
        " AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    try:
        for kind, name, table, sql in objects:
            if kind == "table":
                connection.execute(f'SELECT * FROM "{name}" LIMIT 1').fetchall()
                continue
            columns = connection.execute(f'PRAGMA index_info("{name}")').fetchall()
            if columns and columns[0][2] is not None:
                first = columns[0][2]
                # A partial index is read only by a query that repeats its condition.
                partial = _PARTIAL_INDEX.search(sql or "")
                where = f" WHERE {partial[1]}" if partial else ""
                connection.execute(
                    f'SELECT "{first}" FROM "{table}" INDEXED BY "{name}"{where} LIMIT 1'
                ).fetchall()
    except sqlite3.DatabaseError as error:
        raise StoreCorrupt(
            f"{path} is damaged: {error} (run the integrity check); {_UNTOUCHED}"
        ) from error


def check_integrity(path: Path) -> list[str]:
    """Scan the whole file (SQLite's ``integrity_check``) without writing to it; return the
    problems found, none when it is sound. Raises ``StoreCorrupt`` for a file that is not a
    SQLite database at all."""
    _check_header(path)
    if not path.exists():
        raise StorageFailure(f"no saga store at {path}")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as error:
        raise translate(error, f"opening the saga store {path}") from error
    try:
        rows = [str(row[0]) for row in connection.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.DatabaseError as error:  # damage the check itself stumbles on
        rows = [f"{path} is not a readable SQLite database ({error})"]
    finally:
        connection.close()
    return [] if rows == ["ok"] else rows


def _applied_migrations(
    connection: sqlite3.Connection, path: Path, migrations: Sequence[Migration]
) -> dict[int, str]:
    try:
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except sqlite3.DatabaseError as error:
        raise StoreCorrupt(
            f"{path} is not a readable SQLite database ({error}); {_UNTOUCHED}"
        ) from error
    if "schema_migrations" not in tables:
        if tables:
            raise StoreCorrupt(
                f"{path} is a SQLite database of another application "
                f"(tables {', '.join(sorted(tables))}) and not a saga store; {_UNTOUCHED}"
            )
        return {}
    applied: dict[int, str] = dict(
        connection.execute("SELECT version, name FROM schema_migrations").fetchall()
    )
    newest = max(applied, default=0)
    known = len(migrations)
    if newest > known:
        raise SchemaTooNew(
            f"{path} has schema version {newest}, newer than this coordinator knows ({known}): "
            f"it was written by a newer release; upgrade the coordinator. {_UNTOUCHED}"
        )
    for migration in migrations:
        name = applied.get(migration.version)
        if name is not None and name != migration.name:
            raise StoreCorrupt(
                f"{path} recorded migration {migration.version} as {name!r}, but this "
                f"coordinator's migration {migration.version} is {migration.name!r}; {_UNTOUCHED}"
            )
    return applied


def _configure(connection: sqlite3.Connection, path: Path, synchronous: str) -> None:
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageFailure(f"{path} cannot use write-ahead logging (journal mode {mode})")
    # Both are per connection, not stored in the file: set them on every open.
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    connection.execute("PRAGMA foreign_keys = ON")


def _migrate(
    connection: sqlite3.Connection,
    path: Path,
    migrations: Sequence[Migration],
    applied: dict[int, str],
) -> None:
    for migration in migrations:
        if migration.version in applied:
            continue
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER NOT NULL PRIMARY KEY,"
                " name TEXT NOT NULL,"
                " applied_at TEXT NOT NULL"
                ") STRICT"
            )
            # Another process may have run it while this one waited for the write lock.
            done = connection.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
            ).fetchone()
            if done is None:
                for statement in migration.statements():
                    connection.execute(statement)
                convert = DATA_STEPS.get(migration.version)
                if convert is not None:
                    try:
                        convert(connection)
                    except StoreCorrupt as error:
                        raise StoreCorrupt(
                            f"{path} cannot be migrated to schema {migration.version} "
                            f"({migration.name}), its rows were left as they were: {error}"
                        ) from error
                connection.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, datetime.now(UTC).isoformat()),
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise


def _only_comments(sql: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in sql.splitlines())
