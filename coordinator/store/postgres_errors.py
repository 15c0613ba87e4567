"""Translation of psycopg's exceptions into the coordinator's errors, at the adapter's edge."""

from __future__ import annotations

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from coordinator.core.errors import InvalidArgument, SagaError, StorageUnavailable
from coordinator.store.errors import StorageFailure, StoreClosed, StoreCorrupt

# Damage the server reports in what it stores: retrying will not mend it.
_CORRUPT = (pg_errors.DataCorrupted, pg_errors.IndexCorrupted)
# The server failed to read or write its own files.
_IO = (pg_errors.IoError,)
# A standby, or a database switched to read-only: another server may take the write later.
_READ_ONLY = (pg_errors.ReadOnlySqlTransaction,)
# The server ended a transaction that waited on this process (``stall_timeout``): it was
# rolled back, and the write may be tried again.
_STALLED = (pg_errors.IdleInTransactionSessionTimeout,)


def translate(error: psycopg.Error, doing: str) -> SagaError:
    """The coordinator's error for a psycopg error met while ``doing`` something.

    No connection (refused, lost, timed out, the pool exhausted), an overloaded or restarting
    server, a lock or deadlock given up on, a transaction ended because it waited on this
    process too long, a full disk or a read-only server are
    ``StorageUnavailable``: nothing was acknowledged and the write may be tried again. Damage is
    ``StoreCorrupt``; I/O errors and anything unexpected are ``StorageFailure``.
    """
    detail = _detail(error)
    if isinstance(error, psycopg_pool.PoolClosed):
        return StoreClosed(f"{doing}: the saga store is closed")
    if isinstance(error, psycopg_pool.PoolTimeout):
        return StorageUnavailable(
            f"{doing}: no database connection within the connect timeout; is the server up "
            f"and reachable? ({detail})"
        )
    if isinstance(error, _CORRUPT):
        return StoreCorrupt(f"{doing}: the database reports damaged data ({detail})")
    if isinstance(error, _IO):
        return StorageFailure(f"{doing}: the database server met an I/O error ({detail})")
    if isinstance(error, _READ_ONLY):
        return StorageUnavailable(f"{doing}: the database is read-only now ({detail})")
    if isinstance(error, _STALLED):
        return StorageUnavailable(
            f"{doing}: the database ended a transaction that waited too long on this process "
            f"(was it paused?) ({detail})"
        )
    if isinstance(error, pg_errors.DiskFull):
        return StorageUnavailable(
            f"{doing}: the database server's disk is full; free space ({detail})"
        )
    if isinstance(error, psycopg.DataError) and not getattr(error, "sqlstate", None):
        # Refused before it reached the server: a value PostgreSQL cannot hold, such as a NUL
        # character in a text. The request's fault, not the store's: nothing was written.
        return InvalidArgument(f"{doing}: a value cannot be stored ({detail})")
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        # Connection failures (SQLSTATE class 08, or no SQLSTATE at all: the connection broke),
        # server shutting down or starting (57), out of resources (53), lock and deadlock
        # refusals (55P03, 40001, 40P01), a statement timeout (57014).
        return StorageUnavailable(f"{doing}: the database is unavailable ({detail})")
    return StorageFailure(f"{doing}: unexpected database error ({detail})")


def _detail(error: psycopg.Error) -> str:
    sqlstate = getattr(error, "sqlstate", None)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}{f' {sqlstate}' if sqlstate else ''}: {message}"
