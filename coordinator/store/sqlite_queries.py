"""Listing and counting filters as SQL: which index a query reads, and what it checks on the way.

A listing is ordered by (created_at, saga_id) and resumes after a cursor. Every index a listing
reads ends in (created_at, saga_id) after an equality prefix, so each range it reads is already
in that order and stops once a page is full. One condition drives (its index is read); the
others are checked on the rows read. The driver is the condition that holds the fewest sagas:

- a definition (one range per version, merged in order) or a set of states (one range per
  state): ``saga_counts`` says exactly how many sagas each holds, at no cost, and which ranges
  are empty (those are not read at all);
- a stuck-on step or participant, a label, or a creation time range: their index is counted,
  but never beyond the smallest size already known (10,000 when none is), so choosing costs
  at most that much, and nothing when there is nothing to choose from;
- otherwise the creation order itself.

Counts of sagas by definition, version and state are read from ``saga_counts`` alone; other
counts read the driving index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.ports import ListCursor, SagaFilter
from coordinator.store.packing import to_micros
from coordinator.store.rows import SAGA_FIELDS
from coordinator.store.rules import CountRow

_SELECT_COUNTS = (
    "SELECT definition_name, definition_version, state, total FROM saga_counts WHERE total > 0"
)
_SAGA_COLUMNS = ", ".join(f"s.{name}" for name in SAGA_FIELDS)
_LABELS = "saga_labels_by_value"
_BY_STEP = "sagas_waiting_on_step"
_BY_PARTICIPANT = "sagas_waiting_on_participant"
_BY_CREATION = "sagas_by_creation"
_BY_STATE = "sagas_by_state"
_BY_DEFINITION = "sagas_by_definition"
_EVERY = 2**62
"""More sagas than any store holds: no size known yet."""
_FIRST_LOOK = 10_000
"""How far index entries are counted when no driver's size is known: beyond it, the first
driver in the order above is as good a guess as any."""


def read_counts(connection: sqlite3.Connection) -> list[CountRow]:
    """Every non-empty (definition, version, state) and its number of sagas."""
    return connection.execute(_SELECT_COUNTS).fetchall()


def list_query(
    connection: sqlite3.Connection, where: SagaFilter, limit: int, after: ListCursor | None
) -> tuple[str, list[Any]] | None:
    """The query of one page (``limit`` + 1 rows of ``SAGA_FIELDS``), or None if nothing can
    match."""
    plan = _plan(connection, where)
    if not plan.branches:
        return None
    params: list[Any] = []
    parts = []
    for branch in plan.branches:
        sql, branch_params = _branch(plan, branch, where, after, "keys")
        parts.append(
            f"SELECT created_at, saga_id FROM ({sql} ORDER BY created_at, saga_id LIMIT ?)"
        )
        params.extend((*branch_params, limit + 1))
    keys = " UNION ALL ".join(parts)
    if len(parts) > 1:
        # The ranges merge in order; only the first page's worth of keys is kept.
        keys = f"{keys} ORDER BY created_at, saga_id LIMIT ?"
        params.append(limit + 1)
    sql = (
        f"SELECT {_SAGA_COLUMNS} FROM ({keys}) AS k "
        "CROSS JOIN sagas AS s ON s.saga_id = k.saga_id ORDER BY k.created_at, k.saga_id"
    )
    return sql, params


def count_query(connection: sqlite3.Connection, where: SagaFilter) -> tuple[str, list[Any]] | None:
    """The query counting the sagas of ``where`` (one row, one column), or None for none."""
    return _counting(connection, where, "one", "SELECT count(*) FROM ({rows})")


def count_by_state_query(
    connection: sqlite3.Connection, where: SagaFilter
) -> tuple[str, list[Any]] | None:
    """The query counting the sagas of ``where`` per state (``where.states`` ignored), as rows
    of (state, count), or None for none."""
    every_state = SagaFilter(
        definition=where.definition,
        definition_version=where.definition_version,
        labels=where.labels,
        created_after=where.created_after,
        created_before=where.created_before,
        stuck_on_participant=where.stuck_on_participant,
        stuck_on_step=where.stuck_on_step,
    )
    return _counting(
        connection,
        every_state,
        "state",
        "SELECT state, count(*) FROM ({rows}) GROUP BY state",
    )


def _counting(
    connection: sqlite3.Connection, where: SagaFilter, selecting: str, template: str
) -> tuple[str, list[Any]] | None:
    plan = _plan(connection, where)
    if not plan.branches:
        return None
    params: list[Any] = []
    parts = []
    for branch in plan.branches:
        sql, branch_params = _branch(plan, branch, where, None, selecting)
        parts.append(sql)
        params.extend(branch_params)
    return template.format(rows=" UNION ALL ".join(parts)), params


# --- choosing the driver ---------------------------------------------------------------------


@dataclass
class _Sql:
    """Conditions joined by AND, with their parameters in order."""

    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)


@dataclass(frozen=True)
class _Plan:
    """Where a query reads: ranges of one index, each given by an equality prefix."""

    index: str
    """The index read; ``saga_labels_by_value`` reads label rows, the others saga rows."""
    branches: tuple[tuple[tuple[str, Any], ...], ...]
    """One equality prefix (column, value) per range; no branch at all: nothing matches."""
    residual: _Sql
    """Conditions on the saga row (alias ``s``), checked on the rows read."""

    @property
    def by_label(self) -> bool:
        return self.index == _LABELS


def _plan(connection: sqlite3.Connection, where: SagaFilter) -> _Plan:
    counts = read_counts(connection)
    best: tuple[int, str, Any] = (_EVERY, "creation", None)

    def consider(size: int, driver: str, key: Any = None) -> None:
        nonlocal best
        if size < best[0]:
            best = (size, driver, key)

    # Sizes saga_counts knows exactly, at no cost.
    states = {state.value for state in where.states}
    if states:
        consider(sum(row[3] for row in counts if row[2] in states), "states")
    if where.definition is not None:
        consider(sum(row[3] for row in counts if _of_definition(row, where)), "definition")
    if best[0] == 0:
        return _Plan(_BY_STATE, (), _Sql())
    # Sizes counted on their own index: only to choose between drivers, and never further
    # than the smallest size known (or, knowing none, than a first look).
    created = _created_range(where)
    unknown: list[tuple[str, Any, str, list[Any]]] = []
    for driver, index, column, stuck_on in (
        ("step", _BY_STEP, "waiting_step", where.stuck_on_step),
        ("participant", _BY_PARTICIPANT, "waiting_participant", where.stuck_on_participant),
    ):
        if stuck_on is not None:
            sql = f"SELECT 1 FROM sagas INDEXED BY {index} WHERE {column} = ?{created.sql}"
            unknown.append((driver, None, sql, [stuck_on, *created.params]))
    for key, value in where.labels:
        sql = (
            f"SELECT 1 FROM saga_labels INDEXED BY {_LABELS} "
            f"WHERE key = ? AND value = ?{created.sql}"
        )
        unknown.append(("label", (key, value), sql, [key, value, *created.params]))
    if created.params:
        sql = f"SELECT 1 FROM sagas INDEXED BY {_BY_CREATION} WHERE 1{created.sql}"
        unknown.append(("creation", None, sql, created.params))
    if best[0] == _EVERY and len(unknown) == 1:
        driver, key, _, _ = unknown[0]
        return _driver_plan(where, counts, driver, key)
    if best[0] == _EVERY:
        best = (_FIRST_LOOK, unknown[0][0], unknown[0][1]) if unknown else best
    for driver, key, sql, params in unknown:
        consider(_at_most(connection, sql, params, best[0]), driver, key)
    return _driver_plan(where, counts, best[1], best[2])


@dataclass(frozen=True)
class _Range:
    sql: str
    params: list[Any]


def _created_range(where: SagaFilter) -> _Range:
    sql, params = "", []
    if where.created_after is not None:
        sql += " AND created_at >= ?"
        params.append(to_micros(where.created_after))
    if where.created_before is not None:
        sql += " AND created_at < ?"
        params.append(to_micros(where.created_before))
    return _Range(sql, params)


def _at_most(connection: sqlite3.Connection, rows: str, params: list[Any], cap: int) -> int:
    """How many rows ``rows`` selects, counting no further than ``cap``."""
    (found,) = connection.execute(
        f"SELECT count(*) FROM ({rows} LIMIT ?)", [*params, min(cap, _EVERY)]
    ).fetchone()
    return int(found)


def _of_definition(row: CountRow, where: SagaFilter) -> bool:
    return row[0] == where.definition and (
        where.definition_version is None or row[1] == where.definition_version
    )


def _driver_plan(where: SagaFilter, counts: Sequence[CountRow], driver: str, key: Any) -> _Plan:
    residual = _Sql()
    if driver != "states" and where.states:
        wanted = sorted(state.value for state in where.states)
        residual.add(f"s.state IN ({', '.join('?' for _ in wanted)})", *wanted)
    if driver != "definition":
        if where.definition is not None:
            residual.add("s.definition_name = ?", where.definition)
        if where.definition_version is not None:
            residual.add("s.definition_version = ?", where.definition_version)
    if driver != "step" and where.stuck_on_step is not None:
        residual.add("s.waiting_step = ?", where.stuck_on_step)
    if driver != "participant" and where.stuck_on_participant is not None:
        residual.add("s.waiting_participant = ?", where.stuck_on_participant)
    labels = list(where.labels)
    if driver == "label":
        labels.remove(key)
    for label_key, value in labels:
        residual.add(
            "EXISTS (SELECT 1 FROM saga_labels AS x"
            " WHERE x.saga_id = s.saga_id AND x.key = ? AND x.value = ?)",
            label_key,
            value,
        )
    match driver:
        case "states":
            states = {state.value for state in where.states}
            present = sorted({row[2] for row in counts if row[2] in states})
            return _Plan(_BY_STATE, tuple((("state", state),) for state in present), residual)
        case "definition":
            versions = sorted({row[1] for row in counts if _of_definition(row, where)})
            return _Plan(
                _BY_DEFINITION,
                tuple(
                    (("definition_name", where.definition), ("definition_version", version))
                    for version in versions
                ),
                residual,
            )
        case "label":
            return _Plan(_LABELS, ((("key", key[0]), ("value", key[1])),), residual)
        case "step":
            return _Plan(_BY_STEP, ((("waiting_step", where.stuck_on_step),),), residual)
        case "participant":
            branch = (("waiting_participant", where.stuck_on_participant),)
            return _Plan(_BY_PARTICIPANT, (branch,), residual)
        case _:
            return _Plan(_BY_CREATION, ((),), residual)


def _branch(
    plan: _Plan,
    branch: tuple[tuple[str, Any], ...],
    where: SagaFilter,
    after: ListCursor | None,
    selecting: str,
) -> tuple[str, list[Any]]:
    """One range's query: its keys (``keys``), its sagas' states (``state``) or a row each
    (``one``), with every condition of the filter."""
    alias = "l" if plan.by_label else "s"
    conditions = _Sql()
    for column, value in branch:
        conditions.add(f"{alias}.{column} = ?", value)
    if where.created_after is not None:
        conditions.add(f"{alias}.created_at >= ?", to_micros(where.created_after))
    if where.created_before is not None:
        conditions.add(f"{alias}.created_at < ?", to_micros(where.created_before))
    if after is not None:
        # Keyset pagination: resume strictly after the last row seen, however rows were added
        # meanwhile; (created_at, saga_id) is unique, so nothing is seen twice.
        conditions.add(
            f"({alias}.created_at, {alias}.saga_id) > (?, ?)",
            to_micros(after.created_at),
            after.saga_id,
        )
    conditions.clauses.extend(plan.residual.clauses)
    conditions.params.extend(plan.residual.params)
    columns = {
        "keys": f"{alias}.created_at AS created_at, {alias}.saga_id AS saga_id",
        "state": "s.state AS state",
        "one": "1",
    }[selecting]
    source = f"sagas AS s INDEXED BY {plan.index}"
    if plan.by_label:
        source = f"saga_labels AS l INDEXED BY {plan.index}"
        if plan.residual.clauses or selecting == "state":
            source += " CROSS JOIN sagas AS s ON s.saga_id = l.saga_id"
    where_sql = f"WHERE {' AND '.join(conditions.clauses)}" if conditions.clauses else ""
    return f"SELECT {columns} FROM {source} {where_sql}", conditions.params
