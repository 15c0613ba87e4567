"""The offline checker catches each kind of broken promise (a checker that cannot fail proves
nothing): a small world of real sagas is written as the coordinator and the participants would
write it, then damaged one way at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest

from coordinator.core.events import (
    CallAnswered,
    CancelRequested,
    Event,
    MarkCompensated,
    Outcome,
    RecordedEvent,
    Rejected,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
    Succeeded,
    Transient,
)
from coordinator.core.machine import decide, pending_call, start
from coordinator.core.model import Operation, Saga, SagaState
from coordinator.ports import SagaStore
from coordinator.store import open_store
from coordinator.store.sqlite import SqliteStore
from coordinator.transport.definition_files import parse_definition
from tests.torture.checker import MUST_BE_ZERO, CheckReport, check_run, input_digest
from tests.torture.participant import EFFECTS_SCHEMA, LEDGER_SCHEMA
from tests.torture.scenario import PARTICIPANTS, STEPS, definition, encode_input

OK = Succeeded(b"{}")
NO = Rejected("TORTURE_REJECTED", "no")
UNAVAILABLE = Transient("UNAVAILABLE", "try later")
PARTICIPANT_OF = dict(STEPS)


@dataclass
class World:
    """The files of a finished run."""

    root: Path

    database_url: str | None = None
    """The coordinator's PostgreSQL database; None: its SQLite file (``database``)."""

    @property
    def database(self) -> Path:
        return self.root / "coordinator" / "saga.db"

    @property
    def client_log(self) -> Path:
        return self.root / "acks.jsonl"

    def participant_dir(self, name: str) -> Path:
        return self.root / "participants" / name

    def check(self) -> CheckReport:
        return check_run(
            self.database_url or self.database,
            self.client_log,
            {name: self.participant_dir(name) for name in PARTICIPANTS},
        )

    def effects(self, step: str) -> sqlite3.Connection:
        path = self.participant_dir(PARTICIPANT_OF[step]) / "barrier.db"
        return sqlite3.connect(path, isolation_level=None)

    def coordinator_db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.database, isolation_level=None)

    def acknowledge(self, saga_id: str, payload: bytes, created: bool = True) -> None:
        entry = {
            "kind": "ack",
            "saga_id": saga_id,
            "created": created,
            "input_sha256": input_digest(payload),
        }
        with self.client_log.open("a") as log:
            log.write(json.dumps(entry) + "\n")


class _Writer:
    """Runs sagas through the real state machine into a real store, and writes the effects and
    deliveries the participants would have recorded."""

    def __init__(self, world: World, store: SagaStore) -> None:
        self.world = world
        self.store = store
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.ns = 1_000_000_000
        self.definition = parse_definition(definition(), "torture", PARTICIPANTS)
        self.executed: set[tuple[str, str]] = set()

    def tick(self) -> int:
        self.now += timedelta(milliseconds=1)
        self.ns += 1_000_000
        return self.ns

    def effect(self, saga_id: str, step: str, operation: str) -> None:
        at = self.tick()
        with contextlib.closing(self.world.effects(step)) as db:
            db.execute(
                "INSERT INTO effects (saga_id, step, operation, request_id, at_ns) "
                "VALUES (?, ?, ?, ?, ?)",
                (saga_id, step, operation, f"sagas/{saga_id}/steps/{step}:{operation}", at),
            )

    def delivery(self, saga_id: str, step: str, operation: str, answer: str) -> None:
        at = self.tick()
        path = self.world.participant_dir(PARTICIPANT_OF[step]) / "ledger.db"
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute(
                "INSERT INTO deliveries (pid, operation, saga_id, step, request_id, attempt, "
                "begin_ns, end_ns, answer) VALUES (1, ?, ?, ?, ?, 1, ?, ?, ?)",
                (
                    operation,
                    saga_id,
                    step,
                    f"sagas/{saga_id}/steps/{step}:{operation}",
                    at,
                    at + 1,
                    answer,
                ),
            )

    async def saga(
        self,
        saga_id: str,
        plan: dict[str, Any],
        answers: list[tuple[str, Outcome] | Event],
    ) -> Saga:
        """Create a saga and feed it ``answers``: a participant's answer to the pending call of
        the named step (recorded in its ledger, with its effect), or an event (an operator's
        action), decided and committed as the engine would."""
        payload = encode_input({"n": 0, "pad": "", **plan})
        created = SagaCreated(saga_id, self.definition, payload)
        self.tick()
        saga = start(created, self.now).saga
        await self.store.create(saga, RecordedEvent(saga_id, 1, self.now, created), "fp")
        self.world.acknowledge(saga_id, payload)
        for answer in answers:
            event = self.answer(saga, *answer) if isinstance(answer, tuple) else answer
            self.tick()
            decision = decide(saga, event, self.now)
            assert decision.changed, (saga_id, event)
            await self.store.commit(
                decision.saga, RecordedEvent(saga_id, decision.saga.version, self.now, event)
            )
            saga = decision.saga
        return saga

    def answer(self, saga: Saga, step: str, outcome: Outcome) -> CallAnswered:
        """The participant of ``step`` answers the saga's pending call to it."""
        pending = pending_call(saga)
        assert pending is not None
        assert saga.steps[pending.step].name == step
        operation = pending.operation
        if isinstance(outcome, Succeeded) and (
            operation is Operation.EXECUTE or (saga.saga_id, step) in self.executed
        ):  # a Compensate whose Execute never took effect is a null compensation
            self.effect(saga.saga_id, step, operation.value)
            self.executed.add((saga.saga_id, step))
        answer = {Succeeded: "OK", Transient: "UNAVAILABLE:before"}.get(
            type(outcome), "FAILED_PRECONDITION"
        )
        self.delivery(saga.saga_id, step, operation.value, answer)
        return CallAnswered(pending.operation, pending.step, pending.attempt, outcome)


def _new_world(root: Path) -> World:
    world = World(root)
    world.database.parent.mkdir(parents=True)
    for name in PARTICIPANTS:
        directory = world.participant_dir(name)
        directory.mkdir(parents=True)
        with contextlib.closing(sqlite3.connect(directory / "barrier.db")) as db:
            db.execute(EFFECTS_SCHEMA)
        with contextlib.closing(sqlite3.connect(directory / "ledger.db")) as db:
            db.executescript(LEDGER_SCHEMA)
    return world


async def _write_pristine(world: World) -> None:
    store = await open_store(world.database_url or f"sqlite:///{world.database}")
    writer = _Writer(world, store)
    try:
        done = await writer.saga("ok", {}, [(s, OK) for s, _ in STEPS])
        assert done.state is SagaState.SUCCEEDED
        undone = await writer.saga(
            "undone",
            {"reject": "s2"},
            [("s0", OK), ("s1", OK), ("s2", NO), ("s2", OK), ("s1", OK), ("s0", OK)],
        )
        assert undone.state is SagaState.COMPENSATED
        stuck = await writer.saga(
            "stuck",
            {"reject": "s2", "stuck": "s0"},
            [("s0", OK), ("s1", OK), ("s2", NO), ("s2", OK), ("s1", OK), ("s0", NO)],
        )
        assert stuck.state is SagaState.NEEDS_ATTENTION
    finally:
        await store.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = _new_world(tmp_path_factory.mktemp("pristine"))
    asyncio.run(_write_pristine(world))
    return world


@pytest.fixture
def world(pristine: World, tmp_path: Path) -> World:
    shutil.copytree(pristine.root, tmp_path / "world")
    return World(tmp_path / "world")


def nonzero(report: CheckReport) -> dict[str, int]:
    return {name: count for name, count in report.figures.items() if count}


def test_an_intact_run_has_every_figure_at_zero(world: World) -> None:
    report = world.check()

    assert nonzero(report) == {}, report.examples
    assert set(report.figures) == set(MUST_BE_ZERO)
    assert report.info["sagas_by_state"] == {
        "COMPENSATED": 1,
        "NEEDS_ATTENTION": 1,
        "SUCCEEDED": 1,
    }


def _execute(sql: str, *params: object) -> Callable[[sqlite3.Connection], None]:
    def run(db: sqlite3.Connection) -> None:
        db.execute(sql, params)

    return run


DAMAGE: dict[str, tuple[str, str, Callable[[sqlite3.Connection], None] | None]] = {
    # name: (figure expected, where (see _connect, or "log": the client's), the damage)
    "a duplicate effect": (
        "duplicate_effects",
        "s1",
        _execute(
            "INSERT INTO effects (saga_id, step, operation, request_id, at_ns) "
            "SELECT saga_id, step, operation, request_id, at_ns + 1 FROM effects "
            "WHERE saga_id = 'ok' AND step = 's1'"
        ),
    ),
    "a succeeded saga missing an effect": (
        "succeeded_with_missing_or_compensated_effect",
        "s3",
        _execute("DELETE FROM effects WHERE saga_id = 'ok' AND step = 's3'"),
    ),
    "a succeeded saga with a compensated step": (
        "succeeded_with_missing_or_compensated_effect",
        "s2",
        _execute(
            "INSERT INTO effects (saga_id, step, operation, request_id, at_ns) "
            "VALUES ('ok', 's2', 'compensate', 'x', 9999999999999)"
        ),
    ),
    "a compensated saga left with an effect": (
        "compensated_with_nonzero_net_effect",
        "s0",
        _execute("DELETE FROM effects WHERE saga_id = 'undone' AND operation = 'compensate'"),
    ),
    "compensations oldest first": (
        "compensation_order_violations",
        "s0",
        _execute(
            "UPDATE effects SET at_ns = 1 WHERE saga_id = 'undone' AND operation = 'compensate'"
        ),
    ),
    "an effect after its compensation": (
        "effects_after_compensation",
        "s1",
        _execute(
            "UPDATE effects SET at_ns = 9999999999999 "
            "WHERE saga_id = 'undone' AND operation = 'execute'"
        ),
    ),
    "an effect of a saga nobody created": (
        "effects_of_unknown_sagas",
        "s0",
        _execute(
            "INSERT INTO effects (saga_id, step, operation, request_id, at_ns) "
            "VALUES ('ghost', 's0', 'execute', 'y', 1)"
        ),
    ),
    "a needs-attention saga that was not marked stuck": (
        "unexpected_needs_attention",
        "db",
        # An input that no longer says which step is stuck.
        _execute("UPDATE sagas SET input = ? WHERE saga_id = 'stuck'", b"{}"),
    ),
    "a row that differs from its folded log": (
        "replay_mismatches",
        "db",
        _execute("UPDATE sagas SET version = 99 WHERE saga_id = 'ok'"),
    ),
    "an event whose saga row is gone": (
        "replay_mismatches",
        "db",
        _execute("DELETE FROM sagas WHERE saga_id = 'ok'"),
    ),
    "a stored answer no participant gave": (
        "answers_nobody_gave",
        "ledger:s1",
        _execute(
            "UPDATE deliveries SET answer = 'UNAVAILABLE:before' "
            "WHERE saga_id = 'undone' AND operation = 'compensate'"
        ),
    ),
    "an acknowledged saga that is not stored": ("acknowledged_sagas_lost", "log", None),
    "a second creation under the same key": ("duplicate_sagas_per_key", "log", None),
}


def _connect(world: World, where: str) -> sqlite3.Connection:
    """The file to damage: "db" (the coordinator's), "ledger:STEP" (the delivery ledger of
    the step's participant) or "STEP" (its effects)."""
    if where == "db":
        return world.coordinator_db()
    if where.startswith("ledger:"):
        participant = PARTICIPANT_OF[where.removeprefix("ledger:")]
        ledger = world.participant_dir(participant) / "ledger.db"
        return sqlite3.connect(ledger, isolation_level=None)
    return world.effects(where)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_each_kind_of_damage_is_counted(world: World, name: str) -> None:
    figure, where, damage = DAMAGE[name]
    if where == "log":
        if figure == "acknowledged_sagas_lost":
            world.acknowledge("lost", b"{}")
        else:
            world.acknowledge("ok", encode_input({"n": 0, "pad": ""}), created=True)
    else:
        assert damage is not None
        with contextlib.closing(_connect(world, where)) as db:
            if where == "db":
                db.execute("DROP TRIGGER IF EXISTS saga_events_no_update")
            damage(db)

    report = world.check()

    assert report.figures[figure] >= 1, (name, nonzero(report), dict(report.examples))


def test_an_event_after_the_ending_is_an_illegal_transition(world: World) -> None:
    with contextlib.closing(world.coordinator_db()) as db:
        (body,) = db.execute(
            "SELECT body FROM saga_events WHERE saga_id = 'ok' AND sequence = 2"
        ).fetchone()
        (last,) = db.execute(
            "SELECT max(sequence) FROM saga_events WHERE saga_id = 'ok'"
        ).fetchone()
        db.execute(
            "INSERT INTO saga_events (saga_id, sequence, recorded_at, type, body) "
            "VALUES ('ok', ?, 1767312000000000, 'call_answered', ?)",
            (last + 1, body),
        )

    report = world.check()

    assert report.figures["illegal_state_transitions"] >= 1, nonzero(report)


def test_a_damaged_database_fails_its_integrity_check(world: World) -> None:
    path = world.participant_dir("p1") / "ledger.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode = DELETE")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'deliveries'"
        ).fetchone()
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    data[start : start + 8] = b"\x0d\xff\xff\xff\xff\xff\xff\xff"
    path.write_bytes(bytes(data))

    report = world.check()

    assert report.figures["integrity_check_failures"] >= 1, nonzero(report)


# --- the store on PostgreSQL ---------------------------------------------------------------------


@pytest.fixture
async def postgres_world(tmp_path: Path, postgres_url: str) -> World:
    world = _new_world(tmp_path / "world")
    world.database_url = postgres_url
    await _write_pristine(world)
    return world


async def test_a_store_on_postgresql_is_read_through_the_port_with_every_figure_at_zero(
    postgres_world: World,
) -> None:
    report = postgres_world.check()  # from a running event loop, as the harness calls it

    assert nonzero(report) == {}, report.examples
    assert report.info["sagas_by_state"] == {
        "COMPENSATED": 1,
        "NEEDS_ATTENTION": 1,
        "SUCCEEDED": 1,
    }


def test_a_row_on_postgresql_that_differs_from_its_folded_log_is_counted(
    postgres_world: World,
) -> None:
    assert postgres_world.database_url is not None
    with psycopg.connect(postgres_world.database_url, autocommit=True) as db:
        db.execute("UPDATE sagas SET version = 99 WHERE saga_id = 'ok'")

    report = postgres_world.check()

    assert nonzero(report) == {"replay_mismatches": 1}, dict(report.examples)


# --- logs with operators' actions ----------------------------------------------------------------

Step = tuple[str, Outcome] | Event
"""A participant's answer to the named step's pending call, or an event (an operator's)."""

UNDO_FROM_S2: list[Step] = [("s0", OK), ("s1", OK), ("s2", NO), ("s2", OK), ("s1", OK)]
"""s2 refuses: s2 (a null compensation) and s1 are undone; s0 is next."""

OPERATED: dict[str, tuple[dict[str, Any], list[Step], SagaState]] = {
    "retried-now": (
        {},
        [
            ("s0", OK),
            ("s1", UNAVAILABLE),
            RetryRequested(1, "ops", "s1 is back"),
            ("s1", OK),
            ("s2", OK),
            ("s3", OK),
        ],
        SagaState.SUCCEEDED,
    ),
    "resumed": (
        {"reject": "s2"},
        [*UNDO_FROM_S2, ("s0", NO), ResumeRequested("ops", "the refund works again"), ("s0", OK)],
        SagaState.COMPENSATED,
    ),
    "marked": (
        {"reject": "s2"},
        [*UNDO_FROM_S2, ("s0", NO), MarkCompensated(0, "ops", "refunded by hand")],
        SagaState.COMPENSATED,
    ),
    "cancelled": (
        {},
        [
            ("s0", OK),
            CancelRequested("changed my mind", call_in_flight=False, actor="alice"),
            ("s1", OK),  # s1 was never sent: a null compensation
            ("s0", OK),
        ],
        SagaState.COMPENSATED,
    ),
}


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = _new_world(tmp_path_factory.mktemp("operated"))

    async def write() -> None:
        store = await SqliteStore.open(world.database)
        writer = _Writer(world, store)
        try:
            for saga_id, (plan, answers, state) in OPERATED.items():
                saga = await writer.saga(saga_id, plan, answers)
                assert saga.state is state, saga_id
                assert saga.audit, f"{saga_id}: an operator's action is in its audit trail"
        finally:
            await store.close()

    asyncio.run(write())
    return world


@pytest.fixture
def operated_world(operated: World, tmp_path: Path) -> World:
    shutil.copytree(operated.root, tmp_path / "world")
    return World(tmp_path / "world")


def test_logs_with_operators_actions_keep_every_figure_at_zero(operated_world: World) -> None:
    report = operated_world.check()

    assert nonzero(report) == {}, dict(report.examples)
    assert report.info["sagas_by_state"] == {"COMPENSATED": 3, "SUCCEEDED": 1}


def test_a_tampered_operators_action_in_a_log_is_a_replay_mismatch(
    operated_world: World,
) -> None:
    with contextlib.closing(operated_world.coordinator_db()) as db:
        db.execute("DROP TRIGGER saga_events_no_update")
        (sequence, body) = db.execute(
            "SELECT sequence, body FROM saga_events "
            "WHERE saga_id = 'retried-now' AND type = 'retry_requested'"
        ).fetchone()
        tampered = msgpack.unpackb(body)
        tampered["actor"] = "mallory"
        db.execute(
            "UPDATE saga_events SET body = ? WHERE saga_id = 'retried-now' AND sequence = ?",
            (msgpack.packb(tampered), sequence),
        )

    report = operated_world.check()

    assert report.figures["replay_mismatches"] == 1, nonzero(report)
    assert "retried-now" in report.examples["replay_mismatches"][0]


def test_an_operators_action_the_saga_could_not_take_is_counted(operated_world: World) -> None:
    # The stored action now names a step that was not stuck: replaying the log refuses it.
    with contextlib.closing(operated_world.coordinator_db()) as db:
        db.execute("DROP TRIGGER saga_events_no_update")
        (body,) = db.execute(
            "SELECT body FROM saga_events WHERE saga_id = 'marked' AND type = 'mark_compensated'"
        ).fetchone()
        tampered = msgpack.unpackb(body)
        tampered["step"] = 3
        db.execute(
            "UPDATE saga_events SET body = ? "
            "WHERE saga_id = 'marked' AND type = 'mark_compensated'",
            (msgpack.packb(tampered),),
        )

    report = operated_world.check()

    assert report.figures["replay_mismatches"] >= 1, nonzero(report)
