"""Listing and counting filters as SQL: which index a query reads, and what it checks on the way.

A listing is ordered by (created_at, saga_id) and resumes after a cursor. Every index a listing
reads ends in (created_at, saga_id) after an equality prefix, so each range it reads is already
in that order and stops after a page: the cost of a page does not grow with the store. One
condition drives (its index is read); the others are checked on the rows read:

1. a stuck-on filter: the partial indexes of unended sagas by waiting step or participant;
2. a label: ``saga_labels_by_value``, which carries the saga's creation time;
3. a definition or states, whichever holds fewer sagas (``saga_counts`` knows exactly): one
   range per (definition, version) or per state, merged in order (a name without a version
   merges its versions' ranges);
4. otherwise the creation order itself.

Ranges that ``saga_counts`` says are empty are not read at all. Counts of sagas by definition,
version and state are read from ``saga_counts`` alone; other counts read the driving index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.core.model import SagaState
from coordinator.ports import ListCursor, SagaFilter
from coordinator.store.packing import to_micros
from coordinator.store.sqlite_rows import SAGA_FIELDS

CountRow = tuple[str, int, str, int]
"""A row of ``saga_counts``: definition name, version, state, how many sagas."""

_SELECT_COUNTS = (
    "SELECT definition_name, definition_version, state, total FROM saga_counts WHERE total > 0"
)
_SAGA_COLUMNS = ", ".join(f"s.{name}" for name in SAGA_FIELDS)


def read_counts(connection: sqlite3.Connection) -> list[CountRow]:
    """Every non-empty (definition, version, state) and its number of sagas."""
    return connection.execute(_SELECT_COUNTS).fetchall()


@dataclass
class _Sql:
    """Conditions joined by AND, with their parameters in order."""

    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def where(self) -> str:
        return f"WHERE {' AND '.join(self.clauses)}" if self.clauses else ""


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
        return self.index == "saga_labels_by_value"


def only_counted(where: SagaFilter) -> bool:
    """Whether ``saga_counts`` alone answers counts for this filter."""
    return not (
        where.labels
        or where.created_after is not None
        or where.created_before is not None
        or where.stuck_on_participant is not None
        or where.stuck_on_step is not None
    )


def counted(counts: Sequence[CountRow], where: SagaFilter) -> dict[SagaState, int]:
    """Sagas per state of a filter that ``only_counted`` accepts (``where.states`` ignored)."""
    totals: dict[SagaState, int] = {}
    for name, version, state, total in counts:
        if where.definition is not None and name != where.definition:
            continue
        if where.definition_version is not None and version != where.definition_version:
            continue
        totals[SagaState(state)] = totals.get(SagaState(state), 0) + total
    return totals


def list_query(
    where: SagaFilter, counts: Sequence[CountRow], limit: int, after: ListCursor | None
) -> tuple[str, list[Any]] | None:
    """The query of one page (``limit`` + 1 rows of ``SAGA_FIELDS``), or None if nothing can
    match."""
    plan = _plan(where, counts)
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


def count_query(where: SagaFilter, counts: Sequence[CountRow]) -> tuple[str, list[Any]] | None:
    """The query counting the sagas of ``where`` (one row, one column), or None for none."""
    return _counting(where, counts, "one", "SELECT count(*) FROM ({rows})")


def count_by_state_query(
    where: SagaFilter, counts: Sequence[CountRow]
) -> tuple[str, list[Any]] | None:
    """The query counting the sagas of ``where`` per state (``where.states`` ignored), as rows
    of (state, count), or None for none."""
    unfiltered = SagaFilter(
        definition=where.definition,
        definition_version=where.definition_version,
        labels=where.labels,
        created_after=where.created_after,
        created_before=where.created_before,
        stuck_on_participant=where.stuck_on_participant,
        stuck_on_step=where.stuck_on_step,
    )
    return _counting(
        unfiltered, counts, "state", "SELECT state, count(*) FROM ({rows}) GROUP BY state"
    )


def _counting(
    where: SagaFilter, counts: Sequence[CountRow], selecting: str, template: str
) -> tuple[str, list[Any]] | None:
    plan = _plan(where, counts)
    if not plan.branches:
        return None
    params: list[Any] = []
    parts = []
    for branch in plan.branches:
        sql, branch_params = _branch(plan, branch, where, None, selecting)
        parts.append(sql)
        params.extend(branch_params)
    return template.format(rows=" UNION ALL ".join(parts)), params


def _plan(where: SagaFilter, counts: Sequence[CountRow]) -> _Plan:
    residual = _Sql()
    if where.stuck_on_step is not None:
        if where.stuck_on_participant is not None:
            residual.add("s.waiting_participant = ?", where.stuck_on_participant)
        driver = _Plan(
            "sagas_waiting_on_step", ((("waiting_step", where.stuck_on_step),),), residual
        )
        _check_definition_and_states(residual, where)
        _check_labels(residual, where.labels)
        return driver
    if where.stuck_on_participant is not None:
        driver = _Plan(
            "sagas_waiting_on_participant",
            ((("waiting_participant", where.stuck_on_participant),),),
            residual,
        )
        _check_definition_and_states(residual, where)
        _check_labels(residual, where.labels)
        return driver
    if where.labels:
        (key, value), *others = where.labels
        _check_definition_and_states(residual, where)
        _check_labels(residual, others)
        return _Plan("saga_labels_by_value", ((("key", key), ("value", value)),), residual)
    return _by_definition_or_state(where, counts, residual)


def _by_definition_or_state(where: SagaFilter, counts: Sequence[CountRow], residual: _Sql) -> _Plan:
    def of_definition(row: CountRow) -> bool:
        return (where.definition is None or row[0] == where.definition) and (
            where.definition_version is None or row[1] == where.definition_version
        )

    states = {state.value for state in where.states}
    by_definition: list[CountRow] = []
    if where.definition is not None:
        by_definition = [row for row in counts if of_definition(row)]
    by_state: list[CountRow] = []
    if states:
        by_state = [row for row in counts if row[2] in states]
    if where.definition is not None and (not states or _total(by_definition) <= _total(by_state)):
        versions = sorted({version for _, version, _, _ in by_definition})
        if states:
            residual.add(_in("s.state", states), *sorted(states))
        return _Plan(
            "sagas_by_definition",
            tuple(
                (("definition_name", where.definition), ("definition_version", version))
                for version in versions
            ),
            residual,
        )
    if states:
        if where.definition is not None:
            residual.add("s.definition_name = ?", where.definition)
        if where.definition_version is not None:
            residual.add("s.definition_version = ?", where.definition_version)
        present = sorted({row[2] for row in by_state})
        return _Plan("sagas_by_state", tuple((("state", state),) for state in present), residual)
    if where.definition_version is not None:
        residual.add("s.definition_version = ?", where.definition_version)
    return _Plan("sagas_by_creation", ((),), residual)


def _total(rows: Sequence[CountRow]) -> int:
    return sum(row[3] for row in rows)


def _check_definition_and_states(residual: _Sql, where: SagaFilter) -> None:
    if where.states:
        states = sorted(state.value for state in where.states)
        residual.add(_in("s.state", states), *states)
    if where.definition is not None:
        residual.add("s.definition_name = ?", where.definition)
    if where.definition_version is not None:
        residual.add("s.definition_version = ?", where.definition_version)


def _check_labels(residual: _Sql, labels: Sequence[tuple[str, str]]) -> None:
    for key, value in labels:
        residual.add(
            "EXISTS (SELECT 1 FROM saga_labels AS x"
            " WHERE x.saga_id = s.saga_id AND x.key = ? AND x.value = ?)",
            key,
            value,
        )


def _in(column: str, values: Sequence[str] | set[str]) -> str:
    return f"{column} IN ({', '.join('?' for _ in values)})"


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
    return f"SELECT {columns} FROM {source} {conditions.where()}", conditions.params
