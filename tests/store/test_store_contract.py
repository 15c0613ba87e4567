"""The store port's contract, run against every adapter: each one must behave the same."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.core.errors import ConcurrentUpdate, SagaAlreadyExists
from coordinator.core.events import CancelRequested, RecordedEvent
from coordinator.core.machine import fold
from coordinator.core.model import SagaState
from coordinator.ports import ListCursor, SagaFilter, SagaPage, SagaStore
from coordinator.store import open_store
from coordinator.store.errors import StoreClosed
from coordinator.store.memory import MemoryStore
from coordinator.store.sqlite import SqliteStore

from .strategies import (
    ANSWERS_BY_STATE,
    NO,
    OK,
    T0,
    UNAVAILABLE,
    Answer,
    SagaHistory,
    open_account,
    run_history,
    saga_histories,
)

FINGERPRINT = "fp-1"

SCENARIOS = {
    "running": (),
    "succeeded": (OK, OK, OK),
    "rejected then compensated": (OK, OK, NO, OK, OK),
    "retried then succeeded": (UNAVAILABLE, OK, OK, UNAVAILABLE, OK),
    "retries spent then compensated": (OK, UNAVAILABLE, UNAVAILABLE, OK),
    "compensation failed": (OK, NO, UNAVAILABLE, UNAVAILABLE),
    "cancelled": (OK, CancelRequested("changed my mind"), OK, OK),
}


async def store_history(store: SagaStore, history: SagaHistory, upto: int | None = None) -> None:
    """Create the saga, then commit its events (all, or the first ``upto``), as the engine does."""
    await store.create(history.first, history.log[0], FINGERPRINT)
    for saga, event, changed in history.commits()[:upto]:
        await store.commit(saga, event, changed)


async def all_pages(store: SagaStore, where: SagaFilter, limit: int) -> list[list[str]]:
    """The saga ids of every page of a listing, following the cursors to the end."""
    pages: list[list[str]] = []
    cursor: ListCursor | None = None
    while True:
        page: SagaPage = await store.list(where, limit, cursor)
        pages.append([saga.saga_id for saga in page.sagas])
        if page.next_cursor is None:
            return pages
        assert len(page.sagas) == limit
        cursor = page.next_cursor
        assert len(pages) <= 10_000, "the cursors never reach the end"


def replay(log: Sequence[RecordedEvent]) -> object:
    """The saga that folding a stored log gives."""
    return fold([(recorded.event, recorded.recorded_at) for recorded in log])


class StoreContract:
    """Every test of the store port; a subclass says how to build the store."""

    async def open_store(self, tmp_path: Path) -> SagaStore:
        """A new, empty store."""
        raise NotImplementedError

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SagaStore]:
        """An empty store, closed after the test."""
        store = await self.open_store(tmp_path)
        try:
            yield store
        finally:
            await store.close()

    # --- create ------------------------------------------------------------------------------

    async def test_created_saga_reads_back_equal_with_its_first_event(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", trace_context={"traceparent": "00-ab-cd-01"})

        saga, created = await store.create(history.first, history.log[0], FINGERPRINT)

        assert created is True
        assert saga == history.first
        assert await store.get("s-1") == history.first
        assert await store.events("s-1") == history.log

    async def test_create_again_with_the_same_fingerprint_returns_the_stored_saga_and_false(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK])
        await store_history(store, history)

        saga, created = await store.create(history.first, history.log[0], FINGERPRINT)

        assert created is False
        assert saga == history.last, "the saga as stored now, not as first created"
        assert await store.events("s-1") == history.log

    async def test_create_with_another_fingerprint_raises_already_exists_and_changes_nothing(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1")
        await store_history(store, history)
        other = run_history("s-1", definition=open_account("close-account"), at=T0 + timedelta(1))

        with pytest.raises(SagaAlreadyExists, match="s-1"):
            await store.create(other.first, other.log[0], "fp-other")

        assert await store.get("s-1") == history.first
        assert await store.events("s-1") == history.log

    async def test_concurrent_creates_of_one_id_store_it_once(self, store: SagaStore) -> None:
        history = run_history("s-1")

        results = await asyncio.gather(
            *(store.create(history.first, history.log[0], FINGERPRINT) for _ in range(20))
        )

        assert sorted(created for _, created in results) == [False] * 19 + [True]
        assert all(saga == history.first for saga, _ in results)
        assert await store.events("s-1") == history.log

    async def test_concurrent_creates_of_one_id_by_different_requests_let_exactly_one_win(
        self, store: SagaStore
    ) -> None:
        histories = [run_history("s-1", at=T0 + timedelta(seconds=i)) for i in range(10)]

        results = await asyncio.gather(
            *(store.create(h.first, h.log[0], f"fp-{i}") for i, h in enumerate(histories)),
            return_exceptions=True,
        )

        winners = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
        assert len(winners) == 1
        losers = [result for result in results if isinstance(result, BaseException)]
        assert all(isinstance(loser, SagaAlreadyExists) for loser in losers)
        winner = histories[winners[0]]
        assert await store.get("s-1") == winner.first
        assert await store.events("s-1") == winner.log

    async def test_a_creation_that_does_not_start_at_version_one_is_refused(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK])

        with pytest.raises(ValueError, match="version 1"):
            await store.create(history.last, history.log[-1], FINGERPRINT)

        assert await store.get("s-1") is None

    # --- commit ------------------------------------------------------------------------------

    async def test_commit_stores_the_new_state_with_its_event(self, store: SagaStore) -> None:
        history = run_history("s-1", [OK, OK])
        await store_history(store, history)

        assert await store.get("s-1") == history.last
        assert await store.events("s-1") == history.log

    async def test_commit_with_a_stale_version_raises_concurrent_update_and_stores_nothing(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK, OK, OK])
        await store_history(store, history, upto=1)
        (v2, e2, _), _, (v4, e4, _) = history.commits()

        with pytest.raises(ConcurrentUpdate, match="version 2"):
            await store.commit(v2, e2)  # already applied: the stored saga is past it
        with pytest.raises(ConcurrentUpdate, match="version 2"):
            await store.commit(v4, e4)  # skips version 3

        assert await store.get("s-1") == v2
        assert await store.events("s-1") == history.log[:2]

    async def test_racing_commits_of_one_version_let_exactly_one_through(
        self, store: SagaStore
    ) -> None:
        accepted = run_history("s-1", [OK])
        rejected = run_history("s-1", [NO])
        await store_history(store, accepted, upto=0)

        results = await asyncio.gather(
            *(store.commit(*h.commits()[0]) for h in (accepted, rejected)),
            return_exceptions=True,
        )

        errors = [result for result in results if isinstance(result, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], ConcurrentUpdate)
        winner = accepted if results[0] is None else rejected
        assert await store.get("s-1") == winner.last
        assert await store.events("s-1") == winner.log

    async def test_commit_of_an_unknown_saga_raises_concurrent_update(
        self, store: SagaStore
    ) -> None:
        saga, event, _ = run_history("s-1", [OK]).commits()[0]

        with pytest.raises(ConcurrentUpdate, match="does not exist"):
            await store.commit(saga, event)

        assert await store.events("s-1") == ()

    async def test_commit_whose_event_is_not_the_next_in_the_log_raises_concurrent_update(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK, OK])
        await store_history(store, history, upto=0)
        (v2, _, _), (_, e3, _) = history.commits()

        with pytest.raises(ConcurrentUpdate, match="event 3"):
            await store.commit(v2, e3)

        assert await store.get("s-1") == history.first

    async def test_a_refused_write_does_not_disturb_the_writes_around_it(
        self, store: SagaStore
    ) -> None:
        stale = run_history("stale", [OK])
        await store_history(store, stale)
        a, b = run_history("a"), run_history("b")

        results = await asyncio.gather(
            store.create(a.first, a.log[0], FINGERPRINT),
            store.commit(*stale.commits()[0]),
            store.create(b.first, b.log[0], FINGERPRINT),
            return_exceptions=True,
        )

        assert isinstance(results[1], ConcurrentUpdate)
        assert results[0] == (a.first, True)
        assert results[2] == (b.first, True)
        assert await store.get("a") == a.first
        assert await store.get("b") == b.first
        assert await store.events("stale") == stale.log

    # --- the log -----------------------------------------------------------------------------

    @pytest.mark.parametrize("answers", SCENARIOS.values(), ids=SCENARIOS.keys())
    async def test_events_come_back_in_order_and_replay_to_the_stored_saga(
        self, store: SagaStore, answers: tuple[Answer, ...]
    ) -> None:
        history = run_history("s-1", answers)
        await store_history(store, history)

        log = await store.events("s-1")

        assert [recorded.sequence for recorded in log] == list(range(1, len(history.log) + 1))
        assert log == history.log
        assert replay(log) == await store.get("s-1") == history.last

    @given(data=st.data())
    @settings(
        max_examples=25,
        deadline=None,
        # One store serves all examples (unique saga ids keep them apart), and each adapter's
        # subclass runs this same method: both are intended.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    async def test_any_real_history_replays_from_its_stored_log(
        self, store: SagaStore, data: st.DataObject
    ) -> None:
        history = data.draw(saga_histories(saga_id=f"h-{next(_example_ids)}"))
        await store_history(store, history)

        log = await store.events(history.saga_id)

        assert log == history.log
        assert replay(log) == await store.get(history.saga_id) == history.last

    # --- reads -------------------------------------------------------------------------------

    async def test_an_unknown_saga_is_none_and_has_an_empty_log(self, store: SagaStore) -> None:
        await store_history(store, run_history("s-1"))

        assert await store.get("s-2") is None
        assert await store.events("s-2") == ()

    async def test_unfinished_returns_exactly_the_running_and_compensating_sagas(
        self, store: SagaStore
    ) -> None:
        for i, (state, answers) in enumerate(ANSWERS_BY_STATE.items()):
            history = run_history(f"{state.lower()}", answers, at=T0 + timedelta(seconds=i))
            assert history.last.state is state
            await store_history(store, history)

        unfinished = await store.unfinished()

        assert [(saga.saga_id, saga.state) for saga in unfinished] == [
            ("running", SagaState.RUNNING),
            ("compensating", SagaState.COMPENSATING),
        ]

    # --- list --------------------------------------------------------------------------------

    async def test_list_filters_by_state_by_definition_and_by_both(self, store: SagaStore) -> None:
        expected: dict[tuple[str, SagaState], list[str]] = {}
        for i, (name, (state, answers)) in enumerate(
            itertools.product(("open-account", "close-account"), ANSWERS_BY_STATE.items())
        ):
            for copy in range(3):
                saga_id = f"{name}-{state.lower()}-{copy}"
                history = run_history(
                    saga_id, answers, definition=open_account(name), at=T0 + timedelta(i)
                )
                await store_history(store, history)
                expected.setdefault((name, state), []).append(saga_id)

        def ids(*keys: tuple[str, SagaState]) -> list[str]:
            return sorted(saga_id for key in keys for saga_id in expected[key])

        async def listed(where: SagaFilter) -> list[str]:
            return [saga_id for page in await all_pages(store, where, 2) for saga_id in page]

        done = frozenset({SagaState.SUCCEEDED, SagaState.COMPENSATED})
        running = frozenset({SagaState.RUNNING})
        assert sorted(await listed(SagaFilter(states=done))) == ids(
            ("open-account", SagaState.SUCCEEDED),
            ("open-account", SagaState.COMPENSATED),
            ("close-account", SagaState.SUCCEEDED),
            ("close-account", SagaState.COMPENSATED),
        )
        assert sorted(await listed(SagaFilter(definition="close-account"))) == ids(
            *(("close-account", state) for state in SagaState)
        )
        assert sorted(await listed(SagaFilter(states=running, definition="open-account"))) == ids(
            ("open-account", SagaState.RUNNING)
        )
        assert await listed(SagaFilter(definition="no-such-saga")) == []
        assert len(await listed(SagaFilter())) == 2 * len(SagaState) * 3
        # Counting agrees with listing, filter by filter.
        for where in (
            SagaFilter(),
            SagaFilter(states=done),
            SagaFilter(definition="close-account"),
            SagaFilter(states=running, definition="open-account"),
            SagaFilter(definition="no-such-saga"),
        ):
            assert await store.count(where) == len(await listed(where))

    @pytest.mark.parametrize("limit", [1, 7, 100, 1000])
    async def test_list_pages_through_every_saga_in_order_without_gaps_or_duplicates(
        self, store: SagaStore, limit: int
    ) -> None:
        # 300 sagas, created in a shuffled order, three at each instant: the saga id breaks ties.
        histories = [
            run_history(f"s-{(i * 7919) % 300:03d}", at=T0 + timedelta(milliseconds=i // 3))
            for i in range(300)
        ]
        await asyncio.gather(*(store_history(store, history) for history in histories))
        in_order = sorted(histories, key=lambda h: (h.first.created_at, h.saga_id))

        pages = await all_pages(store, SagaFilter(), limit)

        listed = [saga_id for page in pages for saga_id in page]
        assert listed == [history.saga_id for history in in_order]
        assert len(pages) == -(-300 // limit)  # a full last page has no cursor either

    async def test_list_returns_whole_sagas_and_no_cursor_on_the_last_page(
        self, store: SagaStore
    ) -> None:
        first, second = run_history("a", [OK]), run_history("b", at=T0 + timedelta(seconds=1))
        await store_history(store, first)
        await store_history(store, second)

        page = await store.list(SagaFilter(), 1, None)
        assert tuple(page.sagas) == (first.last,)
        assert page.next_cursor == ListCursor(first.first.created_at, "a")
        last = await store.list(SagaFilter(), 1, page.next_cursor)
        assert tuple(last.sagas) == (second.last,)
        assert last.next_cursor is None

    async def test_list_with_a_limit_below_one_is_refused(self, store: SagaStore) -> None:
        with pytest.raises(ValueError, match="at least one"):
            await store.list(SagaFilter(), 0, None)

    # --- concurrency and life cycle ----------------------------------------------------------

    async def test_many_concurrent_creates_and_commits_all_land(self, store: SagaStore) -> None:
        histories = [
            run_history(f"s-{i:03d}", [OK, OK], at=T0 + timedelta(microseconds=i))
            for i in range(500)
        ]

        async def drive(history: SagaHistory) -> None:
            await store_history(store, history)

        await asyncio.gather(*(drive(history) for history in histories))

        for history in histories:
            assert await store.get(history.saga_id) == history.last
        assert len(await store.unfinished()) == 500
        sample = histories[::50]
        assert [await store.events(h.saga_id) for h in sample] == [h.log for h in sample]

    async def test_a_closed_store_refuses_reads_and_writes_and_closes_again_quietly(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1")
        await store.close()

        with pytest.raises(StoreClosed):
            await store.create(history.first, history.log[0], FINGERPRINT)
        with pytest.raises(StoreClosed):
            await store.get("s-1")
        await store.close()


_example_ids = itertools.count()


class TestMemoryStore(StoreContract):
    """The contract on the in-memory reference store."""

    async def open_store(self, tmp_path: Path) -> SagaStore:
        store = await open_store("memory:")
        assert isinstance(store, MemoryStore)
        return store


class TestSqliteStore(StoreContract):
    """The contract on a real SQLite file."""

    async def open_store(self, tmp_path: Path) -> SagaStore:
        store = await open_store(f"sqlite:///{tmp_path / 'sagas.db'}")
        assert isinstance(store, SqliteStore)
        return store
