"""The in-memory saga store: the reference semantics of the store port, for tests."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from coordinator.core.events import RecordedEvent, SagaCreated
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import (
    Claimed,
    FeedChange,
    FeedPage,
    Fence,
    ListCursor,
    PruneResult,
    RegisteredDefinition,
    SagaFilter,
    SagaPage,
)
from coordinator.store.errors import StoreClosed
from coordinator.store.packing import digest, pack_definition
from coordinator.store.rules import (
    NOT_ENDED,
    PRUNABLE,
    UNFINISHED,
    already_exists,
    check_commit,
    check_creation,
    check_lease,
    check_limit,
    check_prune_limit,
    definition_conflict,
    matches,
    page_of,
    parked_key,
    stale,
)


@dataclass
class _Row:
    saga: Saga
    fingerprint: str
    log: list[RecordedEvent]
    owner: str | None = None
    epoch: int = 0


@dataclass(frozen=True)
class _Registered:
    definition: SagaDefinition
    registered_at: datetime
    digest: str


class MemoryStore:
    """Sagas and their event logs in dictionaries; nothing survives the process.

    Every method runs to completion without awaiting, so on one event loop each write is
    atomic, as a transaction would be. The errors are those of the durable stores.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the store's own clock for leases, in seconds (a database's clock)."""
        self._clock = clock
        self._leases: dict[str, float] = {}
        """Each replica's lease: when it runs out."""
        self._rows: dict[str, _Row] = {}
        self._registry: dict[tuple[str, int], _Registered] = {}
        self._feed: dict[int, FeedChange] = {}
        """The change feed by position (a dict keeps insertion, that is commit, order)."""
        self._newest = 0
        self._pruned_through = 0
        self._closed = False

    async def create(
        self, saga: Saga, event: RecordedEvent, fingerprint: str, replica: str | None = None
    ) -> tuple[Saga, bool]:
        """Store a new saga with its first event; see ``SagaStore.create``.

        A definition version no saga ran before is registered with it, at the saga's creation
        time (a registered version keeps its registered content).
        """
        self._check_open()
        check_creation(saga, event)
        row = self._rows.get(saga.saga_id)
        if row is not None:
            if row.fingerprint == fingerprint:
                return row.saga, False
            raise already_exists(saga.saga_id)
        self._rows[saga.saga_id] = _Row(saga, fingerprint, [event], replica, 1 if replica else 0)
        self._append_feed(saga, event)
        key = (saga.definition.name, saga.definition.version)
        if key not in self._registry:
            self._registry[key] = _registration(saga.definition, saga.created_at)
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
        row = self._rows.get(saga.saga_id)
        if row is not None and fence is not None:
            check_lease(saga.saga_id, fence, row.owner, row.epoch, self._alive(fence.replica))
        if row is None or row.saga.version != saga.version - 1:
            raise stale(saga, None if row is None else row.saga.version)
        row.saga = saga
        if fence is not None and saga.state.is_settled:
            row.owner = None  # nobody holds a saga that ended or parked
        row.log.append(event)
        self._append_feed(saga, event)

    def _append_feed(self, saga: Saga, event: RecordedEvent) -> None:
        self._newest += 1
        record = event
        if isinstance(event.event, SagaCreated):  # the feed does not carry the input
            created = SagaCreated(saga.saga_id, saga.definition, b"")
            record = RecordedEvent(event.saga_id, event.sequence, event.recorded_at, created)
        self._feed[self._newest] = FeedChange(
            self._newest, saga.saga_id, saga.definition, saga.state, saga.labels, record
        )

    async def feed(self, after_position: int, limit: int) -> FeedPage:
        """Up to ``limit`` changes after ``after_position``; see ``SagaStore.feed``."""
        self._check_open()
        if limit < 1:
            raise ValueError(f"a feed page holds at least one change, not {limit}")
        changes = [c for p, c in self._feed.items() if p > after_position][:limit]
        position = changes[-1].position if changes else after_position
        return FeedPage(tuple(changes), position, self._pruned_through)

    async def feed_bounds(self) -> tuple[int, int]:
        """(highest position pruned, newest position); see ``SagaStore.feed_bounds``."""
        self._check_open()
        return self._pruned_through, self._newest

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

    async def count_by_state(self, where: SagaFilter) -> Mapping[SagaState, int]:
        """How many sagas match ``where`` in each state (``where.states`` ignored; states with
        none are left out)."""
        self._check_open()
        every_state = SagaFilter(
            definition=where.definition,
            definition_version=where.definition_version,
            labels=where.labels,
            created_after=where.created_after,
            created_before=where.created_before,
            stuck_on_participant=where.stuck_on_participant,
            stuck_on_step=where.stuck_on_step,
        )
        return dict(Counter(saga.state for saga in self._matching(every_state)))

    def _matching(self, where: SagaFilter) -> Iterator[Saga]:
        for row in self._rows.values():
            if matches(row.saga, where):
                yield row.saga

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        self._check_open()
        row = self._rows.get(saga_id)
        return () if row is None else tuple(row.log)

    async def events_page(
        self, saga_id: str, after_sequence: int, limit: int, *, newest_first: bool = False
    ) -> Sequence[RecordedEvent]:
        """Up to ``limit`` events of the saga's log; see ``SagaStore.events_page``."""
        self._check_open()
        check_limit(limit, "event")
        row = self._rows.get(saga_id)
        if row is None:
            return ()
        if newest_first:
            return tuple(
                event
                for event in reversed(row.log)
                if after_sequence <= 0 or event.sequence < after_sequence
            )[:limit]
        return tuple(event for event in row.log if event.sequence > after_sequence)[:limit]

    # --- replicas and leases -----------------------------------------------------------------

    def _alive(self, replica: str | None) -> bool:
        return replica is not None and self._leases.get(replica, 0.0) > self._clock()

    async def join(self, replica: str, lease: timedelta) -> None:
        """Start the replica's lease; see ``SagaStore.join``."""
        self._check_open()
        self._let_go(replica)
        self._leases[replica] = self._clock() + lease.total_seconds()

    async def renew(self, replica: str, lease: timedelta) -> bool:
        """Extend the replica's lease unless it ran out; see ``SagaStore.renew``."""
        self._check_open()
        if not self._alive(replica):
            return False
        self._leases[replica] = self._clock() + lease.total_seconds()
        return True

    async def leave(self, replica: str) -> int:
        """End the lease and let go of the replica's sagas; see ``SagaStore.leave``."""
        self._check_open()
        self._leases.pop(replica, None)
        return self._let_go(replica)

    def _let_go(self, replica: str) -> int:
        released = 0
        for row in self._rows.values():
            if row.owner == replica:
                row.owner = None
                released += 1
        return released

    async def claim(self, replica: str, limit: int) -> Sequence[Claimed]:
        """Take unfinished sagas no live replica holds, oldest first; see ``SagaStore.claim``."""
        self._check_open()
        check_limit(limit)
        if not self._alive(replica):
            return ()
        free = sorted(
            (
                row
                for row in self._rows.values()
                if row.saga.state in UNFINISHED and not self._alive(row.owner)
            ),
            key=lambda row: (row.saga.created_at, row.saga.saga_id),
        )[:limit]
        return tuple(self._hold(row, replica) for row in free)

    async def take(self, replica: str, saga_id: str) -> Claimed | None:
        """Take one saga whoever holds it; see ``SagaStore.take``."""
        self._check_open()
        row = self._rows.get(saga_id)
        if row is None or not self._alive(replica):
            return None
        return self._hold(row, replica)

    @staticmethod
    def _hold(row: _Row, replica: str) -> Claimed:
        row.owner = replica
        row.epoch += 1
        return Claimed(row.saga, Fence(replica, row.epoch))

    async def oldest_unfinished(self) -> datetime | None:
        """When the oldest saga that has not ended (running, compensating, parked) was created."""
        self._check_open()
        return min(
            (row.saga.created_at for row in self._rows.values() if row.saga.state in NOT_ENDED),
            default=None,
        )

    async def parked_by_step(self) -> Mapping[tuple[str, str], int]:
        """NEEDS_ATTENTION sagas counted by (definition name, step they are stuck on)."""
        self._check_open()
        return dict(
            Counter(
                parked_key(row.saga)
                for row in self._rows.values()
                if row.saga.state is SagaState.NEEDS_ATTENTION
            )
        )

    # --- the definitions registry ------------------------------------------------------------

    async def register_definition(
        self, definition: SagaDefinition, at: datetime
    ) -> tuple[RegisteredDefinition, bool]:
        """Register a definition version; see ``SagaStore.register_definition``."""
        self._check_open()
        key = (definition.name, definition.version)
        new = _registration(definition, at)
        registered = self._registry.get(key)
        if registered is not None:
            if registered.digest != new.digest:
                raise definition_conflict(definition, registered.digest)
            return self._described(registered), False
        self._registry[key] = new
        return self._described(new), True

    async def definitions(self, name: str | None = None) -> Sequence[RegisteredDefinition]:
        """Registered definitions (of ``name``, or all), by name then version, with counts."""
        self._check_open()
        return tuple(
            self._described(self._registry[key])
            for key in sorted(self._registry)
            if name is None or key[0] == name
        )

    def _described(self, registered: _Registered) -> RegisteredDefinition:
        definition = registered.definition
        unfinished = sum(
            1
            for row in self._rows.values()
            if row.saga.state in NOT_ENDED
            and row.saga.definition.name == definition.name
            and row.saga.definition.version == definition.version
        )
        return RegisteredDefinition(
            definition, registered.registered_at, registered.digest, unfinished
        )

    # --- retention ---------------------------------------------------------------------------

    async def count_prunable(self, ended_before: datetime) -> PruneResult:
        """What ``prune`` would remove for this cutoff, counted; nothing is removed."""
        self._check_open()
        rows = _prunable(self._rows.values(), ended_before)
        return PruneResult(len(rows), sum(len(row.log) for row in rows))

    async def prune(self, ended_before: datetime, limit: int) -> PruneResult:
        """Remove up to ``limit`` sagas that ended SUCCEEDED or COMPENSATED before the cutoff,
        oldest ending first, with their events."""
        self._check_open()
        check_prune_limit(limit)
        rows = _prunable(self._rows.values(), ended_before)[:limit]
        pruned = {row.saga.saga_id for row in rows}
        for row in rows:
            del self._rows[row.saga.saga_id]
        for position, change in list(self._feed.items()):
            if change.saga_id in pruned:
                del self._feed[position]
                self._pruned_through = max(self._pruned_through, position)
        return PruneResult(len(rows), sum(len(row.log) for row in rows))

    # --- life cycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Refuse further use; the data is dropped with the object. Idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the saga store is closed")


def _prunable(rows: Iterable[_Row], ended_before: datetime) -> list[_Row]:
    """The rows retention may remove at this cutoff, oldest ending first."""
    ended = [
        (row.saga.ended_at, row.saga.saga_id, row)
        for row in rows
        if row.saga.state in PRUNABLE
        and row.saga.ended_at is not None
        and row.saga.ended_at < ended_before
    ]
    ended.sort(key=lambda entry: entry[:2])
    return [row for _, _, row in ended]


def _registration(definition: SagaDefinition, at: datetime) -> _Registered:
    # The digest of the stored form, as the durable stores compute it.
    return _Registered(definition, at, digest(pack_definition(definition)).hex())
