"""The narrow interfaces the engine needs: a store, a participant gateway and a clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from coordinator.core.calls import ParticipantCall
from coordinator.core.events import Outcome, RecordedEvent
from coordinator.core.model import Saga, SagaDefinition, SagaState


@dataclass(frozen=True)
class SagaFilter:
    """Which sagas to list or count; every condition given must hold."""

    states: frozenset[SagaState] = frozenset()
    """Only these states; empty means all."""
    definition: str | None = None
    """Only this definition name."""
    definition_version: int | None = None
    """Only this version of the definition (alone: this version of any definition)."""
    labels: tuple[tuple[str, str], ...] = ()
    """Only sagas carrying every one of these (key, value) labels."""
    created_after: datetime | None = None
    """Only sagas created at or after this time."""
    created_before: datetime | None = None
    """Only sagas created before this time."""
    stuck_on_participant: str | None = None
    """Only unfinished or parked sagas whose waiting step (``waiting_step``) calls this
    participant."""
    stuck_on_step: str | None = None
    """Only unfinished or parked sagas whose waiting step has this name."""


@dataclass(frozen=True)
class RegisteredDefinition:
    """One version of a definition in the registry."""

    definition: SagaDefinition
    registered_at: datetime
    digest: str
    """SHA-256 of the definition's stored content, hexadecimal."""
    unfinished: int = 0
    """Sagas of this version that have not ended (running, compensating or parked)."""


@dataclass(frozen=True)
class FeedChange:
    """One change of one saga, at its position in the change feed of all sagas."""

    position: int
    """Increasing in commit order across all sagas, never reused (pruning included)."""
    saga_id: str
    definition: SagaDefinition
    state: SagaState | None
    """The saga's state after the change (None: recorded before the feed existed)."""
    labels: Mapping[str, str]
    record: RecordedEvent
    """The change as in the saga's log (a creation's input is not carried)."""


@dataclass(frozen=True)
class ChangeFilter:
    """Which changes of the feed a consumer wants; every condition given must hold."""

    definition: str | None = None
    states: frozenset[SagaState] = frozenset()
    """The saga's state after the change; empty means any."""
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, change: FeedChange) -> bool:
        """Whether ``change`` is one the consumer asked for."""
        if self.definition is not None and change.definition.name != self.definition:
            return False
        if self.states and change.state not in self.states:
            return False
        return all(change.labels.get(key) == value for key, value in self.labels)


@dataclass(frozen=True)
class FeedPage:
    """Changes in commit order, and how far the feed was read."""

    changes: Sequence[FeedChange]
    position: int
    """The last change's position, or the position read from when there were none."""
    pruned_through: int = 0
    """The highest position pruned when the page was read (see ``feed_bounds``)."""


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed (or, counted for a dry run, would remove)."""

    sagas: int
    events: int


@dataclass(frozen=True)
class Fence:
    """The right to write one saga: the replica holding it and the saga's epoch when it was
    claimed. A store refuses a write whose fence is not the saga's current one, or whose
    replica's lease has run out by the database's clock (``LeaseLost``)."""

    replica: str
    epoch: int


@dataclass(frozen=True)
class Claimed:
    """A saga a replica now holds, and the fence its writes must carry."""

    saga: Saga
    fence: Fence


@dataclass(frozen=True)
class ListCursor:
    """Where a listing resumes: after the saga created at ``created_at`` with ``saga_id``."""

    created_at: datetime
    saga_id: str


@dataclass(frozen=True)
class SagaPage:
    """One page of sagas, oldest first, and where the next page starts (None: last page)."""

    sagas: Sequence[Saga]
    next_cursor: ListCursor | None


class SagaStore(Protocol):
    """Durable sagas and their append-only event logs.

    Every write is one transaction: the saga row and its event commit together or not at all,
    and a write returns only once it is durable. Errors are the project's own
    (``coordinator.core.errors``): ``SagaAlreadyExists``, ``ConcurrentUpdate``,
    ``StorageUnavailable``; a driver's exceptions never leak out.
    """

    async def create(
        self, saga: Saga, event: RecordedEvent, fingerprint: str, replica: str | None = None
    ) -> tuple[Saga, bool]:
        """Store a new saga with its first event; return it and True.

        If a saga with this id exists and was created with the same ``fingerprint``, return it
        and False (idempotent creation); with another fingerprint raise ``SagaAlreadyExists``.
        A definition version the registry does not hold yet is registered with the saga; one it
        holds keeps its registered content. With ``replica``, the new saga is held by it at
        epoch 1 (``Fence(replica, 1)``).
        """
        ...

    async def commit(
        self,
        saga: Saga,
        event: RecordedEvent,
        changed_steps: Sequence[int] | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Store the saga's new state with the event that led to it.

        The stored saga must be at version ``saga.version - 1``, and ``event.sequence`` must be
        ``saga.version``; otherwise raise ``ConcurrentUpdate`` and store nothing.
        ``changed_steps`` names the steps that differ from version ``saga.version - 1`` (None:
        any may): a store may write only those. With ``fence``, the saga must still be held by
        that replica at that epoch and the replica's lease must not have run out, judged in the
        same transaction by the database's clock; otherwise raise ``LeaseLost``.
        """
        ...

    # --- replicas and leases: one replica at a time moves a saga forward ------------------------

    async def join(self, replica: str, lease: timedelta) -> None:
        """Start ``replica``'s lease: it lives until ``lease`` from now, by the database's clock.
        An earlier life under the same name is over: the sagas it held are let go (and their
        writes refused), so that a replica restarted under its name takes them up at once."""
        ...

    async def renew(self, replica: str, lease: timedelta) -> bool:
        """Extend the replica's lease to ``lease`` from now; False (nothing changed) when it had
        run out already or does not exist: the replica has lost its sagas and must join anew."""
        ...

    async def leave(self, replica: str) -> int:
        """End the replica's lease and let go of the sagas it holds at once, so that others
        claim them without waiting for the lease to run out; return how many were let go."""
        ...

    async def claim(self, replica: str, limit: int) -> Sequence[Claimed]:
        """Take up to ``limit`` unfinished (RUNNING, COMPENSATING) sagas that no live replica
        holds: never held, let go, or held by a replica whose lease ran out. Each one's epoch
        moves on by one. Two replicas claiming at once never get the same saga. A replica whose
        own lease has run out claims nothing. A limit below 1 raises ValueError."""
        ...

    async def take(self, replica: str, saga_id: str) -> Claimed | None:
        """Take one saga whoever holds it (an operator's action reached this replica): its
        epoch moves on by one, so the replica that held it can write nothing more to it.
        None for an unknown saga or if this replica's own lease has run out."""
        ...

    async def get(self, saga_id: str) -> Saga | None:
        """The saga, or None."""
        ...

    async def list(self, where: SagaFilter, limit: int, after: ListCursor | None) -> SagaPage:
        """Up to ``limit`` sagas matching ``where``, oldest first, after ``after``."""
        ...

    async def count(self, where: SagaFilter) -> int:
        """How many sagas match ``where``."""
        ...

    async def events(self, saga_id: str) -> Sequence[RecordedEvent]:
        """The saga's event log, in order (empty if the saga does not exist)."""
        ...

    async def events_page(
        self, saga_id: str, after_sequence: int, limit: int, *, newest_first: bool = False
    ) -> Sequence[RecordedEvent]:
        """Up to ``limit`` events of the saga's log that come after ``after_sequence`` in the
        reading order (none for an unknown saga): oldest first, those with a greater sequence;
        ``newest_first``, those with a smaller one, newest first, and 0 starts at the newest.
        A limit below 1 raises ValueError, as in ``list`` and ``prune``."""
        ...

    async def count_by_state(self, where: SagaFilter) -> Mapping[SagaState, int]:
        """How many sagas match ``where`` in each state (states with none may be left out;
        ``where.states`` is ignored)."""
        ...

    async def oldest_unfinished(self) -> datetime | None:
        """When the oldest saga that has not ended (running, compensating, parked) was created."""
        ...

    async def parked_by_step(self) -> Mapping[tuple[str, str], int]:
        """NEEDS_ATTENTION sagas counted by (definition name, step they are stuck on)."""
        ...

    async def register_definition(
        self, definition: SagaDefinition, at: datetime
    ) -> tuple[RegisteredDefinition, bool]:
        """Register a definition version; return it and True.

        The same content under a registered name and version returns the registered one and
        False; other content under it raises ``DefinitionConflict`` and stores nothing.
        """
        ...

    async def definitions(self, name: str | None = None) -> Sequence[RegisteredDefinition]:
        """Registered definitions (of ``name``, or all), by name then version, with counts."""
        ...

    async def feed(self, after_position: int, limit: int) -> FeedPage:
        """Up to ``limit`` changes of all sagas with positions above ``after_position``, in
        commit order. Only committed changes are seen, and never one before another that
        committed earlier. A limit below 1 raises ValueError."""
        ...

    async def feed_bounds(self) -> tuple[int, int]:
        """(the highest position pruned, the newest position): a consumer after a position
        below the first may have missed pruned changes."""
        ...

    async def count_prunable(self, ended_before: datetime) -> PruneResult:
        """What ``prune`` would remove for this cutoff, counted; nothing is removed."""
        ...

    async def prune(self, ended_before: datetime, limit: int) -> PruneResult:
        """Remove up to ``limit`` sagas that ended SUCCEEDED or COMPENSATED before the cutoff,
        with their events, in one short transaction. Never a running or parked saga."""
        ...

    async def close(self) -> None:
        """Release the store's resources; pending writes are finished first."""
        ...


class ParticipantGateway(Protocol):
    """Sends calls to participants and reads their answers as outcomes."""

    async def send(self, call: ParticipantCall) -> Outcome:
        """Send one attempt and return how it went; never raises for a participant's answer."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...


class Clock(Protocol):
    """The time, for the engine; the core never reads a clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...
