"""Translation of sqlite3's exceptions into the coordinator's errors, at the adapter's edge."""

from __future__ import annotations

import sqlite3

from coordinator.core.errors import SagaError, StorageUnavailable
from coordinator.store.errors import StorageFailure, StoreCorrupt

# Codes after which the file or the disk cannot be trusted: the store stops writing.
_FATAL = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def primary_code(error: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``error`` (extended codes folded), if it carries one."""
    code: int | None = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_fatal(error: sqlite3.Error) -> bool:
    """Whether ``error`` means the disk or the file failed (as opposed to busy or full)."""
    return primary_code(error) in _FATAL


def translate(error: sqlite3.Error, doing: str) -> SagaError:
    """The coordinator's error for a sqlite3 error met while ``doing`` something.

    Busy or locked and disk full are ``StorageUnavailable`` (retry later); damage is
    ``StoreCorrupt``; I/O errors and anything unexpected are ``StorageFailure``.
    """
    code = primary_code(error)
    name = getattr(error, "sqlite_errorname", type(error).__name__)
    detail = f"{name}: {error}"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StorageUnavailable(
            f"{doing}: the database is locked by another connection past the busy timeout "
            f"({detail})"
        )
    if code == sqlite3.SQLITE_FULL:
        return StorageUnavailable(
            f"{doing}: disk full, the database cannot grow; free space or raise its size limit "
            f"({detail})"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreCorrupt(f"{doing}: the database file is damaged ({detail})")
    if code == sqlite3.SQLITE_IOERR:
        return StorageFailure(f"{doing}: I/O error; check the disk and restart ({detail})")
    return StorageFailure(f"{doing}: unexpected database error ({detail})")
