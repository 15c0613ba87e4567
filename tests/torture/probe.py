"""What the harness reads from the coordinators' store while they run: the backlog of unsettled
sagas, the change feed's newest position, and how often sagas changed hands.

These are a spectator's counts, read around the store port with plain SQL on the SQLite file
(read-only) or the PostgreSQL database (psycopg, autocommit): the harness must not open the store
the coordinators write. The offline checker reads through the port instead.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from tests.torture.checker import read_only

UNSETTLED = "SELECT count(*) FROM sagas WHERE state IN ('RUNNING', 'COMPENSATING')"
NEWEST_POSITION = "SELECT coalesce(max(position), 0) FROM saga_events"
CLAIMS = "SELECT count(*), coalesce(sum(epoch - 1), 0) FROM sagas WHERE epoch > 1"
"""Sagas claimed (or taken) after the hold they were created with, and how many times."""


class StoreProbe:
    """Reads one figure at a time from the SQLite file or from the PostgreSQL database."""

    def __init__(self, database: Path, url: str | None = None) -> None:
        """``url`` a ``postgresql://`` URL, or None for the SQLite file ``database``."""
        self.database = database
        self.url = url

    def unsettled(self) -> int:
        """Sagas RUNNING or COMPENSATING now; raises ``ProbeFailed`` when the store is busy."""
        return int(self._one(UNSETTLED, timeout_ms=200)[0])

    def newest_position(self) -> int:
        """The newest position of the change feed."""
        return int(self._one(NEWEST_POSITION, timeout_ms=2000)[0])

    def claims(self) -> tuple[int, int]:
        """(sagas claimed after their creation at least once, claims after creation in all)."""
        sagas, claims = self._one(CLAIMS, timeout_ms=2000)
        return int(sagas), int(claims)

    def _one(self, query: str, *, timeout_ms: int) -> tuple[Any, ...]:
        try:
            if self.url is None:
                with contextlib.closing(read_only(self.database)) as db:
                    db.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                    row = db.execute(query).fetchone()
            else:
                timeout = max(2, timeout_ms // 1000)  # libpq counts whole seconds, at least two
                with psycopg.connect(self.url, autocommit=True, connect_timeout=timeout) as db:
                    db.execute(f"SET statement_timeout = {timeout_ms}".encode())
                    row = db.execute(query.encode()).fetchone()
        except (sqlite3.Error, psycopg.Error) as error:
            raise ProbeFailed(str(error)) from error
        assert row is not None
        return tuple(row)


class ProbeFailed(Exception):
    """The store did not answer the probe (locked, busy, or not there yet)."""
