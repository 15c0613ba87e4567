"""What the PostgreSQL store adds to the contract: its URL and driver, migrations, replicas
sharing one database, the change feed's commit order under concurrent writers, and a server
that goes away and comes back."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from coordinator.core.errors import (
    DefinitionConflict,
    InvalidArgument,
    SagaAlreadyExists,
    SagaError,
    StorageUnavailable,
)
from coordinator.ports import SagaFilter
from coordinator.store import open_store
from coordinator.store.errors import InvalidStoreUrl, SchemaTooNew, StoreCorrupt
from coordinator.store.postgres import PostgresStore
from coordinator.store.postgres_schema import load_migrations
from tests.support.postgres import PostgresServer, postgres_server

from .strategies import NO, OK, T0, SagaHistory, open_account, run_history, transfer

FINGERPRINT = "fp-1"


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    """A store on a fresh database, closed after the test."""
    opened = await PostgresStore.open(postgres_url)
    try:
        yield opened
    finally:
        await opened.close()


async def query(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement, on a connection of its own (autocommit)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as connection:
        cursor = await connection.execute(sql.encode(), params)
        return await cursor.fetchall() if cursor.description else []


async def store_history(store: PostgresStore, history: SagaHistory) -> None:
    """Create the saga and commit its whole history, as the engine does."""
    await store.create(history.first, history.log[0], FINGERPRINT)
    for saga, event, changed in history.commits():
        await store.commit(saga, event, changed)


# --- URLs and the driver ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql://", "postgres://"])
async def test_a_postgresql_url_opens_the_postgresql_store(postgres_url: str, scheme: str) -> None:
    store = await open_store(scheme + postgres_url.removeprefix("postgresql://"), pool_max=2)
    try:
        assert isinstance(store, PostgresStore)
        assert await store.feed_bounds() == (0, 0)
    finally:
        await store.close()


async def test_without_the_driver_the_url_is_refused_naming_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in sys.modules if name.startswith("coordinator.store.postgres")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed

    with pytest.raises(InvalidStoreUrl, match=r"install saga-coordinator\[postgresql\]"):
        await open_store("postgresql://postgres@127.0.0.1:1/sagas")


@pytest.mark.parametrize(
    "options",
    [{"pool_max": 0}, {"pool_min": 3, "pool_max": 2}, {"connect_timeout": 0}, {"stall_timeout": 0}],
    ids=["no connections", "min above max", "no time to connect", "no time between statements"],
)
async def test_pool_options_that_cannot_work_are_refused(
    postgres_url: str, options: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"pool|connect_timeout|stall_timeout"):
        await PostgresStore.open(postgres_url, **options)


# --- migrations ------------------------------------------------------------------------------


async def test_migrations_are_applied_once_and_recorded(postgres_url: str) -> None:
    shipped = [(migration.version, migration.name) for migration in load_migrations()]
    await (await PostgresStore.open(postgres_url)).close()
    first = await query(postgres_url, "SELECT version, name, applied_at FROM schema_migrations")

    await (await PostgresStore.open(postgres_url)).close()

    again = await query(postgres_url, "SELECT version, name, applied_at FROM schema_migrations")
    assert [(version, name) for version, name, _ in first] == shipped
    assert again == first, "nothing applied twice"


async def test_coordinators_opening_one_new_database_at_once_migrate_it_once(
    postgres_url: str,
) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(6)))
    try:
        history = run_history("s-1", [OK])
        await store_history(stores[0], history)
        assert await stores[5].get("s-1") == history.last
    finally:
        await asyncio.gather(*(store.close() for store in stores))

    recorded = await query(postgres_url, "SELECT version FROM schema_migrations ORDER BY version")
    assert recorded == [(migration.version,) for migration in load_migrations()]


async def test_a_database_migrated_by_a_newer_coordinator_is_refused_untouched(
    postgres_url: str,
) -> None:
    await (await PostgresStore.open(postgres_url)).close()
    await query(postgres_url, "INSERT INTO schema_migrations (version, name) VALUES (99, 'later')")
    before = await query(postgres_url, "SELECT * FROM schema_migrations ORDER BY version")

    with pytest.raises(SchemaTooNew, match=r"schema version 99, newer than this coordinator"):
        await PostgresStore.open(postgres_url)

    assert await query(postgres_url, "SELECT * FROM schema_migrations ORDER BY version") == before


async def test_saga_tables_without_recorded_migrations_are_refused_untouched(
    postgres_url: str,
) -> None:
    await query(postgres_url, "CREATE TABLE sagas (id integer)")

    with pytest.raises(StoreCorrupt, match="no schema_migrations"):
        await PostgresStore.open(postgres_url)

    assert await query(postgres_url, "SELECT to_regclass('schema_migrations')") == [(None,)]


# --- replicas writing at once ----------------------------------------------------------------


async def test_feed_positions_follow_commit_order_with_no_gap_ever_seen_by_a_reader(
    postgres_url: str,
) -> None:
    # Two coordinators on one database, 24 connections writing at once: positions are taken
    # when each write commits, so a reader never sees position n + 1 before n.
    replicas = [await PostgresStore.open(postgres_url, pool_max=12) for _ in range(2)]
    histories = [
        run_history(f"s-{i:02d}", [OK, NO, OK, OK] if i % 3 else [OK, OK, OK]) for i in range(80)
    ]
    total = sum(len(history.log) for history in histories)
    writing = True
    seen: list[tuple[int, str, int]] = []
    gaps: list[str] = []

    async def write(i: int, history: SagaHistory) -> None:
        await store_history(replicas[i % 2], history)

    async def read() -> None:
        position = 0
        while writing or position < total:
            page = await replicas[1].feed(position, 25)
            positions = [change.position for change in page.changes]
            if positions != list(range(position + 1, position + 1 + len(positions))):
                gaps.append(f"after {position}: {positions}")
            seen.extend((c.position, c.saga_id, c.record.sequence) for c in page.changes)
            position = page.position
            await asyncio.sleep(0)

    reader = asyncio.create_task(read())
    try:
        await asyncio.gather(*(write(i, history) for i, history in enumerate(histories)))
        writing = False
        await asyncio.wait_for(reader, 30)

        assert gaps == [], "a reader saw a position before an earlier one was visible"
        assert [position for position, _, _ in seen] == list(range(1, total + 1))
        assert await replicas[0].feed_bounds() == (0, total)
        for history in histories:
            sequences = [sequence for _, saga_id, sequence in seen if saga_id == history.saga_id]
            assert sequences == list(range(1, len(history.log) + 1)), "each saga's log in order"
        stored = await query(postgres_url, "SELECT state, count(*) FROM sagas GROUP BY state")
        expected = Counter(history.last.state for history in histories)
        assert dict(await replicas[0].count_by_state(SagaFilter())) == dict(expected)
        assert sum(count for _, count in stored) == len(histories)
    finally:
        reader.cancel()
        for replica in replicas:
            await replica.close()


async def test_a_write_that_took_its_position_holds_back_later_writes_until_it_ends(
    postgres_url: str, store: PostgresStore
) -> None:
    # Another writer has taken position 2 and not committed yet: a later write waits for it,
    # so nothing at a later position can become visible before position 2 does.
    history = run_history("s-1", [OK])
    await store.create(history.first, history.log[0], FINGERPRINT)
    async with await psycopg.AsyncConnection.connect(postgres_url) as other:
        cursor = await other.execute("UPDATE feed_head SET position = position + 1 RETURNING 1")
        assert await cursor.fetchone() == (1,)
        commit = asyncio.create_task(store.commit(*history.commits()[0]))
        await asyncio.sleep(0.5)

        assert not commit.done(), "the later write went ahead of one that took its position first"
        assert (await store.feed(1, 10)).changes == ()
        await other.rollback()  # that writer failed: its position is given back
        await asyncio.wait_for(commit, 10)

    page = await store.feed(1, 10)
    assert [
        (change.position, change.saga_id, change.record.sequence) for change in page.changes
    ] == [(2, "s-1", 2)]


async def test_duplicate_creates_from_two_coordinators_store_one_saga(postgres_url: str) -> None:
    replicas = [await PostgresStore.open(postgres_url) for _ in range(2)]
    history = run_history("s-1")
    try:
        same = await asyncio.gather(
            *(replicas[i % 2].create(history.first, history.log[0], FINGERPRINT) for i in range(20))
        )
        others = [run_history("s-2", at=T0 + timedelta(seconds=i)) for i in range(10)]
        different = await asyncio.gather(
            *(replicas[i % 2].create(h.first, h.log[0], f"fp-{i}") for i, h in enumerate(others)),
            return_exceptions=True,
        )

        assert sorted(created for _, created in same) == [False] * 19 + [True]
        assert all(saga == history.first for saga, _ in same)
        assert await replicas[1].events("s-1") == history.log
        winners = [i for i, result in enumerate(different) if isinstance(result, tuple)]
        assert len(winners) == 1
        losers = [result for result in different if not isinstance(result, tuple)]
        assert all(isinstance(loser, SagaAlreadyExists) for loser in losers)
        assert await replicas[0].get("s-2") == others[winners[0]].first
        assert await replicas[0].count(SagaFilter()) == 2
        assert [c.saga_id for c in (await replicas[0].feed(0, 100)).changes] in (
            ["s-1", "s-2"],
            ["s-2", "s-1"],
        )
    finally:
        for replica in replicas:
            await replica.close()


async def test_registrations_of_one_version_from_two_coordinators_keep_one_content(
    postgres_url: str,
) -> None:
    replicas = [await PostgresStore.open(postgres_url) for _ in range(2)]
    contents = [transfer(version=2), open_account("transfer", 2)]
    try:
        results = await asyncio.gather(
            *(replicas[i % 2].register_definition(contents[i % 2], T0) for i in range(10)),
            return_exceptions=True,
        )

        registered = [result for result in results if isinstance(result, tuple)]
        refused = [result for result in results if isinstance(result, BaseException)]
        assert [new for _, new in registered].count(True) == 1
        winner = next(definition for definition, new in registered if new).definition
        assert all(definition.definition == winner for definition, _ in registered)
        assert all(isinstance(error, DefinitionConflict) for error in refused)
        assert len(registered) + len(refused) == 10
        assert [d.definition for d in await replicas[1].definitions("transfer")] == [winner]
    finally:
        for replica in replicas:
            await replica.close()


async def test_prunes_from_two_coordinators_at_once_remove_each_saga_once(
    postgres_url: str,
) -> None:
    replicas = [await PostgresStore.open(postgres_url) for _ in range(2)]
    histories = [run_history(f"done-{i:02d}", [OK, OK, OK]) for i in range(60)]
    await asyncio.gather(*(store_history(replicas[0], history) for history in histories))
    kept = run_history("running", [OK])
    await store_history(replicas[0], kept)
    _, newest = await replicas[0].feed_bounds()
    changes = (await replicas[0].feed(0, 1000)).changes
    highest_pruned = max(change.position for change in changes if change.saga_id != "running")
    cutoff = T0 + timedelta(days=1)
    try:

        async def prune_all(replica: PostgresStore) -> tuple[int, int]:
            sagas = events = 0
            while (result := await replica.prune(cutoff, 7)).sagas:
                sagas, events = sagas + result.sagas, events + result.events
            return sagas, events

        removed = await asyncio.gather(*(prune_all(replica) for replica in replicas))

        assert sum(sagas for sagas, _ in removed) == 60
        assert sum(events for _, events in removed) == sum(len(h.log) for h in histories)
        assert await replicas[1].count(SagaFilter()) == 1
        assert dict(await replicas[1].count_by_state(SagaFilter())) == {kept.last.state: 1}
        assert await replicas[1].feed_bounds() == (highest_pruned, newest)
        left = (await replicas[1].feed(0, 1000)).changes
        assert [change.saga_id for change in left] == ["running"] * len(kept.log)
    finally:
        for replica in replicas:
            await replica.close()


# --- a server that goes away -----------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own, which it may stop and start again."""
    with postgres_server(max_connections=50) as server:
        yield server


async def test_a_stopped_server_is_storage_unavailable_and_a_restarted_one_serves_again(
    own_server: PostgresServer,
) -> None:
    url = own_server.url(own_server.create_database())
    store = await PostgresStore.open(url, pool_max=3, connect_timeout=1)
    history = run_history("s-1", [OK, OK])
    await store.create(history.first, history.log[0], FINGERPRINT)
    try:
        own_server.stop(immediate=True)
        other = run_history("s-2")
        saga, event, changed = history.commits()[0]

        for attempt in (
            lambda: store.get("s-1"),
            lambda: store.commit(saga, event, changed),
            lambda: store.create(other.first, other.log[0], FINGERPRINT),
            lambda: store.list(SagaFilter(), 10, None),
            lambda: store.feed(0, 10),
            lambda: store.count(SagaFilter()),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as refused:
                await attempt()
            assert not isinstance(refused.value, psycopg.Error)
            assert "127.0.0.1" in refused.value.message
            assert time.monotonic() - started < 10
        with pytest.raises(StorageUnavailable):
            await PostgresStore.open(url, connect_timeout=1)

        own_server.start()  # same port, same data

        deadline = time.monotonic() + 20
        while True:
            try:
                await store.commit(saga, event, changed)
                break
            except StorageUnavailable:
                assert time.monotonic() < deadline, "the store never reconnected"
                await asyncio.sleep(0.2)
        assert await store.get("s-1") == history.sagas[1]
    finally:
        await store.close()


async def test_a_write_whose_process_stops_mid_transaction_is_ended_and_holds_nobody_up(
    postgres_url: str,
) -> None:
    # A replica paused (SIGSTOP, a frozen VM) in the middle of a write, just after taking the
    # feed position every write needs: the server ends its transaction after stall_timeout.
    stalled = await PostgresStore.open(postgres_url, stall_timeout=0.5)
    other = await PostgresStore.open(postgres_url)
    history = run_history("s-1", [OK])
    waited: list[float] = []

    async def write_that_stops() -> None:
        async with stalled._writing("a write whose process stops") as connection:
            await connection.execute("UPDATE feed_head SET position = position + 1")
            started = time.monotonic()  # the process stops here; another replica writes
            await asyncio.wait_for(other.commit(*history.commits()[0]), 10)
            waited.append(time.monotonic() - started)
            await asyncio.sleep(0.5)  # the process is still away; then it wakes up

    try:
        await other.create(history.first, history.log[0], FINGERPRINT)
        with pytest.raises(StorageUnavailable):
            await write_that_stops()
        assert waited[0] < 3, f"another write waited {waited[0]:.1f}s for the stalled one"
        page = await other.feed(0, 10)
        assert [(c.position, c.record.sequence) for c in page.changes] == [(1, 1), (2, 2)]
    finally:
        await stalled.close()
        await other.close()


async def test_a_store_reconnects_within_seconds_of_the_server_however_long_it_was_away(
    own_server: PostgresServer,
) -> None:
    # psycopg's pool retries a connection after 1, 2, 4, 8 s... for five minutes: back after
    # 8 s, the server would have waited until the attempt at about 15 s.
    url = own_server.url(own_server.create_database())
    store = await PostgresStore.open(url, pool_max=2, connect_timeout=1)
    try:
        history = run_history("s-1")
        await store.create(history.first, history.log[0], FINGERPRINT)
        own_server.stop()
        away_until = time.monotonic() + 8
        while time.monotonic() < away_until:
            with pytest.raises(StorageUnavailable):
                await store.get("s-1")
        own_server.start()
        back = time.monotonic()

        while True:
            try:
                assert await store.get("s-1") == history.first
                break
            except StorageUnavailable:
                await asyncio.sleep(0.1)
        reconnected = time.monotonic() - back
        assert reconnected < 3.5, f"the store reconnected {reconnected:.1f}s after the server"
    finally:
        await store.close()


async def test_errors_of_a_closed_store_are_its_own(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.close()

    with pytest.raises(SagaError) as refused:
        await store.feed_bounds()

    assert not isinstance(refused.value, psycopg.Error)


async def test_a_value_postgresql_cannot_hold_is_refused_as_invalid_and_nothing_stored(
    postgres_url: str,
) -> None:
    store = await open_store(postgres_url)
    try:
        history = run_history("s-nul", labels={"tenant": "acme\x00corp"})
        with pytest.raises(InvalidArgument, match="cannot be stored"):
            await store.create(history.first, history.log[0], "fp")

        assert await store.get("s-nul") is None
        fine = run_history("s-fine", labels={"tenant": "acme"})
        await store.create(fine.first, fine.log[0], "fp")  # the store goes on working
    finally:
        await store.close()
