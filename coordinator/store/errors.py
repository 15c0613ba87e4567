"""The store's own errors, grafted onto the coordinator's error tree.

    SagaError (coordinator.core.errors)   reason
    ├── StorageUnavailable                STORAGE_UNAVAILABLE  busy, locked, disk full: retry later
    ├── ShuttingDown                      SHUTTING_DOWN
    │   └── StoreClosed                   SHUTTING_DOWN        the store was closed
    ├── StorageFailure                    STORAGE_FAILURE      I/O error: restart, check the disk
    │   ├── StoreCorrupt                  STORE_CORRUPT        not a store, or a damaged one
    │   └── SchemaTooNew                  SCHEMA_TOO_NEW       written by a newer coordinator
    └── InvalidStoreUrl (also ValueError) INVALID_STORE_URL    no adapter for this URL

StorageFailure itself lives in the core's tree, since the engine must recognise it (it stops
the coordinator). Every driver exception is translated into one of these at the adapter's edge.
"""

from __future__ import annotations

from coordinator.core.errors import SagaError, ShuttingDown, StorageFailure

__all__ = ["InvalidStoreUrl", "SchemaTooNew", "StorageFailure", "StoreClosed", "StoreCorrupt"]


class StoreClosed(ShuttingDown):
    """The store was closed and takes no more reads or writes."""


class StoreCorrupt(StorageFailure):
    """The file is not a saga store, or it is damaged; it was left untouched."""

    reason = "STORE_CORRUPT"


class SchemaTooNew(StorageFailure):
    """The database was migrated by a newer coordinator than this one; it was left untouched."""

    reason = "SCHEMA_TOO_NEW"


class InvalidStoreUrl(SagaError, ValueError):
    """No storage adapter serves this URL."""

    reason = "INVALID_STORE_URL"
