"""The SQLite saga store: one file, WAL mode, group commit, the embedded default.

Writes go through one writer thread that commits concurrent writes together (see
``sqlite_writer``); reads go through a second connection on a reader thread, which in WAL mode
neither blocks the writer nor waits for it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga
from coordinator.ports import ListCursor, SagaFilter, SagaPage
from coordinator.store.errors import StoreClosed
from coordinator.store.packing import to_micros
from coordinator.store.rules import (
    UNFINISHED,
    already_exists,
    check_commit,
    check_creation,
    check_limit,
    page_of,
    stale,
)
from coordinator.store.sqlite_errors import translate
from coordinator.store.sqlite_rows import (
    INSERT_EVENT,
    INSERT_SAGA,
    INSERT_STEP,
    SAGA_COLUMNS,
    UPDATE_SAGA,
    UPDATE_STEP,
    Definitions,
    event_row,
    read_events,
    read_saga,
    read_sagas,
    saga_row,
    saga_update,
    step_rows,
    step_updates,
)
from coordinator.store.sqlite_schema import (
    SYNCHRONOUS_MODES,
    load_migrations,
    open_reader,
    open_writer,
)
from coordinator.store.sqlite_writer import GroupCommitWriter, WriterStats

T = TypeVar("T")

_SELECT_FOR_CREATE = "SELECT fingerprint FROM sagas WHERE saga_id = ?"
_SELECT_VERSION = "SELECT version FROM sagas WHERE saga_id = ?"
_SELECT_UNFINISHED = f"""
SELECT {SAGA_COLUMNS} FROM sagas
WHERE state IN ({", ".join(f"'{state}'" for state in sorted(UNFINISHED))})
ORDER BY created_at, saga_id
"""


class SqliteStore:
    """Sagas and their append-only event logs in one SQLite file.

    Open it with ``await SqliteStore.open(path)``; close it with ``await store.close()``.
    """

    def __init__(
        self,
        path: Path,
        writer: GroupCommitWriter,
        reader: sqlite3.Connection,
        reader_thread: ThreadPoolExecutor,
    ) -> None:
        """Assemble an opened store; use ``SqliteStore.open``."""
        self._path = path
        self._writer = writer
        self._reader = reader
        self._reader_thread = reader_thread
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._definitions = Definitions()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        max_batch: int = 256,
        max_page_count: int | None = None,
    ) -> SqliteStore:
        """Open (or create) the store at ``path`` and migrate it to the current schema.

        ``synchronous``: ``FULL`` (the default) makes every acknowledged write survive a power
        cut; ``NORMAL`` is faster but may lose the last commits then. ``busy_timeout_ms``: how
        long a write waits for a lock held by another connection before it fails with
        ``StorageUnavailable``. ``max_batch``: the most writes one transaction carries.
        ``max_page_count``: a cap on the file's size in pages (writes beyond it fail as a full
        disk would).

        Raises ``StoreCorrupt`` for a file that is not a saga store or is damaged, and
        ``SchemaTooNew`` for one written by a newer coordinator; such files are not modified.
        """
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must not be negative, not {busy_timeout_ms}")
        file = Path(path)
        migrations = load_migrations()

        def connect() -> sqlite3.Connection:
            connection = open_writer(
                file, migrations, synchronous=mode, busy_timeout_ms=busy_timeout_ms
            )
            if max_page_count is not None:
                connection.execute(f"PRAGMA max_page_count = {int(max_page_count)}")
            return connection

        writer = GroupCommitWriter(connect, max_batch=max_batch, name=f"saga-store-writer {file}")
        await writer.start()
        reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saga-store-reader")
        try:
            reader = await asyncio.get_running_loop().run_in_executor(
                reader_thread, open_reader, file, busy_timeout_ms
            )
        except BaseException:
            await writer.stop()
            reader_thread.shutdown(wait=False)
            raise
        return cls(file, writer, reader, reader_thread)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def write_stats(self) -> WriterStats:
        """How many transactions carried how many writes so far (the group commit at work)."""
        return self._writer.stats

    # --- writes ------------------------------------------------------------------------------

    async def create(self, saga: Saga, event: RecordedEvent, fingerprint: str) -> tuple[Saga, bool]:
        """Store a new saga with its first event; see ``SagaStore.create``."""
        self._check_open()
        check_creation(saga, event)
        definitions = self._definitions
        known_definition = definitions.known_id(saga.definition)
        steps = step_rows(saga)
        event_params = event_row(event)

        def create(connection: sqlite3.Connection) -> tuple[Saga | None, int]:
            # Inside the writer's transaction: a concurrent create of the same id, even in the
            # same batch, runs before or after this one, never in between.
            found = connection.execute(_SELECT_FOR_CREATE, (saga.saga_id,)).fetchone()
            if found is not None:
                if found[0] == fingerprint:
                    return read_saga(connection, definitions, saga.saga_id), -1
                raise already_exists(saga.saga_id)
            definition_id = known_definition
            if definition_id is None:
                definition_id = definitions.store(connection, saga.definition)
            connection.execute(INSERT_SAGA, saga_row(saga, definition_id, fingerprint))
            connection.executemany(INSERT_STEP, steps)
            connection.execute(INSERT_EVENT, event_params)
            return None, definition_id

        stored, definition_id = await self._writer.submit(create, f"creating saga {saga.saga_id}")
        if stored is not None:
            return stored, False
        # Only now is the definition's row known to be committed.
        definitions.remember(saga.definition, definition_id)
        return saga, True

    async def commit(
        self, saga: Saga, event: RecordedEvent, changed_steps: Sequence[int] | None = None
    ) -> None:
        """Store the saga's new state with its event; see ``SagaStore.commit``."""
        self._check_open()
        check_commit(saga, event)
        update = saga_update(saga)
        steps = step_updates(
            saga, range(len(saga.steps)) if changed_steps is None else changed_steps
        )
        event_params = event_row(event)

        def commit(connection: sqlite3.Connection) -> None:
            if connection.execute(UPDATE_SAGA, update).rowcount != 1:
                found = connection.execute(_SELECT_VERSION, (saga.saga_id,)).fetchone()
                raise stale(saga, None if found is None else found[0])
            if steps:
                connection.executemany(UPDATE_STEP, steps)
            connection.execute(INSERT_EVENT, event_params)

        await self._writer.submit(commit, f"committing saga {saga.saga_id} v{saga.version}")

    # --- reads -------------------------------------------------------------------------------

    async def get(self, saga_id: str) -> Saga | None:
        """The saga, or None."""
        definitions = self._definitions

        def get(connection: sqlite3.Connection) -> Saga | None:
            return read_saga(connection, definitions, saga_id)

        return await self._read(get, f"reading saga {saga_id}")

    async def list(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """Up to ``limit`` sagas matching ``where``, oldest first, after ``after``."""
        check_limit(limit)
        clauses, params = _filter_sql(where)
        if after is not None:
            # Keyset pagination: resume strictly after the last row seen, however rows were
            # added meanwhile; (created_at, saga_id) is unique, so nothing is seen twice.
            clauses.append("(created_at, saga_id) > (?, ?)")
            params.extend((to_micros(after.created_at), after.saga_id))
        where_sql = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {SAGA_COLUMNS} FROM sagas {where_sql} ORDER BY created_at, saga_id LIMIT ?"
        params.append(limit + 1)  # one more than asked tells whether another page exists
        definitions = self._definitions

        def list_sagas(connection: sqlite3.Connection) -> SagaPage:
            return page_of(read_sagas(connection, definitions, sql, params), limit)

        return await self._read(list_sagas, "listing sagas")

    async def count(self, where: SagaFilter) -> int:
        """How many sagas match ``where``."""
        clauses, params = _filter_sql(where)
        where_sql = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def count(connection: sqlite3.Connection) -> int:
            (found,) = connection.execute(
                f"SELECT count(*) FROM sagas {where_sql}", params
            ).fetchone()
            return int(found)

        return await self._read(count, "counting sagas")

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        definitions = self._definitions

        def events(connection: sqlite3.Connection) -> Sequence[RecordedEvent]:
            saga = read_saga(connection, definitions, saga_id)
            return () if saga is None else read_events(connection, definitions, saga)

        return await self._read(events, f"reading the events of saga {saga_id}")

    async def unfinished(self) -> Sequence[Saga]:
        """Every saga that is RUNNING or COMPENSATING, oldest first."""
        definitions = self._definitions

        def unfinished(connection: sqlite3.Connection) -> Sequence[Saga]:
            return tuple(read_sagas(connection, definitions, _SELECT_UNFINISHED, ()))

        return await self._read(unfinished, "reading the unfinished sagas")

    # --- life cycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the queued writes, then close both connections and threads. Idempotent."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        try:
            await self._writer.stop()
        finally:
            # Queued behind any read still running, so that read finishes first.
            await asyncio.get_running_loop().run_in_executor(
                self._reader_thread, self._reader.close
            )
            self._reader_thread.shutdown(wait=False)

    async def _on_writer(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``run`` on the write connection in the writer's next transaction (tests only)."""
        return await self._writer.submit(run, "running a test hook")

    async def _read(self, query: Callable[[sqlite3.Connection], T], doing: str) -> T:
        self._check_open()

        def read() -> T:
            try:
                return query(self._reader)
            except sqlite3.Error as error:
                raise translate(error, f"{doing} in {self._path}") from error

        return await asyncio.get_running_loop().run_in_executor(self._reader_thread, read)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the saga store {self._path} is closed")


def _filter_sql(where: SagaFilter) -> tuple[list[str], list[Any]]:
    """WHERE clauses and their parameters for a listing filter."""
    clauses: list[str] = []
    params: list[Any] = []
    if where.states:
        states = sorted(state.value for state in where.states)
        clauses.append(f"state IN ({', '.join('?' for _ in states)})")
        params.extend(states)
    if where.definition is not None:
        clauses.append("definition_name = ?")
        params.append(where.definition)
    return clauses, params
