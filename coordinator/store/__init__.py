"""Storage adapters behind the store port, chosen by URL: ``memory:`` and ``sqlite:///path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.ports import SagaStore
from coordinator.store.errors import InvalidStoreUrl

__all__ = ["open_store", "sqlite_path"]

_SQLITE = "sqlite:///"
_ACCEPTED = (
    "'memory:' (in memory, for tests), 'sqlite:///relative/path.db' or "
    "'sqlite:////absolute/path.db'"
)


async def open_store(url: str, **options: Any) -> SagaStore:
    """Open the store that ``url`` names; ``options`` go to that adapter's ``open``.

    ``memory:`` is the in-memory reference store; ``sqlite:///data/sagas.db`` a SQLite file
    relative to the working directory, ``sqlite:////var/lib/saga/sagas.db`` an absolute one
    (the SQLAlchemy convention). Anything else raises ``InvalidStoreUrl``.
    """
    # Adapters are imported only when chosen: a coordinator on one backend never loads another.
    if url == "memory:":
        if options:
            raise TypeError(f"the memory store takes no options, got {sorted(options)}")
        from coordinator.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:"):
        from coordinator.store.sqlite import SqliteStore

        return await SqliteStore.open(sqlite_path(url), **options)
    raise InvalidStoreUrl(f"unsupported store URL {url!r}: use {_ACCEPTED}")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///`` URL: three slashes and a relative path, four for absolute."""
    if not url.startswith(_SQLITE):
        raise InvalidStoreUrl(
            f"invalid SQLite URL {url!r}: write 'sqlite:///relative/path.db' or "
            "'sqlite:////absolute/path.db'"
        )
    path = url[len(_SQLITE) :]
    if not path or path.endswith("/"):
        raise InvalidStoreUrl(f"invalid SQLite URL {url!r}: it names no file")
    if path == ":memory:" or path.startswith("file:"):
        raise InvalidStoreUrl(
            f"invalid SQLite URL {url!r}: use 'memory:' for a store in memory, or a file path"
        )
    if "?" in path:
        raise InvalidStoreUrl(
            f"invalid SQLite URL {url!r}: pass options as settings, not in the URL"
        )
    return Path(path)
