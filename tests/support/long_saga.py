"""A saga with a very long event log, written straight into a SQLite store's tables.

A step retried through thousands of transient failures takes hours to run for real; the core
drives the same history here (``run_history``) and its rows are inserted in one transaction,
as the coordinator would have written them one by one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from coordinator.core.model import RetryPolicy, SagaDefinition, StepDefinition
from coordinator.store.packing import to_micros
from coordinator.store.rows import label_rows
from coordinator.store.sqlite_rows import (
    INSERT_EVENT,
    INSERT_LABEL,
    INSERT_SAGA,
    INSERT_STEP,
    Definitions,
    event_row,
    saga_row,
    step_rows,
)
from tests.store.strategies import BROKEN, NO, OK, UNAVAILABLE, SagaHistory, run_history

FINGERPRINT = "0" * 64
"""The request fingerprint stored with the saga (no client will create it again)."""


def long_definition() -> SagaDefinition:
    """Two steps; the first may be retried 20,000 times (a flaky ledger, patiently waited for)."""
    patient = RetryPolicy(
        max_attempts=20_000,
        initial_backoff=timedelta(milliseconds=100),
        max_backoff=timedelta(seconds=1),
    )
    return SagaDefinition(
        name="long-haul",
        version=1,
        steps=(
            StepDefinition(
                name="reserve",
                participant="accounts",
                action="Reserve",
                compensation="Release",
                retry=patient,
                compensation_retry=patient,
            ),
            StepDefinition(
                name="charge",
                participant="cards",
                action="Charge",
                compensation="Refund",
            ),
        ),
    )


def write_long_saga(
    path: Path,
    saga_id: str,
    events: int,
    *,
    at: datetime,
    every: timedelta = timedelta(milliseconds=150),
    input: bytes = b'{"order": "o-1"}',
    trace_context: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> SagaHistory:
    """Add to the store at ``path`` (its schema made already) one saga of ``events`` events:
    created at ``at``, its first step failed transiently again and again, one attempt every
    ``every``, then it succeeds, the second step is refused, and that step's compensation (the
    refund of whatever the refused charge did) fails for good, so the saga is parked in
    NEEDS_ATTENTION. Returns its history."""
    definition = long_definition()
    ending = (OK, NO, BROKEN)  # reserve succeeds at last, charge is refused, the refund is broken
    history = run_history(
        saga_id,
        (*([UNAVAILABLE] * max(0, events - 1 - len(ending))), *ending),
        definition=definition,
        at=at,
        step=every,
        input=input,
        trace_context=dict(trace_context or {}),
        labels=dict(labels or {}),
    )
    saga = history.last
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        definitions = Definitions()
        definition_id = definitions.store(db, definition)
        definitions.register_first(db, definition, definition_id, to_micros(at))
        db.execute(INSERT_SAGA, saga_row(saga, definition_id, FINGERPRINT))
        db.executemany(INSERT_STEP, step_rows(saga))
        db.executemany(INSERT_EVENT, [event_row(event) for event in history.log])
        db.executemany(INSERT_LABEL, label_rows(saga))
        db.execute("COMMIT")
    return history
