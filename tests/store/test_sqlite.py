"""What only the SQLite store promises: a durable, guarded file, and group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import sqlite3
import stat
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from coordinator.core.errors import ConcurrentUpdate, DefinitionConflict, StorageUnavailable
from coordinator.core.events import CancelRequested, RecordedEvent
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import ListCursor, PruneResult, SagaFilter
from coordinator.store import sqlite_queries
from coordinator.store.codec import encode_datetime, encode_event, encode_saga
from coordinator.store.errors import SchemaTooNew, StorageFailure, StoreCorrupt
from coordinator.store.packing import (
    event_type,
    pack,
    pack_definition,
    pack_event,
    pack_failure,
    to_micros,
)
from coordinator.store.sqlite import SqliteStore
from coordinator.store.sqlite_queries import (
    count_by_state_query,
    count_query,
    list_query,
)
from coordinator.store.sqlite_schema import check_integrity, load_migrations, open_writer

from .strategies import BROKEN, NO, OK, T0, SagaHistory, open_account, run_history, transfer
from .test_store_contract import FILTERS, all_pages, store_population

FINGERPRINT = "fp-1"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the test's database lives."""
    return tmp_path / "sagas.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    """A store on a new file, closed after the test."""
    store = await SqliteStore.open(db)
    try:
        yield store
    finally:
        await store.close()


async def store_history(store: SqliteStore, history: SagaHistory) -> None:
    """Create the saga and commit all its events."""
    await store.create(history.first, history.log[0], FINGERPRINT)
    for saga, event, changed in history.commits():
        await store.commit(saga, event, changed)


async def pragma(store: SqliteStore, name: str) -> object:
    """A pragma's value as the store's write connection sees it."""
    return await store._on_writer(lambda c: c.execute(f"PRAGMA {name}").fetchone()[0])


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows read from the file by a connection of the test's own."""
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def read(path: Path) -> bytes:
    """A file's bytes (tests read small files where they stand, blocking or not)."""
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    """Replace a file's bytes."""
    path.write_bytes(data)


def files_in(folder: Path) -> list[str]:
    """The names of the files in a folder."""
    return sorted(path.name for path in folder.iterdir())


# --- durability and settings -----------------------------------------------------------------


async def test_sagas_and_logs_survive_close_and_reopen(db: Path) -> None:
    history = run_history("s-1", [OK, OK])
    store = await SqliteStore.open(db)
    await store_history(store, history)
    await store.close()

    reopened = await SqliteStore.open(db)
    try:
        assert await reopened.get("s-1") == history.last
        assert await reopened.events("s-1") == history.log
        await reopened.join("recovery", timedelta(minutes=5))
        assert [c.saga for c in await reopened.claim("recovery", 10)] == [history.last]
    finally:
        await reopened.close()


async def test_opens_in_wal_mode_with_full_sync_foreign_keys_and_a_busy_timeout(
    store: SqliteStore,
) -> None:
    assert await pragma(store, "journal_mode") == "wal"
    assert await pragma(store, "synchronous") == 2  # FULL
    assert await pragma(store, "foreign_keys") == 1
    assert await pragma(store, "busy_timeout") == 5000


async def test_sync_mode_busy_timeout_and_size_cap_are_configurable(db: Path) -> None:
    store = await SqliteStore.open(
        db, synchronous="normal", busy_timeout_ms=250, max_page_count=10_000
    )
    try:
        assert await pragma(store, "synchronous") == 1  # NORMAL
        assert await pragma(store, "busy_timeout") == 250
        assert await pragma(store, "max_page_count") == 10_000
    finally:
        await store.close()


async def test_an_unknown_sync_mode_is_refused_before_the_file_is_created(db: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be one of"):
        await SqliteStore.open(db, synchronous="OFF")

    assert files_in(db.parent) == []


async def test_tables_are_strict(store: SqliteStore) -> None:
    def insert_text_version(connection: sqlite3.Connection) -> None:
        connection.execute(
            "INSERT INTO saga_steps (saga_id, step, state, execute_attempts, compensate_attempts)"
            " VALUES ('x', 0, 'PENDING', 'one', 0)"
        )

    with pytest.raises(StorageFailure, match="cannot store TEXT value in INTEGER column"):
        await store._on_writer(insert_text_version)


# --- migrations ------------------------------------------------------------------------------


async def test_migrations_are_recorded_and_not_run_again_on_reopen(db: Path) -> None:
    await (await SqliteStore.open(db)).close()
    recorded = query(db, "SELECT version, name, applied_at FROM schema_migrations")

    await (await SqliteStore.open(db)).close()

    assert [(version, name) for version, name, _ in recorded] == [
        (1, "initial"),
        (2, "compact_rows"),
        (3, "labels_registry_retention"),
        (4, "change_feed"),
        (5, "leases"),
    ]
    assert query(db, "SELECT version, name, applied_at FROM schema_migrations") == recorded


async def test_two_stores_opening_a_new_file_at_once_migrate_it_once(db: Path) -> None:
    stores = await asyncio.gather(SqliteStore.open(db), SqliteStore.open(db))
    for store in stores:
        await store.close()

    shipped = [(migration.version,) for migration in load_migrations()]
    assert query(db, "SELECT version FROM schema_migrations ORDER BY version") == shipped
    assert len(shipped) >= 5


async def test_a_database_with_a_newer_schema_is_refused_and_left_untouched(db: Path) -> None:
    await (await SqliteStore.open(db)).close()
    with sqlite3.connect(db) as newer:
        future = len(load_migrations()) + 1
        newer.execute(f"INSERT INTO schema_migrations VALUES ({future}, 'from_the_future', 'x')")
    newer.close()
    before = read(db)

    with pytest.raises(
        SchemaTooNew, match=rf"schema version {future}, newer than this coordinator"
    ):
        await SqliteStore.open(db)

    assert read(db) == before


# --- files that are not ours -----------------------------------------------------------------


async def test_random_bytes_are_refused_and_left_untouched(db: Path) -> None:
    garbage = random.Random(7).randbytes(8192)
    write(db, garbage)

    with pytest.raises(StoreCorrupt, match=r"is not a SQLite database.*left untouched"):
        await SqliteStore.open(db)

    assert read(db) == garbage
    assert files_in(db.parent) == ["sagas.db"], "no journal or WAL file either"


def scramble_all_but_the_first_page(data: bytearray, page_size: int, index_page: int) -> None:
    """Random bytes over every page but the first (the header and the schema)."""
    data[page_size:] = random.Random(7).randbytes(len(data) - page_size)


def break_an_index_page(data: bytearray, page_size: int, index_page: int) -> None:
    """Point the first cells of an index page out of the page: a subtle, local damage."""
    start = (index_page - 1) * page_size + 8  # a leaf page's cell pointers follow its header
    data[start : start + 8] = b"\xff" * 8


@pytest.mark.parametrize("damage", [scramble_all_but_the_first_page, break_an_index_page])
async def test_an_integrity_check_on_demand_finds_damage_and_leaves_the_file_untouched(
    db: Path, damage: Callable[[bytearray, int, int], None]
) -> None:
    store = await SqliteStore.open(db)
    for i in range(50):
        await store_history(store, run_history(f"s-{i}", [OK], at=T0 + timedelta(seconds=i)))
    await store.close()
    assert check_integrity(db) == []
    [(index_page,)] = query(db, "SELECT rootpage FROM sqlite_master WHERE name = 'sagas_by_state'")
    damaged = bytearray(read(db))
    damage(damaged, int.from_bytes(damaged[16:18], "big"), index_page)
    write(db, bytes(damaged))

    problems = check_integrity(db)

    assert problems
    assert read(db) == bytes(damaged)


async def test_a_damaged_root_page_is_refused_at_open_and_left_untouched(db: Path) -> None:
    # Opening reads the schema and the first row of each table and index, never the whole
    # file: damage at a root page is found there, deeper damage where it is read or on demand.
    store = await SqliteStore.open(db)
    for i in range(50):
        await store_history(store, run_history(f"s-{i}", [OK], at=T0 + timedelta(seconds=i)))
    await store.close()
    [(index_page,)] = query(db, "SELECT rootpage FROM sqlite_master WHERE name = 'sagas_by_state'")
    damaged = bytearray(read(db))
    break_an_index_page(damaged, int.from_bytes(damaged[16:18], "big"), index_page)
    write(db, bytes(damaged))

    with pytest.raises(StoreCorrupt, match=r"is damaged.*left untouched"):
        await SqliteStore.open(db)

    assert read(db) == bytes(damaged)
    assert check_integrity(db)


async def test_a_file_whose_schema_cannot_be_read_is_refused_and_left_untouched(db: Path) -> None:
    await (await SqliteStore.open(db)).close()
    damaged = bytearray(read(db))
    damaged[100:4096] = random.Random(7).randbytes(4096 - 100)  # the schema's root page
    write(db, bytes(damaged))

    with pytest.raises(StoreCorrupt, match=r"not a readable SQLite database.*left untouched"):
        await SqliteStore.open(db)

    assert read(db) == bytes(damaged)


async def test_another_applications_database_is_refused_and_left_untouched(db: Path) -> None:
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    other.close()
    before = read(db)

    with pytest.raises(StoreCorrupt, match=r"another application.*invoices"):
        await SqliteStore.open(db)

    assert read(db) == before


async def test_a_file_that_cannot_be_opened_is_a_storage_failure(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "sagas.db"

    with pytest.raises(StorageFailure, match="no-such-dir"):
        await SqliteStore.open(missing)


# --- the log is append-only ------------------------------------------------------------------


async def test_the_database_refuses_to_update_or_delete_events(
    store: SqliteStore, db: Path
) -> None:
    history = run_history("s-1", [OK])
    await store_history(store, history)
    before = query(db, "SELECT * FROM saga_events")

    connection = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("UPDATE saga_events SET body = x'80' WHERE sequence = 2")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("DELETE FROM saga_events")
        connection.commit()
    finally:
        connection.close()

    assert query(db, "SELECT * FROM saga_events") == before
    assert len(before) == 2


# --- failures at write time ------------------------------------------------------------------


async def test_a_database_locked_past_the_busy_timeout_fails_writes_and_stores_nothing(
    db: Path,
) -> None:
    store = await SqliteStore.open(db, busy_timeout_ms=50)
    histories = [run_history(f"s-{i}") for i in range(3)]
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        results = await asyncio.gather(
            *(store.create(h.first, h.log[0], FINGERPRINT) for h in histories),
            return_exceptions=True,
        )
        blocker.execute("ROLLBACK")

        assert all(isinstance(result, StorageUnavailable) for result in results), results
        assert "locked" in str(results[0])
        assert [await store.get(h.saga_id) for h in histories] == [None] * 3
        # The lock is gone: the same write now succeeds.
        assert await store.create(histories[0].first, histories[0].log[0], FINGERPRINT) == (
            histories[0].first,
            True,
        )
    finally:
        blocker.close()
        await store.close()


async def test_a_full_disk_fails_writes_until_there_is_room_again(store: SqliteStore) -> None:
    pages = await pragma(store, "page_count")
    await store._on_writer(lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    big = run_history("big", input=b"x" * 200_000)

    with pytest.raises(StorageUnavailable, match="disk full"):
        await store.create(big.first, big.log[0], FINGERPRINT)

    assert await store.get("big") is None
    assert await store.events("big") == ()
    await store._on_writer(lambda c: c.execute("PRAGMA max_page_count = 1000000").fetchone())
    assert await store.create(big.first, big.log[0], FINGERPRINT) == (big.first, True)
    assert await store.get("big") == big.first


async def test_after_an_io_error_the_store_refuses_every_later_write(store: SqliteStore) -> None:
    def fail_with_io_error(connection: sqlite3.Connection) -> None:
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = 778  # SQLITE_IOERR_WRITE, as a failing disk reports it
        error.sqlite_errorname = "SQLITE_IOERR_WRITE"
        raise error

    with pytest.raises(StorageFailure, match="I/O error"):
        await store._on_writer(fail_with_io_error)

    history = run_history("s-1")
    with pytest.raises(StorageFailure, match="restarts"):
        await store.create(history.first, history.log[0], FINGERPRINT)
    assert await store.get("s-1") is None


async def test_a_refused_write_is_undone_alone_while_its_batch_commits(
    store: SqliteStore, db: Path
) -> None:
    history = run_history("kept")

    def write_then_refuse(connection: sqlite3.Connection) -> None:
        connection.execute(
            "INSERT INTO definitions (name, version, digest, body) VALUES ('undone', 1, x'00', x'')"
        )
        raise ConcurrentUpdate("refused after writing")

    results = await asyncio.gather(
        store._on_writer(write_then_refuse),
        store.create(history.first, history.log[0], FINGERPRINT),
        return_exceptions=True,
    )

    assert isinstance(results[0], ConcurrentUpdate)
    assert results[1] == (history.first, True)
    assert query(db, "SELECT saga_id FROM sagas") == [("kept",)]
    assert query(db, "SELECT name FROM definitions") == [(history.first.definition.name,)]


# --- group commit ----------------------------------------------------------------------------


@pytest.mark.parametrize(("max_batch", "shared"), [(256, True), (1, False)])
async def test_concurrent_writes_share_transactions_up_to_the_batch_size(
    db: Path, max_batch: int, shared: bool
) -> None:
    store = await SqliteStore.open(db, max_batch=max_batch)
    histories = [run_history(f"s-{i:03d}") for i in range(300)]
    try:
        await asyncio.gather(*(store.create(h.first, h.log[0], FINGERPRINT) for h in histories))
        stats = store.write_stats
    finally:
        await store.close()

    assert stats.jobs == 300
    assert (stats.transactions < stats.jobs) is shared
    assert query(db, "SELECT count(*) FROM sagas") == [(300,)]


async def test_close_finishes_the_writes_already_queued(db: Path) -> None:
    store = await SqliteStore.open(db)
    histories = [run_history(f"s-{i:03d}") for i in range(100)]
    writes = [
        asyncio.ensure_future(store.create(h.first, h.log[0], FINGERPRINT)) for h in histories
    ]
    await asyncio.sleep(0)  # every write is queued

    await store.close()

    assert all(write.result()[1] for write in writes)
    assert query(db, "SELECT count(*) FROM sagas") == [(100,)]


async def test_a_slow_read_does_not_hold_up_the_reads_behind_it(db: Path) -> None:
    store = await SqliteStore.open(db)
    try:
        await store_history(store, run_history("s-1", [OK]))
        released = threading.Event()

        def slow(connection: sqlite3.Connection) -> bool:
            connection.execute("SELECT count(*) FROM sagas").fetchone()
            return released.wait(30)  # holds its connection until the reads behind it are done

        slow_read = asyncio.ensure_future(store._read(slow, "a slow read"))
        await asyncio.sleep(0.05)
        # With one read connection this would wait for the slow read, which waits for it.
        saga = await asyncio.wait_for(store.get("s-1"), 10)
        events = await asyncio.wait_for(store.events_page("s-1", 0, 10, newest_first=True), 10)
        assert saga is not None
        assert [event.sequence for event in events] == list(range(len(events), 0, -1))
        assert not slow_read.done()
        released.set()
        assert await slow_read is True
    finally:
        released.set()
        await store.close()


async def test_close_lets_a_running_read_finish(db: Path) -> None:
    store = await SqliteStore.open(db)
    await store_history(store, run_history("s-1", [OK]))
    released = threading.Event()

    def slow(connection: sqlite3.Connection) -> int:
        released.wait(30)
        return int(connection.execute("SELECT count(*) FROM sagas").fetchone()[0])

    slow_read = asyncio.ensure_future(store._read(slow, "a slow read"))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    released.set()
    await asyncio.wait_for(closing, 10)
    assert await slow_read == 1


# --- the compact shape of rows ---------------------------------------------------------------


async def test_a_definition_is_stored_once_however_many_sagas_run_it(
    store: SqliteStore, db: Path
) -> None:
    for i in range(5):
        await store_history(store, run_history(f"s-{i}", [OK]))

    assert query(db, "SELECT count(*) FROM definitions") == [(1,)]
    assert query(db, "SELECT count(DISTINCT definition_id) FROM sagas") == [(1,)]


async def test_a_commit_writes_only_the_steps_it_names(store: SqliteStore, db: Path) -> None:
    history = run_history("s-1", [OK, OK])
    await store.create(history.first, history.log[0], FINGERPRINT)
    saga, event, changed = history.commits()[0]  # step 0 succeeded, step 1 started
    assert changed == (0, 1)

    await store.commit(saga, event, changed_steps=(0,))

    rows = query(db, "SELECT step, state FROM saga_steps WHERE saga_id = 's-1' ORDER BY step")
    assert rows[0] == (0, "SUCCEEDED")
    assert rows[1] == (1, "PENDING"), "step 1 was not named, so its row was left alone"
    assert query(db, "SELECT version, state FROM sagas") == [(saga.version, saga.state.value)]


async def test_a_schema_1_store_is_converted_with_every_saga_and_event(db: Path) -> None:
    histories = [
        run_history("done", [OK, OK, OK]),
        run_history("undone", [OK, NO]),
        run_history("half", [OK], at=T0 + timedelta(seconds=5)),
    ]
    schema_1 = load_migrations()[:1]
    connection = open_writer(db, schema_1, synchronous="FULL", busy_timeout_ms=1000)
    with connection:
        connection.execute("BEGIN")
        for history in histories:
            saga = history.sagas[-1]
            connection.execute(
                "INSERT INTO sagas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    saga.saga_id,
                    saga.definition.name,
                    saga.definition.version,
                    saga.state.value,
                    encode_datetime(saga.created_at),
                    encode_datetime(saga.updated_at),
                    saga.version,
                    FINGERPRINT,
                    encode_saga(saga),
                ),
            )
            for recorded in history.log:
                connection.execute(
                    "INSERT INTO saga_events VALUES (?, ?, ?, ?, ?)",
                    (
                        recorded.saga_id,
                        recorded.sequence,
                        encode_datetime(recorded.recorded_at),
                        event_type(recorded.event),
                        encode_event(recorded.event),
                    ),
                )
        connection.execute("COMMIT")
    connection.close()

    store = await SqliteStore.open(db)
    try:
        for history in histories:
            assert await store.get(history.saga_id) == history.sagas[-1]
            assert tuple(await store.events(history.saga_id)) == tuple(history.log)
        again, created = await store.create(history.first, history.log[0], FINGERPRINT)
        assert (again, created) == (history.sagas[-1], False), "fingerprints were kept"
    finally:
        await store.close()
    tables = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert not {"sagas_v1", "saga_events_v1"} & tables
    assert query(db, "SELECT count(*) FROM definitions") == [(1,)]


async def test_a_stored_body_that_is_not_ours_reads_as_store_corrupt(
    store: SqliteStore, db: Path
) -> None:
    await store_history(store, run_history("s-1", [OK]))

    def damage(sql: str) -> None:
        connection = sqlite3.connect(db)
        try:
            connection.execute("DROP TRIGGER IF EXISTS saga_events_no_update")
            connection.execute(sql)
            connection.commit()
        finally:
            connection.close()

    damage("UPDATE saga_events SET body = x'c1' WHERE sequence = 2")
    with pytest.raises(StoreCorrupt, match="stored event cannot be decoded"):
        await store.events("s-1")

    damage("UPDATE saga_steps SET failure = x'92a178a179' WHERE step = 0")
    with pytest.raises(StoreCorrupt, match="stored failure is not in the expected form"):
        await store.get("s-1")


# --- retention: what the database itself allows ----------------------------------------------


async def test_the_database_lets_only_ended_sagas_lose_their_events(
    store: SqliteStore, db: Path
) -> None:
    histories = {
        "running": run_history("running", [OK]),
        "compensating": run_history("compensating", [OK, NO]),
        "parked": run_history("parked", [OK, NO, BROKEN]),
        "succeeded": run_history("succeeded", [OK, OK, OK]),
        "compensated": run_history("compensated", [OK, NO, OK, OK]),
    }
    for history in histories.values():
        await store_history(store, history)

    connection = sqlite3.connect(db, isolation_level=None)
    try:
        for saga_id in ("running", "compensating", "parked"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                connection.execute("DELETE FROM saga_events WHERE saga_id = ?", (saga_id,))
            with pytest.raises(sqlite3.IntegrityError, match="ended SUCCEEDED or COMPENSATED"):
                connection.execute("DELETE FROM sagas WHERE saga_id = ?", (saga_id,))
        for saga_id in ("succeeded", "compensated"):
            with pytest.raises(sqlite3.IntegrityError, match="cannot be updated"):
                connection.execute(
                    "UPDATE saga_events SET body = x'80' WHERE saga_id = ?", (saga_id,)
                )
            deleted = connection.execute("DELETE FROM saga_events WHERE saga_id = ?", (saga_id,))
            assert deleted.rowcount == len(histories[saga_id].log)
    finally:
        connection.close()

    for saga_id in ("running", "compensating", "parked"):
        assert await store.events(saga_id) == histories[saga_id].log


async def test_prune_deletes_every_row_of_the_sagas_it_removes(
    store: SqliteStore, db: Path
) -> None:
    done = run_history("done", [OK, OK, OK], labels={"tenant": "acme", "order": "o-1"})
    kept = run_history("kept", [OK, OK, OK], at=T0 + timedelta(days=1), labels={"tenant": "a"})
    await store_history(store, done)
    await store_history(store, kept)

    assert await store.prune(T0 + timedelta(hours=1), 500) == PruneResult(1, len(done.log))

    for table in ("sagas", "saga_steps", "saga_events", "saga_labels"):
        assert query(db, f"SELECT DISTINCT saga_id FROM {table}") == [("kept",)], table
    assert query(db, "SELECT state, total FROM saga_counts WHERE total > 0") == [("SUCCEEDED", 1)]


# --- the registry ----------------------------------------------------------------------------


async def test_a_conflicting_registration_stores_nothing(store: SqliteStore, db: Path) -> None:
    await store.register_definition(open_account(version=5), T0)
    before = [query(db, f"SELECT * FROM {t}") for t in ("definitions", "definition_versions")]
    edited = dataclasses.replace(open_account(version=5), description="edited")

    with pytest.raises(DefinitionConflict, match=r"version 5 is registered already"):
        await store.register_definition(edited, T0 + timedelta(hours=1))

    after = [query(db, f"SELECT * FROM {t}") for t in ("definitions", "definition_versions")]
    assert after == before


async def test_a_registered_definition_survives_reopening(db: Path) -> None:
    store = await SqliteStore.open(db)
    registered, _ = await store.register_definition(transfer(version=4), T0)
    await store.close()

    reopened = await SqliteStore.open(db)
    try:
        assert list(await reopened.definitions()) == [registered]
        assert await reopened.register_definition(transfer(version=4), T0) == (registered, False)
    finally:
        await reopened.close()


# --- the hot path stays as short as schema 2's -----------------------------------------------


async def test_creation_and_commit_run_no_more_statements_than_before(store: SqliteStore) -> None:
    statements: list[str] = []
    last = [""]

    def trace(sql: str) -> None:
        # A statement whose triggers run is reported again for each of them: once is enough.
        if not sql.strip() or sql == last[0]:
            return
        last[0] = sql
        if sql.split(None, 1)[0].upper() not in _TRANSACTION_CONTROL:
            statements.append(" ".join(sql.split()[:3]).upper())

    definition = open_account()  # one object, as the engine holds each loaded definition
    warm = run_history("warm", [OK], definition=definition)
    await store_history(store, warm)  # the definition is stored and known from here on
    await store._on_writer(lambda connection: connection.set_trace_callback(trace))
    history = run_history("s-1", [OK], definition=definition)
    labelled = run_history("s-2", definition=definition, labels={"tenant": "acme", "order": "o"})

    await store.create(history.first, history.log[0], FINGERPRINT)
    created = statements[:]
    statements.clear()
    saga, event, changed = history.commits()[0]
    await store.commit(saga, event, changed)
    committed = statements[:]
    statements.clear()
    await store.create(labelled.first, labelled.log[0], FINGERPRINT)
    await store._on_writer(lambda connection: connection.set_trace_callback(None))

    assert created == [
        "SELECT FINGERPRINT FROM",
        "INSERT INTO SAGAS",
        *["INSERT INTO SAGA_STEPS"] * 3,
        "INSERT INTO SAGA_EVENTS",
    ]
    assert committed == [
        "UPDATE SAGAS SET",
        *["UPDATE SAGA_STEPS SET"] * 2,
        "INSERT INTO SAGA_EVENTS",
    ]
    assert statements == [
        "SELECT FINGERPRINT FROM",
        "INSERT INTO SAGAS",
        *["INSERT INTO SAGA_STEPS"] * 3,
        *["INSERT INTO SAGA_LABELS"] * 2,
        "INSERT INTO SAGA_EVENTS",
    ]


_TRANSACTION_CONTROL = {"BEGIN", "SAVEPOINT", "RELEASE", "COMMIT", "ROLLBACK"}


@pytest.mark.parametrize("name", list(FILTERS))
async def test_every_filter_reads_an_index_never_the_whole_table(
    store: SqliteStore, name: str
) -> None:
    await store_population(store)
    where = FILTERS[name]
    after = ListCursor(T0 + timedelta(seconds=3), "m")

    def plans(connection: sqlite3.Connection) -> list[str]:
        found: list[str] = []
        for made in (
            list_query(connection, where, 50, None),
            list_query(connection, where, 50, after),
            count_query(connection, where),
            count_by_state_query(connection, where),
        ):
            if made is not None:
                sql, params = made
                rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
                found.extend(str(row[3]) for row in rows)
        return found

    for line in await store._on_writer(plans):
        if line.startswith(("SCAN s", "SCAN l", "SEARCH s", "SEARCH l")):
            assert "INDEX" in line, (name, line)


# --- damaged rows ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "what"),
    [("audit", "audit trail"), ("labels", "labels"), ("deadline_exceeded", "flag")],
)
async def test_a_damaged_new_column_names_the_saga_and_the_file(
    store: SqliteStore, db: Path, column: str, what: str
) -> None:
    await store_history(store, run_history("s-1", [OK], labels={"tenant": "acme"}))
    value = 7 if column == "deadline_exceeded" else b"\xc1"
    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA ignore_check_constraints = ON")
        connection.execute(f"UPDATE sagas SET {column} = ? WHERE saga_id = 's-1'", (value,))
        connection.commit()
    finally:
        connection.close()

    with pytest.raises(StoreCorrupt, match=rf"saga s-1.*{what}") as raised:
        await store.get("s-1")
    assert str(db) in str(raised.value)


# --- schema 2 to 3 ---------------------------------------------------------------------------


def _schema_2_saga(saga: Saga, definition_id: int) -> tuple[Any, ...]:
    """A saga's row as schema 2 wrote it."""
    return (
        saga.saga_id,
        definition_id,
        saga.definition.name,
        saga.definition.version,
        saga.state.value,
        to_micros(saga.created_at),
        to_micros(saga.updated_at),
        None if saga.ended_at is None else to_micros(saga.ended_at),
        saga.version,
        FINGERPRINT,
        saga.input,
        pack_failure(saga.failure),
        saga.cancel_reason,
        pack({}),
    )


def _schema_2_step(saga: Saga, index: int) -> tuple[Any, ...]:
    step = saga.steps[index]

    def micros(value: datetime | None) -> int | None:
        return None if value is None else to_micros(value)

    return (
        saga.saga_id,
        index,
        step.state.value,
        step.execute_attempts,
        step.compensate_attempts,
        step.output,
        pack_failure(step.failure),
        micros(step.next_attempt_at),
        micros(step.started_at),
        micros(step.ended_at),
    )


def _schema_2_event(recorded: RecordedEvent) -> tuple[Any, ...]:
    event = recorded.event
    if isinstance(event, CancelRequested):  # schema 2 recorded no actor
        body = pack({"reason": event.reason, "in_flight": event.call_in_flight})
    else:
        body = pack_event(event)
    return (
        recorded.saga_id,
        recorded.sequence,
        to_micros(recorded.recorded_at),
        event_type(event),
        body,
    )


def write_schema_2(db: Path, histories: Sequence[SagaHistory]) -> None:
    """A schema-2 file holding these sagas and their logs, written as schema 2 wrote them."""
    connection = open_writer(db, load_migrations()[:2], synchronous="FULL", busy_timeout_ms=1000)
    with connection:
        connection.execute("BEGIN")
        definition_ids: dict[SagaDefinition, int] = {}
        for history in histories:
            definition = history.first.definition
            if definition not in definition_ids:
                body = pack_definition(definition)
                connection.execute(
                    "INSERT INTO definitions (name, version, digest, body) VALUES (?, ?, ?, ?)",
                    (definition.name, definition.version, hashlib.sha256(body).digest(), body),
                )
                definition_ids[definition] = len(definition_ids) + 1
            saga = history.last
            connection.execute(
                "INSERT INTO sagas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _schema_2_saga(saga, definition_ids[definition]),
            )
            for index in range(len(saga.steps)):
                connection.execute(
                    "INSERT INTO saga_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _schema_2_step(saga, index),
                )
            for recorded in history.log:
                connection.execute(
                    "INSERT INTO saga_events VALUES (?, ?, ?, ?, ?)", _schema_2_event(recorded)
                )
        connection.execute("COMMIT")
    connection.close()


async def test_a_schema_2_store_is_upgraded_with_its_sagas_intact_and_registry_filled(
    db: Path,
) -> None:
    edited = dataclasses.replace(open_account(), description="edited, same version")
    histories = [
        run_history("running", [OK], at=T0),
        run_history("cancelled", [OK, CancelRequested("stop")], at=T0 + timedelta(seconds=1)),
        run_history(
            "cancelled-done", [OK, CancelRequested("stop"), OK, OK, OK], at=T0 + timedelta(1)
        ),
        run_history("parked", [OK, NO, BROKEN], at=T0 + timedelta(seconds=3)),
        run_history("done", [OK, OK, OK], at=T0 + timedelta(seconds=4)),
        run_history("edited", [OK], definition=edited, at=T0 + timedelta(days=2)),
        run_history("edited-done", [OK, OK, OK], definition=edited, at=T0 + timedelta(days=3)),
        run_history("closing", [], definition=open_account("close-account"), at=T0),
    ]
    assert histories[1].last.state is SagaState.COMPENSATING
    assert histories[2].last.state is SagaState.COMPENSATED
    assert [entry.actor for entry in histories[2].last.audit] == [""]
    write_schema_2(db, histories)

    store = await SqliteStore.open(db)
    try:
        for history in histories:
            assert await store.get(history.saga_id) == history.last, history.saga_id
            assert await store.events(history.saga_id) == history.log, history.saga_id
        registry = await store.definitions()
        stuck_on_accounts = await store.list(SagaFilter(stuck_on_participant="accounts"), 10, None)
        by_state = await store.count_by_state(SagaFilter(definition="open-account"))
        pruned = await store.prune(T0 + timedelta(days=10), 10)
    finally:
        await store.close()

    assert [(d.definition, d.registered_at, d.unfinished) for d in registry] == [
        (open_account("close-account"), T0, 1),
        (edited, T0 + timedelta(days=2), 4),  # the newest content of the version
    ]
    assert [saga.saga_id for saga in stuck_on_accounts.sagas] == [
        "running",
        "cancelled",
        "parked",
        "edited",
    ]
    assert dict(by_state) == {
        SagaState.RUNNING: 2,
        SagaState.COMPENSATING: 1,
        SagaState.COMPENSATED: 1,
        SagaState.NEEDS_ATTENTION: 1,
        SagaState.SUCCEEDED: 2,
    }
    assert pruned == PruneResult(3, len(histories[2].log) + len(histories[4].log) + 4)
    assert query(db, "SELECT version, name FROM schema_migrations ORDER BY version")[-1] == (
        5,
        "leases",
    )


def _drivers(where: SagaFilter) -> list[tuple[str, object]]:
    """Every driver the planner may choose for ``where``."""
    found: list[tuple[str, object]] = [("creation", None)]
    if where.states:
        found.append(("states", None))
    if where.definition is not None:
        found.append(("definition", None))
    if where.stuck_on_step is not None:
        found.append(("step", None))
    if where.stuck_on_participant is not None:
        found.append(("participant", None))
    found.extend(("label", label) for label in where.labels)
    return found


@pytest.mark.parametrize("name", list(FILTERS))
async def test_whichever_index_drives_a_filter_the_sagas_listed_are_the_same(
    store: SqliteStore, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    population = await store_population(store)
    where = FILTERS[name]
    expected = [p.saga_id for p in population if p.matches(where)]
    unfiltered = dataclasses.replace(where, states=frozenset())
    every_state = [p.state for p in population if p.matches(unfiltered)]

    for driver, key in _drivers(where):

        def plan(
            connection: sqlite3.Connection,
            where: SagaFilter,
            driver: str = driver,
            key: object = key,
        ) -> object:
            if driver == "states" and not where.states:
                driver = "creation"  # counting by state drops the states from the filter
            counts = sqlite_queries.read_counts(connection)
            return sqlite_queries._driver_plan(where, counts, driver, key)

        monkeypatch.setattr(sqlite_queries, "_plan", plan)
        listed = [s for page in await all_pages(store, where, 3) for s in page]
        assert listed == expected, driver
        assert await store.count(where) == len(expected), driver
        assert dict(await store.count_by_state(where)) == dict(Counter(every_state)), driver


async def test_a_schema_2_row_that_cannot_be_read_stops_the_upgrade_and_names_it(
    db: Path,
) -> None:
    write_schema_2(db, [run_history("fine", [OK]), run_history("damaged", [OK])])
    connection = sqlite3.connect(db)
    try:
        connection.execute("UPDATE saga_steps SET failure = x'c1' WHERE saga_id = 'damaged'")
        connection.commit()
    finally:
        connection.close()

    with pytest.raises(StoreCorrupt, match=r"sagas\.db cannot be migrated to schema 3.*damaged"):
        await SqliteStore.open(db)

    assert query(db, "SELECT max(version) FROM schema_migrations") == [(2,)]
    assert "saga_labels" not in {name for (name,) in query(db, "SELECT name FROM sqlite_master")}


async def test_a_new_store_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "private.db"
    store = await SqliteStore.open(db)
    await store_history(store, run_history("s-1", [OK]))
    try:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await store.close()


async def test_an_existing_store_file_keeps_the_permissions_its_owner_gave_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "shared.db"
    await (await SqliteStore.open(db)).close()
    db.chmod(0o640)

    await (await SqliteStore.open(db)).close()

    assert stat.S_IMODE(db.stat().st_mode) == 0o640
