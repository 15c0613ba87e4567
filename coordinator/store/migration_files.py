"""The numbered, forward-only schema migrations each SQL store ships: found, ordered, checked.

A store's migrations are files named ``NNNN_what_it_does.sql`` in its own folder under
``coordinator/store/migrations`` (the folder itself for SQLite, ``postgres/`` for PostgreSQL),
numbered 1, 2, 3... without gaps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class MigrationFile:
    """One numbered migration's SQL, as shipped."""

    version: int
    name: str
    sql: str


def read_migrations(*folder: str) -> tuple[MigrationFile, ...]:
    """The migrations in ``coordinator/store/migrations/<folder...>``, in order."""
    directory = resources.files("coordinator.store").joinpath("migrations", *folder)
    found: list[MigrationFile] = []
    for entry in directory.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is not None:
            found.append(MigrationFile(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    numbers = [migration.version for migration in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"store migrations must be numbered 1, 2, 3... without gaps: {numbers}")
    return tuple(found)
