"""Migrating a PostgreSQL store: refuse what is not ours or is newer, apply what is missing.

The migrations in ``coordinator/store/migrations/postgres`` run in one transaction under a
transaction-level advisory lock: coordinators starting together on one database take turns,
and the second finds the work done. Each applied migration is recorded in ``schema_migrations``
with its number and name. A database migrated by a newer coordinator, or whose recorded
migrations are not this coordinator's, is refused before anything is written to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from coordinator.store.errors import SchemaTooNew, StoreCorrupt
from coordinator.store.migration_files import MigrationFile, read_migrations

MIGRATION_LOCK = 0x73616761_6D696772
"""The advisory lock key migrations hold ("sagamigr"): one process migrates at a time."""

_UNTOUCHED = "refusing to open it; the database was left untouched"
_CREATE_MIGRATIONS = """
CREATE TABLE schema_migrations (
    version    integer     NOT NULL PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_TABLES = """
SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
"""


def load_migrations() -> tuple[MigrationFile, ...]:
    """The PostgreSQL migrations shipped with this coordinator, numbered 1, 2, 3... in order."""
    return read_migrations("postgres")


def describe(url: str) -> str:
    """The database of ``url`` for messages and logs: host, port and name, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:  # a malformed URL: say nothing of it rather than echo a secret
        return "the PostgreSQL database"
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    name = parts.get("dbname") or parts.get("user") or ""
    return f"postgresql://{host}{port}/{name}"


async def migrate(
    connection: AsyncConnection[Any], where: str, migrations: Sequence[MigrationFile]
) -> None:
    """Bring the database to ``migrations``, in one transaction under ``MIGRATION_LOCK``.

    Raises ``SchemaTooNew`` for a database migrated by a newer coordinator and
    ``StoreCorrupt`` for one that is not a saga store; both are left untouched.
    """
    async with connection.transaction():
        # Released at the end of the transaction, whatever happens: a crash never leaves it held.
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        applied = await _applied_migrations(connection, where, migrations)
        for migration in migrations:
            if migration.version in applied:
                continue
            # Without parameters the text goes as one simple query: every statement in it runs.
            await connection.execute(migration.sql.encode())
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )


async def _applied_migrations(
    connection: AsyncConnection[Any], where: str, migrations: Sequence[MigrationFile]
) -> dict[int, str]:
    tables = {str(row[0]) for row in await (await connection.execute(_SELECT_TABLES)).fetchall()}
    if "schema_migrations" not in tables:
        ours = tables & {"sagas", "saga_events", "saga_steps", "definitions", "feed_head"}
        if ours:
            raise StoreCorrupt(
                f"{where} has tables of a saga store ({', '.join(sorted(ours))}) but no "
                f"schema_migrations table, so its schema is unknown; {_UNTOUCHED}"
            )
        await connection.execute(_CREATE_MIGRATIONS)
        return {}
    try:
        cursor = await connection.execute("SELECT version, name FROM schema_migrations")
    except (pg_errors.UndefinedColumn, pg_errors.DatatypeMismatch) as error:
        raise StoreCorrupt(
            f"{where} has a schema_migrations table of another application ({error}); {_UNTOUCHED}"
        ) from error
    applied = {int(version): str(name) for version, name in await cursor.fetchall()}
    newest = max(applied, default=0)
    known = len(migrations)
    if newest > known:
        raise SchemaTooNew(
            f"{where} has schema version {newest}, newer than this coordinator knows ({known}): "
            f"it was migrated by a newer release; upgrade the coordinator. {_UNTOUCHED}"
        )
    for migration in migrations:
        name = applied.get(migration.version)
        if name is not None and name != migration.name:
            raise StoreCorrupt(
                f"{where} recorded migration {migration.version} as {name!r}, but this "
                f"coordinator's migration {migration.version} is {migration.name!r}; {_UNTOUCHED}"
            )
    return applied
