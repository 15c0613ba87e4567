"""The SQLite saga store: one file, WAL mode, group commit, the embedded default.

Writes go through one writer thread that commits concurrent writes together (see
``sqlite_writer``); reads go through read connections on reader threads (``READERS``), which
in WAL mode neither block the writer nor wait for it, nor for each other. Each read runs in one
read transaction: a saga's row and its steps, or a page and the counts it was planned with, come
from one snapshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import (
    Claimed,
    FeedPage,
    Fence,
    ListCursor,
    PruneResult,
    RegisteredDefinition,
    SagaFilter,
    SagaPage,
)
from coordinator.store import sqlite_leases as leases
from coordinator.store.errors import StoreClosed, StoreCorrupt
from coordinator.store.packing import (
    digest,
    from_micros,
    pack_definition,
    to_micros,
)
from coordinator.store.rows import (
    event_row,
    label_rows,
    saga_row,
    saga_update,
    step_rows,
    step_updates,
)
from coordinator.store.rules import (
    already_exists,
    check_commit,
    check_creation,
    check_limit,
    check_prune_limit,
    counted,
    definition_conflict,
    only_counted,
    page_of,
    stale,
)
from coordinator.store.sqlite_errors import translate
from coordinator.store.sqlite_queries import (
    count_by_state_query,
    count_query,
    list_query,
    read_counts,
)
from coordinator.store.sqlite_rows import (
    INSERT_FEED_EVENT,
    INSERT_LABEL,
    INSERT_SAGA,
    INSERT_STEP,
    SELECT_FEED,
    SELECT_FEED_BOUNDS,
    UPDATE_SAGA,
    UPDATE_STEP,
    Definitions,
    feed_change,
    read_events,
    read_events_page,
    read_saga,
    read_sagas,
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
_HOLD_NEW = "UPDATE sagas SET owner = ?, epoch = 1 WHERE saga_id = ?"
_UPDATE_FENCED = UPDATE_SAGA.rstrip() + leases.FENCED
_SELECT_OLDEST_UNENDED = """
SELECT min(created_at) FROM (
    SELECT (SELECT created_at FROM sagas INDEXED BY sagas_by_state WHERE state = 'RUNNING'
            ORDER BY created_at LIMIT 1) AS created_at
    UNION ALL
    SELECT (SELECT created_at FROM sagas INDEXED BY sagas_by_state WHERE state = 'COMPENSATING'
            ORDER BY created_at LIMIT 1)
    UNION ALL
    SELECT (SELECT created_at FROM sagas INDEXED BY sagas_by_state
            WHERE state = 'NEEDS_ATTENTION' ORDER BY created_at LIMIT 1)
)
"""
_SELECT_PARKED = """
SELECT definition_name, waiting_step, count(*) FROM sagas INDEXED BY sagas_parked
WHERE state = 'NEEDS_ATTENTION' GROUP BY definition_name, waiting_step
"""
# The partial index's own condition, word for word: SQLite reads the index only for a query
# that repeats it.
_PRUNABLE = "state IN ('SUCCEEDED', 'COMPENSATED')"
_COUNT_PRUNABLE = f"""
SELECT count(*), coalesce(sum(version), 0) FROM sagas INDEXED BY sagas_by_ending
WHERE {_PRUNABLE} AND ended_at < ?
"""
_SELECT_PRUNABLE = f"""
SELECT saga_id FROM sagas INDEXED BY sagas_by_ending
WHERE {_PRUNABLE} AND ended_at < ? ORDER BY ended_at, saga_id LIMIT ?
"""
_IDS = "SELECT value FROM json_each(?)"
_RAISE_HORIZON = f"""
UPDATE feed_horizon SET pruned_through = max(pruned_through, coalesce(
    (SELECT max(position) FROM saga_events WHERE saga_id IN ({_IDS})), 0))
"""
_PRUNE = (
    # Children first: the log (which refuses deleting a saga's events unless it ended
    # SUCCEEDED or COMPENSATED), the steps and labels, then the rows themselves.
    f"DELETE FROM saga_events WHERE saga_id IN ({_IDS})",
    f"DELETE FROM saga_steps WHERE saga_id IN ({_IDS})",
    f"DELETE FROM saga_labels WHERE saga_id IN ({_IDS})",
    f"DELETE FROM sagas WHERE saga_id IN ({_IDS})",
)


READERS = 2
"""Read connections, each used by one thread at a time: a slow read (counting a million sagas
by a label) does not hold up the reads behind it. SQLite runs them side by side in WAL mode,
without the GIL."""


class SqliteStore:
    """Sagas and their append-only event logs in one SQLite file.

    Open it with ``await SqliteStore.open(path)``; close it with ``await store.close()``.
    """

    def __init__(
        self,
        path: Path,
        writer: GroupCommitWriter,
        readers: Sequence[sqlite3.Connection],
        reader_threads: ThreadPoolExecutor,
    ) -> None:
        """Assemble an opened store; use ``SqliteStore.open``."""
        self._path = path
        self._writer = writer
        self._readers = tuple(readers)
        # As many threads as read connections: a thread running a read always finds one idle.
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        for reader in readers:
            self._idle_readers.put(reader)
        self._reader_threads = reader_threads
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
        reader_threads = ThreadPoolExecutor(
            max_workers=READERS, thread_name_prefix="saga-store-reader"
        )
        readers: list[sqlite3.Connection] = []
        try:
            for _ in range(READERS):
                readers.append(
                    await asyncio.get_running_loop().run_in_executor(
                        reader_threads, open_reader, file, busy_timeout_ms
                    )
                )
        except BaseException:
            for reader in readers:
                reader.close()
            await writer.stop()
            reader_threads.shutdown(wait=False)
            raise
        return cls(file, writer, readers, reader_threads)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def write_stats(self) -> WriterStats:
        """How many transactions carried how many writes so far (the group commit at work)."""
        return self._writer.stats

    # --- writes ------------------------------------------------------------------------------

    async def create(
        self, saga: Saga, event: RecordedEvent, fingerprint: str, replica: str | None = None
    ) -> tuple[Saga, bool]:
        """Store a new saga with its first event; see ``SagaStore.create``.

        A definition version no saga ran before is registered with it, at the saga's creation
        time (a registered version keeps its registered content).
        """
        self._check_open()
        check_creation(saga, event)
        definitions = self._definitions
        known_definition = definitions.known_id(saga.definition)
        steps = step_rows(saga)
        labels = label_rows(saga)
        event_params = (*event_row(event), saga.state.value)

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
                # Once per definition and process: the version every saga runs is registered.
                definition_id = definitions.store(connection, saga.definition)
                definitions.register_first(
                    connection, saga.definition, definition_id, to_micros(saga.created_at)
                )
            connection.execute(INSERT_SAGA, saga_row(saga, definition_id, fingerprint))
            if replica is not None:
                connection.execute(_HOLD_NEW, (replica, saga.saga_id))
            connection.executemany(INSERT_STEP, steps)
            if labels:
                connection.executemany(INSERT_LABEL, labels)
            connection.execute(INSERT_FEED_EVENT, event_params)
            return None, definition_id

        stored, definition_id = await self._writer.submit(create, f"creating saga {saga.saga_id}")
        if stored is not None:
            return stored, False
        # Only now is the definition's row known to be committed.
        definitions.remember(saga.definition, definition_id)
        return saga, True

    async def commit(
        self,
        saga: Saga,
        event: RecordedEvent,
        changed_steps: Sequence[int] | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Store the saga's new state with its event; see ``SagaStore.commit``."""
        self._check_open()
        check_commit(saga, event)
        update = saga_update(saga)
        statement = UPDATE_SAGA
        settled = fence is not None and saga.state.is_settled
        if fence is not None:
            statement = _UPDATE_FENCED
            update = (*update, fence.replica, fence.epoch, fence.replica)
        steps = step_updates(
            saga, range(len(saga.steps)) if changed_steps is None else changed_steps
        )
        event_params = (*event_row(event), saga.state.value)

        def commit(connection: sqlite3.Connection) -> None:
            if connection.execute(statement, update).rowcount != 1:
                if fence is not None:
                    raise stale(saga, leases.refused(connection, saga.saga_id, fence))
                found = connection.execute(_SELECT_VERSION, (saga.saga_id,)).fetchone()
                raise stale(saga, None if found is None else found[0])
            if settled:
                connection.execute(leases.SETTLED, (saga.saga_id,))
            if steps:
                connection.executemany(UPDATE_STEP, steps)
            connection.execute(INSERT_FEED_EVENT, event_params)

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
        definitions = self._definitions

        def list_sagas(connection: sqlite3.Connection) -> SagaPage:
            query = list_query(connection, where, limit, after)
            if query is None:
                return SagaPage(sagas=(), next_cursor=None)
            return page_of(read_sagas(connection, definitions, *query), limit)

        return await self._read(list_sagas, "listing sagas")

    async def count(self, where: SagaFilter) -> int:
        """How many sagas match ``where``."""

        def count(connection: sqlite3.Connection) -> int:
            if only_counted(where):
                by_state = counted(read_counts(connection), where)
                return sum(n for state, n in by_state.items() if _wanted(state, where))
            query = count_query(connection, where)
            if query is None:
                return 0
            (found,) = connection.execute(*query).fetchone()
            return int(found)

        return await self._read(count, "counting sagas")

    async def count_by_state(self, where: SagaFilter) -> Mapping[SagaState, int]:
        """How many sagas match ``where`` in each state (``where.states`` ignored; states with
        none are left out)."""

        def count_by_state(connection: sqlite3.Connection) -> Mapping[SagaState, int]:
            if only_counted(where):
                by_state = counted(read_counts(connection), where)
            else:
                query = count_by_state_query(connection, where)
                rows = [] if query is None else connection.execute(*query).fetchall()
                by_state = {SagaState(state): int(n) for state, n in rows}
            return {state: n for state, n in by_state.items() if n}

        return await self._read(count_by_state, "counting sagas by state")

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        definitions = self._definitions

        def events(connection: sqlite3.Connection) -> Sequence[RecordedEvent]:
            saga = read_saga(connection, definitions, saga_id)
            return () if saga is None else read_events(connection, definitions, saga)

        return await self._read(events, f"reading the events of saga {saga_id}")

    async def events_page(
        self, saga_id: str, after_sequence: int, limit: int, *, newest_first: bool = False
    ) -> Sequence[RecordedEvent]:
        """Up to ``limit`` events of the saga's log; see ``SagaStore.events_page``."""
        check_limit(limit, "event")
        definitions = self._definitions

        def events_page(connection: sqlite3.Connection) -> Sequence[RecordedEvent]:
            return read_events_page(
                connection, definitions, saga_id, after_sequence, limit, newest_first
            )

        return await self._read(events_page, f"reading the events of saga {saga_id}")

    # --- replicas and leases (see ``sqlite_leases``) ----------------------------------------

    async def join(self, replica: str, lease: timedelta) -> None:
        """Start the replica's lease; see ``SagaStore.join``."""
        self._check_open()
        await self._writer.submit(
            lambda c: leases.join(c, replica, lease),
            f"starting the lease of {replica} in {self._path}",
        )

    async def renew(self, replica: str, lease: timedelta) -> bool:
        """Extend the replica's lease unless it ran out; see ``SagaStore.renew``."""
        self._check_open()
        return await self._writer.submit(
            lambda c: leases.renew(c, replica, lease),
            f"renewing the lease of {replica} in {self._path}",
        )

    async def leave(self, replica: str) -> int:
        """End the lease and let go of the replica's sagas; see ``SagaStore.leave``."""
        self._check_open()
        return await self._writer.submit(
            lambda c: leases.leave(c, replica), f"ending the lease of {replica} in {self._path}"
        )

    async def claim(self, replica: str, limit: int) -> Sequence[Claimed]:
        """Take unfinished sagas no live replica holds, oldest first; see ``SagaStore.claim``."""
        self._check_open()
        check_limit(limit)
        definitions = self._definitions
        return await self._writer.submit(
            lambda c: leases.claim(c, definitions, replica, limit),
            f"claiming sagas for {replica} in {self._path}",
        )

    async def take(self, replica: str, saga_id: str) -> Claimed | None:
        """Take one saga whoever holds it; see ``SagaStore.take``."""
        self._check_open()
        definitions = self._definitions
        return await self._writer.submit(
            lambda c: leases.take(c, definitions, replica, saga_id),
            f"taking saga {saga_id} in {self._path}",
        )

    async def oldest_unfinished(self) -> datetime | None:
        """When the oldest saga that has not ended (running, compensating, parked) was created."""

        def oldest(connection: sqlite3.Connection) -> datetime | None:
            (found,) = connection.execute(_SELECT_OLDEST_UNENDED).fetchone()
            return None if found is None else from_micros(found)

        return await self._read(oldest, "finding the oldest unfinished saga")

    async def parked_by_step(self) -> Mapping[tuple[str, str], int]:
        """NEEDS_ATTENTION sagas counted by (definition name, step they are stuck on)."""

        def parked(connection: sqlite3.Connection) -> Mapping[tuple[str, str], int]:
            found: dict[tuple[str, str], int] = {}
            for name, step, n in connection.execute(_SELECT_PARKED):
                key = (name, step or "")  # a parked saga always waits on a step; to be safe
                found[key] = found.get(key, 0) + int(n)
            return found

        return await self._read(parked, "counting the parked sagas")

    # --- the definitions registry ------------------------------------------------------------

    async def register_definition(
        self, definition: SagaDefinition, at: datetime
    ) -> tuple[RegisteredDefinition, bool]:
        """Register a definition version; see ``SagaStore.register_definition``."""
        self._check_open()
        definitions = self._definitions
        key = digest(pack_definition(definition))

        def register(connection: sqlite3.Connection) -> tuple[RegisteredDefinition, int, bool]:
            name, version = definition.name, definition.version
            found = definitions.registered(connection, name, version)
            if found is not None:
                definition_id, registered_at, registered_digest = found
                if registered_digest != key:
                    raise definition_conflict(definition, registered_digest.hex())
                new = False
            else:
                definition_id, registered_at = definitions.store(connection, definition), at_micros
                definitions.register_first(connection, definition, definition_id, registered_at)
                new = True
            unfinished = definitions.unfinished(connection, name, version)
            registered = RegisteredDefinition(
                definition, from_micros(registered_at), key.hex(), unfinished
            )
            return registered, definition_id, new

        at_micros = to_micros(at)
        registered, definition_id, new = await self._writer.submit(
            register, f"registering definition {definition.name!r} version {definition.version}"
        )
        # Only now is the definition's row known to be committed.
        definitions.remember(definition, definition_id)
        return registered, new

    async def definitions(self, name: str | None = None) -> Sequence[RegisteredDefinition]:
        """Registered definitions (of ``name``, or all), by name then version, with counts."""
        definitions = self._definitions

        def registry(connection: sqlite3.Connection) -> Sequence[RegisteredDefinition]:
            return tuple(
                RegisteredDefinition(definition, from_micros(at), key.hex(), unfinished)
                for definition, at, key, unfinished in definitions.registry(connection, name)
            )

        return await self._read(registry, "reading the registered definitions")

    # --- retention ---------------------------------------------------------------------------

    async def count_prunable(self, ended_before: datetime) -> PruneResult:
        """What ``prune`` would remove for this cutoff, counted; nothing is removed."""
        cutoff = to_micros(ended_before)

        def count(connection: sqlite3.Connection) -> PruneResult:
            # A saga's version is the length of its log: events are counted without reading them.
            sagas, events = connection.execute(_COUNT_PRUNABLE, (cutoff,)).fetchone()
            return PruneResult(int(sagas), int(events))

        return await self._read(count, "counting the prunable sagas")

    async def prune(self, ended_before: datetime, limit: int) -> PruneResult:
        """Remove up to ``limit`` sagas that ended SUCCEEDED or COMPENSATED before the cutoff,
        oldest ending first, with their events, steps and labels, in one transaction."""
        self._check_open()
        check_prune_limit(limit)
        cutoff = to_micros(ended_before)

        def prune(connection: sqlite3.Connection) -> PruneResult:
            ids = [row[0] for row in connection.execute(_SELECT_PRUNABLE, (cutoff, limit))]
            if not ids:
                return PruneResult(0, 0)
            batch = (json.dumps(ids),)
            # The feed never gives a pruned position again: new ones start above this.
            connection.execute(_RAISE_HORIZON, batch)
            events = connection.execute(_PRUNE[0], batch).rowcount
            for statement in _PRUNE[1:]:
                connection.execute(statement, batch)
            return PruneResult(len(ids), events)

        return await self._writer.submit(prune, f"pruning sagas that ended before {ended_before}")

    # --- change feed -------------------------------------------------------------------------

    async def feed(self, after_position: int, limit: int) -> FeedPage:
        """Up to ``limit`` changes after ``after_position``; see ``SagaStore.feed``."""
        self._check_open()
        if limit < 1:
            raise ValueError(f"a feed page holds at least one change, not {limit}")
        definitions = self._definitions

        def read(connection: sqlite3.Connection) -> FeedPage:
            rows = connection.execute(SELECT_FEED, (after_position, limit)).fetchall()
            pruned, _ = connection.execute(SELECT_FEED_BOUNDS).fetchone()
            return FeedPage(
                tuple(feed_change(connection, definitions, row) for row in rows),
                rows[-1][0] if rows else after_position,
                int(pruned),
            )

        return await self._read(read, "reading the change feed")

    async def feed_bounds(self) -> tuple[int, int]:
        """(highest position pruned, newest position); see ``SagaStore.feed_bounds``."""
        self._check_open()

        def read(connection: sqlite3.Connection) -> tuple[int, int]:
            pruned, newest = connection.execute(SELECT_FEED_BOUNDS).fetchone()
            return int(pruned), int(newest)

        return await self._read(read, "reading the change feed's bounds")

    # --- life cycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the queued reads and writes, then close the connections and threads.
        Idempotent."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        try:
            # Any read still running or queued finishes first.
            await asyncio.to_thread(self._reader_threads.shutdown, wait=True)
            for reader in self._readers:
                reader.close()
        finally:
            # The writer closes last: as the file's last connection, and a writable one, it
            # checkpoints the WAL into the file (a read-only last connection may not).
            await self._writer.stop()

    async def _on_writer(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``run`` on the write connection in the writer's next transaction (tests only)."""
        return await self._writer.submit(run, "running a test hook")

    async def _read(self, query: Callable[[sqlite3.Connection], T], doing: str) -> T:
        self._check_open()

        idle = self._idle_readers

        def read() -> T:
            connection = idle.get_nowait()
            try:
                connection.execute("BEGIN")
                try:
                    return query(connection)
                finally:
                    connection.execute("COMMIT")
            except sqlite3.Error as error:
                raise translate(error, f"{doing} in {self._path}") from error
            except StoreCorrupt as error:
                raise StoreCorrupt(f"{doing} in {self._path}: {error}") from error
            finally:
                idle.put(connection)

        return await asyncio.get_running_loop().run_in_executor(self._reader_threads, read)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the saga store {self._path} is closed")


def _wanted(state: SagaState, where: SagaFilter) -> bool:
    return not where.states or state in where.states
