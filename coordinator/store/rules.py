"""The store port's rules that every adapter applies alike: checks, errors, paging."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.core.errors import ConcurrentUpdate, SagaAlreadyExists
from coordinator.core.events import RecordedEvent
from coordinator.core.model import Saga, SagaState
from coordinator.ports import ListCursor, SagaPage

UNFINISHED = frozenset({SagaState.RUNNING, SagaState.COMPENSATING})
"""The states recovery resumes."""


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


def check_limit(limit: int) -> None:
    """Refuse a page size below one (a caller's bug: the transport picks the default)."""
    if limit < 1:
        raise ValueError(f"a page holds at least one saga, not {limit}")


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


def page_of(sagas: Sequence[Saga], limit: int) -> SagaPage:
    """A page of the first ``limit`` of ``sagas`` (fetched as limit + 1 to know if more exist)."""
    if len(sagas) <= limit:
        return SagaPage(sagas=tuple(sagas), next_cursor=None)
    last = sagas[limit - 1]
    return SagaPage(
        sagas=tuple(sagas[:limit]), next_cursor=ListCursor(last.created_at, last.saga_id)
    )
