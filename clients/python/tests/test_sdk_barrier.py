"""The idempotency barrier's contract, run against SQLite files and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_sdk import ExecuteAfterCompensate, PermanentFailure, Rejected, RetryLater
from saga_sdk.barrier import Barrier, BarrierKey, Operation, OutcomeKind
from saga_sdk.postgres_barrier import PostgresBarrier
from saga_sdk.sqlite_barrier import SqliteBarrier


def execute_key(saga: str = "", request_id: str = "") -> BarrierKey:
    return BarrierKey(
        saga or uuid.uuid4().hex, "open-account", Operation.EXECUTE, request_id or uuid.uuid4().hex
    )


def compensate_key(execute: BarrierKey) -> BarrierKey:
    return BarrierKey(
        execute.saga_id, execute.step, Operation.COMPENSATE, uuid.uuid4().hex, execute.request_id
    )


class BarrierContract(ABC):
    """What every barrier backend does. A subclass says how to build one and reach its db.

    The business effect of every test is a row in the `effects` table, written on the
    connection the barrier hands over; counting those rows counts the effects that committed.
    """

    @abstractmethod
    def new_barrier(self) -> Barrier:
        """Another barrier over the same database (as a restarted participant would have)."""

    @abstractmethod
    def write(self, tx: Any, what: str) -> None:
        """Write one business effect on the barrier's blocking connection."""

    @abstractmethod
    async def write_async(self, tx: Any, what: str) -> None:
        """Write one business effect on the connection given to a coroutine effect."""

    @abstractmethod
    def effects(self) -> list[str]:
        """The committed effects, oldest first."""

    def effect(self, what: str, output: bytes = b"") -> Any:
        def apply(tx: Any) -> bytes:
            self.write(tx, what)
            return output or f"{what}:{uuid.uuid4()}".encode()

        return apply

    def never(self, tx: Any) -> bytes:
        raise AssertionError("the barrier ran an effect it must not run")

    # --- duplicates ---------------------------------------------------------------------------

    def test_a_repeated_execute_applies_once_and_answers_the_first_output(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()
        first = barrier.run(key, self.effect("debit"))
        again = barrier.run(key, self.effect("debit"))
        after_restart = self.new_barrier().run(key, self.never)

        assert first.kind is OutcomeKind.APPLIED
        assert again.kind is OutcomeKind.REPLAYED
        assert again.output == first.output == after_restart.output
        assert self.effects() == ["debit"]

    def test_a_repeated_compensate_undoes_once(self, barrier: Barrier) -> None:
        execute = execute_key()
        barrier.run(execute, self.effect("debit"))
        compensate = compensate_key(execute)
        first = barrier.run(compensate, self.effect("refund", b""))
        again = barrier.run(compensate, self.never)

        assert (first.kind, again.kind) == (OutcomeKind.APPLIED, OutcomeKind.REPLAYED)
        assert self.effects() == ["debit", "refund"]

    def test_an_empty_output_is_replayed_as_empty(self, barrier: Barrier) -> None:
        key = execute_key()
        barrier.run(key, lambda tx: b"")

        assert barrier.run(key, self.never).output == b""

    # --- null compensation and hanging --------------------------------------------------------

    def test_compensate_before_execute_is_null_and_the_late_execute_is_refused(
        self, barrier: Barrier
    ) -> None:
        execute = execute_key()
        compensate = compensate_key(execute)

        null = barrier.run(compensate, self.never)
        with pytest.raises(ExecuteAfterCompensate) as late:
            barrier.run(execute, self.effect("debit"))
        with pytest.raises(ExecuteAfterCompensate):
            self.new_barrier().run(execute, self.effect("debit"))
        replay = barrier.run(compensate, self.never)

        assert null.kind is OutcomeKind.NULL_COMPENSATION
        assert null.output == b""
        assert late.value.reason == "EXECUTE_AFTER_COMPENSATE"
        assert replay.kind is OutcomeKind.REPLAYED
        assert self.effects() == []

    def test_compensating_a_rejected_execute_is_null(self, barrier: Barrier) -> None:
        execute = execute_key()

        def refuse(tx: Any) -> bytes:
            raise Rejected("INSUFFICIENT_FUNDS", "balance too low")

        with pytest.raises(Rejected):
            barrier.run(execute, refuse)
        outcome = barrier.run(compensate_key(execute), self.never)

        assert outcome.kind is OutcomeKind.NULL_COMPENSATION
        assert self.effects() == []

    def test_another_step_or_saga_with_the_same_request_id_is_another_call(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()
        barrier.run(key, self.effect("a"))
        other_saga = BarrierKey("other", key.step, key.operation, key.request_id)
        barrier.run(other_saga, self.effect("b"))

        assert self.effects() == ["a", "b"]

    # --- rejections and failures --------------------------------------------------------------

    def test_a_rejection_undoes_its_writes_and_is_replayed(self, barrier: Barrier) -> None:
        key = execute_key()

        def write_then_refuse(tx: Any) -> bytes:
            self.write(tx, "half-done")
            raise Rejected("CARD_BLOCKED", "the card is blocked")

        with pytest.raises(Rejected) as first:
            barrier.run(key, write_then_refuse)
        with pytest.raises(Rejected) as again:
            self.new_barrier().run(key, self.effect("debit"))

        assert (first.value.reason, first.value.message) == ("CARD_BLOCKED", "the card is blocked")
        assert (again.value.reason, again.value.message) == ("CARD_BLOCKED", "the card is blocked")
        assert self.effects() == []

    def test_a_rejected_compensation_is_not_remembered_and_runs_again_when_resent(
        self, barrier: Barrier
    ) -> None:
        execute = execute_key()
        compensate = compensate_key(execute)
        barrier.run(execute, self.effect("debit"))

        def write_then_refuse(tx: Any) -> bytes:
            self.write(tx, "half-undone")
            raise Rejected("LEDGER_LOCKED", "the ledger is locked")

        with pytest.raises(Rejected) as refused:
            barrier.run(compensate, write_then_refuse)
        # Once the cause is fixed, the same compensation (same request_id) is applied.
        undone = self.new_barrier().run(compensate, self.effect("refund"))
        again = barrier.run(compensate, self.never)

        assert refused.value.reason == "LEDGER_LOCKED"
        assert undone.kind is OutcomeKind.APPLIED
        assert again.kind is OutcomeKind.REPLAYED
        assert self.effects() == ["debit", "refund"]

    def test_a_permanent_failure_undoes_its_writes_and_is_replayed_without_running(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()

        def write_then_give_up(tx: Any) -> bytes:
            self.write(tx, "half-done")
            raise PermanentFailure("no such currency", reason="CURRENCY_UNSUPPORTED")

        with pytest.raises(PermanentFailure):
            barrier.run(key, write_then_give_up)
        with pytest.raises(PermanentFailure) as again:
            self.new_barrier().run(key, self.never)
        compensated = barrier.run(compensate_key(key), self.never)

        assert (again.value.reason, again.value.message) == (
            "CURRENCY_UNSUPPORTED",
            "no such currency",
        )
        assert compensated.kind is OutcomeKind.NULL_COMPENSATION
        assert self.effects() == []

    def test_retry_later_stores_nothing_so_the_retry_runs_the_effect(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()

        def write_then_later(tx: Any) -> bytes:
            self.write(tx, "half-done")
            raise RetryLater("ledger busy", retry_after=timedelta(seconds=5))

        with pytest.raises(RetryLater):
            barrier.run(key, write_then_later)
        retried = barrier.run(key, self.effect("debit"))

        assert retried.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit"]

    def test_a_permanently_failed_compensation_is_not_remembered(self, barrier: Barrier) -> None:
        execute = execute_key()
        compensate = compensate_key(execute)
        barrier.run(execute, self.effect("debit"))

        def give_up(tx: Any) -> bytes:
            self.write(tx, "half-undone")
            raise PermanentFailure("refunds are closed", reason="REFUNDS_CLOSED")

        with pytest.raises(PermanentFailure):
            barrier.run(compensate, give_up)
        undone = barrier.run(compensate, self.effect("refund"))

        assert undone.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit", "refund"]

    async def test_async_refusals_are_stored_like_blocking_ones(self, barrier: Barrier) -> None:
        failed, later = execute_key(), execute_key()

        async def give_up(tx: Any) -> bytes:
            await self.write_async(tx, "half-done")
            raise PermanentFailure("never", reason="NEVER")

        async def not_now(tx: Any) -> bytes:
            await self.write_async(tx, "half-done")
            raise RetryLater("soon", retry_after=timedelta(seconds=1))

        with pytest.raises(PermanentFailure):
            await barrier.run_async(failed, give_up)
        with pytest.raises(PermanentFailure):
            await barrier.run_async(failed, self._async_effect("debit"))
        with pytest.raises(RetryLater):
            await barrier.run_async(later, not_now)
        applied = await barrier.run_async(later, self._async_effect("debit"))

        assert applied.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit"]

    def test_an_unexpected_error_rolls_everything_back_and_a_retry_runs_again(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()

        def write_then_crash(tx: Any) -> bytes:
            self.write(tx, "half-done")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            barrier.run(key, write_then_crash)
        retried = barrier.run(key, self.effect("debit"))

        assert retried.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit"]

    def test_an_effect_that_returns_no_bytes_is_rolled_back(self, barrier: Barrier) -> None:
        key = execute_key()

        def wrong(tx: Any) -> Any:
            self.write(tx, "x")
            return "not bytes"

        with pytest.raises(TypeError, match="bytes"):
            barrier.run(key, wrong)

        assert self.effects() == []

    # --- concurrency --------------------------------------------------------------------------

    def test_concurrent_duplicates_in_threads_apply_once_and_share_the_answer(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()
        start = threading.Barrier(8)
        outputs: list[bytes] = []
        kinds: list[OutcomeKind] = []
        errors: list[BaseException] = []

        def slow(tx: Any) -> bytes:
            self.write(tx, "debit")
            time.sleep(0.2)  # hold the transaction while the duplicates arrive
            return uuid.uuid4().bytes

        def call() -> None:
            try:
                start.wait()
                outcome = barrier.run(key, slow)
                outputs.append(outcome.output)
                kinds.append(outcome.kind)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert errors == []
        assert len(set(outputs)) == 1
        assert sorted(kinds) == [OutcomeKind.APPLIED] + [OutcomeKind.REPLAYED] * 7
        assert self.effects() == ["debit"]

    async def test_concurrent_duplicates_as_tasks_apply_once(self, barrier: Barrier) -> None:
        key = execute_key()

        async def slow(tx: Any) -> bytes:
            await self.write_async(tx, "debit")
            await asyncio.sleep(0.2)
            return uuid.uuid4().bytes

        outcomes = await asyncio.gather(*(barrier.run_async(key, slow) for _ in range(8)))

        assert len({o.output for o in outcomes}) == 1
        assert [o.kind for o in outcomes].count(OutcomeKind.APPLIED) == 1
        assert self.effects() == ["debit"]

    def test_when_the_first_of_concurrent_duplicates_fails_exactly_one_other_applies(
        self, barrier: Barrier
    ) -> None:
        key = execute_key()
        start = threading.Barrier(4)
        attempts = itertools.count()
        answers: list[bytes | str] = []

        def first_fails(tx: Any) -> bytes:
            self.write(tx, "debit")
            time.sleep(0.1)
            if next(attempts) == 0:
                raise RuntimeError("first attempt crashes")
            return uuid.uuid4().bytes

        def call() -> None:
            start.wait()
            try:
                answers.append(barrier.run(key, first_fails).output)
            except RuntimeError as exc:
                answers.append(str(exc))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert answers.count("first attempt crashes") == 1
        assert len({a for a in answers if isinstance(a, bytes)}) == 1
        assert self.effects() == ["debit"]

    # Every backend's subclass runs this one method (hence differing_executors), and every
    # example uses a saga of its own (hence the shared function-scoped fixture is safe).
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(deliveries=st.lists(st.sampled_from("EC"), min_size=1, max_size=6))
    def test_any_order_of_repeated_deliveries_applies_like_the_contract_says(
        self, barrier: Barrier, deliveries: list[str]
    ) -> None:
        # Each example uses its own saga, so examples sharing the fixture do not interfere.
        execute = execute_key()
        compensate = compensate_key(execute)
        tag = execute.saga_id
        executed = compensated = blocked = False
        expected: list[str] = []
        outputs: set[bytes] = set()
        for delivery in deliveries:
            if delivery == "E":
                if blocked:
                    with pytest.raises(ExecuteAfterCompensate):
                        barrier.run(execute, self.effect(f"{tag}:E"))
                    continue
                outputs.add(barrier.run(execute, self.effect(f"{tag}:E")).output)
                if not executed:
                    expected.append(f"{tag}:E")
                executed = True
            else:
                barrier.run(compensate, self.effect(f"{tag}:C", b"-"))
                if not compensated:
                    if executed:
                        expected.append(f"{tag}:C")
                    else:
                        blocked = True
                compensated = True

        assert [e for e in self.effects() if e.startswith(tag)] == expected
        assert len(outputs) <= 1

    def test_a_compensate_arriving_while_its_execute_runs_waits_and_undoes_it(
        self, barrier: Barrier
    ) -> None:
        execute = execute_key()
        running = threading.Event()

        def slow_debit(tx: Any) -> bytes:
            self.write(tx, "debit")
            running.set()
            time.sleep(0.3)
            return b"debited"

        worker = threading.Thread(target=barrier.run, args=(execute, slow_debit))
        worker.start()
        assert running.wait(10)
        outcome = self.new_barrier().run(compensate_key(execute), self.effect("refund"))
        worker.join(10)

        assert outcome.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit", "refund"]

    # --- coroutine effects --------------------------------------------------------------------

    async def test_async_effects_follow_the_same_rules(self, barrier: Barrier) -> None:
        execute = execute_key()

        async def debit(tx: Any) -> bytes:
            await self.write_async(tx, "debit")
            return b"out"

        async def refuse(tx: Any) -> bytes:
            await self.write_async(tx, "half-done")
            raise Rejected("NO", "no")

        async def crash(tx: Any) -> bytes:
            await self.write_async(tx, "half-done")
            raise RuntimeError("boom")

        async def never(tx: Any) -> bytes:
            raise AssertionError("must not run")

        with pytest.raises(RuntimeError):
            await barrier.run_async(execute, crash)
        first = await barrier.run_async(execute, debit)
        again = await barrier.run_async(execute, never)
        refused = execute_key()
        with pytest.raises(Rejected):
            await barrier.run_async(refused, refuse)
        with pytest.raises(Rejected):
            await barrier.run_async(refused, debit)
        hanging = execute_key()
        null = await barrier.run_async(compensate_key(hanging), never)
        with pytest.raises(ExecuteAfterCompensate):
            await barrier.run_async(hanging, debit)

        assert (first.kind, again.kind, again.output) == (
            OutcomeKind.APPLIED,
            OutcomeKind.REPLAYED,
            b"out",
        )
        assert null.kind is OutcomeKind.NULL_COMPENSATION
        assert self.effects() == ["debit"]

    async def test_a_cancelled_async_effect_leaves_nothing(self, barrier: Barrier) -> None:
        key = execute_key()
        written = asyncio.Event()

        async def stuck(tx: Any) -> bytes:
            await self.write_async(tx, "half-done")
            written.set()
            await asyncio.sleep(30)
            return b""

        task = asyncio.create_task(barrier.run_async(key, stuck))
        await asyncio.wait_for(written.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        retried = await barrier.run_async(key, self._async_effect("debit"))

        assert retried.kind is OutcomeKind.APPLIED
        assert self.effects() == ["debit"]

    def _async_effect(self, what: str) -> Any:
        async def apply(tx: Any) -> bytes:
            await self.write_async(tx, what)
            return what.encode()

        return apply


def test_a_compensate_key_needs_the_execute_request_id() -> None:
    with pytest.raises(ValueError, match="execute_request_id"):
        BarrierKey("s", "step", Operation.COMPENSATE, "r")
    with pytest.raises(ValueError, match="request_id"):
        BarrierKey("s", "step", Operation.EXECUTE, "")


def test_the_table_name_must_be_a_plain_identifier(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identifier"):
        SqliteBarrier(tmp_path / "x.db", table="barrier; DROP TABLE x")


class TestSqliteBarrier(BarrierContract):
    @pytest.fixture
    def barrier(self, tmp_path: Path) -> Iterator[Barrier]:
        self.path = tmp_path / "participant.db"
        barrier = SqliteBarrier(self.path)
        with barrier.connect() as connection:
            connection.execute("CREATE TABLE effects (id INTEGER PRIMARY KEY, what TEXT)")
        yield barrier
        barrier.close()

    def new_barrier(self) -> Barrier:
        return SqliteBarrier(self.path)

    def write(self, tx: Any, what: str) -> None:
        assert isinstance(tx, sqlite3.Connection)
        tx.execute("INSERT INTO effects (what) VALUES (?)", (what,))

    async def write_async(self, tx: Any, what: str) -> None:
        self.write(tx, what)

    def effects(self) -> list[str]:
        with sqlite3.connect(self.path) as connection:
            return [r[0] for r in connection.execute("SELECT what FROM effects ORDER BY id")]

    def test_the_database_is_in_wal_mode_with_the_barrier_table(self, barrier: Barrier) -> None:
        with sqlite3.connect(self.path) as connection:
            mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
            tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}

        assert mode == "wal"
        assert "saga_barrier" in tables


class TestPostgresBarrier(BarrierContract):
    @pytest.fixture
    async def barrier(self, postgres_url: str) -> AsyncIterator[Barrier]:
        self.url = postgres_url
        self.opened: list[Barrier] = []
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute("CREATE TABLE effects (id SERIAL PRIMARY KEY, what TEXT)")
        barrier = self.new_barrier()
        yield barrier
        for opened in self.opened:
            await opened.aclose()

    def new_barrier(self) -> Barrier:
        barrier = PostgresBarrier(self.url, max_size=12)
        self.opened.append(barrier)
        return barrier

    def write(self, tx: Any, what: str) -> None:
        assert isinstance(tx, psycopg.Connection)
        tx.execute("INSERT INTO effects (what) VALUES (%s)", (what,))

    async def write_async(self, tx: Any, what: str) -> None:
        assert isinstance(tx, psycopg.AsyncConnection)
        await tx.execute("INSERT INTO effects (what) VALUES (%s)", (what,))

    def effects(self) -> list[str]:
        with psycopg.connect(self.url) as connection:
            rows = connection.execute("SELECT what FROM effects ORDER BY id").fetchall()
        return [r[0] for r in rows]
