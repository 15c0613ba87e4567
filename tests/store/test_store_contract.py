"""The store port's contract, run against every adapter: each one must behave the same."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.core.errors import ConcurrentUpdate, DefinitionConflict, SagaAlreadyExists
from coordinator.core.events import (
    CancelRequested,
    CompleteRequested,
    DeadlineExceeded,
    MarkCompensated,
    RecordedEvent,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
)
from coordinator.core.machine import fold, waiting_step
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import (
    ListCursor,
    PruneResult,
    RegisteredDefinition,
    SagaFilter,
    SagaPage,
    SagaStore,
)
from coordinator.store import open_store
from coordinator.store.errors import StoreClosed
from coordinator.store.memory import MemoryStore
from coordinator.store.packing import pack_definition
from coordinator.store.postgres import PostgresStore
from coordinator.store.sqlite import SqliteStore

from .strategies import (
    ANSWERS_BY_STATE,
    BROKEN,
    NO,
    OK,
    T0,
    UNAVAILABLE,
    Answer,
    SagaHistory,
    open_account,
    quick_retry,
    run_history,
    saga_histories,
    transfer,
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

RUNNING, COMPENSATING, SUCCEEDED, COMPENSATED, NEEDS_ATTENTION = SagaState

OPERATOR_SCENARIOS: dict[str, tuple[SagaDefinition, tuple[Answer, ...], SagaState]] = {
    "completed by hand": (
        transfer(),
        (OK, OK, NO, CompleteRequested(2, b"sent", "ops", "sent by hand")),
        SUCCEEDED,
    ),
    "parked pivot retried": (
        transfer(),
        (OK, UNAVAILABLE, UNAVAILABLE, RetryRequested(1, "ops", "cards are back"), OK, OK),
        SUCCEEDED,
    ),
    "backoff cut short": (
        transfer(),
        (OK, UNAVAILABLE, RetryRequested(1, "ops", "now"), OK, OK),
        SUCCEEDED,
    ),
    "compensation resumed": (
        transfer(),
        (OK, NO, UNAVAILABLE, UNAVAILABLE, ResumeRequested("ops", "again", quick_retry(5)), OK),
        COMPENSATED,
    ),
    "marked compensated": (
        transfer(),
        (OK, NO, BROKEN, MarkCompensated(0, "ops", "refunded by hand")),
        COMPENSATED,
    ),
    "compensation marked during its backoff": (
        transfer(),
        (OK, NO, UNAVAILABLE, MarkCompensated(0, "ops", "refunded by hand")),
        COMPENSATED,
    ),
    "deadline before the pivot": (transfer(), (DeadlineExceeded(), OK), COMPENSATED),
    "deadline after the pivot, then completed": (
        transfer(),
        (OK, OK, DeadlineExceeded(), CompleteRequested(2, b"{}", "ops", "sent late")),
        SUCCEEDED,
    ),
    "retriable parked": (transfer(), (OK, OK, NO), NEEDS_ATTENTION),
    "cancelled by a named operator": (
        open_account(),
        (OK, CancelRequested("changed my mind", actor="alice"), OK, OK, OK),
        COMPENSATED,
    ),
}
"""Histories through every operator action, budget and deadline, and the state each ends in."""


@dataclass(frozen=True)
class Member:
    """One saga of the filter tests' population, and what the filters should know of it."""

    saga_id: str
    definition: str
    version: int
    state: SagaState
    labels: dict[str, str]
    created_at: datetime
    waiting: tuple[str, str] | None
    """(step, participant) the saga waits on, None once ended."""

    def matches(self, where: SagaFilter) -> bool:
        """The filter's meaning, spelled out independently of any store."""
        waiting_step, waiting_participant = self.waiting or (None, None)
        return (
            (not where.states or self.state in where.states)
            and where.definition in (None, self.definition)
            and where.definition_version in (None, self.version)
            and all(self.labels.get(key) == value for key, value in where.labels)
            and (where.created_after is None or self.created_at >= where.created_after)
            and (where.created_before is None or self.created_at < where.created_before)
            and (where.stuck_on_step is None or waiting_step == where.stuck_on_step)
            and (
                where.stuck_on_participant is None
                or waiting_participant == where.stuck_on_participant
            )
        )


_KINDS: tuple[tuple[str, tuple[Answer, ...], SagaState, tuple[str, str] | None], ...] = (
    ("running-identity", (), RUNNING, ("identity", "identity")),
    ("running-account", (OK,), RUNNING, ("account", "accounts")),
    ("running-card", (OK, OK), RUNNING, ("card", "cards")),
    ("compensating", (OK, NO), COMPENSATING, ("account", "accounts")),
    ("succeeded", (OK, OK, OK), SUCCEEDED, None),
    ("compensated", (OK, NO, OK, OK), COMPENSATED, None),
    ("parked", (OK, NO, BROKEN), NEEDS_ATTENTION, ("account", "accounts")),
    ("parked-first", (NO, BROKEN), NEEDS_ATTENTION, ("identity", "identity")),
)
_VERSIONS = (("open-account", 1), ("open-account", 2), ("close-account", 1))


async def store_population(store: SagaStore) -> list[Member]:
    """24 sagas: every kind above for each definition version, created two per second (the id
    breaks ties), with labels on two thirds; in listing order."""
    members = []
    for i, ((name, version), (kind, answers, state, waiting)) in enumerate(
        itertools.product(_VERSIONS, _KINDS)
    ):
        labels = [{"tenant": "acme"}, {"tenant": "globex", "order": f"o-{i}"}, {}][i % 3]
        created_at = T0 + timedelta(seconds=(23 - i) // 2)  # stored newest first
        saga_id = f"{name}-{version}-{kind}"
        history = run_history(
            saga_id,
            answers,
            definition=open_account(name, version),
            at=created_at,
            labels=labels,
        )
        await store_history(store, history)
        members.append(Member(saga_id, name, version, state, labels, created_at, waiting))
    return sorted(members, key=lambda member: (member.created_at, member.saga_id))


def _t(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


FILTERS: dict[str, SagaFilter] = {
    "everything": SagaFilter(),
    "running": SagaFilter(states=frozenset({RUNNING})),
    "ended": SagaFilter(states=frozenset({SUCCEEDED, COMPENSATED})),
    "unended": SagaFilter(states=frozenset({RUNNING, COMPENSATING, NEEDS_ATTENTION})),
    "definition": SagaFilter(definition="open-account"),
    "definition and version": SagaFilter(definition="open-account", definition_version=2),
    "version alone": SagaFilter(definition_version=2),
    "a label": SagaFilter(labels=(("tenant", "acme"),)),
    "two labels": SagaFilter(labels=(("tenant", "globex"), ("order", "o-4"))),
    "two values of one key: nothing": SagaFilter(labels=(("tenant", "acme"), ("tenant", "globex"))),
    "no such label: nothing": SagaFilter(labels=(("tenant", "initech"),)),
    "created from": SagaFilter(created_after=_t(5)),
    "created before": SagaFilter(created_before=_t(5)),
    "created between": SagaFilter(created_after=_t(3), created_before=_t(7)),
    "stuck on a participant": SagaFilter(stuck_on_participant="accounts"),
    "stuck on a step": SagaFilter(stuck_on_step="identity"),
    "stuck on a step and its participant": SagaFilter(
        stuck_on_step="account", stuck_on_participant="accounts"
    ),
    "stuck on a step of another participant: nothing": SagaFilter(
        stuck_on_step="card", stuck_on_participant="accounts"
    ),
    "states and definition": SagaFilter(
        states=frozenset({RUNNING, NEEDS_ATTENTION}), definition="close-account"
    ),
    "parked of a definition": SagaFilter(
        states=frozenset({NEEDS_ATTENTION}), definition="open-account"
    ),
    "states, definition, version and label": SagaFilter(
        states=frozenset({RUNNING}),
        definition="open-account",
        definition_version=1,
        labels=(("tenant", "acme"),),
    ),
    "label and states": SagaFilter(
        labels=(("tenant", "globex"),), states=frozenset({SUCCEEDED, NEEDS_ATTENTION})
    ),
    "label and created range": SagaFilter(
        labels=(("tenant", "acme"),), created_after=_t(2), created_before=_t(9)
    ),
    "stuck, definition and label": SagaFilter(
        stuck_on_participant="accounts", definition="open-account", labels=(("tenant", "acme"),)
    ),
    "stuck and states": SagaFilter(
        stuck_on_participant="accounts", states=frozenset({NEEDS_ATTENTION})
    ),
    "stuck and created range": SagaFilter(stuck_on_step="identity", created_before=_t(6)),
    "states and created range": SagaFilter(states=frozenset({SUCCEEDED}), created_after=_t(2)),
    "definition, version and created range": SagaFilter(
        definition="open-account", definition_version=1, created_after=_t(6)
    ),
    "no such definition: nothing": SagaFilter(definition="no-such-saga"),
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

    async def test_claim_returns_exactly_the_running_and_compensating_sagas(
        self, store: SagaStore
    ) -> None:
        for i, (state, answers) in enumerate(ANSWERS_BY_STATE.items()):
            history = run_history(f"{state.lower()}", answers, at=T0 + timedelta(seconds=i))
            assert history.last.state is state
            await store_history(store, history)

        await store.join("recovery", timedelta(minutes=5))
        unfinished = [claimed.saga for claimed in await store.claim("recovery", 100)]

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

    # --- operator actions, budgets, deadlines and labels round trip --------------------------

    @pytest.mark.parametrize(
        ("definition", "answers", "state"),
        OPERATOR_SCENARIOS.values(),
        ids=OPERATOR_SCENARIOS.keys(),
    )
    async def test_operator_actions_and_budgets_come_back_and_replay(
        self,
        store: SagaStore,
        definition: SagaDefinition,
        answers: tuple[Answer, ...],
        state: SagaState,
    ) -> None:
        history = run_history("s-1", answers, definition=definition, labels={"tenant": "acme"})
        assert len(history.log) == len(answers) + 1, "every answer and action applied"
        assert history.last.state is state
        await store_history(store, history)

        stored = await store.get("s-1")
        log = await store.events("s-1")

        assert stored == history.last
        assert log == history.log
        assert replay(log) == stored
        assert stored.definition == definition, "max_attempts, emits and deadline kept"

    async def test_each_new_field_is_kept_as_the_core_set_it(self, store: SagaStore) -> None:
        cases: dict[str, tuple[str, Callable[[Saga], bool]]] = {
            "by-hand": ("completed by hand", lambda s: s.steps[2].by_operator),
            "retried": ("parked pivot retried", lambda s: s.steps[1].budget_start == 2),
            "resumed": ("compensation resumed", lambda s: s.steps[0].retry_override is not None),
            "deadline": ("deadline before the pivot", lambda s: s.deadline_exceeded),
            "audited": ("cancelled by a named operator", lambda s: s.audit[0].actor == "alice"),
        }
        for saga_id, (scenario, holds) in cases.items():
            definition, answers, _ = OPERATOR_SCENARIOS[scenario]
            history = run_history(saga_id, answers, definition=definition)
            assert holds(history.last), f"{scenario}: the core no longer sets the field"
            await store_history(store, history)

            stored = await store.get(saga_id)

            assert stored is not None
            assert holds(stored), scenario
            assert stored == history.last

    async def test_labels_come_back_with_the_saga_and_its_creation_event(
        self, store: SagaStore
    ) -> None:
        labels = {"tenant": "acme", "order": "o-17", "": "empty key", "ünï": "cödé"}
        history = run_history("s-1", [OK], labels=labels)
        await store_history(store, history)

        stored = await store.get("s-1")
        log = await store.events("s-1")

        assert stored is not None
        assert dict(stored.labels) == labels
        first = log[0].event
        assert isinstance(first, SagaCreated)
        assert dict(first.labels) == labels
        assert log == history.log

    # --- filters -----------------------------------------------------------------------------

    @pytest.mark.parametrize("where", FILTERS.values(), ids=FILTERS.keys())
    async def test_list_count_and_count_by_state_agree_with_each_filter(
        self, store: SagaStore, where: SagaFilter
    ) -> None:
        population = await store_population(store)
        expected = [p for p in population if p.matches(where)]
        every_state = [
            p for p in population if p.matches(dataclasses.replace(where, states=frozenset()))
        ]

        for limit in (2, 100):
            pages = await all_pages(store, where, limit)
            assert [saga_id for page in pages for saga_id in page] == [p.saga_id for p in expected]
        assert await store.count(where) == len(expected)
        assert dict(await store.count_by_state(where)) == dict(
            Counter(p.state for p in every_state)
        )

    async def test_the_population_reaches_the_states_and_steps_it_claims(
        self, store: SagaStore
    ) -> None:
        population = await store_population(store)

        for member in population:
            saga = await store.get(member.saga_id)
            assert saga is not None
            assert saga.state is member.state
            index = waiting_step(saga)
            step = None if index is None else saga.definition.steps[index]
            assert (None if step is None else (step.name, step.participant)) == member.waiting
        assert len(FILTERS) >= 20
        assert all(
            any(p.matches(where) for p in population)
            for name, where in FILTERS.items()
            if "nothing" not in name
        ), "a filter that matches nothing proves little"

    async def test_count_by_state_leaves_out_states_without_sagas_and_ignores_states(
        self, store: SagaStore
    ) -> None:
        await store_history(store, run_history("a", [OK, OK, OK]))
        await store_history(store, run_history("b", [OK]))

        counts = await store.count_by_state(SagaFilter(states=frozenset({SagaState.RUNNING})))

        assert dict(counts) == {SagaState.SUCCEEDED: 1, SagaState.RUNNING: 1}
        assert dict(await store.count_by_state(SagaFilter(definition="nothing"))) == {}

    async def test_counts_follow_sagas_as_they_move(self, store: SagaStore) -> None:
        history = run_history("s-1", [OK, NO, OK, OK])
        await store.create(history.first, history.log[0], FINGERPRINT)
        seen = [dict(await store.count_by_state(SagaFilter(definition="open-account")))]
        for saga, event, changed in history.commits():
            await store.commit(saga, event, changed)
            seen.append(dict(await store.count_by_state(SagaFilter(definition="open-account"))))

        assert seen == [{saga.state: 1} for saga in history.sagas]
        assert await store.count(SagaFilter(states=frozenset({SagaState.RUNNING}))) == 0

    async def test_listing_stays_in_order_without_duplicates_while_sagas_change(
        self, store: SagaStore
    ) -> None:
        histories = [
            run_history(f"s-{i:02d}", [OK, NO, OK, OK], at=T0 + timedelta(seconds=i // 2))
            for i in range(20)
        ]
        for history in histories:
            await store_history(store, history, upto=0)
        later = itertools.count(100)

        listed: list[Saga] = []
        cursor: ListCursor | None = None
        while True:
            page = await store.list(SagaFilter(), 3, cursor)
            listed.extend(page.sagas)
            # Between pages: every saga moves on, and new sagas arrive (created later).
            for history in histories:
                saga = await store.get(history.saga_id)
                if saga is not None and saga.version < len(history.log):
                    await store.commit(*history.commits()[saga.version - 1])
            extra = run_history(f"new-{next(later)}", at=T0 + timedelta(hours=1))
            await store_history(store, extra)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor

        keys = [(saga.created_at, saga.saga_id) for saga in listed]
        assert keys == sorted(set(keys)), "in order, each saga once"
        assert {h.saga_id for h in histories} <= {saga.saga_id for saga in listed}

    # --- the log in pages --------------------------------------------------------------------

    async def test_events_page_returns_the_log_in_slices(self, store: SagaStore) -> None:
        history = run_history("s-1", [OK, NO, OK, OK], labels={"tenant": "acme"})
        await store_history(store, history)
        assert len(history.log) == 5

        assert await store.events_page("s-1", 0, 2) == history.log[:2]
        assert await store.events_page("s-1", 2, 2) == history.log[2:4]
        assert await store.events_page("s-1", 4, 2) == history.log[4:]
        assert await store.events_page("s-1", 5, 2) == ()
        assert await store.events_page("s-1", -3, 100) == history.log
        assert await store.events_page("s-2", 0, 10) == ()
        with pytest.raises(ValueError, match="at least one"):
            await store.events_page("s-1", 0, 0)

    async def test_events_page_reads_the_log_newest_first(self, store: SagaStore) -> None:
        history = run_history("s-1", [OK, NO, OK, OK], labels={"tenant": "acme"})
        await store_history(store, history)
        newest = tuple(reversed(history.log))
        assert [event.sequence for event in newest] == [5, 4, 3, 2, 1]

        assert await store.events_page("s-1", 0, 2, newest_first=True) == newest[:2]
        assert await store.events_page("s-1", 4, 2, newest_first=True) == newest[2:4]
        assert await store.events_page("s-1", 2, 2, newest_first=True) == newest[4:]
        assert await store.events_page("s-1", 1, 2, newest_first=True) == ()
        assert await store.events_page("s-1", 0, 100, newest_first=True) == newest
        assert await store.events_page("s-1", 99, 100, newest_first=True) == newest
        assert await store.events_page("s-2", 0, 10, newest_first=True) == ()
        with pytest.raises(ValueError, match="at least one"):
            await store.events_page("s-1", 0, 0, newest_first=True)

    # --- what operators watch ----------------------------------------------------------------

    async def test_oldest_unfinished_is_the_oldest_running_compensating_or_parked_saga(
        self, store: SagaStore
    ) -> None:
        assert await store.oldest_unfinished() is None
        await store_history(store, run_history("done", [OK, OK, OK], at=T0))
        assert await store.oldest_unfinished() is None, "an ended saga is not unfinished"
        for i, answers in enumerate([(OK,), (OK, NO), (OK, NO, BROKEN)]):
            await store_history(
                store, run_history(f"s-{i}", answers, at=T0 + timedelta(hours=3 - i))
            )

        assert await store.oldest_unfinished() == T0 + timedelta(hours=1)  # the parked one
        await store_history(store, run_history("older", [OK], at=T0 - timedelta(days=1)))
        assert await store.oldest_unfinished() == T0 - timedelta(days=1)

    async def test_parked_by_step_counts_parked_sagas_by_definition_and_step(
        self, store: SagaStore
    ) -> None:
        parked = {
            "a": ("open-account", (OK, NO, BROKEN)),  # compensating 'account' failed
            "b": ("open-account", (OK, NO, BROKEN)),
            "c": ("close-account", (OK, NO, BROKEN)),
            "d": ("open-account", (NO, BROKEN)),  # compensating 'identity' failed
        }
        for saga_id, (name, answers) in parked.items():
            await store_history(store, run_history(saga_id, answers, definition=open_account(name)))
        transfer_parked = run_history("e", (OK, OK, NO), definition=transfer())
        await store_history(store, transfer_parked)
        await store_history(store, run_history("running", (OK, NO)))

        assert dict(await store.parked_by_step()) == {
            ("open-account", "account"): 2,
            ("open-account", "identity"): 1,
            ("close-account", "account"): 1,
            ("transfer", "notify"): 1,
        }

    # --- the definitions registry ------------------------------------------------------------

    async def test_registering_a_new_version_stores_it(self, store: SagaStore) -> None:
        definition = transfer(version=3)

        registered, new = await store.register_definition(definition, T0)

        assert new is True
        assert registered == RegisteredDefinition(
            definition, T0, hashlib.sha256(pack_definition(definition)).hexdigest(), 0
        )
        assert list(await store.definitions()) == [registered]

    async def test_registering_the_same_content_again_changes_nothing(
        self, store: SagaStore
    ) -> None:
        first, _ = await store.register_definition(transfer(version=3), T0)

        again, new = await store.register_definition(transfer(version=3), T0 + timedelta(days=1))

        assert new is False
        assert again == first, "registered when first registered"
        assert list(await store.definitions()) == [first]

    async def test_other_content_under_a_registered_version_is_refused_and_not_stored(
        self, store: SagaStore
    ) -> None:
        first, _ = await store.register_definition(transfer(version=3), T0)
        changed = dataclasses.replace(transfer(version=3), description="edited in place")

        with pytest.raises(DefinitionConflict, match=r"'transfer' version 3 is registered"):
            await store.register_definition(changed, T0 + timedelta(days=1))

        assert list(await store.definitions()) == [first]
        assert list(await store.definitions("transfer")) == [first]

    async def test_definitions_are_listed_by_name_then_version_with_unfinished_counts(
        self, store: SagaStore
    ) -> None:
        for i, definition in enumerate(
            [transfer(version=2), open_account(version=1), transfer(version=1), transfer("zeta")]
        ):
            await store.register_definition(definition, T0 + timedelta(minutes=i))
        for i, answers in enumerate([(), (OK,), (OK, NO), (OK, NO, BROKEN), (OK, OK, OK)]):
            # running, running, compensating, parked: 4 unfinished; succeeded: not
            history = run_history(f"t1-{i}", answers, definition=transfer(version=1))
            await store_history(store, history)
        await store_history(store, run_history("oa", (OK, OK, OK), definition=open_account()))

        listed = await store.definitions()

        assert [(d.definition.name, d.definition.version, d.unfinished) for d in listed] == [
            ("open-account", 1, 0),
            ("transfer", 1, 4),
            ("transfer", 2, 0),
            ("zeta", 1, 0),
        ]
        assert [d.registered_at for d in listed] == [
            T0 + timedelta(minutes=m) for m in (1, 2, 0, 3)
        ]
        assert [d.definition.version for d in await store.definitions("transfer")] == [1, 2]
        assert await store.definitions("nothing") == ()

    async def test_a_version_first_run_by_a_saga_is_registered_at_its_creation(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK], definition=transfer(version=7), at=T0)
        await store_history(store, history)
        later = run_history("s-2", definition=transfer(version=7), at=T0 + timedelta(hours=1))
        await store_history(store, later)

        (registered,) = await store.definitions("transfer")

        assert registered.definition == transfer(version=7)
        assert registered.registered_at == T0
        assert registered.unfinished == 2
        again, new = await store.register_definition(transfer(version=7), T0 + timedelta(days=1))
        assert (again, new) == (registered, False)

    # --- retention ---------------------------------------------------------------------------

    async def test_prune_removes_only_terminal_sagas_ended_before_the_cutoff_oldest_first(
        self, store: SagaStore
    ) -> None:
        histories = {
            # saga id: (answers, created at); each answer comes 10 ms after the last
            "succeeded-old": ((OK, OK, OK), T0),
            "compensated-old": ((OK, NO, OK, OK), T0 + timedelta(minutes=1)),
            "succeeded-older": ((OK, OK, OK), T0 - timedelta(minutes=5)),
            "parked-old": ((OK, NO, BROKEN), T0 - timedelta(days=1)),
            "running-old": ((OK,), T0 - timedelta(days=1)),
            "compensating-old": ((OK, NO), T0 - timedelta(days=1)),
            "succeeded-new": ((OK, OK, OK), T0 + timedelta(days=1)),
        }
        stored = {}
        for saga_id, (answers, at) in histories.items():
            history = run_history(saga_id, answers, at=at, labels={"tenant": "acme"})
            await store_history(store, history)
            stored[saga_id] = history
        cutoff = T0 + timedelta(hours=1)
        prunable = ["succeeded-older", "succeeded-old", "compensated-old"]
        kept = [saga_id for saga_id in histories if saga_id not in prunable]
        expected_events = sum(len(stored[saga_id].log) for saga_id in prunable)

        assert await store.count_prunable(cutoff) == PruneResult(3, expected_events)
        assert await store.prune(T0 - timedelta(days=2), 100) == PruneResult(0, 0)
        first = await store.prune(cutoff, 2)

        assert first == PruneResult(2, sum(len(stored[s].log) for s in prunable[:2]))
        assert [await store.get(saga_id) for saga_id in prunable[:2]] == [None, None]
        assert await store.get("compensated-old") == stored["compensated-old"].last
        second = await store.prune(cutoff, 2)
        assert second == PruneResult(1, len(stored["compensated-old"].log))
        assert await store.prune(cutoff, 2) == PruneResult(0, 0)
        assert await store.count_prunable(cutoff) == PruneResult(0, 0)

        for saga_id in prunable:
            assert await store.get(saga_id) is None
            assert await store.events(saga_id) == ()
            assert await store.events_page(saga_id, 0, 10) == ()
        for saga_id in kept:
            assert await store.get(saga_id) == stored[saga_id].last
            assert await store.events(saga_id) == stored[saga_id].log
        acme = SagaFilter(labels=(("tenant", "acme"),))
        assert sorted(p for page in await all_pages(store, acme, 2) for p in page) == sorted(kept)
        assert await store.count(SagaFilter()) == len(kept)
        assert dict(await store.count_by_state(SagaFilter())) == dict(
            Counter(stored[saga_id].last.state for saga_id in kept)
        )

    async def test_a_pruned_id_can_be_created_afresh(self, store: SagaStore) -> None:
        old = run_history("s-1", [OK, OK, OK], at=T0)
        await store_history(store, old)
        await store.prune(T0 + timedelta(hours=1), 10)
        new = run_history("s-1", [OK], at=T0 + timedelta(days=1))

        assert await store.create(new.first, new.log[0], "fp-new") == (new.first, True)
        assert await store.events("s-1") == new.log[:1]

    async def test_prune_with_a_batch_below_one_is_refused(self, store: SagaStore) -> None:
        with pytest.raises(ValueError, match="at least one saga"):
            await store.prune(T0, 0)

    # --- change feed -------------------------------------------------------------------------

    async def test_the_feed_holds_every_change_in_commit_order_with_rising_positions(
        self, store: SagaStore
    ) -> None:
        first = run_history("s-1", [OK, NO, OK], at=T0, labels={"tenant": "acme"})
        second = run_history("s-2", [OK, OK, OK], at=T0 + timedelta(seconds=1))
        await store.create(first.first, first.log[0], FINGERPRINT)
        await store.create(second.first, second.log[0], FINGERPRINT)
        commits = list(itertools.zip_longest(first.commits(), second.commits()))
        order = [("s-1", 1), ("s-2", 1)]
        for one, two in commits:
            for commit in (one, two):
                if commit is not None:
                    saga, event, changed = commit
                    await store.commit(saga, event, changed)
                    order.append((saga.saga_id, event.sequence))

        page = await store.feed(0, 1000)
        positions = [change.position for change in page.changes]

        assert [(c.saga_id, c.record.sequence) for c in page.changes] == order
        assert positions == sorted(set(positions))
        assert page.position == positions[-1]
        assert await store.feed_bounds() == (0, positions[-1])
        by_saga = {"s-1": first, "s-2": second}
        for change in page.changes:
            history = by_saga[change.saga_id]
            saga_after = history.sagas[change.record.sequence - 1]
            assert change.state is saga_after.state
            assert change.definition == history.first.definition
            if change.record.sequence > 1:
                assert change.record == history.log[change.record.sequence - 1]
        assert dict(page.changes[0].labels) == {"tenant": "acme"}
        # Resuming after any position gives exactly the rest, page by page.
        middle = positions[4]
        rest = await store.feed(middle, 3)
        assert [c.position for c in rest.changes] == positions[5:8]
        assert (await store.feed(positions[-1], 10)).changes == ()
        assert (await store.feed(positions[-1], 10)).position == positions[-1]
        with pytest.raises(ValueError, match="at least one change"):
            await store.feed(0, 0)

    async def test_pruning_raises_the_feed_horizon_and_positions_are_never_reused(
        self, store: SagaStore
    ) -> None:
        old = run_history("old", [OK, OK, OK], at=T0)
        await store_history(store, old)
        _, newest = await store.feed_bounds()
        await store.prune(T0 + timedelta(hours=1), 10)

        pruned, after = await store.feed_bounds()
        assert pruned == newest  # the newest change was pruned: its position is not given again
        assert after == newest
        assert (await store.feed(0, 100)).changes == ()
        fresh = run_history("fresh", [OK], at=T0 + timedelta(days=1))
        await store_history(store, fresh)
        page = await store.feed(pruned, 100)
        assert page.changes[0].position > newest
        assert [c.saga_id for c in page.changes] == ["fresh", "fresh"]

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
        await store.join("recovery", timedelta(minutes=5))
        assert len(await store.claim("recovery", 1000)) == 500
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


class TestPostgresStore(StoreContract):
    """The contract on a fresh database of a real PostgreSQL server."""

    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    async def open_store(self, tmp_path: Path) -> SagaStore:
        store = await open_store(self.url)
        assert isinstance(store, PostgresStore)
        return store
