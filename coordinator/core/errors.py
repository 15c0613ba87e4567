"""The coordinator's one error tree; each error has a stable reason.

    SagaError                      reason
    ├── InvalidArgument            INVALID_ARGUMENT (carries field violations)
    │   └── InvalidDefinition      INVALID_DEFINITION
    ├── SagaNotFound               SAGA_NOT_FOUND
    ├── DefinitionNotFound         DEFINITION_NOT_FOUND
    ├── SagaAlreadyExists          SAGA_ALREADY_EXISTS
    ├── SagaNotCancellable         SAGA_ENDED / SAGA_PAST_PIVOT / SAGA_NEEDS_ATTENTION
    ├── ActionNotAllowed           ACTION_NOT_ALLOWED (the action does not fit the saga's state)
    ├── DefinitionConflict         DEFINITION_VERSION_EXISTS
    ├── ConcurrentUpdate           CONCURRENT_UPDATE
    │   └── StaleVersion           SAGA_VERSION_MISMATCH
    ├── StorageUnavailable         STORAGE_UNAVAILABLE
    ├── StorageFailure             STORAGE_FAILURE (fatal: the coordinator stops)
    ├── WatcherTooSlow             WATCHER_TOO_SLOW
    ├── FeedPositionPruned         FEED_POSITION_PRUNED
    ├── FeedConsumerTooSlow        FEED_CONSUMER_TOO_SLOW
    └── ShuttingDown               SHUTTING_DOWN

The transport maps each to a gRPC status code in one table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path (``steps[2].compensation``) and what is wrong with it."""

    field: str
    description: str


class SagaError(Exception):
    """Something the coordinator refuses or cannot do."""

    reason = "SAGA_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SagaError):
    """The request is invalid; nothing was stored."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.violations = violations


class InvalidDefinition(InvalidArgument):
    """A saga definition is invalid."""

    reason = "INVALID_DEFINITION"


class SagaNotFound(SagaError):
    """No saga has this id."""

    reason = "SAGA_NOT_FOUND"


class DefinitionNotFound(SagaError):
    """No definition has this name (and version)."""

    reason = "DEFINITION_NOT_FOUND"


class SagaAlreadyExists(SagaError):
    """A saga with this id exists, created by a different request."""

    reason = "SAGA_ALREADY_EXISTS"


class SagaNotCancellable(SagaError):
    """The saga cannot be cancelled: it has ended, its pivot was sent, or it needs attention."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ActionNotAllowed(SagaError):
    """An operator action does not fit the saga's state; the message names what would."""

    reason = "ACTION_NOT_ALLOWED"


class DefinitionConflict(SagaError):
    """A definition version is registered already with other content."""

    reason = "DEFINITION_VERSION_EXISTS"


class ConcurrentUpdate(SagaError):
    """The saga changed in storage since it was read (another writer, or a stale owner)."""

    reason = "CONCURRENT_UPDATE"


class StaleVersion(ConcurrentUpdate):
    """An action named the saga version it expected, and the saga has moved on since."""

    reason = "SAGA_VERSION_MISMATCH"


class LeaseLost(ConcurrentUpdate):
    """The write was refused: the writer no longer holds the saga's lease. Another replica took
    the saga over (its epoch moved on), or this replica's own lease ran out; the writer must let
    the saga go."""

    reason = "SAGA_LEASE_LOST"


class StorageUnavailable(SagaError):
    """The store cannot take the write now (locked, full); nothing was acknowledged."""

    reason = "STORAGE_UNAVAILABLE"


class StorageFailure(SagaError):
    """The storage failed in a way that retrying will not fix (I/O error, damage).

    The write that met it was not acknowledged. The coordinator stops: what the disk says it
    wrote can no longer be trusted until a restart, which re-reads and resumes everything.
    """

    reason = "STORAGE_FAILURE"


class ShuttingDown(SagaError):
    """The coordinator is stopping and takes no new work."""

    reason = "SHUTTING_DOWN"


class FeedPositionPruned(SagaError):
    """A change feed consumer asked to resume from a position whose history was pruned."""

    reason = "FEED_POSITION_PRUNED"


class FeedConsumerTooSlow(SagaError):
    """A change feed consumer stopped reading and was cut off; it resumes from its position."""

    reason = "FEED_CONSUMER_TOO_SLOW"


class WatcherTooSlow(SagaError):
    """A watcher fell too far behind the saga's changes; it may watch again."""

    reason = "WATCHER_TOO_SLOW"
