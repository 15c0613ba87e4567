"""The in-memory saga store: the reference semantics of the store port, for tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga
from coordinator.ports import ListCursor, SagaFilter, SagaPage
from coordinator.store.errors import StoreClosed
from coordinator.store.rules import (
    UNFINISHED,
    already_exists,
    check_commit,
    check_creation,
    check_limit,
    page_of,
    stale,
)


@dataclass
class _Row:
    saga: Saga
    fingerprint: str
    log: list[RecordedEvent]


class MemoryStore:
    """Sagas and their event logs in dictionaries; nothing survives the process.

    Every method runs to completion without awaiting, so on one event loop each write is
    atomic, as a transaction would be. The errors are those of the durable stores.
    """

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._closed = False

    async def create(self, saga: Saga, event: RecordedEvent, fingerprint: str) -> tuple[Saga, bool]:
        """Store a new saga with its first event; see ``SagaStore.create``."""
        self._check_open()
        check_creation(saga, event)
        row = self._rows.get(saga.saga_id)
        if row is not None:
            if row.fingerprint == fingerprint:
                return row.saga, False
            raise already_exists(saga.saga_id)
        self._rows[saga.saga_id] = _Row(saga, fingerprint, [event])
        return saga, True

    async def commit(
        self, saga: Saga, event: RecordedEvent, changed_steps: Sequence[int] | None = None
    ) -> None:
        """Store the saga's new state with its event; see ``SagaStore.commit``."""
        self._check_open()
        check_commit(saga, event)
        row = self._rows.get(saga.saga_id)
        if row is None or row.saga.version != saga.version - 1:
            raise stale(saga, None if row is None else row.saga.version)
        row.saga = saga
        row.log.append(event)

    async def get(self, saga_id: str) -> Saga | None:
        """The saga, or None."""
        self._check_open()
        row = self._rows.get(saga_id)
        return None if row is None else row.saga

    async def list(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """Up to ``limit`` sagas matching ``where``, oldest first, after ``after``."""
        self._check_open()
        check_limit(limit)
        matching = sorted(
            (
                saga
                for saga in self._matching(where)
                if after is None
                or (saga.created_at, saga.saga_id) > (after.created_at, after.saga_id)
            ),
            key=lambda saga: (saga.created_at, saga.saga_id),
        )
        return page_of(matching[: limit + 1], limit)

    async def count(self, where: SagaFilter) -> int:
        """How many sagas match ``where``."""
        self._check_open()
        return sum(1 for _ in self._matching(where))

    def _matching(self, where: SagaFilter) -> Iterator[Saga]:
        for row in self._rows.values():
            if (not where.states or row.saga.state in where.states) and (
                where.definition is None or row.saga.definition.name == where.definition
            ):
                yield row.saga

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        self._check_open()
        row = self._rows.get(saga_id)
        return () if row is None else tuple(row.log)

    async def unfinished(self) -> Sequence[Saga]:
        """Every saga that is RUNNING or COMPENSATING, oldest first."""
        self._check_open()
        return tuple(
            sorted(
                (row.saga for row in self._rows.values() if row.saga.state in UNFINISHED),
                key=lambda saga: (saga.created_at, saga.saga_id),
            )
        )

    async def close(self) -> None:
        """Refuse further use; the data is dropped with the object. Idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the saga store is closed")
