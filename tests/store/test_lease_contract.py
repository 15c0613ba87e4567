"""The store port's leases, run against every adapter: one replica at a time writes a saga.

Leases are judged by the store's own clock, so these tests use short real leases and wait them
out; a replica's writes carry a fence (its name and the saga's epoch when it was claimed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator.core.errors import ConcurrentUpdate, LeaseLost
from coordinator.core.model import SagaState
from coordinator.ports import Fence, SagaStore
from coordinator.store import open_store

from .strategies import ANSWERS_BY_STATE, OK, T0, SagaHistory, run_history

LONG = timedelta(minutes=5)
SHORT = timedelta(milliseconds=300)
RUN_OUT = 0.45
"""Seconds after which a SHORT lease has run out."""


async def create(store: SagaStore, history: SagaHistory, replica: str | None = None) -> None:
    await store.create(history.first, history.log[0], "fp", replica)


def running(saga_id: str, seconds: int = 0) -> SagaHistory:
    """A saga with its first step answered: it waits on its second."""
    return run_history(saga_id, [OK], at=T0 + timedelta(seconds=seconds))


class LeaseContract:
    """Every lease test; a subclass says how to build the store."""

    async def open_store(self, tmp_path: Path) -> SagaStore:
        raise NotImplementedError

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SagaStore]:
        store = await self.open_store(tmp_path)
        try:
            yield store
        finally:
            await store.close()

    async def test_a_created_saga_is_held_by_its_creator_at_epoch_1(self, store: SagaStore) -> None:
        await store.join("a", LONG)
        await store.join("b", LONG)
        history = running("s-1")
        await create(store, history, "a")

        saga, event, changed = history.commits()[0]
        await store.commit(saga, event, changed, Fence("a", 1))

        assert await store.claim("b", 10) == ()
        assert await store.get("s-1") == saga

    async def test_claim_takes_the_unfinished_sagas_nobody_holds_oldest_first_in_batches(
        self, store: SagaStore
    ) -> None:
        for index in range(5):
            await create(store, running(f"s-{index}", seconds=10 - index))
        ended = run_history("ended", [OK, OK, OK])
        await create(store, ended)
        for saga, event, changed in ended.commits():
            await store.commit(saga, event, changed)
        parked = run_history("parked", ANSWERS_BY_STATE[SagaState.NEEDS_ATTENTION])
        await create(store, parked)
        for saga, event, changed in parked.commits():
            await store.commit(saga, event, changed)
        assert parked.last.state is SagaState.NEEDS_ATTENTION
        await store.join("a", LONG)

        first = await store.claim("a", 3)
        rest = await store.claim("a", 3)

        assert [c.saga.saga_id for c in first] == ["s-4", "s-3", "s-2"]
        assert [c.saga.saga_id for c in rest] == ["s-1", "s-0"]
        assert {c.fence for c in [*first, *rest]} == {Fence("a", 1)}
        assert await store.claim("a", 3) == ()
        with pytest.raises(ValueError, match="at least one saga"):
            await store.claim("a", 0)

    async def test_sagas_of_a_replica_whose_lease_ran_out_are_claimed_and_its_writes_refused(
        self, store: SagaStore
    ) -> None:
        history = running("s-1")
        await store.join("a", SHORT)
        await store.join("b", LONG)
        await create(store, history, "a")
        assert await store.claim("b", 10) == ()

        await asyncio.sleep(RUN_OUT)
        (claimed,) = await store.claim("b", 10)

        assert claimed.fence == Fence("b", 2)
        assert claimed.saga == history.first
        saga, event, changed = history.commits()[0]
        with pytest.raises(LeaseLost, match="held by replica b at epoch 2"):
            await store.commit(saga, event, changed, Fence("a", 1))
        assert await store.events("s-1") == history.log[:1]
        await store.commit(saga, event, changed, claimed.fence)
        assert await store.get("s-1") == saga

    async def test_a_replica_whose_lease_ran_out_writes_nothing_even_to_sagas_nobody_took(
        self, store: SagaStore
    ) -> None:
        history = running("s-1")
        await store.join("a", SHORT)
        await create(store, history, "a")
        await asyncio.sleep(RUN_OUT)
        saga, event, changed = history.commits()[0]

        with pytest.raises(LeaseLost, match="lease of replica a has run out"):
            await store.commit(saga, event, changed, Fence("a", 1))

        assert await store.renew("a", LONG) is False
        assert await store.claim("a", 10) == ()
        assert await store.take("a", "s-1") is None
        assert await store.get("s-1") == history.first

    async def test_renewing_keeps_the_lease(self, store: SagaStore) -> None:
        history = running("s-1")
        await store.join("a", LONG)
        await store.join("b", LONG)
        await create(store, history, "a")
        assert await store.renew("a", SHORT) is True  # from now on, it must keep renewing
        for _ in range(3):
            await asyncio.sleep(RUN_OUT / 3)
            assert await store.renew("a", SHORT) is True

        assert await store.claim("b", 10) == ()
        saga, event, changed = history.commits()[0]
        await store.commit(saga, event, changed, Fence("a", 1))

    async def test_leaving_lets_others_claim_at_once(self, store: SagaStore) -> None:
        await store.join("a", LONG)
        await store.join("b", LONG)
        await create(store, running("s-1"), "a")
        await create(store, running("s-2"), "a")

        assert await store.leave("a") == 2

        assert [c.saga.saga_id for c in await store.claim("b", 10)] == ["s-1", "s-2"]
        assert await store.renew("a", LONG) is False

    async def test_joining_again_under_a_name_ends_its_earlier_life(self, store: SagaStore) -> None:
        history = running("s-1")
        await store.join("a", LONG)
        await create(store, history, "a")

        await store.join("a", LONG)  # restarted under the same name

        saga, event, changed = history.commits()[0]
        with pytest.raises(LeaseLost):
            await store.commit(saga, event, changed, Fence("a", 1))
        (claimed,) = await store.claim("a", 10)
        assert claimed.fence == Fence("a", 2)

    async def test_take_moves_the_epoch_on_whoever_holds_the_saga(self, store: SagaStore) -> None:
        history = running("s-1")
        await store.join("a", LONG)
        await store.join("b", LONG)
        await create(store, history, "a")

        taken = await store.take("b", "s-1")

        assert taken is not None
        assert taken.fence == Fence("b", 2)
        saga, event, changed = history.commits()[0]
        with pytest.raises(LeaseLost):
            await store.commit(saga, event, changed, Fence("a", 1))
        await store.commit(saga, event, changed, taken.fence)
        assert await store.take("b", "unknown") is None

    async def test_a_fenced_write_at_the_wrong_version_is_a_concurrent_update(
        self, store: SagaStore
    ) -> None:
        history = run_history("s-1", [OK, OK])
        await store.join("a", LONG)
        await create(store, history, "a")
        (first, first_event, changed), (second, second_event, _) = history.commits()[:2]

        with pytest.raises(ConcurrentUpdate) as refused:
            await store.commit(second, second_event, None, Fence("a", 1))

        assert not isinstance(refused.value, LeaseLost)
        await store.commit(first, first_event, changed, Fence("a", 1))

    async def test_a_saga_that_ends_is_held_by_nobody(self, store: SagaStore) -> None:
        history = run_history("s-1", [OK, OK, OK])
        await store.join("a", LONG)
        await create(store, history, "a")
        for saga, event, changed in history.commits():
            await store.commit(saga, event, changed, Fence("a", 1))

        assert await store.leave("a") == 0

    async def test_replicas_claiming_at_once_never_share_a_saga(self, store: SagaStore) -> None:
        for index in range(60):
            await create(store, running(f"s-{index:02d}", seconds=index))
        replicas = [f"r{index}" for index in range(4)]
        for replica in replicas:
            await store.join(replica, LONG)

        async def claim_all(replica: str) -> list[str]:
            got: list[str] = []
            while batch := await store.claim(replica, 4):
                got += [c.saga.saga_id for c in batch]
            return got

        claimed = await asyncio.gather(*(claim_all(replica) for replica in replicas))

        every = [saga_id for got in claimed for saga_id in got]
        assert sorted(every) == [f"s-{index:02d}" for index in range(60)]

    async def test_two_replicas_racing_for_one_saga_exactly_one_wins_every_time(
        self, store: SagaStore
    ) -> None:
        await store.join("a", LONG)
        await store.join("b", LONG)
        winners = []
        for round_ in range(50):
            await create(store, running(f"race-{round_:02d}", seconds=round_))

            a, b = await asyncio.gather(store.claim("a", 5), store.claim("b", 5))

            assert len(a) + len(b) == 1, (round_, a, b)
            winners.append("a" if a else "b")
        assert len(winners) == 50


class TestMemoryLeases(LeaseContract):
    async def open_store(self, tmp_path: Path) -> SagaStore:
        return await open_store("memory:")


class TestSqliteLeases(LeaseContract):
    async def open_store(self, tmp_path: Path) -> SagaStore:
        return await open_store(f"sqlite:///{tmp_path / 'sagas.db'}")


class TestPostgresLeases(LeaseContract):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    async def open_store(self, tmp_path: Path) -> SagaStore:
        return await open_store(self.url)
