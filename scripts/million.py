"""Reads on a large SQLite store: figures printed, no timing asserted.

    python scripts/million.py                          # 1,000,000 sagas (make million)
    python scripts/million.py --sagas 100000 --runs 3  # smaller
    python scripts/million.py --path /data/m.db --keep # keep the store (reused when it exists)

Builds a store of N sagas (1,000,000) of four definition versions in mixed states, most of
them ended long ago and the unfinished ones mostly recent, every one labelled with its tenant
and one in three with an order number. Rows are written in bulk, but each is what the store
itself writes: sagas are driven by the real core through their histories (answers, operators'
actions, a cancellation), turned into rows by the store's own row helpers, then cloned under
new ids and times; a sample is read back through the store and replayed from its log.

Then prints the median time in milliseconds of ``--runs`` (5) runs of each read through
``SqliteStore``: opening the file, the first and a later (11th) page of 50 with each filter,
counting by state (all, and of one definition), a label lookup, stuck-on lookups, one prune
batch of 500, and a get by id; plus the other reads operators use. Each prune run removes a
new batch. The file is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    CompleteRequested,
    RecordedEvent,
)
from coordinator.core.machine import fold
from coordinator.core.model import AuditEntry, SagaDefinition, SagaState
from coordinator.ports import ListCursor, SagaFilter
from coordinator.store.packing import pack_audit, pack_labels, to_micros
from coordinator.store.sqlite import SqliteStore
from coordinator.store.sqlite_rows import (
    INSERT_EVENT,
    INSERT_LABEL,
    INSERT_SAGA,
    INSERT_STEP,
    SAGA_FIELDS,
    Definitions,
    event_row,
    saga_row,
    step_rows,
)
from tests.store.strategies import (
    BROKEN,
    NO,
    OK,
    Answer,
    SagaHistory,
    open_account,
    run_history,
    transfer,
)

BEGIN = datetime(2025, 1, 1, tzinfo=UTC)
SPACING = timedelta(seconds=5)
"""Between two sagas' creations: a million span 58 days."""
PAGE = 50
TENANTS = [f"tenant-{index:02d}" for index in range(20)]
INPUT = (
    b'{"customer":"c-0001234567","company":"Acme Corporation","plan":"enterprise",'
    b'"seats":250,"billing":{"currency":"EUR","country":"DE"},"contact":"ada@example.com"}'
)
TRACE_CONTEXT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
FINGERPRINT = "0" * 64


def say(line: str = "") -> None:
    print(line, flush=True)


# --- the templates ---------------------------------------------------------------------------

# (kind, answers, weight among ended sagas, weight among recent ones)
_COMPENSATABLE_KINDS: list[tuple[str, tuple[Answer, ...], float, float]] = [
    ("succeeded", (OK, OK, OK), 90.0, 25.0),
    ("compensated", (OK, NO, OK, OK), 6.0, 3.0),
    ("cancelled", (OK, CancelRequested("customer left", actor="ops"), OK, OK, OK), 0.5, 0.5),
    ("parked", (OK, NO, BROKEN), 1.5, 1.5),
    ("running-first", (), 0.2, 25.0),
    ("running-second", (OK,), 0.2, 20.0),
    ("running-third", (OK, OK), 0.2, 15.0),
    ("compensating", (OK, NO), 0.1, 10.0),
]
_TRANSFER_KINDS: list[tuple[str, tuple[Answer, ...], float, float]] = [
    ("succeeded", (OK, OK, OK), 90.0, 25.0),
    ("compensated", (OK, NO, OK), 6.0, 3.0),
    ("completed-by-hand", (OK, OK, NO, CompleteRequested(2, b"{}", "ops", "sent by hand")), 1.0, 0),
    ("parked", (OK, OK, NO), 1.5, 2.0),
    ("running-pivot", (OK,), 0.2, 30.0),
    ("running-notify", (OK, OK), 0.2, 15.0),
]


@dataclass
class Template:
    """One saga driven by the core, as rows, ready to be cloned under other ids and times."""

    kind: str
    history: SagaHistory
    saga: list[Any]
    steps: list[tuple[Any, ...]]

    def rows(
        self, saga_id: str, created_at: datetime, labels: dict[str, str]
    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]], list[Any]]:
        """The saga, step, event and label rows of a clone created at ``created_at``."""
        first = self.history.first.created_at
        shift = created_at - first
        micros = shift // timedelta(microseconds=1)

        def moved(value: int | None) -> int | None:
            return None if value is None else value + micros

        saga = list(self.saga)
        saga[_SAGA_ID] = saga_id
        for column in _SAGA_TIMES:
            saga[column] = moved(saga[column])
        saga[_LABELS] = pack_labels(labels)
        audit = self.history.last.audit
        if audit:
            saga[_AUDIT] = pack_audit([_moved_entry(entry, shift) for entry in audit])
        # A step row: saga id, index, five fields, three times, the operator's three fields.
        steps = [
            (saga_id, *step[1:7], *(moved(value) for value in step[7:10]), *step[10:])
            for step in self.steps
        ]
        events = []
        for recorded in self.history.log:
            event = recorded.event
            if isinstance(event, CallAnswered) and event.sent_at is not None:
                event = dataclasses.replace(event, sent_at=event.sent_at + shift)
            events.append(
                event_row(
                    RecordedEvent(saga_id, recorded.sequence, recorded.recorded_at + shift, event)
                )
            )
        label_params = [
            (saga_id, key, value, to_micros(created_at)) for key, value in labels.items()
        ]
        return tuple(saga), steps, events, label_params


_SAGA_ID, _LABELS, _AUDIT = (SAGA_FIELDS.index(name) for name in ("saga_id", "labels", "audit"))
_SAGA_TIMES = [SAGA_FIELDS.index(name) for name in ("created_at", "updated_at", "ended_at")]


def _moved_entry(entry: AuditEntry, shift: timedelta) -> AuditEntry:
    return dataclasses.replace(entry, at=entry.at + shift)


def templates(
    definitions: dict[SagaDefinition, int],
) -> list[tuple[SagaDefinition, Template, float, float]]:
    """Every (definition, kind) with its weights among ended and among recent sagas."""
    found = []
    for definition, definition_id in definitions.items():
        kinds = _TRANSFER_KINDS if definition.name == "transfer" else _COMPENSATABLE_KINDS
        for kind, answers, old, recent in kinds:
            history = run_history(
                f"template-{definition.name}-{definition.version}-{kind}",
                answers,
                definition=definition,
                at=BEGIN,
                step=timedelta(milliseconds=40),
                input=INPUT,
                trace_context=TRACE_CONTEXT,
            )
            assert len(history.log) == len(answers) + 1, (definition.name, kind)
            saga = history.last
            row = list(saga_row(saga, definition_id, FINGERPRINT))
            found.append((definition, Template(kind, history, row, step_rows(saga)), old, recent))
    return found


# --- building the store ----------------------------------------------------------------------


def build(path: Path, sagas: int, seed: int) -> dict[str, Any]:
    """Fill a new store at ``path`` with ``sagas`` sagas; return what a run needs to know."""
    asyncio.run(_create_empty(path))
    rng = random.Random(seed)
    began = time.monotonic()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA synchronous = OFF")  # built from scratch if the machine stops
        db.execute("PRAGMA cache_size = -524288")  # 512 MB
        db.execute("BEGIN IMMEDIATE")
        definitions = {}
        store = Definitions()
        for definition in (
            open_account(version=1),
            open_account(version=2),
            transfer(),
            open_account("close-account"),
        ):
            definition_id = store.store(db, definition)
            store.register_first(db, definition, definition_id, to_micros(BEGIN))
            definitions[definition] = definition_id
        db.execute("COMMIT")
        kinds = templates(definitions)
        old_weights = [old for _, _, old, _ in kinds]
        recent_weights = [recent for _, _, _, recent in kinds]
        recent_from = int(sagas * 0.98)
        ids: list[str] = []
        orders: list[str] = []
        batch = 10_000
        for start in range(0, sagas, batch):
            db.execute("BEGIN IMMEDIATE")
            saga_params, step_params, event_params, label_params = [], [], [], []
            for index in range(start, min(start + batch, sagas)):
                weights = recent_weights if index >= recent_from else old_weights
                _, template, _, _ = rng.choices(kinds, weights)[0]
                saga_id = f"{rng.getrandbits(64):016x}-{index:07d}"
                labels = {"tenant": TENANTS[index % len(TENANTS)]}
                if index % 3 == 0:
                    labels["order"] = f"o-{index:07d}"
                    if len(orders) < 1000 and rng.random() < 0.01:
                        orders.append(labels["order"])
                rows = template.rows(saga_id, BEGIN + index * SPACING, labels)
                saga_params.append(rows[0])
                step_params.extend(rows[1])
                event_params.extend(rows[2])
                label_params.extend(rows[3])
                if index % 997 == 0:
                    ids.append(saga_id)
            db.executemany(INSERT_SAGA, saga_params)
            db.executemany(INSERT_STEP, step_params)
            db.executemany(INSERT_EVENT, event_params)
            db.executemany(INSERT_LABEL, label_params)
            db.execute("COMMIT")
            if (start // batch) % 10 == 9:
                say(f"  ... {start + batch:,} sagas, {time.monotonic() - began:,.0f} s")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        "build_s": time.monotonic() - began,
        "sample_ids": ids,
        "orders": orders,
        "size_mb": path.stat().st_size / 1024 / 1024,
    }


async def _create_empty(path: Path) -> None:
    store = await SqliteStore.open(path)
    await store.close()


async def check_sample(path: Path, ids: list[str]) -> None:
    """The cloned rows read back through the store, replay to themselves, and those with an
    order number are found by their labels."""
    store = await SqliteStore.open(path)
    try:
        for saga_id in ids[:200]:
            saga = await store.get(saga_id)
            log = await store.events(saga_id)
            assert saga is not None, saga_id
            assert fold((event.event, event.recorded_at) for event in log) == saga, saga_id
            if "order" in saga.labels:  # unique: the lookup finds this saga alone
                found = await store.list(SagaFilter(labels=tuple(saga.labels.items())), 10, None)
                assert [saga.saga_id for saga in found.sagas] == [saga_id], saga_id
    finally:
        await store.close()


# --- measuring -------------------------------------------------------------------------------


async def timed(runs: int, action: Callable[[], Awaitable[Any]]) -> float:
    """The median wall time of ``runs`` runs of ``action``, in milliseconds."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        await action()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


async def later_cursor(store: SqliteStore, where: SagaFilter, pages: int) -> ListCursor | None:
    """The cursor of the ``pages``-th page of a listing (None if it has fewer pages)."""
    cursor = None
    for _ in range(pages):
        page = await store.list(where, PAGE, cursor)
        if page.next_cursor is None:
            return None
        cursor = page.next_cursor
    return cursor


async def measure(
    path: Path, sagas: int, runs: int, facts: dict[str, Any]
) -> list[tuple[str, str]]:
    figures: list[tuple[str, str]] = []

    def note(what: str, value: float, extra: str = "") -> None:
        figures.append((what, f"{value:9.2f} ms{'  ' + extra if extra else ''}"))
        say(f"  {what:<58} {value:9.2f} ms{'  ' + extra if extra else ''}")

    open_times = []
    for _ in range(runs):
        began = time.perf_counter()
        store = await SqliteStore.open(path)
        open_times.append((time.perf_counter() - began) * 1000)
        await store.close()
    note("open", statistics.median(open_times))

    store = await SqliteStore.open(path)
    try:
        rng = random.Random(7)
        middle = BEGIN + SPACING * (sagas // 2)
        order = facts["orders"][0] if facts["orders"] else "o-0000000"
        filters = {
            "no filter": SagaFilter(),
            "state RUNNING": SagaFilter(states=frozenset({SagaState.RUNNING})),
            "state NEEDS_ATTENTION": SagaFilter(states=frozenset({SagaState.NEEDS_ATTENTION})),
            "states SUCCEEDED+COMPENSATED": SagaFilter(
                states=frozenset({SagaState.SUCCEEDED, SagaState.COMPENSATED})
            ),
            "definition": SagaFilter(definition="open-account"),
            "definition + version": SagaFilter(definition="open-account", definition_version=2),
            "label tenant (1 in 20)": SagaFilter(labels=(("tenant", "tenant-07"),)),
            "label order (unique)": SagaFilter(labels=(("order", order),)),
            "created in one day": SagaFilter(
                created_after=middle, created_before=middle + timedelta(days=1)
            ),
            "stuck on participant": SagaFilter(stuck_on_participant="accounts"),
            "stuck on step": SagaFilter(stuck_on_step="charge"),
            "parked + definition + tenant": SagaFilter(
                states=frozenset({SagaState.NEEDS_ATTENTION}),
                definition="open-account",
                labels=(("tenant", "tenant-03"),),
            ),
            "running + definition + version": SagaFilter(
                states=frozenset({SagaState.RUNNING}), definition="transfer", definition_version=1
            ),
        }
        say("  listing, pages of 50 (first page / 11th page):")
        for name, where in filters.items():
            first = await timed(runs, functools.partial(store.list, where, PAGE, None))
            cursor = await later_cursor(store, where, 10)
            if cursor is None:
                note(f"list {name}, first page", first, "(fewer than 11 pages)")
                continue
            later = await timed(runs, functools.partial(store.list, where, PAGE, cursor))
            note(f"list {name}, first page", first)
            note(f"list {name}, 11th page", later)
        say("  counting:")
        note("count_by_state, all", await timed(runs, lambda: store.count_by_state(SagaFilter())))
        note(
            "count_by_state, one definition",
            await timed(runs, lambda: store.count_by_state(SagaFilter(definition="transfer"))),
        )
        note(
            "count_by_state, definition + version",
            await timed(
                runs,
                lambda: store.count_by_state(
                    SagaFilter(definition="open-account", definition_version=1)
                ),
            ),
        )
        note(
            "count_by_state, one tenant (label)",
            await timed(
                runs, lambda: store.count_by_state(SagaFilter(labels=(("tenant", "tenant-11"),)))
            ),
        )
        note("count, all", await timed(runs, lambda: store.count(SagaFilter())))
        say("  lookups:")
        note(
            "label lookup (order, unique)",
            await timed(
                runs, lambda: store.list(SagaFilter(labels=(("order", order),)), PAGE, None)
            ),
        )
        note(
            "stuck-on participant, count",
            await timed(runs, lambda: store.count(SagaFilter(stuck_on_participant="cards"))),
        )
        note(
            "stuck-on step, count",
            await timed(runs, lambda: store.count(SagaFilter(stuck_on_step="identity"))),
        )
        ids = facts["sample_ids"]
        note("get by id", await timed(runs, lambda: store.get(rng.choice(ids))))
        note("events of a saga", await timed(runs, lambda: store.events(rng.choice(ids))))
        note(
            "events_page of a saga (first 3)",
            await timed(runs, lambda: store.events_page(rng.choice(ids), 0, 3)),
        )
        note("definitions, with unfinished counts", await timed(runs, store.definitions))
        note("oldest_unfinished", await timed(runs, store.oldest_unfinished))
        note("parked_by_step", await timed(runs, store.parked_by_step))
        say("  retention:")
        cutoff = BEGIN + timedelta(days=30)
        prunable = await store.count_prunable(cutoff)
        note(
            "count_prunable (30 days)",
            await timed(runs, lambda: store.count_prunable(cutoff)),
            f"{prunable.sagas:,} sagas, {prunable.events:,} events",
        )
        removed = []

        async def prune() -> None:
            removed.append(await store.prune(cutoff, 500))

        note(
            "prune one batch of 500",
            await timed(runs, prune),
            f"removed {sum(r.sagas for r in removed):,} sagas, "
            f"{sum(r.events for r in removed):,} events in {len(removed)} batches",
        )
    finally:
        await store.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--path", type=Path, help="the store file (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the store at the end")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    folder = None
    if args.path is None:
        folder = Path(tempfile.mkdtemp(prefix="saga-million-"))
        path = folder / "sagas.db"
    else:
        path = args.path
    try:
        say(f"store: {path}")
        say(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}")
        facts: dict[str, Any]
        if path.exists():
            say("reusing the existing store (prune runs have removed some of its sagas)")
            facts = asyncio.run(_facts_of(path))
        else:
            say(f"building {args.sagas:,} sagas...")
            facts = build(path, args.sagas, args.seed)
            say(f"built in {facts['build_s']:.0f} s, {facts['size_mb']:,.0f} MB")
        asyncio.run(check_sample(path, facts["sample_ids"]))
        say("a sample of 200 sagas reads back, replays from its log and is found by its labels")
        counts = asyncio.run(_counts(path))
        say("sagas by state: " + ", ".join(f"{s.value} {n:,}" for s, n in sorted(counts.items())))
        say(f"median of {args.runs} runs:")
        asyncio.run(measure(path, args.sagas, args.runs, facts))
    finally:
        if folder is not None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.keep:
            say(f"kept {path}")
    return 0


async def _counts(path: Path) -> dict[SagaState, int]:
    store = await SqliteStore.open(path)
    try:
        return dict(await store.count_by_state(SagaFilter()))
    finally:
        await store.close()


async def _facts_of(path: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        ids = [
            row[0] for row in db.execute("SELECT saga_id FROM sagas ORDER BY random() LIMIT 1000")
        ]
        orders = [
            row[0]
            for row in db.execute(
                "SELECT value FROM saga_labels WHERE key = 'order' ORDER BY random() LIMIT 10"
            )
        ]
    return {"sample_ids": ids, "orders": orders}


if __name__ == "__main__":
    sys.exit(main())
