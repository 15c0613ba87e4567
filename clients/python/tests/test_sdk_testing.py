"""The handler test kit, on participants that are safe to retry and on ones that are not."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from saga_sdk import PermanentFailure, RetryLater
from saga_sdk.participant import CompensateContext, ExecuteContext, Participant
from saga_sdk.postgres_barrier import PostgresBarrier
from saga_sdk.sqlite_barrier import SqliteBarrier
from saga_sdk.testing import HandlerKit


def sqlite_accounts(database: Path, *, barrier: bool = True) -> Participant:
    """Opens an account per saga; with `barrier=False` it trusts every call (unsafe)."""
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE IF NOT EXISTS ledger (saga TEXT, what TEXT)")
    participant = Participant("accounts", barrier=SqliteBarrier(database) if barrier else None)

    def connection(ctx: ExecuteContext | CompensateContext) -> Any:
        return ctx.tx if barrier else sqlite3.connect(database, isolation_level=None)

    @participant.action("OpenAccount")
    def open_account(ctx: ExecuteContext) -> dict[str, str]:
        if ctx.input.get("currency") == "DOGE":
            raise PermanentFailure("no dogecoin accounts", reason="CURRENCY_UNSUPPORTED")
        if ctx.input.get("busy"):
            raise RetryLater("the ledger is busy", retry_after=timedelta(seconds=30))
        connection(ctx).execute("INSERT INTO ledger VALUES (?, 'open')", (ctx.saga_id,))
        return {"account": f"acc-{ctx.saga_id}"}

    @participant.compensation("CloseAccount")
    def close_account(ctx: CompensateContext) -> None:
        connection(ctx).execute("INSERT INTO ledger VALUES (?, 'close')", (ctx.saga_id,))

    return participant


def ledger_of(database: Path) -> Any:
    def state(saga_id: str) -> list[str]:
        with sqlite3.connect(database) as db:
            rows = db.execute("SELECT what FROM ledger WHERE saga = ? ORDER BY rowid", (saga_id,))
            return [r[0] for r in rows]

    return state


def test_a_participant_with_a_barrier_passes_every_scenario(tmp_path: Path) -> None:
    database = tmp_path / "accounts.db"
    with HandlerKit(sqlite_accounts(database)) as kit:
        findings = kit.check("OpenAccount", "CloseAccount", {}, state=ledger_of(database))
        kit.assert_safe("OpenAccount", "CloseAccount", {}, state=ledger_of(database))

    assert [(f.name, f.passed) for f in findings] == [
        ("retries-apply-once", True),
        ("compensation-applies-once", True),
        ("compensation-before-execution", True),
        ("concurrent-duplicates", True),
    ], findings


def test_a_participant_that_trusts_every_call_fails_with_reasons(tmp_path: Path) -> None:
    database = tmp_path / "accounts.db"
    with HandlerKit(sqlite_accounts(database, barrier=False)) as kit:
        findings = {
            f.name: f
            for f in kit.check("OpenAccount", "CloseAccount", {}, state=ledger_of(database))
        }
        with pytest.raises(AssertionError, match=r"retries-apply-once: .*changed the saga's state"):
            kit.assert_safe("OpenAccount", "CloseAccount", {}, state=ledger_of(database))

    assert not findings["retries-apply-once"].passed
    assert "the retries changed the saga's state again" in findings["retries-apply-once"].detail
    assert not findings["compensation-applies-once"].passed
    assert not findings["compensation-before-execution"].passed
    assert "hanging" in findings["compensation-before-execution"].detail
    assert not findings["concurrent-duplicates"].passed


def test_a_state_that_does_not_show_the_effect_is_reported(tmp_path: Path) -> None:
    database = tmp_path / "accounts.db"
    with HandlerKit(sqlite_accounts(database)) as kit:
        findings = kit.check("OpenAccount", "CloseAccount", {}, state=lambda saga_id: "same")

    assert "does not show this action's effect" in findings[0].detail


def test_single_calls_show_the_answers_the_coordinator_reads(tmp_path: Path) -> None:
    with HandlerKit(sqlite_accounts(tmp_path / "accounts.db")) as kit:
        opened = kit.execute("OpenAccount", {}, saga_id="acme")
        later = kit.execute("OpenAccount", {"busy": True})
        later_again = kit.retry(later)
        doge = kit.execute("OpenAccount", {"currency": "DOGE"})
        doge_again = kit.retry(doge)
        closed = kit.compensate(opened, "CloseAccount")

        assert kit.handler_calls(later) == 2  # a RetryLater is not stored: the retry runs again
        assert kit.handler_calls(doge) == 1  # a permanent failure is replayed

    assert opened.ok
    assert opened.json() == {"account": "acc-acme"}
    assert (later.code, later.reason, later.retry_after) == (
        grpc.StatusCode.UNAVAILABLE,
        "RETRY_LATER",
        timedelta(seconds=30),
    )
    assert later_again.code is grpc.StatusCode.UNAVAILABLE
    assert (doge.code, doge.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CURRENCY_UNSUPPORTED")
    assert (doge_again.code, doge_again.reason) == (doge.code, doge.reason)
    assert closed.ok


@pytest.fixture
async def postgres_participant(postgres_url: str) -> AsyncIterator[tuple[Participant, str]]:
    with psycopg.connect(postgres_url) as db:
        db.execute("CREATE TABLE ledger (id SERIAL PRIMARY KEY, saga TEXT, what TEXT)")
    barrier = PostgresBarrier(postgres_url, max_size=10)
    participant = Participant("accounts", barrier=barrier)

    @participant.action("OpenAccount")
    async def open_account(ctx: ExecuteContext) -> dict[str, str]:
        await ctx.tx.execute("INSERT INTO ledger (saga, what) VALUES (%s, 'open')", (ctx.saga_id,))
        return {"account": f"acc-{ctx.saga_id}"}

    @participant.compensation("CloseAccount")
    async def close_account(ctx: CompensateContext) -> None:
        await ctx.tx.execute("INSERT INTO ledger (saga, what) VALUES (%s, 'close')", (ctx.saga_id,))

    yield participant, postgres_url
    await barrier.aclose()


async def test_the_kit_checks_async_handlers_on_postgresql_from_an_asyncio_test(
    postgres_participant: tuple[Participant, str],
) -> None:
    participant, url = postgres_participant

    def state(saga_id: str) -> list[str]:
        with psycopg.connect(url) as db:
            rows = db.execute("SELECT what FROM ledger WHERE saga = %s ORDER BY id", (saga_id,))
            return [r[0] for r in rows]

    with HandlerKit(participant) as kit:
        findings = kit.check("OpenAccount", "CloseAccount", {}, state=state)

    assert all(f.passed for f in findings), findings
