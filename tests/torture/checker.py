"""The offline checker: reads what the run left behind and counts every broken promise.

Its inputs are the client's acknowledgement log, the coordinators' store (a SQLite file, checked
with ``PRAGMA integrity_check`` first, or a PostgreSQL database; either read through the store
port once every coordinator has stopped) and each participant's barrier database (effects) and
delivery ledger. Every figure in ``MUST_BE_ZERO`` counts violations of a guarantee; the rest
describes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from coordinator.core.errors import SagaError
from coordinator.core.events import (
    CompleteRequested,
    Event,
    MarkCompensated,
    ResumeRequested,
    RetryRequested,
    SagaCreated,
)
from coordinator.core.machine import decide, start
from coordinator.core.model import Saga, SagaState, StepKind, StepState
from coordinator.ports import ListCursor, SagaFilter
from coordinator.store import open_store
from coordinator.store.errors import StoreCorrupt
from tests.torture.feed_check import FIGURES as FEED_FIGURES
from tests.torture.feed_check import StoredChange, check_feed
from tests.torture.scenario import STEP_NAMES, plan_of_input

MUST_BE_ZERO = (
    "acknowledged_sagas_lost",
    "duplicate_sagas_per_key",
    "conflicting_creates_accepted",
    "duplicate_effects",
    "succeeded_with_missing_or_compensated_effect",
    "compensated_with_nonzero_net_effect",
    "compensation_order_violations",
    "effects_after_compensation",
    "illegal_state_transitions",
    "replay_mismatches",
    "integrity_check_failures",
    "unexpected_needs_attention",
    "needs_attention_inconsistent",
    "succeeded_despite_rejection",
    "unsettled_sagas",
    "effects_of_unknown_sagas",
    "answers_nobody_gave",
    "client_errors",
    *FEED_FIGURES,
)

_SAGA_MOVES = {
    SagaState.RUNNING: {SagaState.RUNNING, SagaState.COMPENSATING, SagaState.SUCCEEDED},
    SagaState.COMPENSATING: {
        SagaState.COMPENSATING,
        SagaState.COMPENSATED,
        SagaState.NEEDS_ATTENTION,
    },
}
_STEP_MOVES = {
    StepState.PENDING: {StepState.RUNNING},
    StepState.RUNNING: {
        StepState.SUCCEEDED,
        StepState.REJECTED,
        StepState.FAILED,
        StepState.COMPENSATING,  # a cancellation during a backoff
    },
    StepState.SUCCEEDED: {StepState.COMPENSATING},
    StepState.REJECTED: {StepState.COMPENSATING},
    StepState.FAILED: {StepState.COMPENSATING},
    StepState.COMPENSATING: {StepState.COMPENSATED},
}
# What only an operator's action may do: take a parked saga out of NEEDS_ATTENTION (retry a
# stuck step, resume or mark a stuck compensation, complete a step by hand), and the step moves
# that go with it.
_OPERATOR_SAGA_MOVES = {
    SagaState.NEEDS_ATTENTION: {
        SagaState.RUNNING,
        SagaState.COMPENSATING,
        SagaState.COMPENSATED,
        SagaState.SUCCEEDED,
    },
}
_OPERATOR_STEP_MOVES = {
    StepState.RUNNING: {StepState.SUCCEEDED},  # completed by hand during a backoff
    StepState.REJECTED: {StepState.RUNNING, StepState.SUCCEEDED},
    StepState.FAILED: {StepState.RUNNING, StepState.SUCCEEDED},
}
_OPERATOR_EVENTS = (RetryRequested, ResumeRequested, MarkCompensated, CompleteRequested)
_EXECUTED = (StepState.SUCCEEDED, StepState.REJECTED, StepState.FAILED)
_COMPENSATION_DONE = ("OK", "UNAVAILABLE:after")
"""Ledger answers after which the barrier holds the compensation (applied or null)."""


@dataclass
class CheckReport:
    """The figures of one run: ``figures`` must all be zero; ``info`` describes the run."""

    figures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MUST_BE_ZERO, 0))
    info: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def violation(self, figure: str, example: str, count: int = 1) -> None:
        """Count ``count`` violations of ``figure``; keep a few examples to debug with."""
        self.figures[figure] += count
        if len(self.examples[figure]) < 8:
            self.examples[figure].append(example)

    @property
    def ok(self) -> bool:
        """Whether every guarantee held."""
        return not any(self.figures.values())


@dataclass(frozen=True)
class Effect:
    """One row of a participant's ``effects`` table."""

    participant: str
    saga_id: str
    step: str
    operation: str
    at_ns: int


@dataclass(frozen=True)
class Delivery:
    """One row of a participant's delivery ledger."""

    participant: str
    operation: str
    saga_id: str
    step: str
    request_id: str
    begin_ns: int
    end_ns: int | None
    answer: str | None


def read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write to ``path``."""
    return sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)


Database = Path | str
"""The coordinators' store: a SQLite file, or a store URL (``postgresql://...``)."""


def input_digest(data: bytes) -> str:
    """How the client log identifies the request it had acknowledged."""
    return hashlib.sha256(data).hexdigest()


def check_run(
    database: Database,
    client_log: Path,
    participant_dirs: Mapping[str, Path],
    feed_consumer_dir: Path | None = None,
) -> CheckReport:
    """Check one run's files and store; see the module docstring. With ``feed_consumer_dir``,
    also what the change feed's consumer recorded (``tests.torture.feed_check``)."""
    report = CheckReport()
    for directory in participant_dirs.values():
        for name in ("barrier.db", "ledger.db"):
            _integrity(report, directory / name)
    stored = _check_coordinator(report, database, client_log)
    sagas = stored.sagas
    effects = [e for name, d in participant_dirs.items() for e in _read_effects(name, d)]
    deliveries = [x for name, d in participant_dirs.items() for x in _read_deliveries(name, d)]
    _check_effects(report, sagas, effects, deliveries)
    _check_answers(report, sagas, deliveries)
    _describe(report, sagas, effects, deliveries, participant_dirs)
    if feed_consumer_dir is not None:
        check_feed(report, stored.feed, feed_consumer_dir)
    return report


def check_coordinator(database: Database, client_log: Path) -> CheckReport:
    """Check the coordinator's store alone: its integrity (a SQLite file's), that every
    acknowledged saga is stored once, and that every saga's log folds legally into its row."""
    report = CheckReport()
    sagas = _check_coordinator(report, database, client_log).sagas
    report.info["sagas_by_state"] = dict(Counter(s.state.value for s in sagas.values()))
    return report


def _check_coordinator(report: CheckReport, database: Database, client_log: Path) -> Stored:
    if isinstance(database, Path):
        _integrity(report, database)
    stored = _read_coordinator(report, database)
    _check_client_log(report, client_log, stored.sagas, stored.logs)
    for saga_id, saga in stored.sagas.items():
        _check_replay(report, saga, stored.logs.get(saga_id, []))
    return stored


# --- the coordinator's store ---------------------------------------------------------------------


def _integrity(report: CheckReport, path: Path) -> None:
    if not path.exists():
        return
    try:
        with contextlib.closing(read_only(path)) as db:
            rows = [row[0] for row in db.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.Error as error:
        rows = [f"cannot check: {error}"]
    if rows != ["ok"]:
        report.violation("integrity_check_failures", f"{path}: {'; '.join(map(str, rows[:3]))}")


RecordedRow = tuple[int, datetime, Event]


@dataclass
class Stored:
    """What the coordinator's store holds, read through the store port."""

    sagas: dict[str, Saga] = field(default_factory=dict)
    logs: dict[str, list[RecordedRow]] = field(default_factory=lambda: defaultdict(list))
    feed: list[StoredChange] = field(default_factory=list)
    """Every change of the feed, in its order."""


def store_url(database: Database) -> str:
    """The store URL of ``database``: a SQLite file's, or the URL itself."""
    return f"sqlite:///{database}" if isinstance(database, Path) else database


def _read_coordinator(report: CheckReport, database: Database) -> Stored:
    stored = Stored()
    where = database if isinstance(database, Path) else _without_password(database)
    try:
        _in_a_loop_of_its_own(lambda: _read_store(report, store_url(database), stored))
    except (SagaError, sqlite3.DatabaseError) as error:
        report.violation("integrity_check_failures", f"{where}: unreadable: {error}")
    return stored


async def _read_store(report: CheckReport, url: str, stored: Stored) -> None:
    """Every saga (listed with no filter), its event log, and the change feed, read through
    the store port as a coordinator reads them; the store is opened here and closed again."""
    store = await open_store(url)
    try:
        after: ListCursor | None = None
        while True:
            try:
                page = await store.list(SagaFilter(), _PAGE, after)
            except StoreCorrupt as error:
                report.violation("replay_mismatches", f"sagas undecodable: {error}")
                break
            stored.sagas.update((saga.saga_id, saga) for saga in page.sagas)
            after = page.next_cursor
            if after is None:
                break
        for saga_id in stored.sagas:
            try:
                events = await store.events(saga_id)
            except (StoreCorrupt, ValueError) as error:
                report.violation("replay_mismatches", f"{saga_id}: events undecodable: {error}")
                continue
            stored.logs[saga_id].extend((e.sequence, e.recorded_at, e.event) for e in events)
        pruned, newest = await store.feed_bounds()
        position = pruned
        while True:
            feed = await store.feed(position, _PAGE)
            stored.feed.extend((c.position, c.saga_id, c.record.sequence) for c in feed.changes)
            if not feed.changes:
                break
            position = feed.position
    finally:
        await store.close()
    # The feed shows each event with its saga, at positions without gaps (pruning aside): a
    # position it skips holds an event whose saga row is missing.
    shown = {position for position, _, _ in stored.feed}
    for position in range(pruned + 1, newest + 1):
        if position not in shown:
            report.violation("replay_mismatches", f"@{position}: an event without a saga row")


_PAGE = 500
"""Sagas, and changes of the feed, read at a time."""


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"


def _in_a_loop_of_its_own(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` to the end in an event loop of its own (in a thread of its own when the
    caller runs one already): the checker is called from plain and from asynchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(work())
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checker") as thread:
        thread.submit(asyncio.run, work()).result()


def _check_replay(report: CheckReport, stored: Saga, log: Sequence[RecordedRow]) -> None:
    """Fold the log event by event: every move legal, and the result the stored row."""
    name = stored.saga_id
    sequences = [sequence for sequence, _, _ in log]
    if sequences != list(range(1, len(log) + 1)):
        report.violation("illegal_state_transitions", f"{name}: log sequences {sequences[:10]}")
        return
    created = [event for _, _, event in log if isinstance(event, SagaCreated)]
    if len(created) != 1:
        report.violation("duplicate_sagas_per_key", f"{name}: {len(created)} creation events")
    first = log[0][2] if log else None
    if not isinstance(first, SagaCreated):
        report.violation("illegal_state_transitions", f"{name}: the log does not start created")
        return
    saga = start(first, log[0][1]).saga
    for sequence, at, event in log[1:]:
        # A parked saga still takes an operator's action; only a terminal one never moves.
        if saga.state.is_terminal:
            report.violation(
                "illegal_state_transitions", f"{name}#{sequence}: event after {saga.state}"
            )
            return
        decision = decide(saga, event, at)
        if not decision.changed or decision.saga.version != sequence:
            report.violation(
                "replay_mismatches",
                f"{name}#{sequence}: the stored event does not apply ({type(event).__name__})",
            )
            return
        for figure, problem in _move_problems(saga, decision.saga, event):
            report.violation(figure, f"{name}#{sequence}: {problem}")
        saga = decision.saga
    if saga != stored:
        report.violation(
            "replay_mismatches",
            f"{name}: the folded log ({saga.state}, v{saga.version}) differs from the row "
            f"({stored.state}, v{stored.version})",
        )


def _move_problems(old: Saga, new: Saga, event: Event) -> Iterable[tuple[str, str]]:
    by_operator = isinstance(event, _OPERATOR_EVENTS)
    if new.state is not old.state:
        allowed = set(_SAGA_MOVES.get(old.state, set()))
        if by_operator:
            allowed |= _OPERATOR_SAGA_MOVES.get(old.state, set())
        failure = new.failure
        if old.state is SagaState.RUNNING and failure is not None:
            # A pivot or retriable step that cannot go on (a "no" from a retriable step, an
            # attempt budget spent, the deadline past the pivot) parks the saga.
            index = _step_index(new, failure.step)
            if index is not None and new.step_definition(index).kind is not StepKind.COMPENSATABLE:
                allowed.add(SagaState.NEEDS_ATTENTION)
        if new.state not in allowed:
            yield "illegal_state_transitions", f"saga {old.state} -> {new.state}"
    for index, (before, after) in enumerate(zip(old.steps, new.steps, strict=True)):
        allowed_steps = set(_STEP_MOVES.get(before.state, set()))
        if by_operator:
            allowed_steps |= _OPERATOR_STEP_MOVES.get(before.state, set())
        if after.state is not before.state and after.state not in allowed_steps:
            yield "illegal_state_transitions", f"step {before.name} {before.state} -> {after.state}"
        if before.state is not StepState.COMPENSATING and after.state is StepState.COMPENSATING:
            later = [
                s.name
                for s, d in zip(
                    new.steps[index + 1 :], new.definition.steps[index + 1 :], strict=True
                )
                if s.state in _EXECUTED and s.execute_attempts > 0 and d.compensation
            ]
            if later:
                yield (
                    "compensation_order_violations",
                    f"compensating {before.name} before the newer {', '.join(later)}",
                )
    busy = [s.name for s in new.steps if s.state in (StepState.RUNNING, StepState.COMPENSATING)]
    if len(busy) > 1:
        yield "illegal_state_transitions", f"several calls at once: {busy}"
    if new.state is SagaState.RUNNING and busy:
        at = STEP_INDEX.get(busy[0], 0)
        if any(s.state is not StepState.SUCCEEDED for s in new.steps[:at]):
            yield "illegal_state_transitions", f"{busy[0]} runs before the earlier steps succeeded"
    if new.state is SagaState.SUCCEEDED and any(
        s.state is not StepState.SUCCEEDED for s in new.steps
    ):
        yield "illegal_state_transitions", "SUCCEEDED with a step that did not succeed"
    if new.state is SagaState.COMPENSATED and any(
        s.state not in (StepState.PENDING, StepState.COMPENSATED) for s in new.steps
    ):
        yield "illegal_state_transitions", "COMPENSATED with a step neither pending nor undone"


STEP_INDEX = {name: index for index, name in enumerate(STEP_NAMES)}


def _step_index(saga: Saga, name: str) -> int | None:
    return next((i for i, step in enumerate(saga.steps) if step.name == name), None)


# --- the client's log ----------------------------------------------------------------------------


def _check_client_log(
    report: CheckReport,
    client_log: Path,
    sagas: Mapping[str, Saga],
    logs: Mapping[str, Sequence[RecordedRow]],
) -> None:
    acknowledged: dict[str, set[str]] = defaultdict(set)
    created = Counter[str]()
    torn = 0
    for line in client_log.read_text().splitlines() if client_log.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            torn += 1
            continue
        kind, saga_id = entry.get("kind"), str(entry.get("saga_id"))
        if kind == "ack":
            acknowledged[saga_id].add(entry["input_sha256"])
            created[saga_id] += bool(entry["created"])
        elif kind == "conflict" and entry.get("code") == "OK":
            report.violation("conflicting_creates_accepted", f"{saga_id}: accepted {entry}")
        elif kind == "error":
            report.violation(
                "client_errors", f"{saga_id}: {entry.get('code')} {entry.get('message')}"
            )
    for saga_id, digests in acknowledged.items():
        saga = sagas.get(saga_id)
        if saga is None:
            report.violation("acknowledged_sagas_lost", f"{saga_id}: acknowledged, not stored")
        elif digests != {input_digest(saga.input)}:
            report.violation("acknowledged_sagas_lost", f"{saga_id}: stored with another input")
    for saga_id, count in created.items():
        if count > 1:
            report.violation("duplicate_sagas_per_key", f"{saga_id}: created={count} times")
    report.info["sagas_acknowledged"] = len(acknowledged)
    report.info["torn_client_log_lines"] = torn


# --- the participants' files ---------------------------------------------------------------------


def _read_effects(participant: str, directory: Path) -> list[Effect]:
    path = directory / "barrier.db"
    if not path.exists():
        return []
    try:
        with contextlib.closing(read_only(path)) as db:
            return [
                Effect(participant, *row)
                for row in db.execute(
                    "SELECT saga_id, step, operation, at_ns FROM effects ORDER BY id"
                )
            ]
    except sqlite3.DatabaseError:
        return []  # counted by the integrity check


def _read_deliveries(participant: str, directory: Path) -> list[Delivery]:
    path = directory / "ledger.db"
    if not path.exists():
        return []
    try:
        with contextlib.closing(read_only(path)) as db:
            return [
                Delivery(participant, *row)
                for row in db.execute(
                    "SELECT operation, saga_id, step, request_id, begin_ns, end_ns, answer "
                    "FROM deliveries ORDER BY id"
                )
            ]
    except sqlite3.DatabaseError:
        return []  # counted by the integrity check


def _check_effects(
    report: CheckReport,
    sagas: Mapping[str, Saga],
    effects: Sequence[Effect],
    deliveries: Sequence[Delivery],
) -> None:
    by_step: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(
        lambda: {"execute": [], "compensate": []}
    )
    for effect in effects:
        if effect.saga_id not in sagas:
            report.violation("effects_of_unknown_sagas", f"{effect}")
        by_step[(effect.saga_id, effect.step)][effect.operation].append(effect.at_ns)
    undone_at: dict[tuple[str, str], int] = {}
    for delivery in deliveries:
        if (
            delivery.operation == "compensate"
            and delivery.answer in _COMPENSATION_DONE
            and delivery.end_ns is not None
        ):
            key = (delivery.saga_id, delivery.step)
            undone_at[key] = min(undone_at.get(key, delivery.end_ns), delivery.end_ns)
    for (saga_id, step), ops in by_step.items():
        for operation, times in ops.items():
            if len(times) > 1:
                report.violation(
                    "duplicate_effects",
                    f"{saga_id}/{step}: {operation} x{len(times)}",
                    len(times) - 1,
                )
        executed = ops["execute"]
        undone = [
            *ops["compensate"],
            *([undone_at[(saga_id, step)]] if (saga_id, step) in undone_at else []),
        ]
        if executed and undone and max(executed) > min(undone):
            report.violation(
                "effects_after_compensation", f"{saga_id}/{step}: executed after its compensation"
            )

    for saga_id, saga in sagas.items():
        reject, stuck = plan_of_input(saga.input)
        # A step an operator completed or undid by hand was settled outside the system: its
        # participant's effects say nothing about the saga's promises.
        by_hand = {step.name for step in saga.steps if step.by_operator}
        steps = {
            name: by_step.get((saga_id, name), {"execute": [], "compensate": []})
            for name in STEP_NAMES
            if name not in by_hand
        }
        if saga.state is SagaState.SUCCEEDED:
            if reject is not None:
                report.violation("succeeded_despite_rejection", f"{saga_id}: {reject} refuses")
            for name, ops in steps.items():
                if len(ops["execute"]) != 1 or ops["compensate"]:
                    report.violation(
                        "succeeded_with_missing_or_compensated_effect",
                        f"{saga_id}/{name}: {len(ops['execute'])} executed, "
                        f"{len(ops['compensate'])} compensated",
                    )
        elif saga.state is SagaState.COMPENSATED:
            for name, ops in steps.items():
                if len(ops["execute"]) != len(ops["compensate"]):
                    report.violation(
                        "compensated_with_nonzero_net_effect",
                        f"{saga_id}/{name}: {len(ops['execute'])} executed, "
                        f"{len(ops['compensate'])} compensated",
                    )
            _check_order(report, saga_id, steps)
        elif saga.state is SagaState.NEEDS_ATTENTION:
            failure = saga.failure
            if stuck is None:
                report.violation(
                    "unexpected_needs_attention", f"{saga_id}: {failure} (not marked stuck)"
                )
                continue
            if failure is None or failure.step != stuck or failure.operation != "compensate":
                report.violation(
                    "needs_attention_inconsistent", f"{saga_id}: stuck at {stuck}, {failure}"
                )
            at = STEP_INDEX[stuck]
            for index, name in enumerate(STEP_NAMES):
                if name not in steps:
                    continue
                ops = steps[name]
                net = len(ops["execute"]) - len(ops["compensate"])
                expected = 0 if index > at else 1
                if net != expected or len(ops["compensate"]) > (1 if index > at else 0):
                    report.violation(
                        "needs_attention_inconsistent",
                        f"{saga_id}/{name}: net effect {net}, expected {expected}",
                    )
            _check_order(report, saga_id, steps)
        else:
            report.violation("unsettled_sagas", f"{saga_id}: {saga.state}")


def _check_answers(
    report: CheckReport, sagas: Mapping[str, Saga], deliveries: Sequence[Delivery]
) -> None:
    """Every OK the coordinator stored was given by a participant: at-least-once delivery, and
    no step moved on (or was reported undone) without its participant's answer."""
    answered = {(d.saga_id, d.step, d.operation) for d in deliveries if d.answer == "OK"}
    for saga_id, saga in sagas.items():
        for step in saga.steps:
            # What an operator recorded by hand (an output, an undoing) no participant said.
            needed = []
            if step.output is not None and not (
                step.by_operator and step.state is StepState.SUCCEEDED
            ):
                needed.append("execute")
            if step.state is StepState.COMPENSATED and not step.by_operator:
                needed.append("compensate")
            for operation in needed:
                if (saga_id, step.name, operation) not in answered:
                    report.violation(
                        "answers_nobody_gave",
                        f"{saga_id}/{step.name}: {operation} stored as OK, no participant said so",
                    )


def _check_order(
    report: CheckReport, saga_id: str, steps: Mapping[str, Mapping[str, list[int]]]
) -> None:
    """Compensations took effect newest step first."""
    undone = [
        (STEP_INDEX[name], min(ops["compensate"]))
        for name, ops in steps.items()
        if ops["compensate"]
    ]
    undone.sort(reverse=True)
    times = [at for _, at in undone]
    if times != sorted(times):
        order = [STEP_NAMES[index] for index, _ in sorted(undone, key=lambda x: x[1])]
        report.violation("compensation_order_violations", f"{saga_id}: undone in order {order}")


def _describe(
    report: CheckReport,
    sagas: Mapping[str, Saga],
    effects: Sequence[Effect],
    deliveries: Sequence[Delivery],
    participant_dirs: Mapping[str, Path],
) -> None:
    states = Counter(saga.state.value for saga in sagas.values())
    report.info["sagas_stored"] = len(sagas)
    report.info["sagas_by_state"] = dict(sorted(states.items()))
    distinct = {(d.participant, d.operation, d.request_id) for d in deliveries}
    report.info["deliveries"] = len(deliveries)
    report.info["duplicate_deliveries_absorbed"] = len(deliveries) - len(distinct)
    report.info["effects"] = len(effects)
    answers = Counter(d.answer or "none (killed or cut off)" for d in deliveries)
    report.info["participant_answers"] = dict(sorted(answers.items()))
    peaks: dict[str, int] = {}
    for name, directory in participant_dirs.items():
        path = directory / "ledger.db"
        if path.exists():
            with (
                contextlib.suppress(sqlite3.DatabaseError),
                contextlib.closing(read_only(path)) as db,
            ):
                row = db.execute("SELECT value FROM meta WHERE key = 'max_in_flight'").fetchone()
                peaks[name] = 0 if row is None else int(row[0])
    report.info["participant_peak_calls_in_flight"] = peaks
