"""Storage adapters behind the store port, chosen by URL: ``memory:``, ``sqlite:///path`` and
``postgresql://...``."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

from coordinator.ports import SagaStore
from coordinator.store.errors import InvalidStoreUrl

__all__ = ["open_store", "redacted_url", "sqlite_path"]

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")
_DRIVERS = ("psycopg", "psycopg_pool", "psycopg_binary")
_ACCEPTED = (
    "'memory:' (in memory, for tests), 'sqlite:///relative/path.db', "
    "'sqlite:////absolute/path.db' or 'postgresql://user@host:port/database'"
)


async def open_store(url: str, **options: Any) -> SagaStore:
    """Open the store that ``url`` names; ``options`` go to that adapter's ``open``.

    ``memory:`` is the in-memory reference store; ``sqlite:///data/sagas.db`` a SQLite file
    relative to the working directory, ``sqlite:////var/lib/saga/sagas.db`` an absolute one
    (the SQLAlchemy convention); ``postgresql://user@host:5432/sagas`` (or ``postgres://``) a
    PostgreSQL database, in libpq's URL form, which several coordinators may share (it needs
    the ``postgresql`` extra). Anything else raises ``InvalidStoreUrl``.
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
    if url.startswith(_POSTGRES):
        try:
            from coordinator.store.postgres import PostgresStore
        except ModuleNotFoundError as error:
            if error.name is None or error.name.partition(".")[0] not in _DRIVERS:
                raise
            raise InvalidStoreUrl(
                f"a PostgreSQL store needs the psycopg driver ({error.name} is missing): "
                "install saga-coordinator[postgresql]"
            ) from error
        return await PostgresStore.open(url, **options)
    raise InvalidStoreUrl(f"unsupported store URL {redacted_url(url)!r}: use {_ACCEPTED}")


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


def redacted_url(url: str) -> str:
    """The store's URL as logs and messages may show it: any password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = urllib.parse.quote(parts.username or "", safe="")
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
