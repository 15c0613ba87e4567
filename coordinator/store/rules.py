"""The store port's rules that every adapter applies alike: checks, errors, paging."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.core.errors import (
    ConcurrentUpdate,
    DefinitionConflict,
    LeaseLost,
    SagaAlreadyExists,
)
from coordinator.core.events import RecordedEvent
from coordinator.core.machine import waiting_step
from coordinator.core.model import Saga, SagaDefinition, SagaState
from coordinator.ports import Fence, ListCursor, SagaFilter, SagaPage

UNFINISHED = frozenset({SagaState.RUNNING, SagaState.COMPENSATING})
"""The states recovery resumes."""
NOT_ENDED = frozenset({SagaState.RUNNING, SagaState.COMPENSATING, SagaState.NEEDS_ATTENTION})
"""The states of sagas that have not ended: running, compensating, or parked."""
PRUNABLE = frozenset({SagaState.SUCCEEDED, SagaState.COMPENSATED})
"""The states of sagas that retention may remove once they are old enough."""

CountRow = tuple[str, int, str, int]
"""A row of a store's ``saga_counts``: definition name, version, state, how many sagas."""


def check_creation(saga: Saga, event: RecordedEvent) -> None:
    """Refuse (ValueError) a creation the engine could not have meant: a caller's bug."""
    if event.saga_id != saga.saga_id:
        raise ValueError(f"event of saga {event.saga_id!r} given for saga {saga.saga_id!r}")
    if saga.version != 1 or event.sequence != 1:
        raise ValueError(
            f"a new saga is at version 1 with event 1, not version {saga.version} "
            f"with event {event.sequence}"
        )


def check_commit(saga: Saga, event: RecordedEvent) -> None:
    """Refuse an event that does not belong to this saga state."""
    if event.saga_id != saga.saga_id:
        raise ValueError(f"event of saga {event.saga_id!r} given for saga {saga.saga_id!r}")
    if event.sequence != saga.version:
        raise ConcurrentUpdate(
            f"saga {saga.saga_id}: event {event.sequence} cannot lead to version {saga.version}"
        )


def check_limit(limit: int, what: str = "saga") -> None:
    """Refuse a page size below one (a caller's bug: the transport picks the default)."""
    if limit < 1:
        raise ValueError(f"a page holds at least one {what}, not {limit}")


def check_prune_limit(limit: int) -> None:
    """Refuse a prune batch below one saga (a caller's bug)."""
    if limit < 1:
        raise ValueError(f"a prune removes at least one saga per batch, not {limit}")


def matches(saga: Saga, where: SagaFilter) -> bool:
    """Whether ``saga`` meets every condition of ``where``: the filter's meaning, which every
    adapter's queries must agree with."""
    if where.states and saga.state not in where.states:
        return False
    if where.definition is not None and saga.definition.name != where.definition:
        return False
    if where.definition_version is not None and (
        saga.definition.version != where.definition_version
    ):
        return False
    if any(saga.labels.get(key) != value for key, value in where.labels):
        return False
    if where.created_after is not None and saga.created_at < where.created_after:
        return False
    if where.created_before is not None and saga.created_at >= where.created_before:
        return False
    if where.stuck_on_participant is not None or where.stuck_on_step is not None:
        index = waiting_step(saga)
        if index is None:
            return False
        step = saga.definition.steps[index]
        if where.stuck_on_participant not in (None, step.participant):
            return False
        if where.stuck_on_step not in (None, step.name):
            return False
    return True


def only_counted(where: SagaFilter) -> bool:
    """Whether the sagas counted per (definition, version, state) alone answer counts for this
    filter."""
    return not (
        where.labels
        or where.created_after is not None
        or where.created_before is not None
        or where.stuck_on_participant is not None
        or where.stuck_on_step is not None
    )


def counted(counts: Sequence[CountRow], where: SagaFilter) -> dict[SagaState, int]:
    """Sagas per state of a filter that ``only_counted`` accepts (``where.states`` ignored)."""
    totals: dict[SagaState, int] = {}
    for name, version, state, total in counts:
        if where.definition is not None and name != where.definition:
            continue
        if where.definition_version is not None and version != where.definition_version:
            continue
        totals[SagaState(state)] = totals.get(SagaState(state), 0) + total
    return totals


def parked_key(saga: Saga) -> tuple[str, str]:
    """How ``parked_by_step`` groups a NEEDS_ATTENTION saga: its definition and its step."""
    index = waiting_step(saga)
    return saga.definition.name, "" if index is None else saga.steps[index].name


def definition_conflict(definition: SagaDefinition, registered_digest: str) -> DefinitionConflict:
    """The error for other content under a registered name and version."""
    return DefinitionConflict(
        f"definition {definition.name!r} version {definition.version} is registered already "
        f"with other content (digest {registered_digest[:12]}); register the change as a new "
        "version"
    )


def already_exists(saga_id: str) -> SagaAlreadyExists:
    """The error for a saga id taken by a different request."""
    return SagaAlreadyExists(f"saga {saga_id} already exists, created by a different request")


def stale(saga: Saga, stored_version: int | None) -> ConcurrentUpdate:
    """The error for a commit that does not follow the stored version."""
    if stored_version is None:
        return ConcurrentUpdate(f"saga {saga.saga_id} does not exist; nothing to update")
    return ConcurrentUpdate(
        f"saga {saga.saga_id} is at version {stored_version} in storage, "
        f"not {saga.version - 1} as this update expects"
    )


def check_lease(
    saga_id: str, fence: Fence, owner: str | None, epoch: int, replica_alive: bool
) -> None:
    """Raise ``LeaseLost`` unless ``fence`` is the saga's current holder and epoch and its
    replica's lease still runs."""
    if owner != fence.replica or epoch != fence.epoch:
        holder = f"replica {owner} at epoch {epoch}" if owner else "no replica"
        raise LeaseLost(
            f"saga {saga_id} is held by {holder}, not by replica {fence.replica} at epoch "
            f"{fence.epoch}: it was taken over; this write is refused"
        )
    if not replica_alive:
        raise LeaseLost(
            f"the lease of replica {fence.replica} has run out: its write to saga {saga_id} is "
            "refused (another replica may hold the saga now)"
        )


def page_of(sagas: Sequence[Saga], limit: int) -> SagaPage:
    """A page of the first ``limit`` of ``sagas`` (fetched as limit + 1 to know if more exist)."""
    if len(sagas) <= limit:
        return SagaPage(sagas=tuple(sagas), next_cursor=None)
    last = sagas[limit - 1]
    return SagaPage(
        sagas=tuple(sagas[:limit]), next_cursor=ListCursor(last.created_at, last.saga_id)
    )
