"""The store's own errors, grafted onto the coordinator's error tree.

    SagaError (coordinator.core.errors)   reason
    ├── StorageUnavailable                STORAGE_UNAVAILABLE  busy, locked, disk full: retry later
    ├── ShuttingDown                      SHUTTING_DOWN
    │   └── StoreClosed                   SHUTTING_DOWN        the store was closed
    ├── StorageFailure                    STORAGE_FAILURE      I/O error: restart, check the disk
    │   ├── StoreCorrupt                  STORE_CORRUPT        not a store, or a damaged one
    │   └── SchemaTooNew                  SCHEMA_TOO_NEW       written by a newer coordinator
    └── InvalidStoreUrl (also ValueError) INVALID_STORE_URL    no adapter for this URL

Every driver exception is translated into one of these at the adapter's edge.
"""

from __future__ import annotations

from coordinator.core.errors import SagaError, ShuttingDown


class StoreClosed(ShuttingDown):
    """The store was closed and takes no more reads or writes."""


class StorageFailure(SagaError):
    """The storage failed in a way that retrying will not fix (I/O error, damage).

    The write that met it was not acknowledged. After an I/O error the store refuses every
    later write too: what the disk says it wrote can no longer be trusted until a restart.
    """

    reason = "STORAGE_FAILURE"


class StoreCorrupt(StorageFailure):
    """The file is not a saga store, or it is damaged; it was left untouched."""

    reason = "STORE_CORRUPT"


class SchemaTooNew(StorageFailure):
    """The database was migrated by a newer coordinator than this one; it was left untouched."""

    reason = "SCHEMA_TOO_NEW"


class InvalidStoreUrl(SagaError, ValueError):
    """No storage adapter serves this URL."""

    reason = "INVALID_STORE_URL"
