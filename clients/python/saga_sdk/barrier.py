"""The idempotency barrier: applies each Execute and Compensate once, in the business transaction.

A participant receives every call at least once, and a Compensate may arrive before (or
instead of) its Execute. The barrier, stored in the participant's own database, makes that safe.
For each call it opens a transaction, records the call's `request_id` in a barrier table and
runs the business effect on the SAME connection, so that the barrier row and the business
writes commit or roll back together:

- a repeated call (same request_id) does not run the effect again; it answers what the first
  call answered: its output, or its rejection;
- a Compensate whose Execute never took effect runs no effect and answers OK (a null
  compensation); it leaves a marker under the Execute's request_id, so that an Execute arriving
  later is refused (`ExecuteAfterCompensate`) and applies nothing (no hanging resource);
- concurrent duplicates wait on the database's lock for the first to finish and then replay it;
- a `Rejected` or `PermanentFailure` Execute rolls its own writes back and its answer is
  remembered: a duplicate gets the same answer without running the effect;
- a `Rejected` or `PermanentFailure` Compensate rolls everything back and is not remembered:
  nothing was undone, and the same compensation sent again (an operator resuming the saga once
  the cause is fixed) runs afresh;
- `RetryLater`, and any other exception, rolls everything back and leaves no barrier row: the
  retry runs afresh (a stored "retry later" would answer "retry later" forever).

Backends: `saga_sdk.sqlite_barrier.SqliteBarrier` (stdlib sqlite3),
`saga_sdk.postgres_barrier.PostgresBarrier` (psycopg 3) and
`saga_sdk.sqlalchemy_barrier.SqlAlchemyBarrier` (a SQLAlchemy session factory). Each creates
its table when missing. To join a connection or transaction of your own instead (a sqlite3 or
psycopg connection, a SQLAlchemy session), see `saga_sdk.transaction.run_in`.

Rows of calls older than a retention window can be deleted with `prune` (and the
`saga-barrier prune` command); see `saga_sdk.retention` for the rule that keeps that safe.

Used by `saga_sdk.participant.Participant`, or on its own::

    outcome = barrier.run(BarrierKey.for_execute(request), lambda tx: debit(tx, request))
    return ExecuteResponse(output=outcome.output)

`run` takes the effect as a function rather than offering a `with` block because a replayed
call must skip the effect, and the body of a `with` block cannot be skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

from saga.v1 import participant_service_pb2

from saga_sdk.errors import ExecuteAfterCompensate, PermanentFailure, Rejected

SyncEffect = Callable[[Any], bytes]
"""A business effect: gets the barrier's open connection, writes on it, returns the output."""
AsyncEffect = Callable[[Any], Awaitable[bytes]]
"""The asyncio form of `SyncEffect`."""

DEFAULT_TABLE = "saga_barrier"

# Barrier row states. PENDING is only ever seen inside the transaction that wrote it.
PENDING = "pending"
DONE = "done"
REJECTED = "rejected"
BLOCKED = "blocked"
"""The marker a null compensation leaves under its Execute's request_id."""
FAILED = "failed"
"""An Execute answered with `PermanentFailure`."""
STATES = (PENDING, DONE, REJECTED, BLOCKED, FAILED)

_EFFECT_SAVEPOINT = "saga_barrier_effect"


class Operation(StrEnum):
    """Which call of the contract a barrier row records."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


@dataclass(frozen=True)
class BarrierKey:
    """Identifies one call: the saga, the step, the operation and its request_id."""

    saga_id: str
    step: str
    operation: Operation
    request_id: str
    execute_request_id: str = ""
    """For a Compensate: the request_id of the Execute it undoes (required)."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must not be empty")
        if self.operation is Operation.COMPENSATE and not self.execute_request_id:
            raise ValueError("a Compensate's key needs the execute_request_id it undoes")

    @classmethod
    def for_execute(cls, request: participant_service_pb2.ExecuteRequest) -> BarrierKey:
        """The key of an ExecuteRequest."""
        return cls(
            saga_id=request.saga.removeprefix("sagas/"),
            step=request.step,
            operation=Operation.EXECUTE,
            request_id=request.request_id,
        )

    @classmethod
    def for_compensate(cls, request: participant_service_pb2.CompensateRequest) -> BarrierKey:
        """The key of a CompensateRequest."""
        return cls(
            saga_id=request.saga.removeprefix("sagas/"),
            step=request.step,
            operation=Operation.COMPENSATE,
            request_id=request.request_id,
            execute_request_id=request.execute_request_id,
        )

    def execute_key(self) -> BarrierKey:
        """For a Compensate: the key of the Execute it undoes."""
        return BarrierKey(self.saga_id, self.step, Operation.EXECUTE, self.execute_request_id)


class OutcomeKind(StrEnum):
    """How the barrier answered a call."""

    APPLIED = "applied"
    """The effect ran and committed now."""
    REPLAYED = "replayed"
    """A repeated call: the first answer, returned again without running the effect."""
    NULL_COMPENSATION = "null_compensation"
    """A Compensate whose Execute never took effect: nothing to undo, nothing ran."""


@dataclass(frozen=True)
class Outcome:
    """The barrier's successful answer to a call. A refusal is raised (`Rejected`,
    `PermanentFailure`)."""

    output: bytes
    kind: OutcomeKind


class Barrier(ABC):
    """An idempotency barrier over the participant's own database.

    `run` is for blocking effects (run it in a worker thread from asyncio code); `run_async` is
    for coroutine effects. Each gives the effect the connection whose transaction holds the
    barrier row: do the business writes on it and do not commit it. Both raise `Rejected` when
    the call was (or had been) rejected, and let any other exception of the effect through,
    after rolling everything back.
    """

    @abstractmethod
    def run(self, key: BarrierKey, effect: SyncEffect) -> Outcome:
        """Apply `effect` once for `key`, in one transaction with the barrier row."""

    @abstractmethod
    async def run_async(self, key: BarrierKey, effect: AsyncEffect) -> Outcome:
        """The asyncio twin of `run`, for an effect that is a coroutine function."""

    def prune(
        self,
        older_than: timedelta,
        *,
        dry_run: bool = False,
        ended: Callable[[list[str]], Iterable[str]] | None = None,
    ) -> int:
        """Delete the rows of calls first seen more than `older_than` ago; return how many
        (with `dry_run`, only count them). With `ended` (given saga ids, it returns those whose
        sagas have ended; `saga_sdk.retention.ended_on(client)` asks the coordinator), only the
        rows of those sagas. Refuses a window shorter than
        `saga_sdk.retention.MINIMUM_RETENTION`; see `saga_sdk.retention` for the rule."""
        raise NotImplementedError(f"{type(self).__name__} cannot prune")

    def close(self) -> None:  # noqa: B027 - a backend without resources has nothing to close
        """Release the backend's connections."""

    async def aclose(self) -> None:
        """Release the backend's connections, including those opened by `run_async`."""
        self.close()


@dataclass(frozen=True)
class StoredAnswer:
    """A barrier row as read back: its state and the answer it keeps."""

    state: str
    output: bytes | None
    reason: str
    message: str


@dataclass(frozen=True)
class BarrierSql:
    """The barrier's three statements for one table and one parameter style."""

    claim: str
    """Insert a row for a key unless one exists (a conflict inserts nothing)."""
    read: str
    record: str
    """Set the state and answer of an existing row."""

    @classmethod
    def build(cls, table: str, placeholder: str) -> BarrierSql:
        """Statements for `table` (a checked identifier) with `placeholder` ("?" or "%s")."""
        p = placeholder
        where = f"saga_id = {p} AND step = {p} AND operation = {p} AND request_id = {p}"
        return cls(
            claim=(
                f"INSERT INTO {table} (saga_id, step, operation, request_id, state) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT DO NOTHING"
            ),
            read=f"SELECT state, output, reason, message FROM {table} WHERE {where}",
            record=f"UPDATE {table} SET state = {p}, output = {p}, reason = {p}, message = {p} "
            f"WHERE {where}",
        )


def key_params(key: BarrierKey) -> tuple[str, str, str, str]:
    """The parameters that pick a key's row, in the statements' order."""
    return (key.saga_id, key.step, key.operation.value, key.request_id)


class SyncSession(Protocol):
    """One connection of a backend, as `run_guarded` drives it."""

    @property
    def connection(self) -> Any:
        """What the effect receives."""

    def begin(self) -> None:
        """Start the transaction, taking whatever lock the backend needs first."""

    def execute(self, sql: str, params: Sequence[object]) -> int:
        """Run a statement; return the number of rows it changed."""

    def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        """Run a query; return its first row."""

    def commit(self) -> None:
        """Commit the transaction."""

    def rollback(self) -> None:
        """Roll back the transaction, if one is open."""

    def savepoint(self) -> None:
        """Mark where the effect starts, so that a refusal undoes only the effect's writes."""

    def rollback_to_savepoint(self) -> None:
        """Undo what was written since `savepoint`."""

    def release_savepoint(self) -> None:
        """Keep what was written since `savepoint` (an ORM flushes its pending objects)."""


class SqlSavepoints:
    """`savepoint` and its two endings as SQL statements, for sessions over a DB-API driver."""

    def execute(self, sql: str, params: Sequence[object]) -> int:
        raise NotImplementedError

    def savepoint(self) -> None:
        self.execute(f"SAVEPOINT {_EFFECT_SAVEPOINT}", ())

    def rollback_to_savepoint(self) -> None:
        self.execute(f"ROLLBACK TO SAVEPOINT {_EFFECT_SAVEPOINT}", ())

    def release_savepoint(self) -> None:
        self.execute(f"RELEASE SAVEPOINT {_EFFECT_SAVEPOINT}", ())


class AsyncSession(Protocol):
    """The asyncio twin of `SyncSession`."""

    @property
    def connection(self) -> Any:
        """What the effect receives."""

    async def begin(self) -> None:
        """Start the transaction, taking whatever lock the backend needs first."""

    async def execute(self, sql: str, params: Sequence[object]) -> int:
        """Run a statement; return the number of rows it changed."""

    async def fetch(self, sql: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        """Run a query; return its first row."""

    async def commit(self) -> None:
        """Commit the transaction."""

    async def rollback(self) -> None:
        """Roll back the transaction, if one is open."""


def _answer(row: tuple[Any, ...] | None, key: BarrierKey) -> StoredAnswer:
    if row is None:
        raise RuntimeError(f"barrier row of {key} vanished inside its transaction")
    state, output, reason, message = row
    return StoredAnswer(state, None if output is None else bytes(output), reason, message)


def _replay(key: BarrierKey, answer: StoredAnswer) -> Outcome:
    if answer.state == DONE:
        return Outcome(answer.output or b"", OutcomeKind.REPLAYED)
    if answer.state == REJECTED:
        raise Rejected(answer.reason, answer.message)
    if answer.state == FAILED:
        raise PermanentFailure(answer.message, reason=answer.reason)
    if answer.state == BLOCKED and key.operation is Operation.EXECUTE:
        raise ExecuteAfterCompensate()
    if answer.state == BLOCKED:
        return Outcome(b"", OutcomeKind.REPLAYED)
    raise RuntimeError(f"barrier row of {key} is in unexpected state {answer.state!r}")


def _record(
    sql: BarrierSql,
    key: BarrierKey,
    state: str,
    output: bytes | None,
    reason: str = "",
    message: str = "",
) -> tuple[str, tuple[object, ...]]:
    return sql.record, (state, output, reason, message, *key_params(key))


def _refused_state(refusal: Rejected | PermanentFailure) -> str:
    return FAILED if isinstance(refusal, PermanentFailure) else REJECTED


def _check_output(output: object) -> bytes:
    if not isinstance(output, bytes):
        raise TypeError(f"a barrier effect must return bytes, not {type(output).__name__}")
    return output


def run_guarded(
    session: SyncSession, sql: BarrierSql, key: BarrierKey, effect: SyncEffect
) -> Outcome:
    """The barrier's rules over one blocking connection; see the module docstring."""
    session.begin()
    finished = False
    try:
        if not session.execute(sql.claim, (*key_params(key), PENDING)):
            # Another call with this request_id committed first (the claim waited for it).
            answer = _answer(session.fetch(sql.read, key_params(key)), key)
            session.rollback()
            finished = True
            return _replay(key, answer)
        if key.operation is Operation.COMPENSATE:
            execute = key.execute_key()
            # Claiming the Execute's key both detects an Execute that never arrived and, by
            # leaving the BLOCKED marker, refuses one that arrives later.
            never_arrived = session.execute(sql.claim, (*key_params(execute), BLOCKED)) == 1
            if (
                never_arrived
                or _answer(session.fetch(sql.read, key_params(execute)), key).state != DONE
            ):
                session.execute(*_record(sql, key, DONE, b""))
                session.commit()
                finished = True
                return Outcome(b"", OutcomeKind.NULL_COMPENSATION)
        # A savepoint, so that a refusal undoes the effect's writes but keeps the barrier row.
        session.savepoint()
        try:
            output = _check_output(effect(session.connection))
        except (Rejected, PermanentFailure) as refused:
            if key.operation is Operation.COMPENSATE:
                raise  # rolled back whole below: a "no" to undoing is not remembered
            session.rollback_to_savepoint()
            state = _refused_state(refused)
            session.execute(*_record(sql, key, state, None, refused.reason, refused.message))
            session.commit()
            finished = True
            raise
        session.release_savepoint()
        session.execute(*_record(sql, key, DONE, output))
        session.commit()
        finished = True
        return Outcome(output, OutcomeKind.APPLIED)
    finally:
        if not finished:
            session.rollback()


async def run_guarded_async(
    session: AsyncSession, sql: BarrierSql, key: BarrierKey, effect: AsyncEffect
) -> Outcome:
    """The asyncio twin of `run_guarded`."""
    await session.begin()
    finished = False
    try:
        if not await session.execute(sql.claim, (*key_params(key), PENDING)):
            answer = _answer(await session.fetch(sql.read, key_params(key)), key)
            await session.rollback()
            finished = True
            return _replay(key, answer)
        if key.operation is Operation.COMPENSATE:
            execute = key.execute_key()
            never_arrived = await session.execute(sql.claim, (*key_params(execute), BLOCKED)) == 1
            if (
                never_arrived
                or _answer(await session.fetch(sql.read, key_params(execute)), key).state != DONE
            ):
                await session.execute(*_record(sql, key, DONE, b""))
                await session.commit()
                finished = True
                return Outcome(b"", OutcomeKind.NULL_COMPENSATION)
        await session.execute(f"SAVEPOINT {_EFFECT_SAVEPOINT}", ())
        try:
            output = _check_output(await effect(session.connection))
        except (Rejected, PermanentFailure) as refused:
            if key.operation is Operation.COMPENSATE:
                raise  # rolled back whole below: a "no" to undoing is not remembered
            await session.execute(f"ROLLBACK TO SAVEPOINT {_EFFECT_SAVEPOINT}", ())
            state = _refused_state(refused)
            await session.execute(*_record(sql, key, state, None, refused.reason, refused.message))
            await session.commit()
            finished = True
            raise
        await session.execute(*_record(sql, key, DONE, output))
        await session.commit()
        finished = True
        return Outcome(output, OutcomeKind.APPLIED)
    finally:
        if not finished:
            await session.rollback()
